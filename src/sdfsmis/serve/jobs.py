"""Background segmentation jobs: one at a time (the CPU is shared), with progress and cancel.

A job writes into ``results/<id>/`` of the workspace; ``predict`` writes every file under a temporary
name and renames it at the end, and a failed or cancelled job removes its folder, so no partial file
is ever left.
"""

from __future__ import annotations

import shutil
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError


class Cancelled(Exception):
    """Raised from the progress callback to stop a prediction."""


@dataclass
class Job:
    id: str
    scan: str  # workspace path of the query scan
    folder: Path
    labels: list[dict]
    state: str = "queued"  # queued | running | done | failed | cancelled
    done: int = 0
    total: int = 0
    error: str | None = None
    summary: dict | None = None
    created: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def public(self) -> dict[str, Any]:
        out = {"id": self.id, "scan": self.scan, "state": self.state, "done": self.done, "total": self.total,
               "progress": (self.done / self.total) if self.total else 0.0, "error": self.error,
               "labels": self.labels}
        if self.state == "done" and self.summary is not None:
            names = {int(x["id"]): x for x in self.labels}
            out["organs"] = [{"label": o["label"], "name": names.get(o["label"], {}).get("name", f"label {o['label']}"),
                              "colour": names.get(o["label"], {}).get("colour"),
                              "volume_ml": o["volume_ml"], "voxels": o["voxels"],
                              "slice_range": [o["slices"][0], o["slices"][-1]] if o["slices"] else None,
                              "n_slices": len(o["slices"])} for o in self.summary["organs"]]
            out["seconds"] = self.summary["seconds"]
            out["segmentation"] = f"/api/jobs/{self.id}/segmentation.nii.gz"
            out["summary"] = f"/api/jobs/{self.id}/segmentation.json"
        return out


@dataclass
class PredictOptions:
    checkpoint: str | None = None
    device: str = "cpu"
    batch_size: int = 16


def run_prediction(support_image: Path, support_mask: Path, query: Path, out: Path, options: PredictOptions,
                   callback: Any, models: Any = None) -> dict:
    """The app's one call into ``sdfsmis.predict.predict`` (the same path as ``sdfsmis predict``);
    ``models``: a ``sdfsmis.predict.ModelCache`` that keeps the model loaded between jobs."""
    from ..predict import predict

    result = predict(support_image, support_mask, query, out, checkpoint=options.checkpoint, device=options.device,
                     batch_size=options.batch_size, overlay=False, progress=False, progress_callback=callback,
                     models=models)
    return result.summary


class JobManager:
    def __init__(self, results: Path, options: PredictOptions, keep: int = 200):
        self.results = results
        self.options = options
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdfsmis-job")
        self.keep = keep
        self.models: Any = None  # the model, loaded by the first job and kept for the next ones

    def submit(self, scan: str, query: Path, labels: list[dict], support: Any) -> Job:
        """``support(folder) -> (support_image, support_mask)`` prepares the support inside the job."""
        job_id = uuid.uuid4().hex[:12]
        folder = self.results / job_id
        job = Job(id=job_id, scan=scan, folder=folder, labels=labels)
        with self.lock:
            self.jobs[job_id] = job
        self.pool.submit(self._run, job, query, support)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is not None and job.state in ("queued", "running"):
            job.cancel.set()
        return job

    def _run(self, job: Job, query: Path, support: Any) -> None:
        if job.cancel.is_set():
            job.state = "cancelled"
            return
        job.state = "running"

        def callback(done: int, total: int) -> None:
            job.done, job.total = done, total
            if job.cancel.is_set():
                raise Cancelled()

        job.folder.mkdir()
        ok = False
        try:
            image, mask = support(job.folder)
            if self.models is None:
                from ..predict import ModelCache

                self.models = ModelCache()
            job.summary = run_prediction(image, mask, query, job.folder / "segmentation.nii.gz", self.options,
                                         callback, models=self.models)
            job.state, ok = "done", True
        except Cancelled:
            job.state = "cancelled"
        except InputError as err:
            job.state, job.error = "failed", str(err)
        except Exception as err:  # the server keeps serving; the page shows the message
            traceback.print_exc()
            job.state, job.error = "failed", f"{type(err).__name__}: {err}"
        finally:
            if not ok:  # nothing of a failed or cancelled job is kept
                shutil.rmtree(job.folder, ignore_errors=True)

    def shutdown(self) -> None:
        for job in list(self.jobs.values()):
            job.cancel.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

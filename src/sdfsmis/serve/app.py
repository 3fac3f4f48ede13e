"""The FastAPI application behind ``sdfsmis serve``.

Every error is a JSON body ``{"error": "..."}`` with a 4xx status for bad requests (the same
messages the CLI prints for bad input), 5xx otherwise. See ``sdfsmis.serve`` for the safety rules.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import support_sets
from ..errors import InputError
from .jobs import JobManager, PredictOptions
from .workspace import SCAN_SUFFIXES, TooLarge, Workspace, move_into, safe_upload_name

STATIC = Path(__file__).resolve().parent / "static"
DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
COOKIE = "sdfsmis_token"


@dataclass
class ServeConfig:
    workspace: Path
    token: str | None = None  # required on every request when set
    max_upload_mb: float = 512.0
    checkpoint: str | None = None
    device: str = "cpu"
    batch_size: int = 16
    allowed_hosts: tuple[str, ...] | None = ("127.0.0.1", "localhost", "[::1]", "::1")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _Limits:
    """ASGI middleware: Host (loopback names only, against DNS rebinding), no cross-site writes (Origin),
    access token, body size limit (413 before anything is parsed or written)."""

    def __init__(self, app: Any, cfg: ServeConfig):
        self.app, self.cfg = app, cfg
        self.limit = int(cfg.max_upload_mb * 1024 * 1024)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.cfg.allowed_hosts is not None:
            host = headers.get("host", "").rsplit(":", 1)[0] if not headers.get("host", "").startswith("[") \
                else headers.get("host", "").split("]")[0] + "]"
            if host not in self.cfg.allowed_hosts:
                return await _error(400, f"host {host!r} not allowed")(scope, receive, send)
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD") and origin is not None \
                and origin.split("://", 1)[-1] != headers.get("host"):
            return await _error(403, "cross-site request refused")(scope, receive, send)  # another site's page
        if self.cfg.token is not None and not self._authorised(scope, headers):
            return await _error(401, "access token required (open the address printed by 'sdfsmis serve')")(
                scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error(413, f"upload is larger than the limit of {self.cfg.max_upload_mb:g} MB")(
                scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise TooLarge("request body")
            return message

        await self.app(scope, counted, send)

    def _authorised(self, scope: dict, headers: dict[str, str]) -> bool:
        token = self.cfg.token or ""
        given = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                given.append(value)
        from urllib.parse import parse_qs

        given += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        return any(secrets.compare_digest(g.encode(), token.encode()) for g in given)


def create_app(cfg: ServeConfig) -> FastAPI:
    ws = Workspace(cfg.workspace)
    jobs = JobManager(ws.root / "results", PredictOptions(cfg.checkpoint, cfg.device, cfg.batch_size))
    names = threading.Lock()  # choosing a free name and renaming into it
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        jobs.shutdown()  # cancels running jobs (their partial output is removed)

    app = FastAPI(title="sdfsmis", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.workspace, app.state.jobs = ws, jobs
    app.add_middleware(_Limits, cfg=cfg)
    limit = int(cfg.max_upload_mb * 1024 * 1024)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, err: InputError) -> JSONResponse:
        return _error(400, str(err))

    @app.exception_handler(TooLarge)
    async def _too_large(request: Request, err: TooLarge) -> JSONResponse:
        return _error(413, f"upload is larger than the limit of {cfg.max_upload_mb:g} MB")

    @app.get("/")
    def index(request: Request) -> Response:
        response = FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})
        token = request.query_params.get("token")
        if cfg.token is not None and token is not None:
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info() -> dict:
        from .. import __version__

        return {"version": __version__, "max_upload_mb": cfg.max_upload_mb, "demo": DEMO.is_dir(),
                "token_required": cfg.token is not None}

    @app.get("/api/scans")
    def scans() -> dict:
        return {"scans": ws.scans()}

    async def _form(request: Request):
        try:
            return await request.form(max_files=2, max_fields=20)
        except TooLarge:
            raise
        except Exception as err:  # malformed multipart body
            raise InputError(None, f"malformed form data ({err})") from None

    async def _receive(upload: Any, suffixes: tuple[str, ...]) -> tuple[str, Path]:
        if upload is None or not hasattr(upload, "read"):
            raise InputError(None, "no file in the request")
        name = safe_upload_name(upload.filename, suffixes)
        await upload.seek(0)
        return name, ws.receive(upload.file, name, limit)

    @app.post("/api/scans")
    async def upload_scan(request: Request) -> dict:
        from ..data.nifti import load_volume

        form = await _form(request)
        name, tmp = await _receive(form.get("file"), SCAN_SUFFIXES)
        try:
            try:
                load_volume(tmp, "image")
            except InputError as err:
                raise InputError(name, err.problem) from None
            with names:
                final = move_into(tmp, ws.unique(ws.root / "uploads", name))
        finally:
            tmp.unlink(missing_ok=True)
        return {"scan": ws.rel(final)}

    @app.post("/api/demo")
    def demo() -> dict:
        folder = ws.root / "demo"
        folder.mkdir(exist_ok=True)
        with names:
            for f in sorted(DEMO.glob("*.nii.gz")):
                if not (folder / f.name).exists():
                    tmp = ws.tmp / f".{f.name}.copy"
                    shutil.copyfile(f, tmp)
                    move_into(tmp, folder / f.name)
        return {"scans": [ws.rel(folder / f.name) for f in sorted(DEMO.glob("*image.nii.gz"))]}

    @app.get("/api/files/{path:path}")
    def file(path: str) -> Response:
        target = ws.resolve(path)
        if not target.name.endswith(SCAN_SUFFIXES):
            raise InputError(path, "only NIfTI files are served")
        return FileResponse(target, headers={"Cache-Control": "no-store"})

    def _labels(form: Any) -> list[dict] | None:
        text = form.get("labels")
        if text in (None, ""):
            return None
        try:
            value = json.loads(text)
        except ValueError:
            raise InputError(None, "labels must be JSON: [{\"id\": 1, \"name\": ..., \"colour\": \"#rrggbb\"}]") from None
        if not isinstance(value, list):
            raise InputError(None, "labels must be a JSON list")
        return value

    async def _annotation(form: Any, scan_path: Path) -> Path:
        """The drawn label volume, checked against the scan (same grid), as a temporary file."""
        from ..data.nifti import check_pair, load_volume

        upload = form.get("annotation")
        if upload is None or not hasattr(upload, "read"):
            raise InputError(None, "draw an organ on a slice first (no annotation was sent)")
        await upload.seek(0)
        head = await upload.read(2)
        await upload.seek(0)
        tmp = ws.receive(upload.file, "annotation" + (".nii.gz" if head == b"\x1f\x8b" else ".nii"), limit)
        try:
            try:
                mask = load_volume(tmp, "label")
                check_pair(load_volume(scan_path, "image"), mask, scan_path, tmp)
            except InputError as err:
                raise InputError("annotation", err.problem) from None
            if not (mask.array > 0).any():
                raise InputError("annotation", "nothing is drawn: outline an organ on a slice first")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    @app.post("/api/segment")
    async def segment(request: Request) -> dict:
        form = await _form(request)
        scan = str(form.get("scan") or "")
        query = ws.resolve(scan)
        given = _labels(form)
        set_name = form.get("support_set")
        if set_name:
            sset = support_sets.load(_set_path(str(set_name)))
            labels = [vars(x) for x in sset.labels]

            def support(folder: Path):
                return support_sets.materialise(sset, folder)
        else:
            tmp = await _annotation(form, query)
            import numpy as np
            import nibabel as nib

            present = [int(v) for v in np.unique(np.asanyarray(nib.load(str(tmp)).dataobj)) if v > 0]
            labels = [vars(x) for x in support_sets.label_infos(present, given)]

            def support(folder: Path):
                return query, move_into(tmp, folder / ("annotation" + ("".join(tmp.suffixes[-2:])
                                                                       if tmp.name.endswith(".gz") else ".nii")))
        return jobs.submit(scan, query, labels, support).public()

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str) -> Response:
        job = jobs.get(job_id)
        return _error(404, f"no job {job_id}") if job is None else JSONResponse(job.public())

    @app.post("/api/jobs/{job_id}/cancel")
    def job_cancel(job_id: str) -> Response:
        job = jobs.cancel(job_id)
        return _error(404, f"no job {job_id}") if job is None else JSONResponse(job.public())

    @app.get("/api/jobs/{job_id}/{name}")
    def job_file(job_id: str, name: str) -> Response:
        job = jobs.get(job_id)
        if job is None or job.state != "done" or name not in ("segmentation.nii.gz", "segmentation.json"):
            return _error(404, f"no {name} for job {job_id}")
        stem = Path(job.scan).name.split(".")[0]
        return FileResponse(job.folder / name, filename=f"{stem}_{name}", headers={"Cache-Control": "no-store"})

    def _set_path(name: str, must_exist: bool = True) -> Path:
        name = support_sets.check_name(name)
        path = ws.resolve(f"support-sets/{name}{support_sets.SUFFIX}", must_exist=False)
        if must_exist and not path.is_file():
            raise InputError(name, "no such support set in the workspace")
        return path

    @app.get("/api/support-sets")
    def list_sets() -> dict:
        out = []
        for f in sorted((ws.root / "support-sets").glob("*" + support_sets.SUFFIX)):
            try:
                meta = support_sets.load(f).meta()
            except InputError:
                continue
            out.append({k: meta[k] for k in ("name", "labels", "slices", "source", "created", "spacing")})
        return {"support_sets": out}

    @app.post("/api/support-sets")
    async def save_set(request: Request) -> Response:
        form = await _form(request)
        name = support_sets.check_name(str(form.get("name") or ""))
        scan_path = ws.resolve(str(form.get("scan") or ""))
        tmp = await _annotation(form, scan_path)
        try:
            sset = support_sets.from_annotation(scan_path, tmp, name, _labels(form))
        finally:
            tmp.unlink(missing_ok=True)
        path = _set_path(name, must_exist=False)
        with names:
            if path.exists() and form.get("overwrite") not in ("1", "true"):
                return _error(409, f"a support set named {name!r} exists already")
            support_sets.save(sset, path)
        return JSONResponse(sset.meta())

    @app.get("/api/support-sets/{name}/export")
    def export_set(name: str) -> Response:
        path = _set_path(name)
        return FileResponse(path, filename=path.name, media_type="application/zip")

    @app.post("/api/support-sets/import")
    async def import_set(request: Request) -> Response:
        form = await _form(request)
        fname, tmp = await _receive(form.get("file"), (support_sets.SUFFIX,))
        try:
            try:
                sset = support_sets.load(tmp)
            except InputError as err:
                raise InputError(fname, err.problem) from None
            path = _set_path(sset.name, must_exist=False)
            with names:
                if path.exists() and form.get("overwrite") not in ("1", "true"):
                    return _error(409, f"a support set named {sset.name!r} exists already")
                move_into(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return JSONResponse(sset.meta())

    return app

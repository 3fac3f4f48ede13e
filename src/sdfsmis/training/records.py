"""What a training run records besides checkpoints: ``log.csv`` (loss, learning rates, speed per
logged window), ``invocations.csv`` (one row per call of ``train``), ``validation.csv``, the loss
plot, and the check of what the model marks on its training episodes."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdfsmis import atomic

log = logging.getLogger("sdfsmis.train")

LOG_COLUMNS = ("step", "loss", "lr", "lr_backbone", "lr_new", "grad_norm", "sec_per_step", "episodes_per_s")
INVOCATION_COLUMNS = ("start_step", "end_step", "wall_s", "median_step_s", "iterations_per_s",
                      "peak_memory_mib", "memory", "device", "processes")


#: A model whose predicted foreground is below this fraction of the true foreground "marks nothing".
EMPTY_FRACTION = 0.05


@torch.no_grad()
def foreground_check(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, float] | None:
    """How much the model marks on an episode batch, with its own threshold rule: predicted and
    true foreground pixels and the highest probability; ``None`` for models without the latent
    path (stand-ins). Eval mode, global RNG untouched."""
    needed = ("episode_from_batch", "predict_latents", "probabilities", "threshold")
    if not all(hasattr(model, name) for name in needed):
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            prob = model.probabilities(model.predict_latents(model.episode_from_batch(dict(batch))))
            if "query_masks" in batch:
                truth = batch["query_masks"].float() > 0.5
            else:
                truth = model.probabilities(batch["query_mask_latents"].float()) > 0.5
    finally:
        model.train(was_training)
    marked = float(model.threshold(prob).sum())
    true = float(truth.sum())
    return {"predicted_px": marked, "true_px": true, "max_probability": float(prob.max())}


def warn_if_empty(check: Mapping[str, float] | None, where: str) -> bool:
    """Log a warning where ``check`` says the model marks (almost) nothing; True if it did."""
    if not check or check["true_px"] <= 0 or check["predicted_px"] >= EMPTY_FRACTION * check["true_px"]:
        return False
    log.warning("%s: the model marks almost nothing on a fixed batch of training episodes (%d px predicted for %d "
                "true, highest probability %.3f): it is not usable yet; train longer, raise the learning "
                "rate, or start from a trained model (init_from=bundled)", where, check["predicted_px"],
                check["true_px"], check["max_probability"])
    return True


def truncate_log(path: Path, after_step: int) -> None:
    """Drop rows logged after ``after_step`` (work lost by an interruption) from a CSV log."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= after_step]
    buf = io.StringIO()
    csv.writer(buf).writerows(kept)
    atomic.write_text(path, buf.getvalue())


def append_row(path: Path, columns: Sequence[str], row: Mapping[str, Any]) -> None:
    """Append ``row``; a log started with other columns (an older run resumed) keeps its own."""
    new = not path.is_file()
    if not new:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), None)
        columns = header or columns
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in columns})


def plot_loss(log_csv: str | Path, png: str | Path) -> Path | None:
    """Loss (and its running mean) against step from ``log.csv`` to ``png``; ``None`` if no rows."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    log_csv, png = Path(log_csv), Path(png)
    if not log_csv.is_file():
        return None
    with log_csv.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("loss")]
    if not rows:
        return None
    steps = np.array([float(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    smooth = np.array([loss[max(0, i - 9): i + 1].mean() for i in range(len(loss))])
    from matplotlib.ticker import FuncFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.95)
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label="running mean (10 logs)")
    if np.all(loss > 0):
        ax.set_yscale("log")  # plain tick labels: mathtext ones are slow to lay out
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    with atomic.replacing(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png


class LossWindow:
    """The steps since the last ``log.csv`` row: their summed loss and their time, less the time
    spent in validation and checkpoints (``paused``)."""

    def __init__(self, accelerator: Any, episodes_per_step: int):
        self.accelerator, self.episodes_per_step = accelerator, episodes_per_step
        self.loss = torch.zeros((), device=accelerator.device)
        self.steps, self.start = 0, time.perf_counter()
        self.seconds: list[float] = []  # mean step time of each logged window of this call

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss.detach().float()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def write(self, path: Path | None, step: int, optimizer: torch.optim.Optimizer, grad_norm: float,
              bar: Any) -> None:
        """Close the window: one ``log.csv`` row (``path=None`` on other processes), the bar's text.
        A loss that is not finite stops training."""
        mean_loss = self.accelerator.reduce(self.loss, "mean").item() / self.steps
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training loss became {mean_loss} at step {step}")
        seconds = (time.perf_counter() - self.start) / self.steps
        self.seconds.append(seconds)
        lr = max(g["lr"] for g in optimizer.param_groups)
        if path is not None:
            append_row(path, LOG_COLUMNS, {
                "step": step, "loss": f"{mean_loss:.6g}", "lr": f"{lr:.6g}",
                **{f"lr_{g['name']}": f"{g['lr']:.6g}" for g in optimizer.param_groups if "name" in g},
                "grad_norm": f"{float(grad_norm):.6g}", "sec_per_step": f"{seconds:.4g}",
                "episodes_per_s": f"{self.episodes_per_step / seconds:.4g}"})
        bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{lr:.2g}")
        self.loss.zero_()
        self.steps, self.start = 0, time.perf_counter()


def invocation_row(start: int, end: int, wall_s: float, window_seconds: Sequence[float],
                 accelerator: Any) -> dict[str, Any]:
    """What ``invocations.csv`` records of one call of ``train``. The wall time runs from the call (model
    build, data loading and encoding included) to the last step; the median step time is over the
    logged windows. Peak memory: the CUDA allocator's peak on a GPU, the process's peak resident set
    on a CPU."""
    device = accelerator.device
    if device.type == "cuda":
        name, kind = torch.cuda.get_device_name(device), "cuda_allocated"
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource  # Unix; ru_maxrss is in KiB on Linux

        name, kind = "cpu", "process_rss"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = float(np.median(window_seconds)) if window_seconds else float("nan")
    return {"start_step": start, "end_step": end, "wall_s": f"{wall_s:.1f}", "median_step_s": f"{median:.4g}",
            "iterations_per_s": f"{1 / median:.4g}", "peak_memory_mib": f"{peak:.0f}", "memory": kind,
            "device": name, "processes": accelerator.num_processes}


def run_validation(validate: Callable, accelerator: Any, loss_module: nn.Module, out_dir: Path,
                   step: int) -> None:
    """``validate(model, step)`` in eval mode without gradients; its floats go to ``validation.csv``."""
    model = accelerator.unwrap_model(loss_module).model
    model.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            result = validate(model, step)
    finally:
        model.train()
    if result:
        row = {"step": step, **{k: f"{float(v):.6g}" for k, v in result.items()}}
        append_row(out_dir / "validation.csv", list(row), row)

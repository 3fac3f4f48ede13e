"""The slice pipeline's two halves on two threads (CPU): while one batch is decoded and merged into
the output, the next batch is encoded and run through the UNet.

On the CPU each half gets half of torch's threads (one each on two cores). Small operations (the
UNet's attention at 16 x 16 latents, one support at a time) gain little from a second intra-op thread,
and on a machine whose cores are busy with other processes intra-op threads wait on one another;
two independent single-threaded halves keep both cores busy either way. The worker runs one task at a
time, in order, and at most ``MAX_PENDING`` tasks wait; an exception raised by a task (a cancelled
progress callback, for one) is raised in the caller at its next :meth:`Overlap.submit` or on exit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

MAX_PENDING = 2


class Overlap:
    """``with Overlap(device) as ov: ov.submit(fn, *args)``: ``fn`` runs on one worker thread (in order),
    or at once in the caller where overlapping does not apply (not the CPU, one thread, ``enabled=False``)."""

    def __init__(self, device: str | torch.device = "cpu", enabled: bool = True):
        self.threads = torch.get_num_threads()
        self.enabled = bool(enabled) and torch.device(device).type == "cpu" and self.threads >= 2
        self.per_half = max(1, self.threads // 2)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def __enter__(self) -> Overlap:
        if self.enabled:
            torch.set_num_threads(self.per_half)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdfsmis-decode",
                                            initializer=torch.set_num_threads, initargs=(self.per_half,))
        return self

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._pool is None:
            fn(*args)
            return
        self._pending.append(self._pool.submit(fn, *args))
        while self._pending and (self._pending[0].done() or len(self._pending) > MAX_PENDING):
            self._pending.popleft().result()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._pool is None:
            return
        try:
            if exc_type is not None:
                for future in self._pending:
                    future.cancel()
            while self._pending:
                future = self._pending.popleft()
                if exc_type is None:
                    future.result()
                elif not future.cancelled():
                    future.exception()  # wait; the caller's exception wins
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            torch.set_num_threads(self.threads)

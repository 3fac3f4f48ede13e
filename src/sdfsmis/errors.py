"""The one exception type users see for bad input: it names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input. ``str(err)`` is ``"<path>: <problem>"`` when a path is known."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)

    def __reduce__(self):  # keeps (path, problem) when sent between worker processes
        return type(self), (self.path, self.problem)

"""The one error type for bad input files: it names the file and says what to do."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A problem with a user's input file, worded so the user can fix it."""

    def __init__(self, path: str | Path | None, problem: str, advice: str = "") -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        self.advice = advice
        where = f"{self.path}: " if self.path else ""
        text = f"{where}{problem}"
        if advice:
            text += f" ({advice})"
        super().__init__(text)

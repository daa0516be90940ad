"""Where a benchmark's Markdown table goes."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def table_path(name: str, out: Path, default_out: Path) -> Path:
    """``benchmarks/results/NAME`` for a run in the benchmark's default work directory, else ``OUT/NAME``:
    a trial run elsewhere (``--out``) must not overwrite the committed table of the full run."""
    if Path(out).resolve() != Path(default_out).resolve():
        return Path(out).resolve() / name
    RESULTS.mkdir(exist_ok=True)
    return RESULTS / name

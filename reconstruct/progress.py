"""One progress helper for long loops: a bar with ETA on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("reconstruct")


def progress(items: Iterable[T], total: int, desc: str, unit: str = "it", quiet: bool = False) -> Iterator[T]:
    """Iterate ``items`` reporting progress: tqdm on a TTY, a log line every ~10% otherwise."""
    if quiet:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    start = time.monotonic()
    step = max(1, total // 10)
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == total:
            el = time.monotonic() - start
            eta = el / i * (total - i)
            log.info("%s: %d/%d %s, %.0f s elapsed, ETA %.0f s", desc, i, total, unit, el, eta)

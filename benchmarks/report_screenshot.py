"""Render an autoproc report.html in headless Chromium: a screenshot, console errors and missing images.

    python benchmarks/report_screenshot.py PROJECT/report.html --o benchmarks/out/report/shot.png
    python benchmarks/report_screenshot.py --synthetic --o benchmarks/out/report/shot.png   # tiny fake project

Runs Debian's ``chromium --headless --no-sandbox --disable-gpu --screenshot`` with console logging on
stderr and reports (stdout) the wall time, the number of console errors (lines Chromium logs from the
page's console at level ERROR, e.g. a failed resource load) and the images the page references that do
not exist. Exit status 1 when Chromium is missing, produced no screenshot, or either count is non-zero.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path


def find_chromium() -> str | None:
    """The Chromium executable (Debian's ``chromium``, or another common name)."""
    return next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)


def missing_images(report: Path) -> list[str]:
    """The <img> sources of the page that do not resolve to a file."""
    page = report.read_text()
    out = []
    for src in re.findall(r'<img [^>]*src="([^"]+)"', page):
        rel = urllib.parse.unquote(src.split("?")[0])
        if not (report.parent / rel).is_file():
            out.append(rel)
    return out


def console_errors(stderr: str) -> list[str]:
    """Page console messages at error level (and failed loads) in Chromium's ``--enable-logging=stderr`` log."""
    errors = []
    for line in stderr.splitlines():
        if "CONSOLE" in line and ("ERROR" in line or "error" in line.lower()):
            errors.append(line.strip())
        elif "net::ERR_" in line and "file://" in line:
            errors.append(line.strip())
    return errors


def screenshot(report: Path, out: Path, width: int = 1280, height: int = 4000, timeout_s: float = 90.0
               ) -> tuple[float, list[str], str]:
    """Render ``report`` to ``out``; returns (wall seconds, console errors, Chromium's stderr)."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed: apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", "--allow-file-access-from-files",
               f"--screenshot={out.resolve()}", f"--window-size={width},{height}", report.resolve().as_uri()]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - t0
    if not out.exists():
        raise RuntimeError(f"chromium wrote no screenshot (exit {r.returncode}): {r.stderr[-2000:]}")
    return wall, console_errors(r.stderr), r.stderr


def _synthetic(directory: Path) -> Path:
    """A small fake project with every section (the test suite's), and its report."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from test_report import make_project

    from autoproc.report import write_report

    return write_report(make_project(directory), active=False)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", nargs="?", help="report.html to render")
    p.add_argument("--synthetic", action="store_true", help="render the report of a tiny synthetic project instead")
    p.add_argument("--o", default="benchmarks/out/report/screenshot.png", help="screenshot PNG to write")
    p.add_argument("--width", type=int, default=1280, help="window width (px)")
    p.add_argument("--height", type=int, default=4000, help="window height (px): the screenshot's height")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if a.synthetic:
            report = _synthetic(Path(tmp) / "project")
        elif a.report:
            report = Path(a.report)
        else:
            p.error("give a report.html or --synthetic")
        missing = missing_images(report)
        try:
            wall, errors, _ = screenshot(report, Path(a.o), a.width, a.height)
        except (FileNotFoundError, RuntimeError) as err:
            print(f"report_screenshot: {err}", file=sys.stderr)
            return 1
    print(f"screenshot: {a.o} ({a.width}x{a.height}), chromium wall time {wall:.1f} s")
    print(f"console errors: {len(errors)}")
    for e in errors:
        print(f"  {e}")
    print(f"missing images: {len(missing)}")
    for m in missing:
        print(f"  {m}")
    return 0 if not errors and not missing else 1


if __name__ == "__main__":
    sys.exit(main())

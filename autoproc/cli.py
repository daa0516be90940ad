"""``autoproc``: the automated pipeline's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reconstruct.cli import run_command

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def _cmd_demo_data(a: argparse.Namespace) -> None:
    from .demo import write_demo_data

    star = write_demo_data(a.o, a.movies, a.seed)
    print(f"demo movies written; import them from {star} (truth in {a.o}/truth)")


def build_parser() -> argparse.ArgumentParser:
    """The ``autoproc`` argument parser."""
    p = argparse.ArgumentParser(prog="autoproc", formatter_class=HELP_FORMAT,
                                description="Automated cryo-EM processing, from movies to a refined map.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("demo-data", formatter_class=HELP_FORMAT,
                       help="write the built-in simulated data set (CFTR movies with known truth)",
                       description="Simulate micrograph movies of CFTR (PDB 6MSM, shipped with the package) "
                                   "with drift, dose, CTF and noise; no network needed.")
    s.add_argument("--o", required=True, help="output project directory")
    s.add_argument("--movies", type=int, default=None, help="number of movies (default: the demo's 8)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: the demo's fixed seed)")
    s.set_defaults(func=_cmd_demo_data)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoproc`` console script."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

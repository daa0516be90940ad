"""Command-line options shared by every ``reconstruct`` subcommand's parser."""

from __future__ import annotations

import argparse


def add_gpu_flag(p: argparse.ArgumentParser) -> None:
    """``--gpu`` (CuPy, an error with advice if no GPU is usable) or ``--auto-device`` (GPU when present)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", dest="gpu", action="store_const", const=True, default=False,
                   help="compute on the GPU with CuPy (fails with advice if none is usable)")
    g.add_argument("--auto-device", dest="gpu", action="store_const", const=None,
                   help="use a GPU when one is present, else the CPU")

"""``ranker``: the class ranker's command line (image preparation now; scoring and training as they land)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reconstruct.cli import run_command
from reconstruct.files.errors import InputError

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def _cmd_prepare(a: argparse.Namespace) -> None:
    from reconstruct.files.mrc import read_map, write_stack

    from .preprocess import NET_SIZE, network_images

    stack, px = read_map(a.i)
    px = a.angpix if a.angpix > 0 else px
    if px <= 0:
        raise InputError(a.i, "the header has no pixel size", "pass --angpix")
    imgs = network_images(stack, a.particle_diameter, px)
    write_stack(a.o, imgs, px * stack.shape[-1] / NET_SIZE)
    print(f"wrote {len(imgs)} images of {NET_SIZE}x{NET_SIZE} to {a.o}")


def build_parser() -> argparse.ArgumentParser:
    """The ``ranker`` argument parser."""
    p = argparse.ArgumentParser(prog="ranker", formatter_class=HELP_FORMAT,
                                description="Score 2D class averages as RELION's class ranker does.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("prepare-images", formatter_class=HELP_FORMAT,
                       help="cut and resample class averages to the network's 64x64 input",
                       description="Cut a centred window of ceil(D/p)+1 pixels (even) around each class "
                                   "average and Fourier-resample it to 64x64, without intensity normalisation.")
    s.add_argument("--i", required=True, help="class averages (.mrcs stack, e.g. run_it025_classes.mrcs)")
    s.add_argument("--o", required=True, help="output stack of 64x64 images")
    s.add_argument("--particle_diameter", type=float, required=True, help="mask diameter D in Å")
    s.add_argument("--angpix", type=float, default=-1.0, help="pixel size in Å (-1: from the header)")
    s.set_defaults(func=_cmd_prepare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ranker`` console script."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

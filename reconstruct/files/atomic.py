"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A reader (or a resumed job) sees either the old file or the complete new one, never a partial one;
a failure (full disk, exception) removes the temporary file and leaves any old file untouched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _new_temporary(target: Path) -> Path:
    """Create an empty temporary file beside ``target`` as a plain ``open(target, "w")`` would create the target:
    mode 0666 as the umask and any default ACL of the folder reduce it (``tempfile`` would make it owner-only)."""
    for _ in range(100):
        path = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a temporary file beside {target}")


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``target`` atomically.

    The file ends with the permissions a plain ``open(target, "w")`` would leave: those of the file it replaces,
    else 0666 less the umask (and as a default ACL of the folder says), so results on a shared file system stay
    readable by the group, as RELION's are.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temporary(target)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp_path, target.stat().st_mode & 0o777)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)

"""Evaluation of a scheme's operators (RELION-4 ``schemer.cpp`` semantics).

Control operators (``wait``, ``exit``, ``exit_maxtime``) change the flow and are handled by
:mod:`autoproc.schemer`; everything else computes a value into the operator's output variable or acts on
a file. File paths go through ``resolve`` so ``Schemes/<scheme>/<job>/...`` names reach the job's
current directory, as they do in job options.
"""

from __future__ import annotations

import glob
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from reconstruct.files.errors import InputError
from reconstruct.files.star import read_star

from .scheme import UNDEFINED, Operator, Scheme

log = logging.getLogger("autoproc")
Resolver = Callable[[str], str]


def _number(scheme: Scheme, token: str) -> float:
    """A float input: a float variable's value or a literal number."""
    if scheme.kind_of(token) == "float":
        return float(scheme.get(token))
    try:
        return float(token)
    except ValueError:
        raise InputError(scheme.directory / "scheme.star", f"{token!r} is neither a float variable nor a number",
                         "define the variable or use a literal number") from None


def _string(scheme: Scheme, token: str) -> str:
    """A string input: a string variable's value, else the literal text."""
    return str(scheme.get(token)) if scheme.kind_of(token) == "string" else token


def _boolean(scheme: Scheme, token: str) -> bool:
    if scheme.kind_of(token) == "bool":
        return bool(scheme.get(token))
    return token.strip().lower() in ("1", "true", "yes")


def _star_table(spec: str, project: Path, resolve: Resolver) -> tuple[pd.DataFrame, str]:
    """``file,table,label`` -> (the table, the label); a missing file is an empty table."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 3:
        raise ValueError(f"STAR operator input {spec!r} must be 'file,table,label'")
    path = project / resolve(parts[0])
    if not path.exists():
        return pd.DataFrame(), parts[2]
    blocks = read_star(path)
    table = blocks.get(parts[1])
    if table is None:
        raise InputError(path, f"no data_{parts[1]} table", "fix the operator's 'file,table,label'")
    if parts[2] not in table.columns:
        raise InputError(path, f"table {parts[1]} has no column {parts[2]}")
    return table, parts[2]


def count_images(path: Path, table: str) -> int:
    """Rows of ``table`` in a STAR file; 0 when the file does not exist (RELION's count_images)."""
    if not path.exists():
        return 0
    blocks = read_star(path)
    return len(blocks[table]) if table in blocks else 0


def evaluate(op: Operator, scheme: Scheme, project: Path, resolve: Resolver) -> None:
    """Apply ``op`` to the scheme's variables (or files under ``project``)."""
    t = op.type
    i1, i2 = op.input1, op.input2
    out = op.output
    value: object
    if t == "bool=set":
        value = _boolean(scheme, i1)
    elif t in ("bool=and", "bool=or"):
        a, b = _boolean(scheme, i1), _boolean(scheme, i2)
        value = (a and b) if t == "bool=and" else (a or b)
    elif t == "bool=not":
        value = not _boolean(scheme, i1)
    elif t in ("bool=gt", "bool=lt", "bool=ge", "bool=le", "bool=eq"):
        a, b = _number(scheme, i1), _number(scheme, i2)
        value = {"bool=gt": a > b, "bool=lt": a < b, "bool=ge": a >= b, "bool=le": a <= b,
                 "bool=eq": abs(a - b) < 1e-8}[t]
    elif t == "bool=file_exists":
        value = (project / resolve(_string(scheme, i1))).exists()
    elif t in ("bool=read_star", "float=read_star", "string=read_star"):
        table, label = _star_table(_string(scheme, i1), project, resolve)
        row = int(_number(scheme, i2)) if i2 != UNDEFINED else 0
        if table.empty:
            raise ValueError(f"operator {op.name}: the STAR file in {_string(scheme, i1)!r} does not exist yet")
        value = table[label].iloc[row]
    elif t in ("float=set", "float=round"):
        value = _number(scheme, i1)
        if t == "float=round":
            value = float(round(value))
    elif t in ("float=plus", "float=minus", "float=mult", "float=divide"):
        a, b = _number(scheme, i1), _number(scheme, i2)
        value = {"float=plus": a + b, "float=minus": a - b, "float=mult": a * b,
                 "float=divide": a / b if b != 0 else math.inf}[t]
    elif t == "float=count_images":
        table_name = _string(scheme, i2) if i2 != UNDEFINED else "particles"
        value = float(count_images(project / resolve(_string(scheme, i1)), table_name))
    elif t == "float=count_words":
        text = _string(scheme, i1)
        value = float(len([w for w in text.split(",") if w.strip()])) if text != UNDEFINED else 0.0
    elif t in ("float=star_table_max", "float=star_table_min", "float=star_table_avg", "float=star_table_sort_idx"):
        table, label = _star_table(_string(scheme, i1), project, resolve)
        col = pd.to_numeric(table[label]) if not table.empty else pd.Series(dtype=float)
        if col.empty:
            value = 0.0
        elif t == "float=star_table_max":
            value = float(col.max())
        elif t == "float=star_table_min":
            value = float(col.min())
        elif t == "float=star_table_avg":
            value = float(col.mean())
        else:  # 1-based index of the largest (input2 = 1) or smallest (-1) value
            value = float((col.idxmax() if _number(scheme, i2) > 0 else col.idxmin()) + 1)
    elif t == "string=set":
        value = _string(scheme, i1)
    elif t == "string=join":
        value = _string(scheme, i1) + _string(scheme, i2)
    elif t in ("string=before_first", "string=after_first", "string=before_last", "string=after_last"):
        text, sep = _string(scheme, i1), _string(scheme, i2)
        if sep not in text:
            value = text
        elif t == "string=before_first":
            value = text.split(sep, 1)[0]
        elif t == "string=after_first":
            value = text.split(sep, 1)[1]
        elif t == "string=before_last":
            value = text.rsplit(sep, 1)[0]
        else:
            value = text.rsplit(sep, 1)[1]
    elif t == "string=glob":
        hits = sorted(str(Path(p).relative_to(project)) for p in glob.glob(str(project / _string(scheme, i1))))
        value = ",".join(hits) if hits else UNDEFINED
    elif t == "string=nth_word":
        words = [w for w in _string(scheme, i1).split(",") if w.strip()]
        n = int(_number(scheme, i2))
        idx = n - 1 if n > 0 else len(words) + n
        value = words[idx] if 0 <= idx < len(words) else UNDEFINED
    elif t in ("touch_file", "copy_file", "move_file", "delete_file"):
        _file_operator(t, project / resolve(_string(scheme, i1)),
                       project / resolve(_string(scheme, i2)) if i2 != UNDEFINED else None)
        return
    elif t == "email":
        log.info("scheme %s: %s: %s %s (no mail is sent from autoproc; see the log)", scheme.name, op.name,
                 _string(scheme, i1), _string(scheme, i2) if i2 != UNDEFINED else "")
        return
    else:
        raise ValueError(f"operator {op.name}: type {t} is a control operator, handled by the schemer")
    if out != UNDEFINED:
        scheme.set(out, value)


def _file_operator(t: str, src: Path, dst: Path | None) -> None:
    if t == "touch_file":
        src.parent.mkdir(parents=True, exist_ok=True)
        src.touch()
    elif t == "delete_file":
        src.unlink(missing_ok=True)
    else:
        if dst is None:
            raise ValueError(f"{t} needs a destination in input2")
        target = dst / src.name if dst.is_dir() or str(dst).endswith("/") else dst
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copy2 if t == "copy_file" else shutil.move)(src, target)

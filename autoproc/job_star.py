"""RELION's ``job.star``: a job's type and its options, and the schemer's substitutions into them."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from reconstruct.files.errors import InputError
from reconstruct.files.star import read_star, write_star

_VAR = re.compile(r"\$\$([A-Za-z0-9_]+)(?=\s|$)")
_SCHEME_PATH = re.compile(r"Schemes/([^/\s]+)/([^/\s]+)/")


@dataclass
class JobStar:
    """The contents of a ``job.star``."""

    type_label: str
    options: dict[str, str] = field(default_factory=dict)
    is_continue: bool = False
    is_tomo: bool = False

    @classmethod
    def read(cls, path: str | Path) -> JobStar:
        """Read a job.star; a missing block or column is an :class:`InputError`."""
        blocks = read_star(path)
        if "job" not in blocks or "joboptions_values" not in blocks:
            raise InputError(path, "not a RELION job.star (needs data_job and data_joboptions_values)")
        job = blocks["job"].iloc[0]
        values = blocks["joboptions_values"]
        if values.empty:
            options: dict[str, str] = {}
        else:
            options = {str(k): "" if pd.isna(v) else _text(v)
                       for k, v in zip(values["rlnJobOptionVariable"], values["rlnJobOptionValue"])}
        return cls(str(job["rlnJobTypeLabel"]), options, bool(int(job.get("rlnJobIsContinue", 0))),
                   bool(int(job.get("rlnJobIsTomo", 0))))

    def write(self, path: str | Path) -> None:
        """Write atomically in RELION's layout."""
        write_star(path, {
            "job": {"rlnJobTypeLabel": self.type_label, "rlnJobIsContinue": int(self.is_continue),
                    "rlnJobIsTomo": int(self.is_tomo)},
            "joboptions_values": pd.DataFrame({"rlnJobOptionVariable": list(self.options),
                                               "rlnJobOptionValue": list(self.options.values())}),
        })


def _text(v: object) -> str:
    """Option values as text; integral floats keep RELION's plain form ('2', not '2.0')."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def format_value(value: float | bool | str, boolean_option: bool = False) -> str:
    """A scheme variable as it appears in a job option: booleans Yes/No, floats as plain numbers."""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, float):
        return _text(value)
    if boolean_option:
        raise ValueError(f"string value {value!r} given to a boolean option")
    return value


def substitute(options: Mapping[str, str], variables: Callable[[str], float | bool | str | None],
               job_dir_of: Callable[[str, str], str | None]) -> dict[str, str]:
    """Options with ``$$var`` replaced by the variable's value and ``Schemes/S/J/`` by J's job directory.

    ``variables(name)`` returns a variable's value or None when there is no such variable (an error);
    ``job_dir_of(scheme, job)`` returns the job's current directory (e.g. ``CtfFind/job003/``) or None
    when the path should stay as written.
    """
    out = {}
    for key, value in options.items():
        def var(m: re.Match[str], key: str = key) -> str:
            v = variables(m.group(1))
            if v is None:
                raise ValueError(f"option {key}: unknown scheme variable $${m.group(1)}")
            return format_value(v)

        value = _VAR.sub(var, value)
        out[key] = rewrite_scheme_paths(value, job_dir_of)
    return out


def rewrite_scheme_paths(value: str, job_dir_of: Callable[[str, str], str | None]) -> str:
    """Replace every ``Schemes/<scheme>/<job>/`` in ``value`` by that job's current directory."""
    def repl(m: re.Match[str]) -> str:
        d = job_dir_of(m.group(1), m.group(2))
        return d if d is not None else m.group(0)

    return _SCHEME_PATH.sub(repl, value)

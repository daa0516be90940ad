"""A RELION-4 Scheme: variables, operators, jobs and edges, read from and written to ``scheme.star``.

The file layout is RELION's (``Schemes/<name>/scheme.star`` plus one ``<job>/job.star`` per job), so a
scheme written here opens in ``relion_schemer`` and the other way round. Execution lives in
:mod:`autoproc.schemer`; this module is the data model only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from reconstruct.files.errors import InputError
from reconstruct.files.star import read_star, write_star

UNDEFINED = "undefined"
KINDS = ("float", "bool", "string")
_BLOCK = {"float": "scheme_floats", "bool": "scheme_bools", "string": "scheme_strings"}
_LABEL = {"float": "Float", "bool": "Boolean", "string": "String"}


@dataclass
class Variable:
    """A scheme variable's current value and the value ``--reset`` restores."""

    value: float | bool | str
    reset: float | bool | str


@dataclass
class Operator:
    """One operator node: ``output = type(input1, input2)`` (unused fields are ``undefined``)."""

    name: str
    type: str
    output: str = UNDEFINED
    input1: str = UNDEFINED
    input2: str = UNDEFINED


@dataclass
class SchemeJob:
    """A job node: its folder in the scheme and the pipeline job directory it currently points at."""

    original_name: str
    current_name: str
    mode: str = "new"  # new | continue
    has_started: bool = False


@dataclass
class Edge:
    """The one outgoing edge of a node; a fork goes to ``output_if_true`` when ``boolean`` is true."""

    input: str
    output: str
    is_fork: bool = False
    output_if_true: str = UNDEFINED
    boolean: str = UNDEFINED


def _convert(kind: str, value: object) -> float | bool | str:
    if kind == "float":
        return float(value)  # type: ignore[arg-type]
    if kind == "bool":
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes")
        return bool(int(value))  # type: ignore[call-overload]
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


@dataclass
class Scheme:
    """A scheme as RELION's schemer holds it in memory."""

    name: str
    directory: Path
    current_node: str = UNDEFINED
    variables: dict[str, dict[str, Variable]] = field(default_factory=lambda: {k: {} for k in KINDS})
    operators: dict[str, Operator] = field(default_factory=dict)
    jobs: dict[str, SchemeJob] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    # ---- reading and writing ------------------------------------------------------------------
    @classmethod
    def read(cls, directory: str | Path) -> Scheme:
        """Read ``directory/scheme.star``; every problem is an :class:`InputError` naming the file."""
        directory = Path(directory)
        path = directory / "scheme.star"
        blocks = read_star(path)
        if "scheme_general" not in blocks:
            raise InputError(path, "no data_scheme_general block", "is this a RELION-4 scheme.star?")
        general = blocks["scheme_general"].iloc[0]
        name = str(general.get("rlnSchemeName", directory.name)).rstrip("/").split("/")[-1]
        scheme = cls(name=name, directory=directory,
                     current_node=str(general.get("rlnSchemeCurrentNodeName", UNDEFINED)))
        for kind in KINDS:
            df = blocks.get(_BLOCK[kind])
            if df is None:
                continue
            lab = f"rlnScheme{_LABEL[kind]}Variable"
            for _, row in df.iterrows():
                scheme.variables[kind][str(row[f"{lab}Name"])] = Variable(
                    _convert(kind, row[f"{lab}Value"]), _convert(kind, row[f"{lab}ResetValue"]))
        for _, row in blocks.get("scheme_operators", pd.DataFrame()).iterrows():
            op = Operator(str(row["rlnSchemeOperatorName"]), str(row["rlnSchemeOperatorType"]),
                          str(row["rlnSchemeOperatorOutput"]), str(row["rlnSchemeOperatorInput1"]),
                          str(row["rlnSchemeOperatorInput2"]))
            scheme.operators[op.name] = op
        for _, row in blocks.get("scheme_jobs", pd.DataFrame()).iterrows():
            job = SchemeJob(str(row["rlnSchemeJobNameOriginal"]), str(row["rlnSchemeJobName"]),
                            str(row["rlnSchemeJobMode"]), bool(int(row["rlnSchemeJobHasStarted"])))
            scheme.jobs[job.original_name] = job
        for _, row in blocks.get("scheme_edges", pd.DataFrame()).iterrows():
            scheme.edges.append(Edge(str(row["rlnSchemeEdgeInputNodeName"]), str(row["rlnSchemeEdgeOutputNodeName"]),
                                     bool(int(row["rlnSchemeEdgeIsFork"])),
                                     str(row["rlnSchemeEdgeOutputNodeNameIfTrue"]),
                                     str(row["rlnSchemeEdgeBooleanVariable"])))
        scheme.validate()
        return scheme

    def write(self) -> None:
        """Rewrite ``scheme.star`` atomically (the schemer does this after every node)."""
        blocks: dict[str, pd.DataFrame | dict] = {
            "scheme_general": {"rlnSchemeName": f"Schemes/{self.name}/",
                               "rlnSchemeCurrentNodeName": self.current_node}}
        for kind in KINDS:
            if not self.variables[kind]:
                continue
            lab = f"rlnScheme{_LABEL[kind]}Variable"

            def fmt(v: float | bool | str, k: str = kind) -> float | int | str:
                return int(bool(v)) if k == "bool" else v

            blocks[_BLOCK[kind]] = pd.DataFrame({
                f"{lab}Name": list(self.variables[kind]),
                f"{lab}Value": [fmt(v.value) for v in self.variables[kind].values()],
                f"{lab}ResetValue": [fmt(v.reset) for v in self.variables[kind].values()]})
        if self.operators:
            ops = list(self.operators.values())
            blocks["scheme_operators"] = pd.DataFrame({
                "rlnSchemeOperatorName": [o.name for o in ops], "rlnSchemeOperatorType": [o.type for o in ops],
                "rlnSchemeOperatorOutput": [o.output for o in ops], "rlnSchemeOperatorInput1": [o.input1 for o in ops],
                "rlnSchemeOperatorInput2": [o.input2 for o in ops]})
        if self.jobs:
            jobs = list(self.jobs.values())
            blocks["scheme_jobs"] = pd.DataFrame({
                "rlnSchemeJobNameOriginal": [j.original_name for j in jobs],
                "rlnSchemeJobName": [j.current_name for j in jobs], "rlnSchemeJobMode": [j.mode for j in jobs],
                "rlnSchemeJobHasStarted": [int(j.has_started) for j in jobs]})
        blocks["scheme_edges"] = pd.DataFrame({
            "rlnSchemeEdgeInputNodeName": [e.input for e in self.edges],
            "rlnSchemeEdgeOutputNodeName": [e.output for e in self.edges],
            "rlnSchemeEdgeIsFork": [int(e.is_fork) for e in self.edges],
            "rlnSchemeEdgeOutputNodeNameIfTrue": [e.output_if_true for e in self.edges],
            "rlnSchemeEdgeBooleanVariable": [e.boolean for e in self.edges]})
        write_star(self.directory / "scheme.star", blocks)

    # ---- structure ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the graph: one outgoing edge per node, edges between known nodes, forks on booleans."""
        path = self.directory / "scheme.star"
        seen: set[str] = set()
        nodes = set(self.operators) | set(self.jobs)
        for e in self.edges:
            if e.input in seen:
                raise InputError(path, f"node {e.input!r} has more than one outgoing edge",
                                 "a scheme node may have only one edge (use a fork for a choice)")
            seen.add(e.input)
            for n in (e.input, e.output) + ((e.output_if_true,) if e.is_fork else ()):
                if n != UNDEFINED and n not in nodes:
                    raise InputError(path, f"edge refers to an unknown node {n!r}",
                                     "add the operator or job, or fix the edge")
            if e.is_fork and e.boolean not in self.variables["bool"]:
                raise InputError(path, f"fork from {e.input!r} tests an unknown boolean {e.boolean!r}")
        for op in self.operators.values():
            if op.type not in OPERATOR_TYPES:
                raise InputError(path, f"operator {op.name!r} has an unknown type {op.type!r}",
                                 f"known types: {', '.join(sorted(OPERATOR_TYPES))}")

    @property
    def start_node(self) -> str:
        """The input node of the first edge, where execution starts when the current node is undefined."""
        return self.edges[0].input if self.edges else UNDEFINED

    def next_node(self, node: str) -> str:
        """The node after ``node``: its edge's output, or for a fork the branch its boolean selects."""
        for e in self.edges:
            if e.input == node:
                if e.is_fork and bool(self.variables["bool"][e.boolean].value):
                    return e.output_if_true
                return e.output
        return UNDEFINED

    def kind_of(self, name: str) -> str | None:
        """Which kind of variable ``name`` is (float, bool, string), or None."""
        for kind in KINDS:
            if name in self.variables[kind]:
                return kind
        return None

    def get(self, name: str) -> float | bool | str:
        """A variable's current value."""
        kind = self.kind_of(name)
        if kind is None:
            raise KeyError(f"scheme {self.name}: no variable {name!r}")
        return self.variables[kind][name].value

    def set(self, name: str, value: object, reset_too: bool = False) -> None:
        """Set a variable (converted to its kind); ``reset_too`` also sets the value ``--reset`` restores."""
        kind = self.kind_of(name)
        if kind is None:
            raise KeyError(f"scheme {self.name}: no variable {name!r} "
                           f"(variables: {', '.join(sorted(n for k in KINDS for n in self.variables[k]))})")
        v = _convert(kind, value)
        self.variables[kind][name].value = v
        if reset_too:
            self.variables[kind][name].reset = v

    def reset(self) -> None:
        """RELION's ``--reset``: variables to their reset values, jobs to not-started, current node to the start."""
        for kind in KINDS:
            for var in self.variables[kind].values():
                var.value = var.reset
        for job in self.jobs.values():
            job.current_name = job.original_name
            job.has_started = False
        self.current_node = self.start_node


OPERATOR_TYPES = frozenset({
    "bool=set", "bool=and", "bool=or", "bool=not", "bool=gt", "bool=lt", "bool=ge", "bool=le", "bool=eq",
    "bool=file_exists", "bool=read_star",
    "float=set", "float=plus", "float=minus", "float=mult", "float=divide", "float=round", "float=count_images",
    "float=count_words", "float=read_star", "float=star_table_max", "float=star_table_min", "float=star_table_avg",
    "float=star_table_sort_idx",
    "string=set", "string=join", "string=before_first", "string=after_first", "string=before_last",
    "string=after_last", "string=glob", "string=nth_word", "string=read_star",
    "touch_file", "copy_file", "move_file", "delete_file", "wait", "exit_maxtime", "exit", "email",
})

"""The Schemes engine: scheme.star and job.star I/O, operators, substitution, job execution and re-runs."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from autoproc.job_runner import ABORT_NOW, FAILURE, SUCCESS, JobAborted, read_record, run_commands
from autoproc.job_star import JobStar, substitute
from autoproc.operators import evaluate
from autoproc.pipeline import Pipeline
from autoproc.run import request_abort, reset_schemes, run_schemes
from autoproc.scheme import Edge, Operator, Scheme, SchemeJob, Variable
from autoproc.schemer import Schemer
from autoproc.shipped_schemes import Settings, install_schemes
from reconstruct.files.errors import InputError
from reconstruct.files.star import read_star, write_star

# scheme.star as RELION-4 writes it (a cut-down prep), to check we read RELION's own files.
RELION_SCHEME = """
# version 30001

data_scheme_general

_rlnSchemeName                       Schemes/prep/
_rlnSchemeCurrentNodeName            WAIT

# version 30001

data_scheme_floats

loop_
_rlnSchemeFloatVariableName #1
_rlnSchemeFloatVariableValue #2
_rlnSchemeFloatVariableResetValue #3
do_at_most    50.000000    50.000000
maxtime_hr    48.000000    48.000000
wait_sec   180.000000   180.000000

# version 30001

data_scheme_operators

loop_
_rlnSchemeOperatorName #1
_rlnSchemeOperatorType #2
_rlnSchemeOperatorOutput #3
_rlnSchemeOperatorInput1 #4
_rlnSchemeOperatorInput2 #5
EXIT_maxtime exit_maxtime  undefined maxtime_hr  undefined
WAIT       wait  undefined   wait_sec  undefined

# version 30001

data_scheme_jobs

loop_
_rlnSchemeJobNameOriginal #1
_rlnSchemeJobName #2
_rlnSchemeJobMode #3
_rlnSchemeJobHasStarted #4
importmovies importmovies   continue            0

# version 30001

data_scheme_edges

loop_
_rlnSchemeEdgeInputNodeName #1
_rlnSchemeEdgeOutputNodeName #2
_rlnSchemeEdgeIsFork #3
_rlnSchemeEdgeOutputNodeNameIfTrue #4
_rlnSchemeEdgeBooleanVariable #5
WAIT EXIT_maxtime            0  undefined  undefined
EXIT_maxtime importmovies            0  undefined  undefined
importmovies WAIT            0  undefined  undefined
"""


def test_reads_relion_scheme_and_round_trips(tmp_path: Path) -> None:
    d = tmp_path / "Schemes" / "prep"
    d.mkdir(parents=True)
    (d / "scheme.star").write_text(RELION_SCHEME)
    s = Scheme.read(d)
    assert s.name == "prep" and s.current_node == "WAIT" and s.get("wait_sec") == 180.0
    assert s.jobs["importmovies"].mode == "continue" and not s.jobs["importmovies"].has_started
    assert s.next_node("EXIT_maxtime") == "importmovies" and s.start_node == "WAIT"
    s.set("do_at_most", 7)
    s.write()
    again = Scheme.read(d)
    assert again.get("do_at_most") == 7.0 and again.edges == s.edges and again.operators == s.operators


def test_scheme_rejects_two_edges_from_one_node(tmp_path: Path) -> None:
    d = tmp_path / "Schemes" / "bad"
    d.mkdir(parents=True)
    (d / "scheme.star").write_text(RELION_SCHEME.replace("importmovies WAIT            0  undefined  undefined",
                                                         "importmovies WAIT 0 undefined undefined\n"
                                                         "importmovies EXIT_maxtime 0 undefined undefined"))
    with pytest.raises(InputError, match="more than one outgoing edge"):
        Scheme.read(d)


def _toy(tmp_path: Path) -> Scheme:
    s = Scheme("toy", tmp_path / "Schemes" / "toy")
    s.variables["float"] = {n: Variable(v, v) for n, v in (("a", 3.0), ("b", 2.0), ("out", 0.0))}
    s.variables["bool"] = {"flag": Variable(False, False)}
    s.variables["string"] = {n: Variable(v, v) for n, v in (("star", "mics.star"), ("text", "x,y,z"),
                                                            ("res", ""), ("spec", "mics.star,micrographs,rlnV"))}
    return s


def test_operators(tmp_path: Path) -> None:
    s = _toy(tmp_path)
    write_star(tmp_path / "mics.star", {"micrographs": pd.DataFrame({"rlnV": [4.0, 9.0, 1.0]})})

    def run(t: str, out: str, i1: str, i2: str = "undefined") -> object:
        evaluate(Operator("op", t, out, i1, i2), s, tmp_path, lambda p: p)
        return s.get(out)

    assert run("float=plus", "out", "a", "b") == 5.0
    assert run("float=divide", "out", "a", "4") == 0.75
    assert run("bool=gt", "flag", "a", "b") is True
    assert run("bool=eq", "flag", "a", "3.000000001") is True
    assert run("bool=file_exists", "flag", "star") is True
    assert run("float=count_images", "out", "star", "micrographs") == 3.0
    assert run("float=count_images", "out", "missing.star", "micrographs") == 0.0
    assert run("float=star_table_max", "out", "spec") == 9.0
    assert run("float=star_table_sort_idx", "out", "spec", "-1") == 3.0
    assert run("float=count_words", "out", "text") == 3.0
    assert run("string=nth_word", "res", "text", "-1") == "z"
    assert run("string=after_last", "res", "text", ",") == "z"
    assert run("string=join", "res", "star", "text") == "mics.starx,y,z"
    evaluate(Operator("t", "touch_file", "undefined", "sub/flag.txt"), s, tmp_path, lambda p: p)
    assert (tmp_path / "sub" / "flag.txt").exists()


def test_substitution_of_variables_and_scheme_paths() -> None:
    values = {"do_at_most": 50.0, "do_log": True, "myref": "Schemes/proc/inimodel3d/initial_model.mrc"}
    dirs = {("proc", "inimodel3d"): "InitialModel/job009/"}
    out = substitute({"other_args": "--do_at_most $$do_at_most", "do_log": "$$do_log", "fn_ref": "$$myref",
                      "fn_img": "Schemes/proc/select_parts/particles.star"},
                     values.get, lambda s, j: dirs.get((s, j)))
    assert out == {"other_args": "--do_at_most 50", "do_log": "Yes", "fn_ref": "InitialModel/job009/initial_model.mrc",
                   "fn_img": "Schemes/proc/select_parts/particles.star"}
    with pytest.raises(ValueError, match="unknown scheme variable"):
        substitute({"x": "$$nope"}, values.get, lambda s, j: None)


def test_shipped_schemes_match_relion_and_relion_it(tmp_path: Path) -> None:
    install_schemes(tmp_path, Settings(angpix=0.86, particle_diameter=160))
    proc = Scheme.read(tmp_path / "Schemes" / "proc")
    assert proc.start_node == "WAIT" and proc.next_node("refine3d") == "WAIT"
    assert {j: proc.jobs[j].mode for j in ("select_mics", "class2d")} == {"select_mics": "continue", "class2d": "new"}
    extract = JobStar.read(tmp_path / "Schemes" / "proc" / "extract" / "job.star")
    assert (extract.options["extract_size"], extract.options["rescale"]) == ("280", "96")
    c2d = JobStar.read(tmp_path / "Schemes" / "proc" / "class2d" / "job.star")
    assert c2d.options["particle_diameter"] == "176"  # 1.1 x D


def _import_scheme(project: Path, pattern: str = "Movies/*.mrcs") -> None:
    s = Scheme("prep", project / "Schemes" / "prep")
    s.variables["float"] = {"wait_sec": Variable(0.0, 0.0)}
    s.operators = {"WAIT": Operator("WAIT", "wait", "undefined", "wait_sec")}
    s.jobs = {"importmovies": SchemeJob("importmovies", "importmovies", "continue")}
    s.edges = [Edge("WAIT", "importmovies"), Edge("importmovies", "WAIT")]
    s.current_node = "WAIT"
    s.write()
    JobStar("relion.import", {"fn_in_raw": pattern, "is_multiframe": "Yes", "angpix": "1.5", "kV": "300",
                              "Cs": "2.7", "Q0": "0.1"}).write(s.directory / "importmovies" / "job.star")


def test_jobs_rerun_only_when_options_or_inputs_change(tmp_path: Path) -> None:
    (tmp_path / "Movies").mkdir()
    (tmp_path / "Movies" / "a.mrcs").write_bytes(b"x")
    _import_scheme(tmp_path)
    first = run_schemes(tmp_path, ["prep"])
    assert first.state == "complete"
    job = tmp_path / "Import" / "job001"
    assert (job / SUCCESS).exists() and (job / "job.star").exists()
    assert "reconstruct import --i 'Movies/*.mrcs'" in (job / "note.txt").read_text()
    assert len(read_star(job / "movies.star")["movies"]) == 1
    # Nothing changed: nothing runs.
    again = run_schemes(tmp_path, ["prep"])
    assert sum(r.jobs_run for _, r in again.passes) == 0
    # A new movie: the continue-mode job runs again in the same directory.
    (tmp_path / "Movies" / "b.mrcs").write_bytes(b"y")
    run_schemes(tmp_path, ["prep"])
    assert len(read_star(job / "movies.star")["movies"]) == 2 and len(read_record(job)["launches"]) == 2
    # A changed option: a new job directory.
    js = JobStar.read(tmp_path / "Schemes" / "prep" / "importmovies" / "job.star")
    js.options["angpix"] = "1.2"
    js.write(tmp_path / "Schemes" / "prep" / "importmovies" / "job.star")
    run_schemes(tmp_path, ["prep"])
    assert (tmp_path / "Import" / "job002" / SUCCESS).exists()
    pipe = Pipeline.read(tmp_path)
    assert [p.name for p in pipe.processes] == ["Import/job001/", "Import/job002/"]
    assert pipe.job_counter == 3 and pipe.process("Import/job002/").status == "Succeeded"
    reset_schemes(tmp_path, ["prep"])
    assert not Scheme.read(tmp_path / "Schemes" / "prep").jobs["importmovies"].has_started


def test_failed_job_is_marked_and_stops_the_scheme(tmp_path: Path) -> None:
    _import_scheme(tmp_path, "Nowhere/*.tif")
    out = run_schemes(tmp_path, ["prep"])
    assert out.state == "failed" and "no movies match" in out.message
    job = tmp_path / "Import" / "job001"
    assert (job / FAILURE).exists() and "no movies match" in (job / "run.err").read_text()
    assert Pipeline.read(tmp_path).process("Import/job001/").status == "Failed"
    assert Scheme.read(tmp_path / "Schemes" / "prep").current_node == "importmovies"


def test_abort_stops_a_running_command(tmp_path: Path) -> None:
    job = tmp_path / "Job"
    job.mkdir()
    threading.Timer(1.0, lambda: (job / ABORT_NOW).touch()).start()
    start = time.monotonic()
    with pytest.raises(JobAborted):
        run_commands([[sys.executable, "-c", "import time; time.sleep(60)"]], tmp_path, job, [job / ABORT_NOW],
                     poll_s=0.1)
    assert time.monotonic() - start < 15


def test_abort_request_touches_scheme_and_job(tmp_path: Path) -> None:
    _import_scheme(tmp_path)
    (tmp_path / "Movies").mkdir()
    (tmp_path / "Movies" / "a.mrcs").write_bytes(b"x")
    run_schemes(tmp_path, ["prep"])
    s = Scheme.read(tmp_path / "Schemes" / "prep")
    s.current_node = "importmovies"
    s.write()
    touched = request_abort(tmp_path, ["prep"])
    assert "Import/job001/" + ABORT_NOW in touched
    assert Schemer(tmp_path, "prep").run_pass().state == "aborted"


def test_jobs_run_through_submitit_local_executor(tmp_path: Path) -> None:
    pytest.importorskip("submitit", reason="submitit is not installed")
    from autoproc.execution import ExecutionOptions, make_runner

    (tmp_path / "Movies").mkdir()
    (tmp_path / "Movies" / "a.mrcs").write_bytes(b"x")
    _import_scheme(tmp_path)
    out = run_schemes(tmp_path, ["prep"], runner=make_runner(ExecutionOptions("local", poll_s=0.2)))
    job = tmp_path / "Import" / "job001"
    assert out.state == "complete" and (job / SUCCESS).exists()
    assert any((job / "submitit").iterdir()) and len(read_star(job / "movies.star")["movies"]) == 1
    _import_scheme(tmp_path, "Nowhere/*.tif")
    failed = run_schemes(tmp_path, ["prep"], runner=make_runner(ExecutionOptions("local", poll_s=0.2)))
    assert failed.state == "failed" and (tmp_path / "Import" / "job002" / FAILURE).exists()


def test_changed_option_reruns_the_job_and_its_dependants_only(tmp_path: Path) -> None:
    (tmp_path / "Movies").mkdir()
    for n in "ab":
        (tmp_path / "Movies" / f"{n}.mrcs").write_bytes(b"x")
    _import_scheme(tmp_path)
    s = Scheme.read(tmp_path / "Schemes" / "prep")
    s.jobs.update({j: SchemeJob(j, j, "new") for j in ("pick", "again")})
    s.edges = [Edge("WAIT", "importmovies"), Edge("importmovies", "pick"), Edge("pick", "again"), Edge("again", "WAIT")]
    s.write()
    for job, src in (("pick", "Schemes/prep/importmovies/movies.star"), ("again", "Schemes/prep/pick/movies.star")):
        JobStar("relion.select", {"fn_data": src, "do_select_values": "Yes", "select_label": "rlnOpticsGroup",
                                  "select_minval": "0", "select_maxval": "5"}).write(s.directory / job / "job.star")
    assert run_schemes(tmp_path, ["prep"]).state == "complete"
    assert [p.name for p in Pipeline.read(tmp_path).processes] == ["Import/job001/", "Select/job002/", "Select/job003/"]
    assert len(read_star(tmp_path / "Select" / "job003" / "movies.star")["movies"]) == 2
    js = JobStar.read(s.directory / "pick" / "job.star")
    js.options["select_maxval"] = "4"
    js.write(s.directory / "pick" / "job.star")
    run_schemes(tmp_path, ["prep"])
    names = [p.name for p in Pipeline.read(tmp_path).processes]
    assert names == ["Import/job001/", "Select/job002/", "Select/job003/", "Select/job004/", "Select/job005/"]
    assert len(read_record(tmp_path / "Import" / "job001")["launches"]) == 1


def _motioncorr_project(tmp_path: Path, other_args: str = "") -> None:
    """Four tiny simulated movies, and a prep scheme of import + motion correction."""
    from reconstruct.simulate import MovieSimulation, simulate_movies
    from reconstruct.simulate.density import atomic_model_map

    vol = atomic_model_map(Path(__file__).parent / "data" / "1ake_adk_closed.pdb.gz", 32, 2.0)
    simulate_movies([vol], 2.0, MovieSimulation(n_movies=4, size=128, pixel_size=2.0, n_frames=4,
                                                particles_per_movie=3, particle_diameter=50.0), tmp_path)
    _import_scheme(tmp_path)
    s = Scheme.read(tmp_path / "Schemes" / "prep")
    s.jobs["motioncorr"] = SchemeJob("motioncorr", "motioncorr", "continue")
    s.edges = [Edge("WAIT", "importmovies"), Edge("importmovies", "motioncorr"), Edge("motioncorr", "WAIT")]
    s.write()
    JobStar("relion.motioncorr", {"input_star_mics": "Schemes/prep/importmovies/movies.star", "patch_x": "1",
                                  "patch_y": "1", "dose_per_frame": "1.5", "other_args": other_args}
            ).write(s.directory / "motioncorr/job.star")


def test_job_capped_by_do_at_most_runs_until_every_movie_is_done(tmp_path: Path) -> None:
    _motioncorr_project(tmp_path, "--do_at_most 2")
    assert run_schemes(tmp_path, ["prep"]).state == "complete"
    job = tmp_path / "MotionCorr" / "job002"
    assert len(read_star(job / "corrected_micrographs.star")["micrographs"]) == 4
    assert len(read_record(job)["launches"]) == 2 and not read_record(job)["partial"]


def test_per_micrograph_job_runs_as_an_array(tmp_path: Path) -> None:
    pytest.importorskip("submitit", reason="submitit is not installed")
    from autoproc.execution import ExecutionOptions, SubmititRunner

    _motioncorr_project(tmp_path)
    runner = SubmititRunner(ExecutionOptions("local", poll_s=0.2, array_tasks=2, array_parallelism=2))
    assert run_schemes(tmp_path, ["prep"], runner=runner).state == "complete"
    job = tmp_path / "MotionCorr" / "job002"
    assert sorted(p.name for p in (job / "array").iterdir()) == ["task001_movies.star", "task002_movies.star"]
    assert len(read_star(job / "corrected_micrographs.star")["micrographs"]) == 4 and (job / SUCCESS).exists()


def test_bad_input_file_fails_the_job_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "Movies").mkdir()
    (tmp_path / "Movies" / "a.mrcs").write_bytes(b"x")
    _import_scheme(tmp_path)
    s = Scheme.read(tmp_path / "Schemes" / "prep")
    s.jobs["pick"] = SchemeJob("pick", "pick", "new")
    s.edges = [Edge("WAIT", "importmovies"), Edge("importmovies", "pick"), Edge("pick", "WAIT")]
    s.write()
    broken = "data_movies\nloop_\n_rlnMicrographMovieName #1\n_rlnOpticsGroup #2\nx.mrcs\n"
    (tmp_path / "broken.star").write_text(broken)
    JobStar("relion.select", {"fn_data": "broken.star", "do_select_values": "Yes", "select_label": "rlnOpticsGroup",
                              "select_minval": "0", "select_maxval": "5"}).write(s.directory / "pick" / "job.star")
    out = run_schemes(tmp_path, ["prep"])
    err = (tmp_path / "Select" / "job002" / "run.err").read_text()
    assert out.state == "failed" and "broken.star" in out.message and "broken.star" in err
    assert (tmp_path / "Select" / "job002" / FAILURE).exists()


def test_rerun_keeps_the_projects_settings_and_applies_new_flags(tmp_path: Path) -> None:
    from autoproc.cli import _settings, build_parser
    from autoproc.shipped_schemes import load_settings, save_settings

    first = _settings(build_parser().parse_args(["run", "--o", str(tmp_path), "--movies", "Raw/*.tif", "--angpix",
                                                 "0.86", "--set", "proc/class2d:nr_classes=40"]), tmp_path)
    save_settings(tmp_path, first)
    again = _settings(build_parser().parse_args(["run", "--o", str(tmp_path), "--diameter", "150", "--set",
                                                 "proc/refine3d:ini_high=30"]), tmp_path)
    assert (again.movies, again.angpix, again.particle_diameter) == ("Raw/*.tif", 0.86, 150.0)
    assert again.extra == {"proc/class2d": {"nr_classes": "40"}, "proc/refine3d": {"ini_high": "30"}}
    save_settings(tmp_path, again)
    assert load_settings(tmp_path) == again


def test_job_commands_turn_off_relion_defaults_and_resume() -> None:
    """A job.star's "No" on an option RELION defaults to "Yes" becomes our negated flag, in the order
    the options are listed; a resumed job gets --continue; the user's other arguments come last."""
    from autoproc.job_types import JOB_TYPES

    o = {"fn_img": "Extract/job004/particles.star", "do_run_C1": "No", "do_solvent": "No",
         "do_ctf_correction": "yes", "use_gpu": "Yes", "other_args": "--batch 32"}
    (cmd,) = JOB_TYPES["relion.initialmodel"].commands(o, "InitialModel/job005/", True)
    assert cmd[-6:] == ["--no_run_in_c1", "--no_flatten_solvent", "--continue", "--gpu", "--batch", "32"]
    assert "--no_ctf" not in cmd
    (cmd,) = JOB_TYPES["relion.class2d"].commands({"fn_img": "p.star", "do_zero_mask": "No"}, "Class2D/job006/",
                                                  False)
    assert cmd[-1] == "--no_zero_mask" and "--continue" not in cmd and "--no_ctf" not in cmd

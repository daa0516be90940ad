"""RELION-4's shipped ``prep`` and ``proc`` schemes, and relion_it.py's way of filling them in.

The graphs, variables, operators and job options are RELION's (``scripts/Schemes/{prep,proc}``, see
``../shared/specs/schemes_and_empiar.md`` §2); :class:`Settings` derives the data-set-specific values
from the acquisition parameters and the particle diameter as ``relion_it.py`` does (§3). Two choices
differ from RELION's shipped files and are explicit settings: the class-ranker threshold defaults to
the paper's 0.15 (the scheme ships 0.45, relion_it.py 0.25), and the ranker's input is the Class2D job's
last iteration, whatever the number of iterations.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reconstruct.extraction import extraction_box_sizes
from reconstruct.files.atomic import atomic_write_text
from reconstruct.files.errors import InputError

from .job_star import JobStar
from .job_types import class2d_iterations
from .scheme import UNDEFINED, Edge, Operator, Scheme, SchemeJob, Variable


@dataclass
class Settings:
    """Data-set and run settings that relion_it.py writes into the schemes (RELION's names in comments)."""

    movies: str = "Movies/*.tif"  # prep__importmovies__fn_in_raw
    angpix: float = 0.885  # prep__importmovies__angpix (Å, of the movies)
    voltage: float = 300.0  # kV
    cs: float = 2.7  # mm
    q0: float = 0.1
    dose_per_frame: float = 1.277  # e/Å^2
    gain: str = ""  # gain reference in the project ("" = none)
    gain_rot: int = 0
    gain_flip: int = 0
    bin_factor: int = 1
    patches: tuple[int, int] = (5, 5)
    float16: bool = True
    particle_diameter: float = 160.0  # longest diameter D (Å)
    log_ratio: float = 150.0 / 180.0  # LoG minimum diameter / maximum diameter
    symmetry: str = "C1"
    max_pixel_size: float = 3.75  # relion_it.py: down-scale particles to the first FFT-friendly box below this (Å)
    ctf_box: int = 512
    ctf_resmax: float = 5.0
    ctf_max_resolution: float = 6.0  # select_mics__select_maxval
    class2d_classes: int = 100
    class2d_iterations: int = 200
    rank_threshold: float = 0.15
    inimodel_classes: int = 3
    inimodel_iterations: int = 200
    min_particles_3d: int = 5000
    refine_sampling: str = "7.5 degrees"
    refine_local_sampling: str = "1.8 degrees"
    do_at_most: int = 50
    wait_sec: float = 180.0
    maxtime_hr: float = 48.0
    use_gpu: bool = False
    extra: dict[str, dict[str, str]] = field(default_factory=dict)  # {"proc/class2d": {"option": "value"}}

    @property
    def micrograph_pixel_size(self) -> float:
        """Pixel size after motion correction's binning."""
        return self.angpix * self.bin_factor

    @property
    def mask_diameter(self) -> float:
        """relion_it.py: 1.1 x the particle diameter, for Class2D, InitialModel and Refine3D."""
        return round(1.1 * self.particle_diameter)


# Scheme variables that come from Settings; every other variable is state the operators maintain.
SETTING_VARIABLES = ("do_at_most", "maxtime_hr", "wait_sec", "min_nr_parts_3d")


def _yn(b: bool) -> str:
    return "Yes" if b else "No"


def _scheme(name: str, project: Path, floats: dict[str, float], bools: dict[str, bool], strings: dict[str, str],
            operators: list[Operator], jobs: dict[str, str], edges: list[Edge]) -> Scheme:
    s = Scheme(name=name, directory=project / "Schemes" / name)
    s.variables["float"] = {k: Variable(float(v), float(v)) for k, v in floats.items()}
    s.variables["bool"] = {k: Variable(bool(v), bool(v)) for k, v in bools.items()}
    s.variables["string"] = {k: Variable(v, v) for k, v in strings.items()}
    s.operators = {o.name: o for o in operators}
    s.jobs = {k: SchemeJob(k, k, mode) for k, mode in jobs.items()}
    s.edges = edges
    s.current_node = s.start_node
    s.validate()
    return s


def _e(a: str, b: str) -> Edge:
    return Edge(a, b)


def _fork(a: str, if_false: str, if_true: str, boolean: str) -> Edge:
    return Edge(a, if_false, True, if_true, boolean)


def prep_scheme(project: Path, st: Settings) -> tuple[Scheme, dict[str, JobStar]]:
    """RELION's prep: import movies, motion correction, CTF estimation, looping until the maximum time."""
    scheme = _scheme(
        "prep", project, {"do_at_most": st.do_at_most, "maxtime_hr": st.maxtime_hr, "wait_sec": st.wait_sec}, {}, {},
        [Operator("EXIT_maxtime", "exit_maxtime", UNDEFINED, "maxtime_hr"),
         Operator("WAIT", "wait", UNDEFINED, "wait_sec")],
        {"importmovies": "continue", "motioncorr": "continue", "ctffind": "continue"},
        [_e("WAIT", "EXIT_maxtime"), _e("EXIT_maxtime", "importmovies"), _e("importmovies", "motioncorr"),
         _e("motioncorr", "ctffind"), _e("ctffind", "WAIT")])
    jobs = {
        "importmovies": JobStar("relion.import", {
            "fn_in_raw": st.movies, "is_multiframe": "Yes", "optics_group_name": "opticsGroup1", "fn_mtf": "",
            "angpix": str(st.angpix), "kV": str(st.voltage), "Cs": str(st.cs), "Q0": str(st.q0)}),
        "motioncorr": JobStar("relion.motioncorr", {
            "input_star_mics": "Schemes/prep/importmovies/movies.star", "do_own_motioncor": "Yes",
            "patch_x": str(st.patches[0]), "patch_y": str(st.patches[1]), "bfactor": "150",
            "bin_factor": str(st.bin_factor), "dose_per_frame": str(st.dose_per_frame), "pre_exposure": "0",
            "do_dose_weighting": "Yes", "do_save_noDW": "No", "eer_grouping": "20", "do_float16": _yn(st.float16),
            "do_save_ps": "Yes", "group_for_ps": "4", "fn_gain_ref": st.gain,
            "gain_rot": str(st.gain_rot), "gain_flip": str(st.gain_flip), "first_frame_sum": "1",
            "last_frame_sum": "-1", "use_gpu": _yn(st.use_gpu), "other_args": "--do_at_most $$do_at_most",
            "nr_threads": "12"}),
        "ctffind": JobStar("relion.ctffind", {
            "input_star_mics": "Schemes/prep/motioncorr/corrected_micrographs.star", "use_noDW": "No",
            "use_given_ps": "Yes", "box": str(st.ctf_box), "resmin": "30", "resmax": str(st.ctf_resmax),
            "dfmin": "5000", "dfmax": "50000", "dfstep": "500", "dast": "100", "do_phaseshift": "No",
            "use_gpu": _yn(st.use_gpu)}),
    }
    return scheme, jobs


def proc_scheme(project: Path, st: Settings) -> tuple[Scheme, dict[str, JobStar]]:
    """RELION's proc: select micrographs, LoG picking, extraction, VDAM 2D, ranking, initial model, auto-refine."""
    scheme = _scheme(
        "proc", project,
        {"current_nr_mics": 0, "prev_nr_mics": 0, "maxtime_hr": st.maxtime_hr, "wait_sec": st.wait_sec,
         "current_nr_parts": 0, "min_nr_parts_3d": st.min_particles_3d},
        {"has_ctffind": False, "do_3d": False, "has_larger_nr_mics": False, "do_log": True, "do_topaz": False,
         "has_topaz_model": False, "has_iniref": False},
        {"ctffind_mics": "Schemes/prep/ctffind/micrographs_ctf.star",
         "selected_mics": "Schemes/proc/select_mics/micrographs.star",
         "selected_parts": "Schemes/proc/select_parts/particles.star", "particles": "particles",
         "micrographs": "micrographs", "topaz_model": "", "iniref": "None", "myref": "",
         "inimodel_output": "Schemes/proc/inimodel3d/initial_model.mrc"},
        [Operator("HAS_ctffind", "bool=file_exists", "has_ctffind", "ctffind_mics"),
         Operator("COUNT_mics", "float=count_images", "current_nr_mics", "selected_mics", "micrographs"),
         Operator("HAS_mics_increased", "bool=gt", "has_larger_nr_mics", "current_nr_mics", "prev_nr_mics"),
         Operator("SET_prev_nr_mics", "float=set", "prev_nr_mics", "current_nr_mics"),
         Operator("SET_do_topaz", "bool=not", "do_topaz", "do_log"),
         Operator("COUNT_parts", "float=count_images", "current_nr_parts", "selected_parts", "particles"),
         Operator("CHECK_do_3d", "bool=ge", "do_3d", "current_nr_parts", "min_nr_parts_3d"),
         Operator("CHECK_iniref", "bool=file_exists", "has_iniref", "iniref"),
         Operator("SET_myref_user", "string=set", "myref", "iniref"),
         Operator("SET_myref_inimodel", "string=set", "myref", "inimodel_output"),
         Operator("HAS_topaz_model", "bool=file_exists", "has_topaz_model", "topaz_model"),
         Operator("EXIT_maxtime", "exit_maxtime", UNDEFINED, "maxtime_hr"),
         Operator("WAIT", "wait", UNDEFINED, "wait_sec")],
        {"select_mics": "continue", "autopick": "continue", "extract": "continue", "class2d": "new",
         "select_parts": "new", "inimodel3d": "new", "refine3d": "new"},
        [_e("WAIT", "EXIT_maxtime"), _e("EXIT_maxtime", "HAS_ctffind"),
         _fork("HAS_ctffind", "WAIT", "select_mics", "has_ctffind"), _e("select_mics", "COUNT_mics"),
         _e("COUNT_mics", "HAS_mics_increased"),
         _fork("HAS_mics_increased", "WAIT", "SET_prev_nr_mics", "has_larger_nr_mics"),
         _e("SET_prev_nr_mics", "SET_do_topaz"), _e("SET_do_topaz", "autopick"), _e("autopick", "extract"),
         _e("extract", "class2d"), _e("class2d", "select_parts"), _e("select_parts", "COUNT_parts"),
         _e("COUNT_parts", "CHECK_do_3d"), _fork("CHECK_do_3d", "WAIT", "CHECK_iniref", "do_3d"),
         _fork("CHECK_iniref", "inimodel3d", "SET_myref_user", "has_iniref"), _e("SET_myref_user", "refine3d"),
         _e("inimodel3d", "SET_myref_inimodel"), _e("SET_myref_inimodel", "refine3d"), _e("refine3d", "WAIT")])
    box, small = extraction_box_sizes(st.particle_diameter, st.micrograph_pixel_size, st.max_pixel_size)
    mask = str(st.mask_diameter)
    gpu = _yn(st.use_gpu)
    jobs = {
        "select_mics": JobStar("relion.select", {
            "fn_mic": "$$ctffind_mics", "do_select_values": "Yes", "select_label": "rlnCtfMaxResolution",
            "select_minval": "-9999", "select_maxval": str(st.ctf_max_resolution), "do_class_ranker": "No"}),
        "autopick": JobStar("relion.autopick", {
            "fn_input_autopick": "Schemes/proc/select_mics/micrographs.star", "do_log": "$$do_log",
            "do_topaz": "$$do_topaz", "log_diam_min": str(round(st.log_ratio * st.particle_diameter)),
            "log_diam_max": str(round(st.particle_diameter)), "log_adjust_thr": "0", "log_upper_thr": "999",
            "log_maxres": "20", "log_invert": "No", "use_gpu": "No"}),
        "extract": JobStar("relion.extract", {
            "star_mics": "Schemes/proc/select_mics/micrographs.star",
            "coords_suffix": "Schemes/proc/autopick/autopick.star", "extract_size": str(box),
            "do_rescale": _yn(small < box), "rescale": str(small), "do_norm": "Yes", "bg_diameter": "-1",
            "do_invert": "Yes", "do_float16": _yn(st.float16), "do_fom_threshold": "No", "minimum_pick_fom": "-3"}),
        "class2d": JobStar("relion.class2d", {
            "fn_img": "Schemes/proc/extract/particles.star", "nr_classes": str(st.class2d_classes), "do_grad": "Yes",
            "nr_iter_grad": str(st.class2d_iterations), "do_em": "No", "tau_fudge": "2", "particle_diameter": mask,
            "psi_sampling": "6", "offset_range": "5", "offset_step": "1", "do_ctf_correction": "Yes",
            "do_zero_mask": "Yes", "use_gpu": gpu}),
        "select_parts": JobStar("relion.select", {
            "do_class_ranker": "Yes",
            "fn_model": f"Schemes/proc/class2d/run_it{st.class2d_iterations:03d}_optimiser.star",
            "rank_threshold": str(st.rank_threshold), "do_select_values": "No"}),
        "inimodel3d": JobStar("relion.initialmodel", {
            "fn_img": "Schemes/proc/select_parts/particles.star", "nr_classes": str(st.inimodel_classes),
            "nr_iter": str(st.inimodel_iterations), "sym_name": st.symmetry, "do_run_C1": "Yes", "tau_fudge": "4",
            "particle_diameter": mask, "do_solvent": "Yes", "offset_range": "6", "offset_step": "2",
            "sampling": "15 degrees", "do_ctf_correction": "Yes", "use_gpu": gpu}),
        "refine3d": JobStar("relion.refine3d", {
            "fn_img": "Schemes/proc/select_parts/particles.star", "fn_ref": "$$myref", "ini_high": "40",
            "sym_name": st.symmetry, "particle_diameter": mask, "sampling": st.refine_sampling,
            "auto_local_sampling": st.refine_local_sampling, "offset_range": "5", "offset_step": "1",
            "ref_correct_greyscale": "Yes", "do_zero_mask": "Yes", "do_solvent_fsc": "No", "auto_faster": "No",
            "do_ctf_correction": "Yes", "use_gpu": gpu}),
    }
    return scheme, jobs


def install_schemes(project: Path, st: Settings) -> list[str]:
    """Write ``Schemes/prep`` and ``Schemes/proc`` with ``st`` applied; returns the scheme names.

    Run on an existing project, it keeps each scheme's state (current node, job directories, variables)
    and rewrites only the job templates and the variables' values the settings give, so changed
    settings take effect, through the make-like rule, on exactly the jobs they touch.
    """
    names = []
    for build in (prep_scheme, proc_scheme):
        fresh, jobs = build(project, st)
        for job, js in jobs.items():
            for option, value in st.extra.get(f"{fresh.name}/{job}", {}).items():
                js.options[option] = value
        if "select_parts" in jobs and "fn_model" not in st.extra.get("proc/select_parts", {}):
            # the ranker reads Class2D's last iteration, whatever --set made of the iterations
            last = class2d_iterations(jobs["class2d"].options)
            jobs["select_parts"].options["fn_model"] = f"Schemes/proc/class2d/run_it{last:03d}_optimiser.star"
        for job, js in jobs.items():
            js.write(fresh.directory / job / "job.star")
        if (fresh.directory / "scheme.star").exists():
            current = Scheme.read(fresh.directory)
            for name in SETTING_VARIABLES:  # the others are the run's state, set by operators
                if current.kind_of(name) == "float" and fresh.kind_of(name) == "float":
                    var = fresh.variables["float"][name]
                    current.variables["float"][name] = Variable(var.value, var.reset)
            if current.kind_of("prev_nr_mics") == "float":
                # a new run looks at every micrograph again, so changed options reach the jobs after the
                # micrograph-count gate (unchanged jobs are skipped as up to date)
                current.set("prev_nr_mics", 0.0)
            current.write()
        else:
            fresh.write()
        names.append(fresh.name)
    return names


SETTINGS_FILE = "autoproc_settings.json"


def save_settings(project: Path, st: Settings) -> None:
    """Keep the run's settings in the project, so a plain re-run (``autoproc run --o DIR``) uses them again."""
    atomic_write_text(project / SETTINGS_FILE, json.dumps(asdict(st), indent=1))


def load_settings(project: Path) -> Settings | None:
    """The settings a project was last run with, or None for a new project."""
    path = project / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        data["patches"] = tuple(data["patches"])
        return Settings(**data)
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"unreadable autoproc settings ({err})",
                         "delete it to start from the defaults and give the acquisition flags again") from None

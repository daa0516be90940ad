"""RELION job types: from a job's ``job.star`` options to the command lines that run it, and its files.

Each job type knows (as RELION's ``pipeline_jobs.cpp`` does) its directory (``Class2D``...), its full
type label once the options are known, the commands to run (our ``reconstruct``/``ranker`` programs,
with RELION's option names translated), the input files it reads and the output nodes it writes.
"""

from __future__ import annotations

import glob
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Options = dict[str, str]

# HEALPix orders of RELION's sampling menu ("30 degrees" -> 1 ...).
_SAMPLING = {"30 degrees": 1, "15 degrees": 2, "7.5 degrees": 3, "3.7 degrees": 4, "1.8 degrees": 5,
             "0.9 degrees": 6, "0.5 degrees": 7, "0.2 degrees": 8, "0.1 degrees": 9}


def yes(o: Options, key: str, default: bool = False) -> bool:
    """A Yes/No option."""
    v = o.get(key)
    return default if v is None or v == "" else v.strip().lower() in ("yes", "true", "1")


def num(o: Options, key: str, default: float) -> float:
    """A numeric option (RELION writes numbers as text)."""
    v = o.get(key, "")
    try:
        return float(v) if v != "" else default
    except ValueError:
        raise ValueError(f"option {key} = {v!r} is not a number") from None


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def healpix_order(text: str, option: str) -> int:
    """RELION's angular-sampling menu text as a HEALPix order.

    RELION passes one order less on the command line (``7.5 degrees`` -> ``--healpix_order 2``): the
    menu names the sampling after one order of oversampling, and so do the callers here.
    """
    key = text.strip()
    if key not in _SAMPLING:
        raise ValueError(f"option {option} = {text!r}: expected one of {', '.join(_SAMPLING)}")
    return _SAMPLING[key]


def _other(o: Options) -> list[str]:
    return shlex.split(o.get("other_args", ""))


def _gpu(o: Options) -> list[str]:
    return ["--gpu"] if yes(o, "use_gpu") else []


def _switched_off(o: Options, cont: bool, flags: dict[str, str]) -> list[str]:
    """The job's closing flags: one per yes/no option (on by default in RELION) the user turned off,
    ``--continue`` when resuming, then ``--gpu`` and the user's other arguments."""
    off = [flag for key, flag in flags.items() if not yes(o, key, True)]
    return off + (["--continue"] if cont else []) + _gpu(o) + _other(o)


@dataclass(frozen=True)
class JobType:
    """How one RELION job type runs in autoproc."""

    base: str  # e.g. "relion.class2d"
    directory: str  # e.g. "Class2D"
    label: Callable[[Options], str]
    commands: Callable[[Options, str, bool], list[list[str]]]
    outputs: Callable[[Options, str], list[tuple[str, str]]]
    input_keys: tuple[str, ...]

    def inputs(self, o: Options) -> list[str]:
        """The files this job reads (paths relative to the project), in option order."""
        out = []
        for key in self.input_keys:
            v = o.get(key, "").strip()
            if v and v not in ("None", "undefined") and not any(c in v for c in "*?"):
                out.append(v)
        return out


# ---- Import -------------------------------------------------------------------------------------
def _import_cmds(o: Options, d: str, cont: bool) -> list[list[str]]:
    if not yes(o, "is_multiframe", True):
        raise ValueError("autoproc imports movies only (is_multiframe Yes); import micrographs with RELION")
    cmd = ["reconstruct", "import", "--i", o.get("fn_in_raw", "Movies/*.tif"), "--odir", d,
           "--ofile", "movies.star", "--do_movies", "--optics_group_name", o.get("optics_group_name", "opticsGroup1"),
           "--angpix", _n(num(o, "angpix", 1.0)), "--kV", _n(num(o, "kV", 300)), "--Cs", _n(num(o, "Cs", 2.7)),
           "--Q0", _n(num(o, "Q0", 0.1))]
    if o.get("fn_mtf", "").strip():
        cmd += ["--optics_group_mtf", o["fn_mtf"]]
    if cont:
        cmd.append("--continue")
    return [cmd + _other(o)]


# ---- MotionCorr ---------------------------------------------------------------------------------
def _motioncorr_cmds(o: Options, d: str, cont: bool) -> list[list[str]]:
    cmd = ["reconstruct", "motioncorr", "--i", o["input_star_mics"], "--o", d,
           "--first_frame_sum", _n(num(o, "first_frame_sum", 1)), "--last_frame_sum", _n(num(o, "last_frame_sum", -1)),
           "--bfactor", _n(num(o, "bfactor", 150)), "--bin_factor", _n(num(o, "bin_factor", 1)),
           "--patch_x", _n(num(o, "patch_x", 1)), "--patch_y", _n(num(o, "patch_y", 1)),
           "--dose_per_frame", _n(num(o, "dose_per_frame", 1)), "--preexposure", _n(num(o, "pre_exposure", 0)),
           "--eer_grouping", _n(num(o, "eer_grouping", 32))]
    if yes(o, "do_dose_weighting", True):
        cmd.append("--dose_weighting")
    if yes(o, "do_save_noDW"):
        cmd.append("--save_noDW")
    if yes(o, "do_save_ps"):
        cmd += ["--grouping_for_ps", _n(num(o, "group_for_ps", 4))]
    if yes(o, "do_float16"):
        cmd.append("--float16")
    gain = o.get("fn_gain_ref", "").strip()
    if gain:
        cmd += ["--gainref", gain, "--gain_rot", _gain_code(o.get("gain_rot", "0")),
                "--gain_flip", _gain_code(o.get("gain_flip", "0"))]
    if o.get("fn_defect", "").strip():
        cmd += ["--defect_file", o["fn_defect"]]
    if cont:
        cmd.append("--only_do_unfinished")
    return [cmd + _gpu(o) + _other(o)]


def _gain_code(text: str) -> str:
    """RELION's radio-button text ('No rotation (0)', 'Flip upside down (1)') or a bare number -> the number."""
    t = text.strip()
    if t.endswith(")") and "(" in t:
        t = t[t.rindex("(") + 1:-1]
    return t or "0"


# ---- CtfFind ------------------------------------------------------------------------------------
def _ctffind_cmds(o: Options, d: str, cont: bool) -> list[list[str]]:
    cmd = ["reconstruct", "ctffind", "--i", o["input_star_mics"], "--o", d,
           "--box", _n(num(o, "box", 512)), "--resmin", _n(num(o, "resmin", 30)), "--resmax", _n(num(o, "resmax", 5)),
           "--dfmin", _n(num(o, "dfmin", 5000)), "--dfmax", _n(num(o, "dfmax", 50000)),
           "--dfstep", _n(num(o, "dfstep", 500)), "--dast", _n(num(o, "dast", 100))]
    if yes(o, "use_noDW"):
        cmd.append("--use_noDW")
    if yes(o, "use_given_ps"):
        cmd.append("--use_given_ps")
    if yes(o, "do_phaseshift"):
        cmd += ["--do_phaseshift", "--phase_min", _n(num(o, "phase_min", 0)), "--phase_max",
                _n(num(o, "phase_max", 180)), "--phase_step", _n(num(o, "phase_step", 10))]
    if cont:
        cmd.append("--only_do_unfinished")
    return [cmd + _gpu(o) + _other(o)]


# ---- Select -------------------------------------------------------------------------------------
def _select_label(o: Options) -> str:
    if yes(o, "do_class_ranker"):
        return "relion.select.class2dauto"
    if yes(o, "do_select_values"):
        return "relion.select.onvalue"
    raise ValueError("autoproc runs Select jobs with do_class_ranker or do_select_values set to Yes "
                     "(interactive selection needs RELION's GUI)")


def _select_cmds(o: Options, d: str, cont: bool) -> list[list[str]]:
    if _select_label(o) == "relion.select.class2dauto":
        cmd = ["ranker", "score", "--opt", o["fn_model"], "--o", d, "--min_score", _n(num(o, "rank_threshold", 0.5))]
        if num(o, "select_nr_parts", -1) > 0:
            cmd += ["--select_min_nr_particles", _n(num(o, "select_nr_parts", -1))]
        if num(o, "select_nr_classes", -1) > 0:
            cmd += ["--select_min_nr_classes", _n(num(o, "select_nr_classes", -1))]
        return [cmd + _other(o)]
    src = o.get("fn_mic", "").strip() or o.get("fn_data", "").strip()
    if not src:
        raise ValueError("a Select job on values needs fn_mic (micrographs) or fn_data (particles)")
    cmd = ["reconstruct", "select", "--i", src, "--o", d, "--select", o.get("select_label", "rlnCtfMaxResolution"),
           "--minval", _n(num(o, "select_minval", -9999)), "--maxval", _n(num(o, "select_maxval", 9999))]
    return [cmd + _other(o)]


def _select_outputs(o: Options, d: str) -> list[tuple[str, str]]:
    if _select_label(o) == "relion.select.class2dauto":
        return [(d + "particles.star", "ParticlesData.star.relion"),
                (d + "class_averages.star", "ImagesData.star.relion.classaverages")]
    if o.get("fn_mic", "").strip():
        return [(d + "micrographs.star", "MicrographsData.star.relion")]
    if Path(o.get("fn_data", "")).name == "movies.star":  # reconstruct select keeps a movies table's name
        return [(d + "movies.star", "MicrographMoviesData.star.relion")]
    return [(d + "particles.star", "ParticlesData.star.relion")]


# ---- AutoPick -----------------------------------------------------------------------------------
def _autopick_cmds(o: Options, d: str, cont: bool) -> list[list[str]]:
    if not yes(o, "do_log"):
        raise ValueError("autoproc picks with the Laplacian-of-Gaussian picker only (do_log Yes); "
                         "Topaz and template picking need RELION")
    cmd = ["reconstruct", "autopick", "--i", o["fn_input_autopick"], "--odir", d, "--LoG",
           "--LoG_diam_min", _n(num(o, "log_diam_min", 200)), "--LoG_diam_max", _n(num(o, "log_diam_max", 250)),
           "--LoG_adjust_threshold", _n(num(o, "log_adjust_thr", 0)),
           "--LoG_upper_threshold", _n(num(o, "log_upper_thr", 999)), "--LoG_maxres", _n(num(o, "log_maxres", 20))]
    if yes(o, "log_invert"):
        cmd.append("--LoG_invert")
    if cont:
        cmd.append("--only_do_unfinished")
    return [cmd + _gpu(o) + _other(o)]


# ---- Extract ------------------------------------------------------------------------------------
def _extract_cmds(o: Options, d: str, cont: bool) -> list[list[str]]:
    cmd = ["reconstruct", "extract", "--i", o["star_mics"], "--coord_list", o["coords_suffix"], "--part_dir", d,
           "--extract_size", _n(num(o, "extract_size", 128))]
    if yes(o, "do_rescale"):
        cmd += ["--scale", _n(num(o, "rescale", 128))]
    if yes(o, "do_norm", True):
        cmd += ["--norm", "--bg_radius", _n(num(o, "bg_diameter", -1) / 2 if num(o, "bg_diameter", -1) > 0 else -1)]
    if yes(o, "do_invert", True):
        cmd.append("--invert_contrast")
    if yes(o, "do_float16"):
        cmd.append("--float16")
    if yes(o, "do_fom_threshold"):
        cmd += ["--minimum_pick_fom", _n(num(o, "minimum_pick_fom", 0))]
    if cont:
        cmd.append("--only_do_unfinished")
    return [cmd + _gpu(o) + _other(o)]


# ---- Class2D ------------------------------------------------------------------------------------
def class2d_iterations(o: Options) -> int:
    """Iterations the Class2D job will write last (run_itNNN)."""
    return int(num(o, "nr_iter_grad", 200)) if yes(o, "do_grad", True) else int(num(o, "nr_iter_em", 25))


def _class2d_cmds(o: Options, d: str, cont: bool) -> list[list[str]]:
    vdam = yes(o, "do_grad", True)
    cmd = ["reconstruct", "class2d", "--i", o["fn_img"], "--o", d, "--K", _n(num(o, "nr_classes", 50)),
           "--particle_diameter", _n(num(o, "particle_diameter", 200)), "--algorithm", "vdam" if vdam else "em",
           "--iter", str(class2d_iterations(o)), "--tau2_fudge", _n(num(o, "tau_fudge", 2)),
           "--psi_step", _n(num(o, "psi_sampling", 6)), "--offset_range", _n(num(o, "offset_range", 5)),
           "--offset_step", _n(num(o, "offset_step", 1))]
    return [cmd + _switched_off(o, cont, {"do_ctf_correction": "--no_ctf", "do_zero_mask": "--no_zero_mask"})]


def _class2d_outputs(o: Options, d: str) -> list[tuple[str, str]]:
    it = f"{d}run_it{class2d_iterations(o):03d}"
    return [(it + "_data.star", "ParticlesData.star.relion.class2d"),
            (it + "_optimiser.star", "ProcessData.star.relion.optimiser.class2d")]


# ---- InitialModel -------------------------------------------------------------------------------
def _initialmodel_cmds(o: Options, d: str, cont: bool) -> list[list[str]]:
    cmd = ["reconstruct", "initialmodel", "--i", o["fn_img"], "--o", d, "--K", _n(num(o, "nr_classes", 1)),
           "--iter", _n(num(o, "nr_iter", 200)), "--sym", o.get("sym_name", "C1"),
           "--particle_diameter", _n(num(o, "particle_diameter", 200)), "--tau2_fudge", _n(num(o, "tau_fudge", 4)),
           "--offset_range", _n(num(o, "offset_range", 6)), "--offset_step", _n(num(o, "offset_step", 2)),
           "--healpix_order", str(healpix_order(o.get("sampling", "15 degrees"), "sampling") - 1)]
    return [cmd + _switched_off(o, cont, {"do_run_C1": "--no_run_in_c1", "do_ctf_correction": "--no_ctf",
                                          "do_solvent": "--no_flatten_solvent"})]


def _initialmodel_outputs(o: Options, d: str) -> list[tuple[str, str]]:
    it = f"{d}run_it{int(num(o, 'nr_iter', 200)):03d}"
    return [(d + "initial_model.mrc", "DensityMap.mrc.relion.initialmodel"),
            (it + "_data.star", "ParticlesData.star.relion.initialmodel"),
            (it + "_optimiser.star", "ProcessData.star.relion.optimiser.initialmodel")]


# ---- Refine3D -----------------------------------------------------------------------------------
def _refine3d_cmds(o: Options, d: str, cont: bool) -> list[list[str]]:
    cmd = ["reconstruct", "refine3d", "--i", o["fn_img"], "--ref", o["fn_ref"], "--o", d,
           "--particle_diameter", _n(num(o, "particle_diameter", 200)), "--sym", o.get("sym_name", "C1"),
           "--ini_high", _n(num(o, "ini_high", 60)),
           "--healpix_order", str(healpix_order(o.get("sampling", "7.5 degrees"), "sampling") - 1),
           "--auto_local_healpix_order", str(healpix_order(o.get("auto_local_sampling", "1.8 degrees"),
                                                             "auto_local_sampling") - 1),
           "--offset_range", _n(num(o, "offset_range", 5)), "--offset_step", _n(num(o, "offset_step", 1))]
    return [cmd + _switched_off(o, cont, {"do_ctf_correction": "--no_ctf"})]


def _refine3d_outputs(o: Options, d: str) -> list[tuple[str, str]]:
    return [(d + "run_data.star", "ParticlesData.star.relion.refine3d"),
            (d + "run_class001.mrc", "DensityMap.mrc.relion.refine3d"),
            (d + "run_half1_class001_unfil.mrc", "DensityMap.mrc.relion.halfmap.refine3d"),
            (d + "run_optimiser.star", "ProcessData.star.relion.optimiser.refine3d")]


def _fixed(label: str) -> Callable[[Options], str]:
    return lambda o: label


JOB_TYPES: dict[str, JobType] = {t.base: t for t in (
    JobType("relion.import", "Import", _fixed("relion.import.movies"), _import_cmds,
            lambda o, d: [(d + "movies.star", "MicrographMoviesData.star.relion")], ()),
    JobType("relion.motioncorr", "MotionCorr", _fixed("relion.motioncorr.own"), _motioncorr_cmds,
            lambda o, d: [(d + "corrected_micrographs.star", "MicrographsData.star.relion.motioncorr")],
            ("input_star_mics", "fn_gain_ref", "fn_defect")),
    JobType("relion.ctffind", "CtfFind", _fixed("relion.ctffind.ctffind4"), _ctffind_cmds,
            lambda o, d: [(d + "micrographs_ctf.star", "MicrographsData.star.relion.ctf")], ("input_star_mics",)),
    JobType("relion.select", "Select", _select_label, _select_cmds, _select_outputs,
            ("fn_model", "fn_mic", "fn_data")),
    JobType("relion.autopick", "AutoPick", _fixed("relion.autopick.log"), _autopick_cmds,
            lambda o, d: [(d + "autopick.star", "MicrographsCoords.star.relion.autopick")], ("fn_input_autopick",)),
    JobType("relion.extract", "Extract", _fixed("relion.extract"), _extract_cmds,
            lambda o, d: [(d + "particles.star", "ParticlesData.star.relion")], ("star_mics", "coords_suffix")),
    JobType("relion.class2d", "Class2D", _fixed("relion.class2d"), _class2d_cmds, _class2d_outputs, ("fn_img",)),
    JobType("relion.initialmodel", "InitialModel", _fixed("relion.initialmodel"), _initialmodel_cmds,
            _initialmodel_outputs, ("fn_img",)),
    JobType("relion.refine3d", "Refine3D", _fixed("relion.refine3d"), _refine3d_cmds, _refine3d_outputs,
            ("fn_img", "fn_ref", "fn_mask")),
)}


def job_type(label: str) -> JobType:
    """The job type for a (possibly suffixed) RELION type label, matched by prefix as RELION does."""
    for base, jt in JOB_TYPES.items():
        if label == base or label.startswith(base + "."):
            return jt
    raise ValueError(f"job type {label!r} is not run by autoproc (supported: {', '.join(JOB_TYPES)})")


def import_signature(o: Options, project: Path) -> list[str]:
    """What an Import job would find now: the movies its pattern matches (new movies mean new work)."""
    pattern = o.get("fn_in_raw", "")
    return sorted(str(Path(p).relative_to(project)) for p in glob.glob(str(project / pattern)))

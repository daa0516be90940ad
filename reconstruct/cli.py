"""``reconstruct``: command-line entry to the numerical core and its jobs.

Each subcommand is a thin layer: it parses options (RELION's names where RELION has the option),
builds an options object and calls a driver.  Errors in the user's input end the program with one
clear message and exit status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backend import GPUUnavailableError
from .cli_options import add_gpu_flag
from .files.errors import InputError

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter
log = logging.getLogger("reconstruct")


def _cmd_project(a: argparse.Namespace) -> None:
    from .project_job import ProjectOptions, project_particles

    project_particles(ProjectOptions(Path(a.i), Path(a.ang), Path(a.o), a.ctf, a.pad, a.white_noise,
                                     a.batch, a.seed, a.gpu))


def _cmd_backproject(a: argparse.Namespace) -> None:
    from .reconstruct_job import ReconstructOptions, reconstruct_particles

    reconstruct_particles(ReconstructOptions(Path(a.i), Path(a.o), not a.no_ctf, a.sym, a.pad, a.maxres,
                                             a.subset, a.cls, a.batch, Path(a.project_dir) if a.project_dir else None,
                                             a.gpu))


def _cmd_refine3d(a: argparse.Namespace) -> None:
    from .refine3d import Refine3DOptions, refine3d

    res = refine3d(Refine3DOptions(
        star=Path(a.i), ref=Path(a.ref), out=Path(a.o), particle_diameter=a.particle_diameter, sym=a.sym,
        ini_high=a.ini_high, healpix_order=a.healpix_order, auto_local_healpix_order=a.auto_local_healpix_order,
        offset_range=a.offset_range, offset_step=a.offset_step, tau2_fudge=a.tau2_fudge,
        low_resol_join_halves=a.low_resol_join_halves, pad=a.pad, ctf=not a.no_ctf,
        adaptive_fraction=a.adaptive_fraction, max_significant=a.maxsig, max_iter=a.iter, batch=a.batch,
        seed=a.random_seed, gpu=a.gpu, continue_run=a.continue_run,
        project_dir=Path(a.project_dir) if a.project_dir else None, ssri=_ssri_options(a)))
    print(f"final map {res.final_map}: gold-standard resolution {res.resolution:.2f} Å after {res.iterations} "
          "iterations")


def _cmd_class2d(a: argparse.Namespace) -> None:
    from .class2d import Class2DOptions, class2d

    res = class2d(Class2DOptions(
        star=Path(a.i), out=Path(a.o), particle_diameter=a.particle_diameter, n_classes=a.K, algorithm=a.algorithm,
        n_iter=a.iter, psi_step=a.psi_step, offset_range=a.offset_range, offset_step=a.offset_step,
        tau2_fudge=a.tau2_fudge, class_inactivity_threshold=a.class_inactivity_threshold,
        center_classes=not a.dont_center_classes, ctf=not a.no_ctf, zero_mask=not a.no_zero_mask, pad=a.pad,
        ini_subset=a.grad_ini_subset, fin_subset=a.grad_fin_subset, stepsize=a.grad_stepsize,
        write_every=a.grad_write_iter, adaptive_fraction=a.adaptive_fraction, max_significant=a.maxsig,
        batch=a.batch, seed=a.random_seed, gpu=a.gpu, resume=a.continue_run,
        project_dir=Path(a.project_dir) if a.project_dir else None))
    n_used = int((res.class_distribution > 0.001 / len(res.class_distribution)).sum())
    print(f"{len(res.class_distribution)} classes ({n_used} non-empty) in {res.classes}; gallery {res.gallery}")


def _class3d_options(a: argparse.Namespace, ref: Path | None, stepsize: float, inflate: float) -> Any:
    from .class3d import Class3DOptions

    return Class3DOptions(
        star=Path(a.i), out=Path(a.o), particle_diameter=a.particle_diameter, ref=ref, n_classes=a.K,
        algorithm=a.algorithm, n_iter=a.iter, sym=a.sym,
        healpix_order=a.healpix_order, max_healpix_order=a.max_healpix_order, offset_range=a.offset_range,
        offset_step=a.offset_step, tau2_fudge=a.tau2_fudge, ini_high=getattr(a, "ini_high", 0.0),
        strict_highres_exp=getattr(a, "strict_highres_exp", -1.0),
        ctf=not a.no_ctf, zero_mask=not a.no_zero_mask, flatten_solvent=not a.no_flatten_solvent, pad=a.pad,
        ini_subset=a.grad_ini_subset, fin_subset=a.grad_fin_subset, stepsize=stepsize, inflate=inflate,
        write_every=a.grad_write_iter, adaptive_fraction=a.adaptive_fraction, max_significant=a.maxsig,
        coarse_keepsafe=a.coarse_keepsafe, batch=a.batch, seed=a.random_seed, gpu=a.gpu, resume=a.continue_run,
        project_dir=Path(a.project_dir) if a.project_dir else None)


def _cmd_initialmodel(a: argparse.Namespace) -> None:
    from .class3d import class3d

    opt = _class3d_options(a, None, a.grad_stepsize, -1.0)
    opt.sym, opt.align_sym = ("C1", a.sym) if a.run_in_c1 else (a.sym, "C1")
    res = class3d(opt)
    shares = ", ".join(f"{100 * p:.1f}%" for p in res.class_distribution)
    print(f"initial model {res.initial_model} (largest of {len(res.class_distribution)} classes: {shares}; "
          f"estimated resolution {res.resolution:.1f} Å)" + (
              f"; {a.sym} axes found, CC with its symmetrised self {res.symmetry_score:.3f}"
              if res.symmetry_score is not None else ""))
    print(f"class slices: {res.slices}")


def _cmd_class3d(a: argparse.Namespace) -> None:
    from .class3d import class3d

    vdam = a.algorithm == "vdam"
    res = class3d(_class3d_options(a, Path(a.ref), a.grad_stepsize if vdam else 1.0, 1.0))
    shares = ", ".join(f"{100 * p:.1f}%" for p in res.class_distribution)
    print(f"{len(res.maps)} classes ({shares}) in {res.maps[0].parent}; particles and classes in {res.data_star}; "
          f"slices {res.slices}")


def _ssri_options(a: argparse.Namespace) -> Any:
    from .ssri import SsriOptions

    if not a.ssri:
        return None
    return SsriOptions(alpha=a.ssri_alpha, beta=a.ssri_beta, gamma=a.ssri_gamma, eps=a.ssri_eps, epsp=a.ssri_epsp,
                       mu=a.ssri_mu, iters=a.ssri_iters, lr=a.ssri_lr, holdout=a.ssri_holdout,
                       search=not a.ssri_no_search, fsc_weight=not a.ssri_no_fsc_weight)


def _add_run_options(s: argparse.ArgumentParser, batch: int, batch_help: str, seed_help: str | None = None,
                     resume: bool = False) -> None:
    """The closing options of every command that reads particles: --batch, --random_seed (where the
    command draws anything at random), --continue (where it can resume), --project_dir, --gpu."""
    s.add_argument("--batch", type=int, default=batch, help=batch_help)
    if seed_help is not None:
        s.add_argument("--random_seed", type=int, default=0, help=seed_help)
    if resume:
        s.add_argument("--continue", dest="continue_run", action="store_true",
                       help="resume from the last written iteration in --o")
    s.add_argument("--project_dir", default=None, help="directory that image paths are relative to (default: cwd)")
    add_gpu_flag(s)


def _add_class3d_arguments(s: argparse.ArgumentParser, initial_model: bool) -> None:
    """Options shared by ``initialmodel`` and ``class3d`` (RELION's names and each job's defaults)."""
    s.add_argument("--i", required=True, help="particle STAR file (with CTF parameters)")
    s.add_argument("--o", required=True, help="output directory (files are DIR/run_*)")
    s.add_argument("--K", type=int, default=3 if initial_model else 4, help="number of classes")
    s.add_argument("--particle_diameter", type=float, required=True,
                   help="diameter of the spherical mask on the maps and circular mask on the images (Å)")
    s.add_argument("--sym", default="C1",
                   help="point group: initialmodel finds its axes in the final map; class3d imposes it")
    s.add_argument("--algorithm", choices=("vdam", "em"), default="vdam" if initial_model else "em",
                   help="optimisation algorithm")
    s.add_argument("--iter", type=int, default=0,
                   help="mini-batches (vdam) or iterations (em); 0 = 200 for vdam, 25 for em")
    s.add_argument("--healpix_order", type=int, default=1,
                   help="coarse angular sampling: HEALPix order (1 = 30°, oversampled to 15°; 2 = 15°)")
    s.add_argument("--max_healpix_order", type=int, default=2,
                   help="finest coarse order the automatic sampling may reach (RELION allows 3; each order "
                        "costs about 8x the orientation search)")
    s.add_argument("--offset_range", type=float, default=6.0,
                   help="translational search range around each particle's previous offset (pixels)")
    s.add_argument("--offset_step", type=float, default=2.0,
                   help="coarse translational step (pixels); oversampled to half")
    s.add_argument("--tau2_fudge", type=float, default=4.0,
                   help="regularisation parameter T (default 4, RELION's): with em each class is the data "
                        "average Wiener-filtered with tau2 = T x the power of the class's reference; with "
                        "vdam it scales the SNR of the step's FSC estimate.  Higher trusts the data more "
                        "(sharper maps, more overfitting)")
    s.add_argument("--no_ctf", action="store_true", help="do not correct for the CTF")
    s.add_argument("--no_zero_mask", action="store_true", help="do not mask the particle images")
    s.add_argument("--no_flatten_solvent", action="store_true", help="do not zero the maps outside the mask")
    s.add_argument("--pad", type=float, default=1.0, help="padding factor of the Fourier grids")
    s.add_argument("--grad_ini_subset", type=int, default=-1,
                   help="vdam: initial mini-batch size (-1: initialmodel 0.5%% of the particles, 200 to 5,000; "
                        "class3d 10%%, 200 to 100,000)")
    s.add_argument("--grad_fin_subset", type=int, default=-1,
                   help="vdam: final mini-batch size (-1: 10%% of the particles, 1,000 to 50,000 (initialmodel) "
                        "or 100,000 (class3d))")
    s.add_argument("--grad_stepsize", type=float, default=0.5 if initial_model else 0.3,
                   help="vdam: final step size" + (" (the first mini-batches take 0.9)" if initial_model else ""))
    s.add_argument("--grad_write_iter", type=int, default=10,
                   help="vdam: write the outputs every this many mini-batches")
    s.add_argument("--adaptive_fraction", type=float, default=0.999,
                   help="posterior mass of the coarse poses oversampled per particle")
    s.add_argument("--maxsig", type=int, default=-1,
                   help="most coarse poses oversampled per particle (-1: 5 K; RELION uses 100 K)")
    s.add_argument("--coarse_keepsafe", type=float, default=1.5,
                   help="the coarse pass compares images up to RELION's coarse image size with this safety factor "
                        "(RELION's 3D uses 1.2, which lost pose accuracy at 30° steps in our tests; 0: the full "
                        "current size, slower)")
    _add_run_options(s, 512, "particles per E-step batch (lower it if memory is short)",
                     "seed of the initial maps, classes and mini-batches", resume=True)


def _add_ssri_options(s: argparse.ArgumentParser) -> None:
    from .ssri import SsriOptions

    d = SsriOptions()
    g = s.add_argument_group("SSRI (OPUS-SSRI's sparseness- and smoothness-regularised maximisation)")
    g.add_argument("--ssri", action="store_true",
                   help="replace the FSC-based (tau2) regularisation of each half map by SSRI")
    g.add_argument("--ssri_alpha", type=float, default=d.alpha,
                   help="sparseness (log-l1) weight, in units of eps x the noise RMS of the data term's gradient")
    g.add_argument("--ssri_beta", type=float, default=d.beta,
                   help="smoothness (log-TV) weight, in units of eps' x the same noise RMS")
    g.add_argument("--ssri_gamma", type=float, default=d.gamma,
                   help="weight keeping each map close to the previous one, in units of the mean Fourier weight")
    g.add_argument("--ssri_eps", type=float, default=d.eps,
                   help="eps of the log-l1 term, in units of the density level (half the mean of the map's "
                        "strongest 1/32 of voxels)")
    g.add_argument("--ssri_epsp", type=float, default=d.epsp,
                   help="eps' of the log-TV term, in units of the same density level")
    g.add_argument("--ssri_mu", type=float, default=d.mu,
                   help="Nesterov smoothing of the gradient norm, in units of the density level; 0 = the "
                        "unregularised map's noise level per voxel")
    g.add_argument("--ssri_iters", type=int, default=d.iters, help="inner (proximal-gradient) iterations")
    g.add_argument("--ssri_lr", type=float, default=d.lr,
                   help="step size, in units of 1/(Lipschitz constant of the data, proximal and TV terms)")
    g.add_argument("--ssri_holdout", type=float, default=d.holdout,
                   help="fraction of each half's particles back-projected a second time, on their own, to "
                        "choose alpha and beta by cross-validation within the half and to keep the Wiener map's "
                        "shells where it predicts those particles better")
    g.add_argument("--ssri_no_search", action="store_true",
                   help="use --ssri_alpha/--ssri_beta as given instead of choosing among x4, x2, x1, x1/2 of them "
                        "(and no Wiener guard)")
    g.add_argument("--ssri_no_fsc_weight", action="store_true",
                   help="align against the SSRI half maps as they are (the reference implementation) instead of "
                        "weighting them by the plain half maps' FSC, which keeps anything beyond the "
                        "gold-standard resolution out of the references")


def _cmd_ssri_tune(a: argparse.Namespace) -> None:
    from .ssri_tune import SsriTuneOptions, as_flags, ssri_tune

    res = ssri_tune(SsriTuneOptions(Path(a.i), Path(a.ref), Path(a.o), a.particle_diameter, a.subset,
                                    Path(a.model) if a.model else None, not a.no_ctf, a.batch, a.random_seed, a.gpu,
                                    Path(a.project_dir) if a.project_dir else None))
    print(f"trials in {Path(a.o) / 'ssri_tune.star'}; refine with: {as_flags(res.best)}")


def _cmd_postprocess(a: argparse.Namespace) -> None:
    from .postprocess import PostprocessOptions, postprocess

    half2 = a.i2 or a.i.replace("half1", "half2")
    if half2 == a.i:
        raise InputError(a.i, "cannot derive the second half map's name", "pass --i2")
    res = postprocess(PostprocessOptions(Path(a.i), Path(half2), Path(a.o), Path(a.mask) if a.mask else None,
                                         a.angpix, a.ini_threshold, a.extend_inimask, a.width_soft_edge,
                                         a.autob_lowres, a.adhoc_bfac, a.randomize_at_fsc))
    print(f"final resolution {res.resolution:.2f} Å; B-factor for sharpening {res.bfactor:.1f} Å^2; "
          f"written {res.map}, {res.masked_map}, {res.star}")


def _cmd_fsc(a: argparse.Namespace) -> None:
    import pandas as pd

    from .files.star import write_star
    from .fsc import fsc, resolution_at, shell_resolutions

    m1, m2, px = _read_map_pair(a.map1, a.map2, a.angpix)
    curve = fsc(m1, m2)
    box = m1.shape[-1]
    for t in (0.5, 0.143):
        r = resolution_at(curve, box, px, t)
        print(f"FSC = {t:<5g} at {r.angstrom:.2f} Å (shell {r.shell})")
    if a.o:
        k = shell_resolutions(box, px)
        with np.errstate(divide="ignore"):
            ang = np.where(k > 0, 1 / np.maximum(k, 1e-12), 999.0)
        write_star(a.o, {"fsc": pd.DataFrame({"rlnSpectralIndex": np.arange(len(curve)), "rlnResolution": k,
                                              "rlnAngstromResolution": ang,
                                              "rlnFourierShellCorrelation": curve})})
    if a.plot:
        from .plots import plot_fsc

        plot_fsc({f"{Path(a.map1).name} vs {Path(a.map2).name}": curve}, box, px, a.plot)


def _read_map_pair(path1: str, path2: str, angpix: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Two maps of one shape and pixel size (``angpix`` > 0 overrides the headers)."""
    from .files.mrc import read_map

    m1, p1 = read_map(path1)
    m2, p2 = read_map(path2)
    if m1.shape != m2.shape:
        raise InputError(path2, f"shape {m2.shape} differs from {path1}'s {m1.shape}",
                         "resample one map to the other's box first")
    px = angpix if angpix > 0 else (p1 or p2)
    if px <= 0:
        raise InputError(path1, "the header has no pixel size", "pass --angpix")
    if angpix <= 0 and p1 and p2 and abs(p1 - p2) > 0.01 * p1:
        raise InputError(path2, f"pixel size {p2:.4f} Å differs from {path1}'s {p1:.4f} Å")
    return m1, m2, px


def _cmd_align_maps(a: argparse.Namespace) -> None:
    from .align_maps import align_maps
    from .files.mrc import write_map
    from .fsc import resolution_at
    from .geometry import matrix_to_euler

    moving, reference, px = _read_map_pair(a.moving, a.reference, a.angpix)
    if moving.ndim != 3:
        raise InputError(a.moving, "is not a 3D map")
    res = align_maps(moving, reference, px, allow_mirror=not a.no_mirror, diameter=a.particle_diameter)
    proper = res.rotation @ np.diag([-1.0, 1.0, 1.0]) if res.mirrored else res.rotation
    rot, tilt, psi = (float(v) for v in matrix_to_euler(proper))
    write_map(a.o, res.aligned, px)
    box = reference.shape[0]
    print(f"rotation (rot, tilt, psi) = ({rot:.2f}, {tilt:.2f}, {psi:.2f})°"
          + (" after mirroring x (the moving map had the other hand)" if res.mirrored else "")
          + f"; shift ({res.shift[0]:.2f}, {res.shift[1]:.2f}, {res.shift[2]:.2f}) Å; masked CC {res.correlation:.4f}")
    for t in (0.5, 0.143):
        r = resolution_at(res.fsc, box, px, t)
        print(f"FSC after alignment = {t:<5g} at {r.angstrom:.2f} Å (shell {r.shell})")
    print(f"wrote {a.o}")
    if a.plot:
        from .plots import plot_fsc

        plot_fsc({f"{Path(a.moving).name} aligned vs {Path(a.reference).name}": res.fsc}, box, px, a.plot)


def _cmd_align_symmetry(a: argparse.Namespace) -> None:
    from .files.mrc import read_map, write_map
    from .geometry import matrix_to_euler
    from .symmetry import symmetrise_map
    from .symmetry_align import align_symmetry

    vol, px = read_map(a.i)
    px = a.angpix if a.angpix > 0 else px
    if px <= 0:
        raise InputError(a.i, "the header has no pixel size", "pass --angpix")
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(a.i, f"is not a cubic 3D map (shape {vol.shape})")
    res = align_symmetry(vol, px, a.sym, diameter=a.particle_diameter)
    rot, tilt, psi = (float(v) for v in matrix_to_euler(res.rotation))
    out = symmetrise_map(res.aligned, a.sym) if a.symmetrise else res.aligned
    write_map(a.o, out, px)
    print(f"{a.sym} axes found: centred by ({res.shift[0]:.2f}, {res.shift[1]:.2f}, {res.shift[2]:.2f}) Å, then "
          f"rotated by (rot, tilt, psi) = ({rot:.2f}, {tilt:.2f}, {psi:.2f})°; CC with its {a.sym}-symmetrised "
          f"self {res.score:.4f}" + (" (low: is the map really this symmetric?)" if res.score < 0.8 else ""))
    print(f"wrote {a.o}" + (f" (symmetrised in {a.sym})" if a.symmetrise else ""))


def _cmd_mask(a: argparse.Namespace) -> None:
    from .files.mrc import read_map, write_map
    from .masks import soft_sphere, threshold_mask

    vol, px = read_map(a.i)
    px = a.angpix if a.angpix > 0 else px
    if a.sphere > 0:
        mask = soft_sphere(vol.shape, a.sphere / (2 * px), a.soft_edge)
    else:
        if a.threshold is None:
            raise InputError(a.i, "give --ini_threshold (density level) or --sphere (diameter in Å)")
        mask = threshold_mask(vol, a.threshold, a.extend_inimask, a.width_soft_edge)
    write_map(a.o, mask, px)
    print(f"mask written to {a.o}: {float(mask.sum()):.0f} voxels inside (soft-edge weighted)")


def _cmd_symmetry(a: argparse.Namespace) -> None:
    from .geometry import matrix_to_euler
    from .symmetry import symmetry_operators

    ops = symmetry_operators(a.sym)
    print(f"symmetry group {a.sym.upper()}: {len(ops)} operators")
    for i, r in enumerate(ops, 1):
        rot, tilt, psi = (float(v) for v in matrix_to_euler(r)) if np.linalg.det(r) > 0 else (np.nan,) * 3
        print(f" R({i}) = {np.array2string(r, precision=5, suppress_small=True).replace(chr(10), ' ')}"
              f"  Euler: {rot:.3f} {tilt:.3f} {psi:.3f}")


def _cmd_simulate(a: argparse.Namespace) -> None:
    from .simulate import MovieSimulation, ParticleSimulation, atomic_model_map, simulate_movies, simulate_particles

    models = a.model
    if a.kind == "particles":
        maps = [atomic_model_map(m, a.box, a.angpix) for m in models]
        cfg = ParticleSimulation(n_particles=a.n, box=a.box, pixel_size=a.angpix, snr=a.snr,
                                 junk_fraction=a.junk_fraction, seed=a.seed, max_offset=a.max_offset,
                                 particle_diameter=a.particle_diameter)
        truth = simulate_particles(maps, cfg, a.o)
        print(f"wrote {len(truth.table)} particles: {truth.particles_star} (truth in {Path(a.o) / 'truth'})")
    else:
        maps = [atomic_model_map(m, a.box, a.angpix) for m in models]
        cfg = MovieSimulation(n_movies=a.n, size=a.size, pixel_size=a.angpix, n_frames=a.frames, snr=a.snr,
                              seed=a.seed, particle_diameter=a.particle_diameter or 0.7 * a.box * a.angpix)
        simulate_movies(maps, a.angpix, cfg, a.o)
        print(f"wrote {a.n} movies and {Path(a.o) / 'movies.star'} (truth in {Path(a.o) / 'truth'})")


def build_parser() -> argparse.ArgumentParser:
    """The ``reconstruct`` argument parser with all subcommands."""
    p = argparse.ArgumentParser(prog="reconstruct", formatter_class=HELP_FORMAT,
                                description="RELION-compatible cryo-EM reconstruction tools "
                                            "(NumPy on CPU, CuPy on GPU).")
    p.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("project", formatter_class=HELP_FORMAT,
                       help="project a map for the poses/CTFs of a STAR file (like relion_project)",
                       description="Project a 3D map into one image per particle row of a STAR file, using "
                                   "its Euler angles, origin offsets and (with --ctf) CTF parameters. "
                                   "Writes ROOT.mrcs and ROOT.star.")
    s.add_argument("--i", required=True, help="input 3D map (.mrc)")
    s.add_argument("--ang", required=True, help="particle STAR file with rlnAngleRot/Tilt/Psi (and CTF columns)")
    s.add_argument("--o", default="proj", help="output root name")
    s.add_argument("--ctf", action="store_true", help="multiply the projections by each particle's CTF")
    s.add_argument("--pad", type=float, default=2.0, help="padding factor of the Fourier-space projector")
    s.add_argument("--white_noise", type=float, default=0.0, help="standard deviation of Gaussian noise to add")
    s.add_argument("--batch", type=int, default=256, help="images projected per batch")
    s.add_argument("--seed", type=int, default=0, help="random seed for the noise")
    add_gpu_flag(s)
    s.set_defaults(func=_cmd_project)

    s = sub.add_parser("backproject", formatter_class=HELP_FORMAT,
                       help="reconstruct a map from posed particles (like relion_reconstruct)",
                       description="Direct Fourier reconstruction from particles with known orientations: "
                                   "CTF-weighted back-projection, gridding correction, optional symmetry.")
    s.add_argument("--i", required=True, help="particle STAR file with orientations")
    s.add_argument("--o", required=True, help="output map (.mrc)")
    s.add_argument("--no_ctf", action="store_true", help="do not correct for the CTF")
    s.add_argument("--sym", default="C1", help="point group (C1, Cn, Dn, T, O, I, ...)")
    s.add_argument("--pad", type=float, default=2.0, help="padding factor")
    s.add_argument("--maxres", type=float, default=-1.0, help="highest resolution to include (Å); -1: Nyquist")
    s.add_argument("--subset", type=int, default=0, choices=(0, 1, 2), help="use only this rlnRandomSubset (0: all)")
    s.add_argument("--class", dest="cls", type=int, default=-1, help="use only this rlnClassNumber (-1: all)")
    _add_run_options(s, 256, "images read and inserted per batch")
    s.set_defaults(func=_cmd_backproject)

    s = sub.add_parser("refine3d", formatter_class=HELP_FORMAT,
                       help="3D auto-refine with gold-standard half sets (like relion_refine --auto_refine)",
                       description="Refine particle poses and a 3D map from a starting reference: two "
                                   "independent half sets, HEALPix orientation sampling made finer as the "
                                   "resolution stops improving, local searches from --auto_local_healpix_order, "
                                   "FSC-based regularisation. Writes RELION's run_it*/run_* files into --o; "
                                   "--continue resumes after the last completed iteration.")
    s.add_argument("--i", required=True, help="particle STAR file (with CTF parameters)")
    s.add_argument("--ref", required=True, help="initial reference map, same box and pixel size as the particles")
    s.add_argument("--o", required=True, help="output directory (files are DIR/run_*)")
    s.add_argument("--particle_diameter", type=float, required=True, help="diameter of the soft solvent mask (Å)")
    s.add_argument("--sym", default="C1", help="point group")
    s.add_argument("--ini_high", type=float, default=60.0, help="low-pass the reference to this resolution (Å)")
    s.add_argument("--healpix_order", type=int, default=2, help="initial HEALPix order (2: 15 degrees)")
    s.add_argument("--auto_local_healpix_order", type=int, default=4,
                   help="from this HEALPix order on, search locally around the previous poses")
    s.add_argument("--offset_range", type=float, default=5.0, help="translational search range (pixels)")
    s.add_argument("--offset_step", type=float, default=1.0, help="translational search step (pixels)")
    s.add_argument("--tau2_fudge", type=float, default=1.0, help="regularisation parameter T")
    s.add_argument("--low_resol_join_halves", type=float, default=40.0,
                   help="resolution (Å) below which the two half maps are averaged")
    s.add_argument("--pad", type=float, default=2.0, help="padding factor of the projectors")
    s.add_argument("--no_ctf", action="store_true", help="do not correct for the CTF")
    s.add_argument("--adaptive_fraction", type=float, default=0.999,
                   help="posterior mass of the poses kept per particle")
    s.add_argument("--maxsig", type=int, default=256, help="most poses per particle kept for the M-step")
    s.add_argument("--iter", type=int, default=30, help="maximum number of iterations")
    _add_ssri_options(s)
    _add_run_options(s, 64, "particles per batch in the E-step",
                     "seed for the half-set split and sampling perturbation", resume=True)
    s.set_defaults(func=_cmd_refine3d)

    s = sub.add_parser("class2d", formatter_class=HELP_FORMAT,
                       help="2D classification, VDAM or EM (like RELION's Class2D job)",
                       description="Classify particles into --K 2D class averages with in-plane rotation and "
                                   "translation search and CTF correction. --algorithm vdam (RELION 4's default) "
                                   "takes --iter mini-batches of growing size with adaptive-moment gradient steps, "
                                   "replacing inactive classes; --algorithm em takes --iter full expectation-"
                                   "maximisation passes. Writes RELION's run_it* files into --o (every "
                                   "--grad_write_iter mini-batches and at the end) and run_classes.png, the "
                                   "classes sorted by size; --continue resumes after the last written iteration.")
    s.add_argument("--i", required=True, help="particle STAR file (with CTF parameters)")
    s.add_argument("--o", required=True, help="output directory (files are DIR/run_*)")
    s.add_argument("--K", type=int, default=50, help="number of classes")
    s.add_argument("--particle_diameter", type=float, required=True,
                   help="diameter of the circular mask on images and classes (Å)")
    s.add_argument("--algorithm", choices=("vdam", "em"), default="vdam", help="optimisation algorithm")
    s.add_argument("--iter", type=int, default=0,
                   help="mini-batches (vdam) or iterations (em); 0 = 200 for vdam, 25 for em")
    s.add_argument("--psi_step", type=float, default=6.0,
                   help="in-plane angular step (degrees) after oversampling; the coarse search uses twice this")
    s.add_argument("--offset_range", type=float, default=5.0,
                   help="translational search range around each particle's previous offset (pixels)")
    s.add_argument("--offset_step", type=float, default=1.0,
                   help="translational step (pixels) after oversampling; the coarse search uses twice this")
    s.add_argument("--tau2_fudge", type=float, default=2.0, help="regularisation parameter T")
    s.add_argument("--class_inactivity_threshold", type=float, default=0.1,
                   help="vdam: replace a class holding less than this fraction of an average class (0 = never)")
    s.add_argument("--dont_center_classes", action="store_true", help="do not re-centre class averages")
    s.add_argument("--no_ctf", action="store_true", help="do not correct for the CTF")
    s.add_argument("--no_zero_mask", action="store_true", help="do not mask the particle images")
    s.add_argument("--pad", type=float, default=2.0, help="padding factor of the Fourier grids")
    s.add_argument("--grad_ini_subset", type=int, default=-1,
                   help="vdam: initial mini-batch size (-1: 0.5%% of the particles, 200 to 10,000)")
    s.add_argument("--grad_fin_subset", type=int, default=-1,
                   help="vdam: final mini-batch size (-1: 5%% of the particles, 1,000 to 100,000)")
    s.add_argument("--grad_stepsize", type=float, default=0.3,
                   help="vdam: final step size (the first mini-batches take 0.9)")
    s.add_argument("--grad_write_iter", type=int, default=10,
                   help="vdam: write the outputs every this many mini-batches")
    s.add_argument("--adaptive_fraction", type=float, default=0.999,
                   help="posterior mass of the coarse poses oversampled per particle")
    s.add_argument("--maxsig", type=int, default=-1,
                   help="most coarse poses oversampled per particle (-1: 5 K for vdam and em; 0: no cap, as "
                        "RELION's EM, many times slower while the classes are blurred)")
    _add_run_options(s, 256, "particles per E-step batch (lower it if memory is short)",
                     "seed of the initial references and mini-batches", resume=True)
    s.set_defaults(func=_cmd_class2d)

    s = sub.add_parser("initialmodel", formatter_class=HELP_FORMAT,
                       help="3D initial model without a reference, by VDAM (like RELION's InitialModel job)",
                       description="Build --K 3D classes from Gaussian-blob starts by --iter VDAM mini-batches of "
                                   "growing size (0.5%% then 10%% of the particles), HEALPix orientation search "
                                   "with oversampling and translations, CTF correction; no resolution limit is "
                                   "imposed. The most populated class is aligned to --sym's axes (the run itself "
                                   "is in C1 unless --no_run_in_c1) and written as DIR/initial_model.mrc. Writes "
                                   "RELION's run_it* files and a PNG of every class's central slices every "
                                   "--grad_write_iter mini-batches; --continue resumes after the last written one.")
    _add_class3d_arguments(s, initial_model=True)
    s.add_argument("--no_run_in_c1", dest="run_in_c1", action="store_false",
                   help="search in --sym throughout instead of running in C1 and aligning the axes afterwards")
    s.set_defaults(func=_cmd_initialmodel)

    s = sub.add_parser("class3d", formatter_class=HELP_FORMAT,
                       help="3D classification from a reference (like RELION's Class3D job)",
                       description="Classify particles into --K 3D classes, all starting from --ref low-passed to "
                                   "--ini_high; in the first iteration every particle goes to a random class, which "
                                   "breaks the tie. --algorithm em (RELION's default) takes --iter full "
                                   "expectation-maximisation passes; vdam takes mini-batches of 10%% of the data. "
                                   "Writes RELION's run_it* files (classes, model, data with rlnClassNumber) and a "
                                   "PNG of every class's central slices; --continue resumes.")
    s.add_argument("--ref", required=True, help="reference map (box and pixel size of the particles)")
    s.add_argument("--ini_high", type=float, default=60.0, help="low-pass filter the reference to this resolution (Å)")
    s.add_argument("--strict_highres_exp", type=float, default=-1.0,
                   help="align and classify using frequencies up to this resolution only (Å; the maps are still "
                        "reconstructed to the current resolution); RELION's 'Limit resolution E-step', which keeps "
                        "classes from locking onto noise (-1: no limit)")
    _add_class3d_arguments(s, initial_model=False)
    s.set_defaults(func=_cmd_class3d)

    s = sub.add_parser("ssri-tune", formatter_class=HELP_FORMAT,
                       help="search SSRI's parameters on a refined subset (the OPUS-SSRI paper's ordered search)",
                       description="Back-project a subset of refined particles per half set, then try alpha, beta, "
                                   "gamma and eps' in that order (each over a small grid, the others fixed at the "
                                   "best so far), keeping the value with the best FSC between the two SSRI half "
                                   "maps. Writes DIR/ssri_tune.star and prints the refine3d options to use. "
                                   "refine3d --ssri chooses its parameters by itself; this is for checking them.")
    s.add_argument("--i", required=True, help="refined particles with rlnRandomSubset (e.g. run_data.star)")
    s.add_argument("--ref", required=True, help="the map SSRI starts from (e.g. run_class001.mrc)")
    s.add_argument("--o", required=True, help="output directory")
    s.add_argument("--particle_diameter", type=float, required=True, help="solvent mask diameter (Å)")
    s.add_argument("--subset", type=int, default=2000, help="particles used, half from each half set")
    s.add_argument("--model", default=None,
                   help="run_model.star with the noise spectrum (default: the one next to --i, else estimated)")
    s.add_argument("--no_ctf", action="store_true", help="do not correct for the CTF")
    _add_run_options(s, 256, "particles per back-projection batch", "seed of the subset and the held-out voxels")
    s.set_defaults(func=_cmd_ssri_tune)

    s = sub.add_parser("postprocess", formatter_class=HELP_FORMAT,
                       help="masked, phase-randomisation-corrected FSC and sharpening (like relion_postprocess)",
                       description="From two unfiltered half maps: an automatic (or given) soft mask, unmasked "
                                   "and masked FSC with the phase-randomisation correction, the resolution at "
                                   "FSC 0.143, an automatic Guinier B-factor, and the sharpened map. Writes "
                                   "ROOT.mrc, ROOT_masked.mrc, ROOT.star and ROOT_fsc.png.")
    s.add_argument("--i", required=True, help="half map 1 (e.g. run_half1_class001_unfil.mrc)")
    s.add_argument("--i2", default=None, help="half map 2 (default: --i with half1 replaced by half2)")
    s.add_argument("--o", default="postprocess", help="output root name")
    s.add_argument("--mask", default=None, help="soft mask (0..1); default: made automatically")
    s.add_argument("--angpix", type=float, default=-1.0, help="pixel size in Å (-1: from the header)")
    s.add_argument("--ini_threshold", type=float, default=None,
                   help="automatic mask: density threshold of the 15 Å low-passed average (default: from the solvent)")
    s.add_argument("--extend_inimask", type=float, default=3.0, help="automatic mask: pixels to grow")
    s.add_argument("--width_soft_edge", type=float, default=6.0, help="automatic mask: soft edge width (px)")
    s.add_argument("--autob_lowres", type=float, default=10.0, help="lowest resolution (Å) in the Guinier fit")
    s.add_argument("--adhoc_bfac", type=float, default=None, help="sharpen with this B-factor instead of fitting")
    s.add_argument("--randomize_at_fsc", type=float, default=0.8,
                   help="randomise phases beyond the resolution where the unmasked FSC drops below this")
    s.set_defaults(func=_cmd_postprocess)

    s = sub.add_parser("fsc", formatter_class=HELP_FORMAT, help="FSC between two maps and the resolution",
                       description="Fourier shell correlation of two maps; prints the resolution at 0.5 "
                                   "and 0.143 and optionally writes the curve as STAR and PNG.")
    s.add_argument("map1", help="first map (e.g. half map 1)")
    s.add_argument("map2", help="second map (e.g. half map 2, or the truth)")
    s.add_argument("--angpix", type=float, default=-1.0, help="pixel size in Å (-1: from the header)")
    s.add_argument("--o", default=None, help="write the FSC table to this STAR file")
    s.add_argument("--plot", default=None, help="write the FSC curve to this PNG file")
    s.set_defaults(func=_cmd_fsc)

    s = sub.add_parser("align-maps", formatter_class=HELP_FORMAT,
                       help="rotate, shift (and mirror) one map onto another; FSC after alignment",
                       description="Find the rotation, translation and hand that best put MOVING onto REFERENCE: "
                                   "a global search over a ~15° rotation grid (each with its best FFT-found shift) "
                                   "at a coarse sampling, then a local refinement; writes MOVING resampled onto "
                                   "REFERENCE's grid and prints the motion and the FSC at 0.5 and 0.143. Needed to "
                                   "compare maps that agree only up to a rigid motion, e.g. initial models.")
    s.add_argument("moving", help="map to move")
    s.add_argument("reference", help="map to align to (same box)")
    s.add_argument("--o", required=True, help="output: the aligned map")
    s.add_argument("--angpix", type=float, default=-1.0, help="pixel size in Å (-1: from the headers)")
    s.add_argument("--particle_diameter", type=float, default=None,
                   help="diameter (Å) of the mask the maps are compared in (default: 90%% of the box)")
    s.add_argument("--no_mirror", action="store_true", help="do not try the other hand")
    s.add_argument("--plot", default=None, help="write the FSC curve after alignment to this PNG file")
    s.set_defaults(func=_cmd_align_maps)

    s = sub.add_parser("align-symmetry", formatter_class=HELP_FORMAT,
                       help="find a point group's axes in a C1 map and rotate it into RELION's frame",
                       description="Centre the map on its centre of mass, search the rotation that makes it agree "
                                   "best with itself under the group's operators (RELION's convention: Cn/Dn main "
                                   "axis along z, Dn 2-fold along x, ...), refine it locally, and write the map in "
                                   "that frame, ready for refinement with --sym. Prints the motion and how "
                                   "symmetric the map is (CC with its symmetrised self).")
    s.add_argument("--i", required=True, help="input map (e.g. an initial model made in C1)")
    s.add_argument("--sym", required=True, help="point group (C2, C4, D2, D7, T, O, I, ...)")
    s.add_argument("--o", required=True, help="output map in the group's frame")
    s.add_argument("--angpix", type=float, default=-1.0, help="pixel size in Å (-1: from the header)")
    s.add_argument("--particle_diameter", type=float, default=None,
                   help="diameter (Å) of the region compared (default: 90%% of the box)")
    s.add_argument("--symmetrise", action="store_true", help="also average the output over the group")
    s.set_defaults(func=_cmd_align_symmetry)

    s = sub.add_parser("mask", formatter_class=HELP_FORMAT, help="make a soft mask (like relion_mask_create)",
                       description="A soft mask from a density threshold (binarise, extend, cosine edge) or a sphere.")
    s.add_argument("--i", required=True, help="input map")
    s.add_argument("--o", default="mask.mrc", help="output mask")
    s.add_argument("--ini_threshold", dest="threshold", type=float, default=None, help="density threshold")
    s.add_argument("--extend_inimask", type=float, default=3.0, help="pixels to grow the binary mask by")
    s.add_argument("--width_soft_edge", type=float, default=6.0, help="width of the cosine edge in pixels")
    s.add_argument("--sphere", type=float, default=-1.0, help="instead, a sphere of this diameter (Å)")
    s.add_argument("--soft_edge", type=float, default=3.0, help="edge width (px) of the sphere")
    s.add_argument("--angpix", type=float, default=-1.0, help="pixel size in Å (-1: from the header)")
    s.set_defaults(func=_cmd_mask)

    s = sub.add_parser("symmetry", formatter_class=HELP_FORMAT, help="print a point group's operators",
                       description="Print the operators of a point group in RELION's conventions "
                                   "(as relion_refine --print_symmetry_ops).")
    s.add_argument("--sym", required=True, help="point group, e.g. C4, D2, T, O, I, I3")
    s.set_defaults(func=_cmd_symmetry)

    s = sub.add_parser("simulate", formatter_class=HELP_FORMAT, help="simulate data with known ground truth",
                       description="Simulate extracted particles, or micrograph movies, from atomic models "
                                   "(PDB/mmCIF). Writes a RELION-style project and truth/ beside it.")
    s.add_argument("kind", choices=("particles", "movies"), help="what to simulate")
    s.add_argument("--model", required=True, nargs="+", help="atomic model(s); several give a heterogeneous set")
    s.add_argument("--o", required=True, help="output project directory")
    s.add_argument("--n", type=int, default=1000, help="number of particles (or movies)")
    s.add_argument("--box", type=int, default=64, help="particle box in pixels")
    s.add_argument("--angpix", type=float, default=3.0, help="pixel size in Å")
    s.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio (variance ratio in the particle)")
    s.add_argument("--junk_fraction", type=float, default=0.0, help="fraction of junk particles (particles only)")
    s.add_argument("--max_offset", type=float, default=6.0, help="largest true origin offset in Å (particles only)")
    s.add_argument("--particle_diameter", type=float, default=None, help="particle diameter in Å")
    s.add_argument("--size", type=int, default=512, help="micrograph edge in pixels (movies only)")
    s.add_argument("--frames", type=int, default=16, help="frames per movie (movies only)")
    s.add_argument("--seed", type=int, default=0, help="random seed (the output is deterministic for a seed)")
    s.set_defaults(func=_cmd_simulate)
    for register in _job_registrars():
        register(sub)
    return p


def _job_registrars() -> list[Any]:
    """Subcommands whose drivers define their own parser (the pre-processing jobs)."""
    from . import autopick_job, ctffind_job, extract_job, import_job, motioncorr_job, select_job

    return [import_job.register, motioncorr_job.register, ctffind_job.register, select_job.register,
            autopick_job.register, extract_job.register]


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv``, set up logging and run the chosen subcommand; user errors give one line and exit 2.

    Shared by the ``reconstruct``, ``ranker`` and ``autoproc`` console scripts.
    """
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        args.func(args)
    except (InputError, GPUUnavailableError, MemoryError, ValueError) as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``reconstruct`` console script."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

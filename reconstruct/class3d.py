"""3D classification: RELION's InitialModel job (VDAM from Gaussian blobs) and Class3D job (EM or VDAM).

Each mini-batch (or EM iteration): an E-step over every particle of the batch -- a coarse search over K
classes x HEALPix orientations (the current order, RELION's grid in the group's asymmetric unit, randomly
perturbed each time) x translations around each particle's previous offset, then every significant coarse pose
oversampled once (8 finer orientations x 4 finer offsets), as RELION's adaptive oversampling, the coarse pass
at a coarse image size by RELION's rule with a safety factor of 1.5 (RELION's 3D: 1.2;
:func:`reconstruct.sampling.coarse_image_size`) and the fine one at the current size -- and an M-step that
back-projects, per half set (particle index mod 2), the residuals w c (X - c A) / sigma2 and weights w c^2 /
sigma2 into the K class grids, from which :mod:`reconstruct.vdam` takes one step (or, with ``--algorithm em``,
RELION's EM update: the data average Wiener-filtered with tau2 = T x the reference's power, ``--tau2_fudge``
T). Samples of one fine orientation are summed before they are back-projected, so the back-projection costs at
most one slice per distinct fine orientation per batch. Nothing loops over particles or poses in Python.

The initial model starts from K references of random Gaussian blobs on the grey-scale of a
reconstruction of the data at random orientations (RELION's ``--denovo_3dref``); the sampling gets
finer (``--healpix_order`` up to ``--max_healpix_order``) when the resolution stops improving and the
orientations are estimated better than the grid.  After the last mini-batch the most populated class
is aligned to the requested point group (:mod:`reconstruct.symmetry_align`) and written as
``initial_model.mrc``, as RELION's job runs ``relion_align_symmetry``.  Class3D starts every class
from the low-passed reference and breaks the tie by assigning each particle to a random class in the
first iteration.  Outputs are RELION's (``run_itNNN_{class00k.mrc,model.star,data.star,optimiser.star,
sampling.star}``, the VDAM moments) plus a PNG of each class's central slices; ``--continue``
resumes from the last written iteration.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from .backend import to_numpy
from .classifier_base import ClassifierBase
from .files.errors import InputError
from .files.mrc import deinterleave_complex, interleave_complex, read_map, write_map
from .files.star import read_star, write_star
from .fourier import centred_fft, crop_half, lowpass_filter, shift_images
from .geometry import angle_between, euler_to_matrix, matrix_to_euler, random_rotations
from .likelihood import fourier_mask, inverse_sigma2_curve, score_poses, significant_posteriors
from .masks import soft_sphere
from .memory import check_fits
from .oversampling import FineSamples, argmax_per_image, normalise_per_image
from .particles import origins_px
from .progress import progress
from .refine3d import image_power_spectrum, reference_scale
from .sampling import angular_step, coarse_image_size, orientations, translations
from .symmetry import group_order, symmetry_operators
from .vdam import (
    Moments,
    VdamSchedule,
    apply_step,
    class_steps,
    fsc_weights,
    half_set_fsc,
    power_tau2,
    update_moments,
    wiener_weights,
)

log = logging.getLogger("reconstruct")

#: Rotation vectors (degrees, in units of the coarse angular step) of the 8 finer orientations that
#: oversample one coarse orientation: the centres of the 2 x 2 x 2 sub-cells of its cell.
_CHILD_ROTVECS = np.array([[x, y, z] for x in (-0.25, 0.25) for y in (-0.25, 0.25) for z in (-0.25, 0.25)])
_N_CHILD = len(_CHILD_ROTVECS)


@dataclass
class Class3DOptions:
    """Options of ``reconstruct initialmodel`` and ``reconstruct class3d`` (RELION's names)."""

    star: Path  # --i
    out: Path  # --o: output directory; files are DIR/run_*
    particle_diameter: float  # --particle_diameter (Å)
    ref: Path | None = None  # --ref: None = de novo from blobs (initial model)
    n_classes: int = 3  # --K
    algorithm: str = "vdam"  # --algorithm: vdam or em
    n_iter: int = 0  # --iter: 0 = 200 mini-batches (vdam) or 25 iterations (em)
    sym: str = "C1"  # --sym: the group searched in (the initial model runs in C1, see align_sym)
    align_sym: str = "C1"  # initial model: the group whose axes are found in the final map
    healpix_order: int = 1  # --healpix_order: coarse sampling (1 = 30 degrees, oversampled to 15)
    max_healpix_order: int = 2  # --max_healpix_order: finest coarse order auto-sampling may reach
    offset_range: float = 6.0  # --offset_range (px, around each particle's previous offset)
    offset_step: float = 2.0  # --offset_step (px, coarse; oversampled to half)
    tau2_fudge: float = 4.0  # --tau2_fudge (T)
    ini_high: float = 0.0  # --ini_high: low-pass of --ref (Å); 0 = none
    strict_highres_exp: float = -1.0  # --strict_highres_exp: E-step uses frequencies up to this (Å); -1 = all
    class_inactivity_threshold: float = 0.0  # vdam class replacement (0 = off, RELION's InitialModel)
    ctf: bool = True
    zero_mask: bool = True
    flatten_solvent: bool = True
    pad: float = 1.0  # --pad (RELION's InitialModel uses 1)
    ini_subset: int = -1
    fin_subset: int = -1
    stepsize: float = 0.5  # final VDAM step (0.5 initial model, 0.3 classification)
    inflate: float = -1.0  # initial step = stepsize * inflate (-1: 0.9 / stepsize; 1: no schedule)
    write_every: int = 10
    adaptive_fraction: float = 0.999
    max_significant: int = -1  # -1: 5 K coarse poses per particle (RELION: 100 K)
    coarse_keepsafe: float = 1.5  # coarse pass at RELION's coarse image size, this factor (RELION: 1.2); 0 = full
    batch: int = 512
    seed: int = 0
    gpu: bool = False
    resume: bool = False
    project_dir: Path | None = None


@dataclass
class Class3DResult:
    """Where the final outputs are, and the numbers a caller wants."""

    maps: list[Path]
    model_star: Path
    data_star: Path
    slices: Path
    iterations: int
    class_distribution: np.ndarray
    resolution: float
    initial_model: Path | None = None
    symmetry_score: float | None = None


@dataclass
class _State:
    it: int
    refs: Any  # (K, N, N, N)
    mom: Moments
    pi: np.ndarray
    sigma2: np.ndarray  # (N/2+1,)
    sigma_offset: float  # px
    resolution_shell: int
    order: int
    fsc: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    acc_rot: np.ndarray = field(default_factory=lambda: np.zeros(0))
    acc_trans: np.ndarray = field(default_factory=lambda: np.zeros(0))
    completeness: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    loglik: float = 0.0
    avg_pmax: float = 0.0
    changes_classes: float = 0.0
    checked_shell: int = 0  # resolution at the last auto-sampling check


def _even(n: float) -> int:
    m = math.ceil(n)
    return m + (m % 2)


def child_rotations(step: float) -> np.ndarray:
    """The 8 small rotations (8, 3, 3) that split a coarse orientation cell of ``step`` degrees;
    ``delta @ A`` is a finer orientation around coarse pose A."""
    return Rotation.from_rotvec(np.deg2rad(_CHILD_ROTVECS * step)).as_matrix()


class _Classifier(ClassifierBase):
    def __init__(self, opt: Class3DOptions) -> None:
        if not 0 <= opt.healpix_order <= opt.max_healpix_order <= 4:
            raise ValueError("need 0 <= --healpix_order <= --max_healpix_order <= 4")
        radius_px = self.open_job(opt, 3)
        xp = self.xp
        self.sym_ops = symmetry_operators(opt.sym)
        self.maxsig = opt.max_significant if opt.max_significant > 0 else 5 * self.k
        # Grids: references, moments, two halves of data and weights; the coarse slices at the finest order.
        n_coarse = self.k * 12 * 4**opt.max_healpix_order * 6 * 2**opt.max_healpix_order // group_order(opt.sym)
        need = (self.grids.cells * self.k * 8 * 9 + n_coarse * self.box * (self.box // 2 + 1) * 8
                + opt.batch * self.maxsig * _N_CHILD * self.box * (self.box // 2 + 1) * 8)
        check_fits(need, xp, f"3D classification of K={self.k} classes at box {self.box}",
                   "use fewer classes (--K), a lower --max_healpix_order, a smaller --batch or --maxsig, "
                   "or downsampled particles")
        self.mask2d = soft_sphere((self.box, self.box), radius_px, 5.0, xp)
        self.mask3d = soft_sphere((self.box,) * 3, radius_px, 5.0, xp)
        kind = "initial_model" if opt.ref is None else "3d"
        self.schedule = VdamSchedule(n_iter=self.n_iter, n_particles=self.n, ini_subset=opt.ini_subset,
                                     fin_subset=opt.fin_subset, stepsize=opt.stepsize, inflate=opt.inflate,
                                     tau2_fudge=opt.tau2_fudge, kind=kind)
        self.shifts_coarse = translations(opt.offset_range, opt.offset_step)
        self.shift_children = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * (0.25 * opt.offset_step)
        self.rot = np.tile(np.eye(3), (self.n, 1, 1))
        self.offsets = np.zeros((self.n, 2)) if opt.ref is None else np.array(origins_px(self.table, self.px))
        self.unfiltered_power: Any = None  # (K, shells) power of --ref before its low-pass: the first tau2 (EM)

    # -- set-up ---------------------------------------------------------------------------------
    def initial_state(self) -> _State:
        """Noise from the images' power; references of random blobs (de novo) or the given map."""
        opt, xp = self.opt, self.xp
        rng = np.random.default_rng(opt.seed)
        rows = np.arange(min(self.n, 1000))
        sigma2 = image_power_spectrum(self.src, rows, opt.batch, xp)
        if opt.ref is None:
            refs = self.blob_references(self.seed_references(rows, sigma2, rng), rng)
            resolution_shell = 5
        else:
            refs, resolution_shell = self.reference_maps(sigma2)
        z = np.zeros((self.k, self.box // 2 + 2))
        return _State(0, refs, Moments.empty(self.grids), np.full(self.k, 1.0 / self.k), sigma2,
                      opt.offset_range / 3, resolution_shell, opt.healpix_order, z.copy(), np.zeros(self.k),
                      np.zeros(self.k), z.copy())

    def seed_references(self, rows: np.ndarray, sigma2: np.ndarray, rng: np.random.Generator) -> Any:
        """Per class, a CTF-weighted reconstruction of its share of ``rows`` at random orientations."""
        xp, g = self.xp, self.grids
        d, w = g.zeros(), g.zeros(xp.float32)
        inv_s2 = xp.asarray(inverse_sigma2_curve(sigma2, self.box), dtype=xp.float32)
        for r, imgs in self.src.batches(self.opt.batch, rows):
            x = centred_fft(xp.asarray(imgs) * self.mask2d, 2)
            c = self.ctf(r, xp) if self.ctf else xp.ones(x.shape, xp.float32)
            g.insert(d, w, r % self.k, random_rotations(r.size, rng), x * c * inv_s2, c * c * inv_s2)
        d, w = g.friedel(d), g.friedel(w, conjugate=False)
        mean_w = float(w[w > 0].mean()) if bool((w > 0).any()) else 1.0
        return g.images(d / (w + 0.1 * mean_w))

    def blob_references(self, seed: Any, rng: np.random.Generator) -> Any:
        """40 positive minus half of 40 negative Gaussian blobs per class, centred ~N(box/2, d/6), on the
        seed's grey-scale, masked with the background outside (RELION's ``make_blobs_3d``)."""
        n = self.box
        d = self.opt.particle_diameter / self.px
        seed = to_numpy(seed)
        zz, yy, xx = np.mgrid[0:n, 0:n, 0:n].astype(np.float32)
        reach = d / 3
        refs = np.zeros((self.k, n, n, n), np.float32)
        for k in range(self.k):  # K maps of 80 blobs: set-up only
            out = np.zeros((n, n, n), np.float32)
            for sign in (1.0, -0.5):
                for c in rng.normal(n / 2, d / 6, size=(40, 3)):
                    ci = np.round(c).astype(int)
                    if not ((ci >= 0) & (ci < n)).all():
                        continue
                    amp = abs(float(seed[k][ci[2], ci[1], ci[0]]))
                    lo, hi = np.maximum(ci - math.ceil(reach), 0), np.minimum(ci + math.ceil(reach) + 1, n)
                    sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
                    r2 = (xx[sl] - c[0]) ** 2 + (yy[sl] - c[1]) ** 2 + (zz[sl] - c[2]) ** 2
                    out[sl] += sign * amp * np.exp(-r2 * (10 / d) ** 2)
            std = out.std()
            refs[k] = out * (seed[k].std() / std if std > 0 else 0)
        mask = to_numpy(self.mask3d)
        outside = 1 - mask
        bg = (refs * outside).sum((1, 2, 3), keepdims=True) / max(float(outside.sum()), 1e-6)
        return self.xp.asarray(refs * mask + bg * outside)

    def reference_maps(self, sigma2: np.ndarray) -> tuple[Any, int]:
        """K copies of ``--ref``, low-passed to ``--ini_high`` and put on the data's grey-scale."""
        opt, xp = self.opt, self.xp
        ref, ref_px = read_map(opt.ref)
        if ref.shape != (self.box,) * 3:
            raise InputError(opt.ref, f"reference is {ref.shape}, particles are {self.box} px",
                             "rescale the reference to the particles' box and pixel size")
        if ref_px > 0 and abs(ref_px - self.px) > 0.01 * self.px:
            raise InputError(opt.ref, f"reference pixel size {ref_px:.3f} Å differs from the particles' "
                             f"{self.px:.3f} Å", "rescale the reference (e.g. relion_image_handler --rescale_angpix)")
        raw = ref
        if opt.ini_high > 0:
            ref = lowpass_filter(ref, self.px, opt.ini_high, ndim=3)
        shell = max(5, round(self.box * self.px / opt.ini_high)) if opt.ini_high > 0 else self.box // 4
        size = min(self.box, max(16, _even(2 * (shell + 10))))
        mats, _ = orientations(opt.healpix_order, opt.sym)
        scale = reference_scale(self.src, self.ctf, xp.asarray(ref) * self.mask3d, sigma2, size, mats,
                                self.shifts_coarse, opt.pad, opt.batch, xp)
        if scale is None:
            raise InputError(opt.ref, "the reference does not correlate with the particles",
                             "check that the particles' contrast is inverted (protein white) as RELION expects")
        log.info("reference grey-scale matched to the data: scale %.4g", scale)
        unfiltered = self.grids.transform(xp.asarray(raw * scale)[None] * self.mask3d, gridding_correction=False)
        self.unfiltered_power = xp.repeat(power_tau2(self.grids, unfiltered, 1.0), self.k, axis=0)
        refs = xp.asarray(np.repeat((ref * scale)[None], self.k, axis=0).astype(np.float32))
        return refs * self.mask3d, shell

    # -- one mini-batch ---------------------------------------------------------------------------
    def current_size(self, st: _State) -> int:
        return min(self.box, max(16, _even(2 * (st.resolution_shell + 10))))

    def coarse_size(self, order: int, size: int) -> int:
        """The coarse pass's image size at HEALPix ``order`` and current size ``size``
        (:func:`coarse_image_size`; the full current size when ``coarse_keepsafe`` is 0)."""
        if self.opt.coarse_keepsafe <= 0:
            return size
        return coarse_image_size(angular_step(order), self.opt.particle_diameter, self.px, self.box, size,
                                 keepsafe=self.opt.coarse_keepsafe)

    def iterate(self, st: _State, rows: np.ndarray, fixed_class: np.ndarray | None) -> dict[str, Any]:
        """E-step over ``rows`` and the half sets' back-projected residuals and weights.

        ``fixed_class`` (per particle, or None) restricts each particle to one class: Class3D's
        first iteration, when every class is the same reference.
        """
        xp, opt, g = self.xp, self.opt, self.grids
        size = self.current_size(st)
        mask2d = fourier_mask(size, size / 2 - 1, xp)
        inv_s2 = xp.asarray(inverse_sigma2_curve(st.sigma2, size), dtype=xp.float32) * mask2d
        score_inv_s2 = inv_s2
        if opt.strict_highres_exp > 0:  # align and classify on the low frequencies only; reconstruct all
            score_inv_s2 = inv_s2 * fourier_mask(size, self.box * self.px / opt.strict_highres_exp, xp)
        proj_grid = g.transform(st.refs, gridding_correction=True)
        rng = np.random.default_rng([opt.seed, st.it])
        mats, _ = orientations(st.order, opt.sym, perturb=0.5, rng=rng)
        oc = len(mats)
        c_size = self.coarse_size(st.order, size)
        c_mask = fourier_mask(c_size, c_size / 2 - 1, xp)
        c_inv_s2 = crop_half(score_inv_s2, c_size) * c_mask
        coarse = g.project(proj_grid, np.repeat(np.arange(self.k), oc), np.tile(mats, (self.k, 1, 1)), c_size)
        sample = {"size": size, "mask": mask2d, "inv_s2": inv_s2, "score_inv_s2": score_inv_s2,
                  "c_mask": c_mask, "c_inv_s2": c_inv_s2,
                  "grid": proj_grid, "coarse": coarse, "mats": mats,
                  "children": child_rotations(angular_step(st.order)),
                  "log_pi": xp.asarray(np.log(np.maximum(st.pi, 1e-30)), dtype=xp.float32)}
        acc = {"g_half": xp.zeros((2, self.k, *g.shape), xp.complex64),
               "f_half": xp.zeros((2, self.k, *g.shape), xp.float32),
               "resid": np.zeros(self.box // 2 + 1), "resid_n": np.zeros(self.box // 2 + 1),
               "class_mass": np.zeros(self.k), "offset2": 0.0, "n": 0, "changed": 0,
               "spread_rot": np.zeros(self.k), "spread_trans": np.zeros(self.k), "spread_n": np.zeros(self.k),
               "size": size, "coarse_size": c_size}
        nb = -(-rows.size // opt.batch)
        desc = f"{'iteration' if self.em else 'mini-batch'} {st.it}/{self.n_iter}"
        for r, imgs in progress(self.src.batches(opt.batch, rows), nb, desc, "batch", quiet=nb < 4):
            fixed = None if fixed_class is None else fixed_class[r]
            self._estep(r, xp.asarray(imgs), sample, fixed, st, acc)
        acc["g_half"] = xp.stack([g.friedel(acc["g_half"][h]) for h in (0, 1)])
        acc["f_half"] = xp.stack([g.friedel(acc["f_half"][h], conjugate=False) for h in (0, 1)])
        return acc

    def _estep(self, rows: np.ndarray, imgs: Any, sample: dict[str, Any], fixed: np.ndarray | None, st: _State,
               acc: dict[str, Any]) -> None:
        """Coarse search, oversampled fine search, per-particle records and M-step sums for one batch."""
        xp, opt, g = self.xp, self.opt, self.grids
        size, mask2d, inv_s2 = sample["size"], sample["mask"], sample["inv_s2"]
        mats, log_pi = sample["mats"], sample["log_pi"]
        oc = len(mats)
        b = rows.size
        prev = self.offsets[rows]
        centred = shift_images(imgs, xp.asarray(prev, dtype=xp.float32))
        if opt.zero_mask:
            centred = centred * self.mask2d
        x = crop_half(centred_fft(centred, 2), size)
        c = crop_half(self.ctf(rows, xp), size) if self.ctf else xp.ones(x.shape, xp.float32)
        sc = self.shifts_coarse
        c_size = sample["coarse"].shape[1]
        logl = score_poses(crop_half(x, c_size), crop_half(c, c_size), sample["coarse"], sc, sample["c_inv_s2"],
                           self.box, sample["c_mask"])  # (B, K oc, Tc)
        prior = xp.broadcast_to(log_pi[None, :], (b, self.k))
        if fixed is not None:
            prior = xp.where(xp.arange(self.k)[None, :] == xp.asarray(fixed)[:, None], prior, -1e30)
        tot = xp.asarray(prev[:, None, :] + sc[None], dtype=xp.float32)
        s2 = 2 * st.sigma_offset**2
        logl += xp.repeat(prior, oc, axis=1)[:, :, None]  # in place: logl is the largest array of the E-step
        logl -= ((tot**2).sum(-1) / s2)[:, None, :]
        sig = significant_posteriors(logl, opt.adaptive_fraction, self.maxsig)
        del logl
        # Oversampling: 8 finer orientations x 4 finer offsets around every significant coarse pose,
        # the finer slices projected once per distinct orientation in the batch.
        fine_id = sig.orient[:, None] * _N_CHILD + xp.arange(_N_CHILD)[None]  # (E, 8) over K oc 8
        uniq, local = xp.unique(fine_id.ravel(), return_inverse=True)
        local = local.reshape(fine_id.shape)
        u = to_numpy(uniq)
        cls_u = u // (_N_CHILD * oc)
        rot_u = np.einsum("uij,ujk->uik", sample["children"][u % _N_CHILD], mats[(u // _N_CHILD) % oc])
        fine = g.project(sample["grid"], cls_u, rot_u, size)
        fs = FineSamples(self.box, size, mask2d, x, c, inv_s2, fine, sc, self.shift_children, xp,
                         score_inv_s2=sample["score_inv_s2"])
        cls_e = sig.orient // oc
        t_abs = xp.asarray(sc, dtype=xp.float32)[sig.shift][:, None, :] + xp.asarray(self.shift_children,
                                                                                     dtype=xp.float32)[None]
        tot_f = xp.asarray(prev, dtype=xp.float32)[sig.image][:, None, :] + t_abs  # (E, 4, 2)
        lf = fs.scores(sig.image, sig.shift, local) + log_pi[cls_e][:, None, None] \
            - ((tot_f**2).sum(-1) / s2)[:, None, :]
        pw, top, norm = normalise_per_image(xp, sig.image, lf.reshape(-1, _N_CHILD * 4), b)
        best_local, best_off = self._record(rows, sig, pw, local, cls_u, rot_u, tot_f, cls_e, acc)
        self.loglik[rows] = to_numpy(top + xp.log(norm)) - to_numpy(((xp.abs(fs.xm) ** 2) * fs.wm).sum(axis=1))
        res = fs.best_residual_power(xp.asarray(best_off - prev, dtype=xp.float32), best_local)
        n_sh = self.box // 2 + 1
        acc["resid"] += to_numpy(xp.bincount(fs.shells, weights=res.sum(axis=0), minlength=n_sh + 1))[:n_sh]
        acc["resid_n"] += b * to_numpy(xp.bincount(fs.shells, minlength=n_sh + 1))[:n_sh]
        # M-step sums per (half set, fine orientation), then back-projected once per orientation.
        n_u = u.size
        gd = xp.zeros((2 * n_u, fs.xm.shape[1]), xp.complex64)
        gw = xp.zeros((2 * n_u, fs.xm.shape[1]), xp.float32)
        half = xp.asarray(rows % 2)[sig.image] * n_u
        fs.accumulate(sig.image, sig.shift, half[:, None] + local, pw.reshape(-1, _N_CHILD, 4), gd, gw)
        ops_t = np.swapaxes(self.sym_ops, 1, 2)
        for h in (0, 1):
            part = slice(h * n_u, (h + 1) * n_u)
            gd[part] -= fs.pm * gw[part]  # residuals: sum w c (X - c A) / sigma2
            sel = np.nonzero(to_numpy(gw[part].sum(axis=1)) > 0)[0]
            per = max(1, 512 // len(ops_t))
            for s in range(0, sel.size, per):  # bounded (slices x S^2) temporaries
                pick = sel[s:s + per]
                d_img = xp.zeros((pick.size, size, size // 2 + 1), xp.complex64)
                w_img = xp.zeros((pick.size, size, size // 2 + 1), xp.float32)
                d_img[:, mask2d] = gd[part][xp.asarray(pick)]
                w_img[:, mask2d] = gw[part][xp.asarray(pick)]
                # Symmetry: a slice at pose A of a symmetric map is one at A R_g^T for every operator.
                rots = (rot_u[pick][:, None] @ ops_t[None]).reshape(-1, 3, 3)
                g.insert(acc["g_half"][h], acc["f_half"][h], np.repeat(cls_u[pick], len(ops_t)), rots,
                         xp.repeat(d_img, len(ops_t), axis=0), xp.repeat(w_img, len(ops_t), axis=0))

    def _record(self, rows: np.ndarray, sig: Any, pw: Any, local: Any, cls_u: np.ndarray, rot_u: np.ndarray,
                tot_f: Any, cls_e: Any, acc: dict[str, Any]) -> tuple[Any, np.ndarray]:
        """Each particle's best class, orientation and offset; the batch's sums (:meth:`tally`)."""
        xp = self.xp
        b = rows.size
        img = sig.image
        best_e, best_s = argmax_per_image(xp, img, pw, b)
        j, s_idx = best_s // 4, best_s % 4
        best_local = local[best_e, j]
        bl = to_numpy(best_local)
        best_cls, best_rot = cls_u[bl], rot_u[bl]
        new_off = to_numpy(tot_f[best_e, s_idx])
        img_np = to_numpy(img)
        loc_np = to_numpy(local)
        e = img_np.size
        d_ang = to_numpy(angle_between(rot_u[loc_np].reshape(-1, 3, 3),
                                       np.repeat(best_rot[img_np], _N_CHILD, axis=0))).reshape(e, _N_CHILD)
        d_off = to_numpy(tot_f) - new_off[img_np][:, None, :]
        self.tally(rows, sig, pw, cls_e, d_ang, d_off, best_cls, new_off, acc)
        self.cls[rows], self.rot[rows], self.offsets[rows] = best_cls, best_rot, new_off
        return best_local, new_off

    # -- maximisation -------------------------------------------------------------------------------
    def maximise(self, st: _State, acc: dict[str, Any], it: int, full_pass: bool) -> None:
        """Other parameters (running averages), one VDAM (or EM) step of the maps, auto-sampling."""
        xp, g, opt = self.xp, self.grids, self.opt
        pi_prev = self.update_other_parameters(st, acc, full_pass)
        radius = acc["size"] / 2
        v = g.transform(st.refs, gridding_correction=False)
        direction = update_moments(g, acc["g_half"], acc["f_half"], st.mom, self.floor, em=self.em)
        if self.em:
            # RELION's Class3D: a Wiener filter with tau2 = T x the power of the reference this
            # iteration aligned to (in the first, of --ref before its --ini_high low-pass).
            first = it == 1 and self.unfiltered_power is not None
            tau2 = opt.tau2_fudge * self.unfiltered_power if first else power_tau2(g, v, opt.tau2_fudge)
            weight, fsc = wiener_weights(g, tau2, acc["f_half"].sum(axis=0), radius)
        else:
            # RELION's estimate from the moments, capped by what the half sets' own data support.
            tau2 = self.schedule.tau2_fudge_at(it)
            fsc = xp.minimum(half_set_fsc(g, v, acc["f_half"], self.floor, tau2, radius, st.mom),
                             fsc_weights(g, v, st.mom, tau2, radius))
            weight = fsc
        eta = np.ones(self.k) if self.em else class_steps(self.schedule.step(it), st.pi)
        skip: list[int] = []
        if not self.em and opt.class_inactivity_threshold > 0 and self.schedule.replacing(it):
            skip = self.replace_class(st, v, direction, fsc, pi_prev, radius)
        v = apply_step(g, v, direction, weight, eta, radius, skip)
        refs = g.images(v)
        st.refs = refs * self.mask3d if opt.flatten_solvent else refs
        self.summarise(st, acc, fsc)
        if it % 10 == 0:
            self.auto_sampling(st)

    def auto_sampling(self, st: _State) -> None:
        """RELION's rule, checked every 10 mini-batches: one HEALPix order finer when the resolution
        has not improved and the current angular step is not already below 0.75x the orientations'
        estimated accuracy."""
        accuracy = float(np.sum(st.pi * st.acc_rot))
        if (st.order < self.opt.max_healpix_order and st.resolution_shell <= st.checked_shell
                and angular_step(st.order) >= 0.75 * accuracy):
            st.order += 1
            log.info("  sampling: HEALPix order %d (%.1f° coarse, %.2f° after oversampling)", st.order,
                     angular_step(st.order), angular_step(st.order) / 2)
        st.checked_shell = st.resolution_shell

    # -- files ------------------------------------------------------------------------------------
    def write(self, st: _State, it: int) -> Path:
        """RELION's run_itNNN_* files and the slices PNG; the optimiser file last, as the mark of a
        complete iteration."""
        from .plots import plot_class_slices

        root = self.out / f"run_it{it:03d}"
        refs = to_numpy(st.refs)
        for k in range(self.k):
            write_map(f"{root}_class{k + 1:03d}.mrc", refs[k], self.px)
        if not self.em:
            core = (slice(None),) + self.grids.core
            m = to_numpy(st.mom.m[(slice(None),) + core]).reshape(2 * self.k, *self.grids.core_shape)
            u = to_numpy(st.mom.u[core])
            for j in range(2 * self.k):  # RELION's layout: unshifted, complex interleaved along x
                write_map(f"{root}_1moment{j + 1:03d}.mrc", interleave_complex(np.fft.ifftshift(m[j], axes=(0, 1))),
                          self.px)
            for k in range(self.k):
                write_map(f"{root}_2moment{k + 1:03d}.mrc", np.fft.ifftshift(u[k], axes=(0, 1)), self.px)
        self.write_data(Path(f"{root}_data.star"))
        self.write_class_model(st, Path(f"{root}_model.star"), root.name)
        write_star(Path(f"{root}_sampling.star"), {"sampling_general": {
            "rlnHealpixOrder": st.order, "rlnPsiStep": angular_step(st.order), "rlnSymmetryGroup": self.opt.sym,
            "rlnOffsetRange": self.opt.offset_range * self.px, "rlnOffsetStep": self.opt.offset_step * self.px,
            "rlnHealpixOrderOriginal": self.opt.healpix_order}})
        slices = plot_class_slices(refs, st.pi, self.out / f"run_it{it:03d}_slices.png",
                                   title=f"{self.k} classes after {it} {'iterations' if self.em else 'mini-batches'}"
                                         f" ({self.box * self.px / st.resolution_shell:.1f} Å)")
        self.write_optimiser(st, it, Path(f"{root}_optimiser.star"), root.name)
        return slices

    def write_data(self, path: Path) -> None:
        df = self.particle_table(drop=("rlnOriginX", "rlnOriginY"))
        df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = matrix_to_euler(self.rot)
        write_star(path, {"optics": self.table.optics, "particles": df})

    def write_class_model(self, st: _State, path: Path, root: str) -> None:
        stem = f"{self.out / root}"
        self.write_model(st, path, [f"{stem}_class{k + 1:03d}.mrc" for k in range(self.k)],
                         ([f"{stem}_1moment{k + 1:03d}.mrc" for k in range(self.k)],
                          [f"{stem}_2moment{k + 1:03d}.mrc" for k in range(self.k)]))

    def write_optimiser(self, st: _State, it: int, path: Path, root: str) -> None:
        opt = self.opt
        general = self.optimiser_general(st, it, root)
        general.update({"rlnOrientSamplingStarFile": f"{self.out / root}_sampling.star",
                        "rlnDoSolventFlattening": int(opt.flatten_solvent),
                        "rlnHighresLimitExpectation": opt.strict_highres_exp, "rlnSymmetryGroup": opt.sym,
                        "rlnDenovo3DRef": int(opt.ref is None)})
        write_star(path, {"optimiser_general": general})

    def resume(self) -> _State | None:
        """The state after the last fully written iteration, or None if there is none."""
        last = self.last_written()
        if last is None:
            return None
        it, root, model = last
        xp, g = self.xp, self.grids
        refs = np.stack([read_map(f"{root}_class{k + 1:03d}.mrc")[0] for k in range(self.k)])
        mom = Moments.empty(g)
        if not self.em:
            core = (slice(None),) + g.core
            m1 = np.stack([deinterleave_complex(read_map(f"{root}_1moment{j + 1:03d}.mrc")[0])
                           for j in range(2 * self.k)])
            mom.m[(slice(None),) + core] = xp.asarray(np.fft.fftshift(m1, axes=(1, 2)).reshape(
                2, self.k, *g.core_shape))
            m2 = np.stack([read_map(f"{root}_2moment{k + 1:03d}.mrc")[0] for k in range(self.k)])
            mom.u[core] = xp.asarray(np.fft.fftshift(m2, axes=(1, 2)))
        order = int(read_star(f"{root}_sampling.star")["sampling_general"].iloc[0]["rlnHealpixOrder"])
        numbers = self.model_numbers(model)
        st = _State(it=it, refs=xp.asarray(refs), mom=mom, order=order, checked_shell=numbers["resolution_shell"],
                    completeness=np.zeros((self.k, self.box // 2 + 2)), **numbers)
        data = self.load_particles(root)
        angles = (data[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
        self.rot = euler_to_matrix(*angles)
        log.info("continuing from iteration %d", it)
        return st


def _finish_initial_model(c: _Classifier, st: _State) -> tuple[Path, float | None]:
    """``initial_model.mrc``: the most populated class, aligned to ``align_sym``'s axes and symmetrised
    (RELION's ``relion_align_symmetry --select_largest_class --apply_sym``)."""
    from .symmetry import symmetrise_map
    from .symmetry_align import align_symmetry

    opt = c.opt
    best = int(np.argmax(st.pi))
    vol = to_numpy(st.refs[best])
    score = None
    if group_order(opt.align_sym) > 1:
        res = align_symmetry(vol, c.px, opt.align_sym, diameter=opt.particle_diameter)
        vol, score = symmetrise_map(res.aligned, opt.align_sym), res.score
        log.info("class %d (%.1f%%) aligned to %s: CC with its symmetrised self %.3f%s", best + 1,
                 100 * st.pi[best], opt.align_sym, score, " (low: is it really this symmetric?)" if score < 0.8 else "")
    else:
        log.info("initial model: class %d (%.1f%% of the particles)", best + 1, 100 * st.pi[best])
    out = c.out / "initial_model.mrc"
    write_map(out, vol, c.px)
    return out, score


def class3d(opt: Class3DOptions) -> Class3DResult:
    """Run 3D classification (VDAM mini-batches or EM) and write RELION's InitialModel/Class3D outputs."""
    c = _Classifier(opt)
    st = c.resume() if opt.resume else None
    if st is None:
        st = c.initial_state()
        slices = c.write(st, 0)
    else:
        slices = c.out / f"run_it{st.it:03d}_slices.png"
    what = "initial model" if opt.ref is None else "3D classification"
    log.info("%s (%s): %d particles, K = %d, box %d, %.3f Å/px, %d %s, symmetry %s", what, opt.algorithm.upper(),
             c.n, c.k, c.box, c.px, c.n_iter, "iterations" if c.em else "mini-batches", opt.sym)
    fixed = np.random.default_rng([opt.seed, 1]).integers(0, c.k, c.n) if opt.ref is not None and c.k > 1 else None
    while st.it < c.n_iter:
        it = st.it + 1
        st.it = it
        rows, full = c.batch_rows(it)
        t0 = time.perf_counter()
        acc = c.iterate(st, rows, fixed if it == 1 else None)
        c.maximise(st, acc, it, full)
        if c.em or it % opt.write_every == 0 or it == c.n_iter or full:
            slices = c.write(st, it)
        log.info("%s %d/%d: %d particles, resolution %.1f Å (size %d, coarse pass %d), HEALPix order %d, classes %s, "
                 "mean Pmax %.3f, %.1f s", "iteration" if c.em else "mini-batch", it, c.n_iter, rows.size,
                 c.box * c.px / st.resolution_shell, acc["size"], acc["coarse_size"], st.order,
                 " ".join(f"{100 * p:.0f}%" for p in st.pi), float(c.pmax[rows].mean()), time.perf_counter() - t0)
    root = c.out / f"run_it{st.it:03d}"
    result = Class3DResult([Path(f"{root}_class{k + 1:03d}.mrc") for k in range(c.k)], Path(f"{root}_model.star"),
                           Path(f"{root}_data.star"), slices, st.it, st.pi, c.box * c.px / st.resolution_shell)
    if opt.ref is None:
        result.initial_model, result.symmetry_score = _finish_initial_model(c, st)
    return result

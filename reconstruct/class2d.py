"""2D classification (RELION's Class2D job): VDAM mini-batches by default, or EM over all particles.

Each mini-batch (or EM iteration): an E-step over every particle of the batch -- a coarse search over
K classes x in-plane angles (twice the psi step) x translations (twice the offset step, around each
particle's previous offset), then every significant coarse pose oversampled once (2 angles x 4
offsets), as RELION's adaptive oversampling -- and an M-step that back-projects the residuals
w c (X - c A) / sigma2 and weights w c^2 / sigma2 of each half set (particle index mod 2) into the
class grids, from which :mod:`reconstruct.vdam` takes one step.  Samples of one class and in-plane
angle are summed before they are back-projected, so the back-projection costs at most K x angles
slices per batch whatever the number of particles.  Everything is batched over particles x classes x
angles x translations; nothing loops over particles or poses in Python.

Outputs are RELION's: ``run_itNNN_{classes.mrcs,model.star,data.star,optimiser.star}`` (and the VDAM
moments) every ``--grad_write_iter`` mini-batches and at the end, and a class gallery sorted by
class size.  ``--continue`` resumes from the last written iteration.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backend import to_numpy
from .classifier_base import ClassifierBase
from .files.errors import InputError
from .files.mrc import deinterleave_complex, interleave_complex, read_map, write_stack
from .files.stack import read_named_images
from .files.star import read_star, write_star
from .fourier import centred_fft, crop_half, shift_images
from .geometry import rotation_2d
from .likelihood import fourier_mask, inverse_sigma2_curve, score_poses, significant_posteriors
from .masks import soft_sphere
from .memory import check_fits
from .oversampling import FineSamples, argmax_per_image, normalise_per_image
from .particles import origins_px
from .progress import progress
from .refine3d import image_power_spectrum
from .sampling import coarse_image_size, translations
from .vdam import (
    Moments,
    VdamSchedule,
    apply_step,
    class_steps,
    fsc_weights,
    update_moments,
)

log = logging.getLogger("reconstruct")


@dataclass
class Class2DOptions:
    """Options of ``reconstruct class2d``, with RELION's names and the Class2D job's defaults."""

    star: Path  # --i
    out: Path  # --o: output directory; files are DIR/run_*
    particle_diameter: float  # --particle_diameter (Å)
    n_classes: int = 50  # --K
    algorithm: str = "vdam"  # --algorithm: vdam (RELION 4's default) or em
    n_iter: int = 0  # --iter: 0 = 200 mini-batches (vdam) or 25 iterations (em)
    psi_step: float = 6.0  # --psi_step (degrees; searched coarsely at twice this, then oversampled)
    offset_range: float = 5.0  # --offset_range (px, around each particle's previous offset)
    offset_step: float = 1.0  # --offset_step (px; searched coarsely at twice this)
    tau2_fudge: float = 2.0  # --tau2_fudge (T)
    class_inactivity_threshold: float = 0.1  # --class_inactivity_threshold (0 = no replacement)
    center_classes: bool = True  # --center_classes
    ctf: bool = True  # --ctf
    zero_mask: bool = True  # --zero_mask
    pad: float = 2.0  # --pad
    ini_subset: int = -1  # --grad_ini_subset (-1: 0.5% of the particles, 200..10000)
    fin_subset: int = -1  # --grad_fin_subset (-1: 5% of the particles, 1000..100000)
    stepsize: float = 0.3  # --grad_stepsize (final)
    write_every: int = 10  # --grad_write_iter
    adaptive_fraction: float = 0.999  # --adaptive_fraction
    max_significant: int = -1  # --maxsig (-1: 5 K for vdam and em; 0: none, RELION's EM default)
    batch: int = 256  # --batch: particles per E-step chunk
    seed: int = 0  # --random_seed
    gpu: bool = False  # --gpu
    resume: bool = False  # --continue
    project_dir: Path | None = None


@dataclass
class Class2DResult:
    """Where the final outputs are, and the numbers a caller wants."""

    classes: Path
    model_star: Path
    data_star: Path
    gallery: Path
    iterations: int
    class_distribution: np.ndarray
    resolution: float


@dataclass
class _State:
    it: int
    refs: Any  # (K, N, N) real-space references
    mom: Moments
    pi: np.ndarray  # (K,)
    sigma2: np.ndarray  # (N/2+1,) noise power per complex coefficient
    sigma_offset: float  # px
    resolution_shell: int
    fsc: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (K, N/2+2)
    acc_rot: np.ndarray = field(default_factory=lambda: np.zeros(0))
    acc_trans: np.ndarray = field(default_factory=lambda: np.zeros(0))
    completeness: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    loglik: float = 0.0
    avg_pmax: float = 0.0
    changes_classes: float = 0.0  # fraction of the batch's particles that changed class


def _even(n: float) -> int:
    m = math.ceil(n)
    return m + (m % 2)


class _Classifier(ClassifierBase):
    def __init__(self, opt: Class2DOptions) -> None:
        radius_px = self.open_job(opt, 2)
        # Grids, moments, two halves of data and weights, projections: a rough upper bound.
        n_slices = self.k * round(720 / opt.psi_step)
        need = self.grids.cells * self.k * 8 * 9 + n_slices * self.box * (self.box // 2 + 1) * 8
        check_fits(need, self.xp, f"2D classification of K={self.k} classes at box {self.box}",
                   "use fewer classes (--K), a coarser --psi_step or downsampled particles")
        self.mask = soft_sphere((self.box, self.box), radius_px, 5.0, self.xp)
        self.schedule = VdamSchedule(n_iter=self.n_iter, n_particles=self.n, ini_subset=opt.ini_subset,
                                     fin_subset=opt.fin_subset, stepsize=opt.stepsize,
                                     tau2_fudge=opt.tau2_fudge, kind="2d")
        # RELION caps VDAM at 5 K and leaves EM uncapped; uncapped, our first EM pass over 10,000 particles
        # took over 900 s instead of 74 s (every particle kept >= 250 poses), so both are capped by default.
        self.maxsig = opt.max_significant if opt.max_significant >= 0 else 5 * self.k
        self.psi_coarse = np.arange(0.0, 360.0, 2 * opt.psi_step)
        self.psi_fine = (self.psi_coarse[:, None] + np.array([-0.5, 0.5]) * opt.psi_step).ravel() % 360
        self.shifts_coarse = translations(opt.offset_range, 2 * opt.offset_step)
        self.shift_children = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * (0.5 * opt.offset_step)
        data = self.table.data
        self.psi = np.array(data["rlnAnglePsi"], dtype=float) if "rlnAnglePsi" in data else np.zeros(self.n)
        self.offsets = np.array(origins_px(self.table, self.px), dtype=float)

    # -- set-up ---------------------------------------------------------------------------------
    def initial_state(self) -> _State:
        """RELION's start: noise from the images' power, references of random Gaussian blobs."""
        opt, xp = self.opt, self.xp
        rng = np.random.default_rng(opt.seed)
        rows = np.arange(min(self.n, 1000))
        sigma2 = image_power_spectrum(self.src, rows, opt.batch, xp)
        seed = self.seed_references(rows, sigma2, rng)
        refs = self.blob_references(seed, rng)
        return _State(0, refs, Moments.empty(self.grids), np.full(self.k, 1.0 / self.k), sigma2,
                      opt.offset_range, 5, np.zeros((self.k, self.box // 2 + 2)), np.zeros(self.k),
                      np.zeros(self.k), np.zeros((self.k, self.box // 2 + 2)))

    def seed_references(self, rows: np.ndarray, sigma2: np.ndarray, rng: np.random.Generator) -> Any:
        """Per class, the CTF-weighted average of its share of ``rows`` at random in-plane angles."""
        xp, g = self.xp, self.grids
        d, w = g.zeros(), g.zeros(xp.float32)
        inv_s2 = xp.asarray(inverse_sigma2_curve(sigma2, self.box), dtype=xp.float32)
        for r, imgs in self.src.batches(self.opt.batch, rows):
            x = centred_fft(xp.asarray(imgs) * self.mask, 2)
            c = self.ctf(r, xp) if self.ctf else xp.ones(x.shape, xp.float32)
            rot = rotation_2d(rng.uniform(0, 360, r.size))
            g.insert(d, w, r % self.k, rot, x * c * inv_s2, c * c * inv_s2)
        d, w = g.friedel(d), g.friedel(w, conjugate=False)
        mean_w = float(w[w > 0].mean()) if bool((w > 0).any()) else 1.0
        return g.images(d / (w + 0.1 * mean_w))

    def blob_references(self, seed: Any, rng: np.random.Generator) -> Any:
        """40 positive minus half of 40 negative Gaussian blobs per class, each class its own, on the
        seed's grey-scale, masked (RELION's ``make_blobs_2d``)."""
        xp, n = self.xp, self.box
        d = self.opt.particle_diameter / self.px
        seed = to_numpy(seed)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        refs = np.zeros((self.k, n, n), np.float32)
        for k in range(self.k):  # K images of 80 blobs: set-up only
            out = np.zeros((n, n), np.float32)
            for sign in (1.0, -0.5):
                c = rng.normal(n / 2, d / 7, size=(40, 2))
                ci = np.round(c).astype(int)
                ok = ((ci >= 0) & (ci < n)).all(axis=1)
                amp = np.where(ok, np.abs(seed[k][np.clip(ci[:, 1], 0, n - 1), np.clip(ci[:, 0], 0, n - 1)]), 0)
                r2 = (xx[None] - c[:, 0, None, None]) ** 2 + (yy[None] - c[:, 1, None, None]) ** 2
                out += sign * (amp[:, None, None] * np.exp(-r2 * (10 / d) ** 2)).sum(0)
            std = out.std()
            refs[k] = out * (seed[k].std() / std if std > 0 else 0)
        mask = to_numpy(self.mask)
        outside = 1 - mask
        bg = (refs * outside).sum((1, 2), keepdims=True) / max(float(outside.sum()), 1e-6)
        return xp.asarray(refs * mask + bg * outside)

    # -- one mini-batch ---------------------------------------------------------------------------
    def current_size(self, st: _State) -> int:
        return min(self.box, max(16, _even(2 * (st.resolution_shell + 10))))

    def coarse_size(self, size: int) -> int:
        """The coarse pass's image size at current size ``size`` (:func:`coarse_image_size`)."""
        return coarse_image_size(2 * self.opt.psi_step, self.opt.particle_diameter, self.px, self.box, size)

    def iterate(self, st: _State, rows: np.ndarray, full_pass: bool) -> dict[str, Any]:
        """E-step over ``rows`` and accumulation of the half sets' residuals and weights."""
        xp, opt, g = self.xp, self.opt, self.grids
        size, c_size = self.current_size(st), self.coarse_size(self.current_size(st))
        mask2d = fourier_mask(size, size / 2 - 1, xp)
        inv_s2 = xp.asarray(inverse_sigma2_curve(st.sigma2, size), dtype=xp.float32) * mask2d
        c_mask = fourier_mask(c_size, c_size / 2 - 1, xp)
        c_inv_s2 = xp.asarray(inverse_sigma2_curve(st.sigma2, c_size), dtype=xp.float32) * c_mask
        proj_grid = g.transform(st.refs, gridding_correction=True)
        kc, kf = self.psi_coarse.size, self.psi_fine.size
        coarse = g.project(proj_grid, np.repeat(np.arange(self.k), kc), np.tile(rotation_2d(self.psi_coarse),
                                                                                (self.k, 1, 1)), c_size)
        fine = g.project(proj_grid, np.repeat(np.arange(self.k), kf), np.tile(rotation_2d(self.psi_fine),
                                                                              (self.k, 1, 1)), size)
        log_pi = xp.asarray(np.log(np.maximum(st.pi, 1e-30)), dtype=xp.float32)
        n_freq = int(mask2d.sum())
        acc = {"gd": xp.zeros((2 * self.k * kf, n_freq), xp.complex64),
               "gw": xp.zeros((2 * self.k * kf, n_freq), xp.float32),
               "resid": np.zeros(self.box // 2 + 1), "resid_n": np.zeros(self.box // 2 + 1),
               "class_mass": np.zeros(self.k), "offset2": 0.0, "n": 0, "changed": 0,
               "spread_rot": np.zeros(self.k), "spread_trans": np.zeros(self.k), "spread_n": np.zeros(self.k)}
        nb = -(-rows.size // opt.batch)
        desc = f"{'iteration' if self.em else 'mini-batch'} {st.it}/{self.n_iter}"
        for r, imgs in progress(self.src.batches(opt.batch, rows), nb, desc, "batch", quiet=nb < 4):
            self._estep(r, xp.asarray(imgs), size, mask2d, inv_s2, (coarse, c_mask, c_inv_s2), fine, log_pi, st,
                        acc)
        # The per-(class, angle) sums are back-projected once: K x angles slices at most.
        gd2 = xp.zeros((2, self.k, *g.shape), xp.complex64)
        gw2 = xp.zeros((2, self.k, *g.shape), xp.float32)
        classes = np.repeat(np.arange(self.k), kf)
        rots = np.tile(rotation_2d(self.psi_fine), (self.k, 1, 1))
        pm = fine[:, mask2d]
        for h in (0, 1):
            part = slice(h * self.k * kf, (h + 1) * self.k * kf)
            acc["gd"][part] -= pm * acc["gw"][part]  # residuals: sum w c (X - c A) / sigma2
            sel = np.nonzero(to_numpy(acc["gw"][part].sum(axis=1)) > 0)[0]
            for s in range(0, sel.size, 512):  # bounded (slices x S^2) temporaries
                pick = sel[s:s + 512]
                d_img = xp.zeros((pick.size, size, size // 2 + 1), xp.complex64)
                w_img = xp.zeros((pick.size, size, size // 2 + 1), xp.float32)
                d_img[:, mask2d] = acc["gd"][part][xp.asarray(pick)]
                w_img[:, mask2d] = acc["gw"][part][xp.asarray(pick)]
                g.insert(gd2[h], gw2[h], classes[pick], rots[pick], d_img, w_img)
            gd2[h] = g.friedel(gd2[h])
            gw2[h] = g.friedel(gw2[h], conjugate=False)
        acc["g_half"], acc["f_half"], acc["size"] = gd2, gw2, size
        return acc

    def _estep(self, rows: np.ndarray, imgs: Any, size: int, mask2d: Any, inv_s2: Any, coarse: Any, fine: Any,
               log_pi: Any, st: _State, acc: dict[str, Any]) -> None:
        """Coarse search, oversampled fine search, per-particle records and M-step sums for one batch.

        ``coarse`` holds the coarse pass's projections, frequency mask and 1/sigma2 at its own (smaller) size."""
        xp, opt = self.xp, self.opt
        kc, kf = self.psi_coarse.size, self.psi_fine.size
        prev = self.offsets[rows]
        # Centre each image on its previous offset, mask it, and go to Fourier space at the current size.
        centred = shift_images(imgs, xp.asarray(prev, dtype=xp.float32))
        if opt.zero_mask:
            centred = centred * self.mask
        x = crop_half(centred_fft(centred, 2), size)
        c = crop_half(self.ctf(rows, xp), size) if self.ctf else xp.ones(x.shape, xp.float32)
        sc = self.shifts_coarse
        c_proj, c_mask, c_inv_s2 = coarse
        c_size = c_proj.shape[1]
        logl = score_poses(crop_half(x, c_size), crop_half(c, c_size), c_proj, sc, c_inv_s2, self.box,
                           c_mask)  # (B, K kc, Tc)
        tot = xp.asarray(prev[:, None, :] + sc[None], dtype=xp.float32)  # (B, Tc, 2) absolute offsets
        s2 = 2 * st.sigma_offset**2
        logl += xp.repeat(log_pi, kc)[None, :, None]  # in place: logl is the largest array of the E-step
        logl -= ((tot**2).sum(-1) / s2)[:, None, :]
        sig = significant_posteriors(logl, opt.adaptive_fraction, self.maxsig)
        # Oversampling: two finer angles x four finer offsets around every significant coarse pose.
        cls_e = sig.orient // kc
        fine_idx = (cls_e * kf + 2 * (sig.orient % kc))[:, None] + xp.arange(2)[None]  # (E, 2)
        t_abs = xp.asarray(sc, dtype=xp.float32)[sig.shift][:, None, :] + xp.asarray(self.shift_children,
                                                                                     dtype=xp.float32)[None]
        tot_f = xp.asarray(prev, dtype=xp.float32)[sig.image][:, None, :] + t_abs  # (E, 4, 2) absolute
        fs = FineSamples(self.box, size, mask2d, x, c, inv_s2, fine, sc, self.shift_children, xp)
        scores = fs.scores(sig.image, sig.shift, fine_idx)
        lf = scores + log_pi[cls_e][:, None, None] - ((tot_f**2).sum(-1) / s2)[:, None, :]
        pw, top, norm = normalise_per_image(xp, sig.image, lf.reshape(-1, 8), rows.size)
        best = self._record(rows, sig, pw, fine_idx, tot_f, cls_e, acc)
        self.loglik[rows] = to_numpy(top + xp.log(norm)) - to_numpy(((xp.abs(fs.xm) ** 2) * fs.wm).sum(axis=1))
        # Noise: residual power of each image at its best pose, per shell.
        res = fs.best_residual_power(xp.asarray(best[1] - prev, dtype=xp.float32), best[0])
        acc["resid"] += to_numpy(xp.bincount(fs.shells, weights=res.sum(axis=0), minlength=self.box // 2 + 2))[
            : self.box // 2 + 1]
        acc["resid_n"] += rows.size * to_numpy(xp.bincount(fs.shells, minlength=self.box // 2 + 2))[
            : self.box // 2 + 1]
        half = xp.asarray(rows % 2)[sig.image] * (self.k * kf)
        fs.accumulate(sig.image, sig.shift, half[:, None] + fine_idx, pw.reshape(-1, 2, 4), acc["gd"], acc["gw"])

    def _record(self, rows: np.ndarray, sig: Any, pw: Any, fine_idx: Any, tot_f: Any, cls_e: Any,
                acc: dict[str, Any]) -> tuple[Any, np.ndarray]:
        """Each particle's best class, in-plane angle and offset; the batch's sums (:meth:`tally`)."""
        xp = self.xp
        b, kf = rows.size, self.psi_fine.size
        img = sig.image
        best_e, best_s = argmax_per_image(xp, img, pw, b)
        j, s_idx = best_s // 4, best_s % 4
        best_cls = to_numpy(cls_e[best_e])
        new_psi = self.psi_fine[to_numpy(fine_idx[best_e, j]) % kf]
        new_off = to_numpy(tot_f[best_e, s_idx])
        img_np = to_numpy(img)
        d_psi = (self.psi_fine[to_numpy(fine_idx % kf)] - new_psi[img_np][:, None] + 180) % 360 - 180
        d_off = to_numpy(tot_f) - new_off[img_np][:, None, :]
        self.tally(rows, sig, pw, cls_e, d_psi, d_off, best_cls, new_off, acc)
        self.cls[rows], self.psi[rows], self.offsets[rows] = best_cls, new_psi, new_off
        return fine_idx[best_e, j], new_off


    # -- maximisation -------------------------------------------------------------------------------
    def maximise(self, st: _State, acc: dict[str, Any], it: int, full_pass: bool) -> None:
        """Other parameters (running averages), then one VDAM (or EM) step of the references."""
        g, opt = self.grids, self.opt
        pi_prev = self.update_other_parameters(st, acc, full_pass)
        radius = acc["size"] / 2
        v = g.transform(st.refs, gridding_correction=False)
        direction = update_moments(g, acc["g_half"], acc["f_half"], st.mom, self.floor, em=self.em)
        tau2 = opt.tau2_fudge if self.em else self.schedule.tau2_fudge_at(it)
        fsc = fsc_weights(g, v, st.mom, tau2, radius)
        eta = np.ones(self.k) if self.em else class_steps(self.schedule.step(it), st.pi)
        skip: list[int] = []
        if not self.em and opt.class_inactivity_threshold > 0 and self.schedule.replacing(it):
            skip = self.replace_class(st, v, direction, fsc, pi_prev, radius)
        v = apply_step(g, v, direction, fsc, eta, radius, skip)
        refs = g.images(v)
        n_ini, n_mid, _ = self.schedule.phases
        if opt.center_classes and (self.em or it <= n_ini + n_mid or it >= self.n_iter):
            refs = self.centre(st, refs)
        st.refs = refs * self.mask  # --flatten_solvent: zero outside the particle's circle
        self.summarise(st, acc, fsc)

    def centre(self, st: _State, refs: Any) -> Any:
        """Move each class's centre of mass to the box centre (and its moments with it)."""
        xp, opt = self.xp, self.opt
        pos = xp.maximum(refs, 0) * self.mask
        total = pos.sum(axis=(1, 2))
        idx = xp.arange(self.box, dtype=xp.float32) - self.box // 2
        cx = (pos.sum(axis=1) * idx).sum(axis=1) / xp.maximum(total, 1e-30)
        cy = (pos.sum(axis=2) * idx).sum(axis=1) / xp.maximum(total, 1e-30)
        shift = -to_numpy(xp.stack([cx, cy], 1))
        norm = np.hypot(*shift.T)
        cap = np.minimum(1.0, opt.offset_range / np.maximum(norm, 1e-9))
        shift *= cap[:, None]
        small = norm < max(0.01 * opt.particle_diameter / self.px, 2.0)
        shift[small] = 0.0
        if not bool((~small).any()):
            return refs
        for h in (0, 1):
            st.mom.m[h] = self.grids.shift(st.mom.m[h], shift)
        return shift_images(refs, xp.asarray(shift, dtype=xp.float32))

    # -- files ------------------------------------------------------------------------------------
    def write(self, st: _State, it: int) -> None:
        """RELION's run_itNNN_* files; the optimiser file last, as the mark of a complete iteration."""
        root = self.out / f"run_it{it:03d}"
        refs = to_numpy(st.refs)
        write_stack(f"{root}_classes.mrcs", refs, self.px)
        if not self.em:
            core = (slice(None),) + self.grids.core
            m = to_numpy(st.mom.m[(slice(None),) + core]).reshape(2 * self.k, *self.grids.core_shape)
            write_stack(f"{root}_1moment.mrcs", interleave_complex(np.fft.ifftshift(m, axes=1)), self.px)
            u = to_numpy(st.mom.u[core])
            write_stack(f"{root}_2moment.mrcs", np.fft.ifftshift(u, axes=1), self.px)
        self.write_data(Path(f"{root}_data.star"))
        self.write_class_model(st, Path(f"{root}_model.star"), root.name)
        self.write_optimiser(st, it, Path(f"{root}_optimiser.star"), root.name)

    def write_data(self, path: Path) -> None:
        df = self.particle_table(drop=("rlnAngleRot", "rlnAngleTilt", "rlnOriginX", "rlnOriginY"))
        df["rlnAnglePsi"] = self.psi
        write_star(path, {"optics": self.table.optics, "particles": df})

    def write_class_model(self, st: _State, path: Path, root: str) -> None:
        stack = f"{self.out / root}"
        self.write_model(st, path, [f"{k + 1:06d}@{stack}_classes.mrcs" for k in range(self.k)],
                         ([f"{k + 1:06d}@{stack}_1moment.mrcs" for k in range(self.k)],
                          [f"{k + 1:06d}@{stack}_2moment.mrcs" for k in range(self.k)]),
                         extra_class_columns={"rlnClassPriorOffsetX": 0.0, "rlnClassPriorOffsetY": 0.0})

    def write_optimiser(self, st: _State, it: int, path: Path, root: str) -> None:
        opt = self.opt
        general = self.optimiser_general(st, it, root)
        general.update({"rlnDoSolventFlattening": 1, "rlnDoCenterClasses": int(opt.center_classes),
                        "rlnPsiStep": opt.psi_step, "rlnOffsetRange": opt.offset_range,
                        "rlnOffsetStep": opt.offset_step, "rlnHighresLimitExpectation": -1.0})
        write_star(path, {"optimiser_general": general})

    def resume(self) -> _State | None:
        """The state after the last fully written iteration, or None if there is none."""
        last = self.last_written()
        if last is None:
            return None
        it, root, model = last
        refs, _ = read_map(f"{root}_classes.mrcs")
        xp, g = self.xp, self.grids
        mom = Moments.empty(g)
        if not self.em:
            core = (slice(None),) + g.core
            m1, _ = read_map(f"{root}_1moment.mrcs")
            m1 = np.fft.fftshift(deinterleave_complex(m1), axes=1).reshape(2, self.k, *g.core_shape)
            mom.m[(slice(None),) + core] = xp.asarray(m1)
            m2, _ = read_map(f"{root}_2moment.mrcs")
            mom.u[core] = xp.asarray(np.fft.fftshift(m2.reshape(self.k, *g.core_shape), axes=1))
        st = _State(it=it, refs=xp.asarray(refs.reshape(self.k, self.box, self.box)), mom=mom,
                    completeness=np.zeros((self.k, self.box // 2 + 2)), **self.model_numbers(model))
        data = self.load_particles(root)
        self.psi = np.array(data["rlnAnglePsi"], dtype=float)
        log.info("continuing from iteration %d", it)
        return st


@dataclass
class ClassAverages:
    """The class averages of a Class2D iteration with their model_classes rows."""

    images: np.ndarray  # (K, N, N), class k at index k - 1
    classes: pd.DataFrame  # model_classes (rlnReferenceImage, rlnClassDistribution, ...)
    general: pd.Series  # model_general
    pixel_size: float


def read_class_averages(model_star: str | Path, project_dir: str | Path | None = None) -> ClassAverages:
    """Read a Class2D ``run_itNNN_model.star`` (ours or RELION's) and the class images it names.

    ``rlnReferenceImage`` (``N@path_classes.mrcs``) is resolved against ``project_dir`` (default: the
    current directory, RELION's convention) and, failing that, next to the model file.
    """
    path = Path(model_star)
    blocks = read_star(path)
    for name in ("model_general", "model_classes"):
        if name not in blocks:
            raise InputError(path, f"no data_{name} block: not a classification model.star")
    classes = blocks["model_classes"].reset_index(drop=True)
    if "rlnReferenceImage" not in classes.columns:
        raise InputError(path, "data_model_classes has no rlnReferenceImage column")
    general = blocks["model_general"].iloc[0]
    if int(general.get("rlnReferenceDimensionality", 2)) != 2:
        raise InputError(path, "is a 3D model (rlnReferenceDimensionality 3)", "pass a 2D classification's model")
    project = Path(project_dir or Path.cwd())
    images = read_named_images(classes["rlnReferenceImage"], path,
                               lambda file: [project / file, path.parent / Path(file).name])
    px = float(general.get("rlnPixelSize", 0.0))
    return ClassAverages(images, classes, general, px)


def class2d(opt: Class2DOptions) -> Class2DResult:
    """Run 2D classification (VDAM mini-batches or EM) and write RELION's Class2D outputs."""
    import time

    c = _Classifier(opt)
    st = c.resume() if opt.resume else None
    if st is None:
        st = c.initial_state()
        c.write(st, 0)
    log.info("2D classification (%s): %d particles, K = %d, box %d, %.3f Å/px, %d %s", opt.algorithm.upper(), c.n,
             c.k, c.box, c.px, c.n_iter, "iterations" if c.em else "mini-batches")
    while st.it < c.n_iter:
        it = st.it + 1
        st.it = it
        rows, full = c.batch_rows(it)
        t0 = time.perf_counter()
        acc = c.iterate(st, rows, full)
        c.maximise(st, acc, it, full)
        if c.em or it % opt.write_every == 0 or it == c.n_iter or full:
            c.write(st, it)
        log.info("%s %d/%d: %d particles, resolution %.1f Å (size %d, coarse pass %d), %d non-empty classes, "
                 "mean Pmax %.3f, %.1f s", "iteration" if c.em else "mini-batch", it, c.n_iter, rows.size,
                 c.box * c.px / st.resolution_shell, acc["size"], c.coarse_size(acc["size"]),
                 int((st.pi > 1e-3 / c.k).sum()),
                 float(c.pmax[rows].mean()), time.perf_counter() - t0)
    root = c.out / f"run_it{st.it:03d}"
    from .plots import plot_class_gallery

    gallery = plot_class_gallery(to_numpy(st.refs), st.pi, c.out / "run_classes.png",
                                 title=f"{c.k} classes after {st.it} {'iterations' if c.em else 'mini-batches'}")
    return Class2DResult(Path(f"{root}_classes.mrcs"), Path(f"{root}_model.star"), Path(f"{root}_data.star"),
                         gallery, st.it, st.pi, c.box * c.px / st.resolution_shell)

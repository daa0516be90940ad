"""3D auto-refine with gold-standard half sets (RELION's ``relion_refine --auto_refine``).

Each iteration, for each half set independently: an E-step (a coarse global search over HEALPix
orientations and a translation grid, then a finer local search around the best coarse pose --
RELION's adaptive oversampling -- or, once sampling is fine, local searches around the previous
pose), then an M-step back-projecting every significant pose with weight posterior / sigma2.  The two
half maps give the gold-standard FSC, which sets the resolution, the regularisation tau2 and the
image size of the next iteration.  Sampling gets finer when the resolution stops improving; the run
ends when it no longer can, joining both halves into the final map.  Every iteration is written as
RELION writes it, so ``--continue`` resumes from the last completed one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backend import fft_module, to_numpy
from .files.errors import InputError
from .files.mrc import read_map, write_map
from .files.stack import ImageSource
from .files.star import MetadataTable, read_particles, read_star, write_star
from .fourier import centred_fft, crop_half, lowpass_filter, phase_shift_2d
from .fsc import fsc, fsc_weighted, resolution_at, shell_resolutions
from .geometry import angle_between, euler_to_matrix, matrix_to_euler
from .likelihood import (
    fourier_mask,
    friedel_weights,
    score_local_poses,
    score_poses,
    shell_map,
    significant_posteriors,
)
from .masks import soft_sphere
from .memory import backprojector_bytes, check_fits
from .particles import CtfSource, ParticleJob, origins_px
from .progress import progress
from .projector import BackProjector, Projector
from .sampling import angular_step, local_rotations, orientations, translations
from .ssri import SsriOptions, describe, ssri_reconstruct

log = logging.getLogger("reconstruct")


@dataclass
class Refine3DOptions:
    """Options of ``reconstruct refine3d``, with RELION's names and defaults."""

    star: Path  # --i
    ref: Path  # --ref
    out: Path  # --o: output directory; files are DIR/run_*
    particle_diameter: float  # --particle_diameter (Å)
    sym: str = "C1"  # --sym
    ini_high: float = 60.0  # --ini_high (Å): initial low-pass of the reference
    healpix_order: int = 2  # --healpix_order: initial (coarse) angular sampling
    auto_local_healpix_order: int = 4  # --auto_local_healpix_order: local searches from this order on
    offset_range: float = 5.0  # --offset_range (px)
    offset_step: float = 1.0  # --offset_step (px)
    tau2_fudge: float = 1.0  # --tau2_fudge
    low_resol_join_halves: float = 40.0  # --low_resol_join_halves (Å)
    pad: float = 2.0  # --pad
    ctf: bool = True  # --ctf
    adaptive_fraction: float = 0.999  # --adaptive_fraction
    max_significant: int = 256  # --maxsig: most poses per particle carried into the M-step
    max_iter: int = 30  # --iter (safety cap; auto-refine stops on convergence)
    max_healpix_order: int = 6
    batch: int = 64  # particles per E-step batch
    seed: int = 0  # --random_seed
    gpu: bool | None = False  # --gpu
    continue_run: bool = False  # --continue
    project_dir: Path | None = None
    ssri: SsriOptions | None = None  # --ssri: OPUS-SSRI's regularised maximisation instead of tau2


@dataclass
class _State:
    iteration: int = 0
    order: int = 2
    resolution: float = 0.0  # Å
    best_resolution: float = 1e9
    no_gain: int = 0
    converged: bool = False
    local_offset_step: float = 0.0  # px; translational sampling of local searches (0: from the order)
    sigma2: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class RefineResult:
    """Where the final outputs are, and the numbers a caller wants."""

    final_map: Path
    half_maps: tuple[Path, Path]
    data_star: Path
    resolution: float
    fsc: np.ndarray
    iterations: int
    ssri_seconds: list[float] = field(default_factory=list)  # per iteration run in this call (--ssri)


def _even(n: float) -> int:
    m = math.ceil(n)
    return m + (m % 2)


def _current_size(resolution: float, box: int, pixel_size: float) -> int:
    """RELION's current image size: the resolution's shell plus 10 shells of margin, even, <= box."""
    shell = box * pixel_size / resolution
    return min(box, max(16, _even(2 * (shell + 10))))


def _posterior_spread(b: int, img: np.ndarray, w: np.ndarray, poses: np.ndarray, best: np.ndarray,
                      dshift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the posterior's rms angle (degrees) and offset (px) from its most likely pose.

    This is how accurately the data fix the pose -- RELION's rlnAccuracyRotations/Translations --
    and decides whether finer sampling can still help.
    """
    ang2 = np.bincount(img, weights=w * angle_between(poses, best) ** 2, minlength=b)
    sh2 = np.bincount(img, weights=w * (dshift**2).sum(axis=1), minlength=b)
    return np.sqrt(ang2), np.sqrt(sh2)


def _halves(table: MetadataTable, seed: int) -> np.ndarray:
    if "rlnRandomSubset" in table.data.columns:
        h = table.data["rlnRandomSubset"].to_numpy(dtype=int)
        if set(np.unique(h)) <= {1, 2} and len(np.unique(h)) == 2:
            return h
    rng = np.random.default_rng(seed)
    h = np.ones(len(table), dtype=int)
    h[rng.permutation(len(table))[: len(table) // 2]] = 2
    return h


def _inverse_sigma2(sigma2: np.ndarray, size: int, mask: Any, xp: Any) -> Any:
    """1/sigma2 on the (size, size/2+1) grid, zero outside ``mask``."""
    return xp.where(mask, 1.0 / xp.maximum(shell_map(sigma2, size, xp), 1e-30), 0.0).astype(xp.float32)


def _shell_sums(values: Any, size: int, n_shells: int, xp: Any) -> Any:
    """Sum (B, S, S/2+1) arrays over Fourier shells, counting Friedel mates: (n_shells,)."""
    from .likelihood import freq_grid

    ky, kx = freq_grid((size, size), xp)
    shell = xp.round(xp.sqrt(kx * kx + ky * ky)).astype(xp.int64)
    fw = friedel_weights(size, xp)
    inside = shell < n_shells
    tot = (values * fw).sum(axis=0)
    return xp.bincount(shell[inside], weights=tot[inside], minlength=n_shells)


def image_power_spectrum(src: ImageSource, rows: np.ndarray, batch: int, xp: Any) -> np.ndarray:
    """Mean power per Fourier shell (0..N/2) of the images ``rows``: at cryo-EM SNRs, the noise's."""
    box = src.box
    n_shells = box // 2 + 1
    total = xp.zeros(n_shells)
    for _, imgs in src.batches(batch, rows):
        ft = centred_fft(xp.asarray(imgs), 2)
        total += _shell_sums(xp.abs(ft) ** 2, box, n_shells, xp)
    counts = _shell_sums(xp.ones((1, box, box // 2 + 1)), box, n_shells, xp)
    return to_numpy(total / (len(rows) * xp.maximum(counts, 1)))


def inverse_sigma2_full(sigma2: np.ndarray, box: int, xp: Any) -> Any:
    """1/sigma2 on the full (box, box/2+1) grid, zero beyond Nyquist (the M-step's frequency weight)."""
    return _inverse_sigma2(sigma2, box, fourier_mask(box, box / 2, xp), xp)


def reference_scale(src: ImageSource, ctf: CtfSource | None, ref: Any, sigma2: np.ndarray, size: int,
                    mats: np.ndarray, shifts: np.ndarray, pad: float, batch: int, xp: Any,
                    n_sample: int = 128) -> float | None:
    """The data's intensity relative to ``ref``, from scale-free (correlation) best poses of a sample.

    A reference on another grey-scale would make the likelihood meaningless in the first
    iteration; RELION offers --firstiter_cc for this, here it is automatic.  None when the
    reference does not correlate with the particles at all.
    """
    box = src.box
    mask2d = fourier_mask(size, size / 2 - 1, xp)
    inv_s2 = _inverse_sigma2(sigma2, size, mask2d, xp)
    proj = Projector(xp.asarray(ref), padding=pad).project(xp.asarray(mats), size=size)
    n = len(src.table)
    rows = np.linspace(0, n - 1, min(n, n_sample)).astype(int)
    num = den = 0.0
    for r, imgs in src.batches(batch, rows):
        x = crop_half(centred_fft(xp.asarray(imgs), 2), size)
        c = crop_half(ctf(r, xp), size) if ctf else xp.ones(x.shape, xp.float32)
        cross, power = score_poses(x, c, proj, shifts, inv_s2, box, mask2d, terms=True)
        cc = cross / xp.sqrt(xp.maximum(power, 1e-30))[:, :, None]
        best = cc.reshape(len(r), -1).argmax(axis=1)
        m_best, t_best = best // len(shifts), best % len(shifts)
        idx = xp.arange(len(r))
        num += float(cross[idx, m_best, t_best].sum()) / 2
        den += float(power[idx, m_best].sum())
    if den <= 0 or num <= 0:
        return None
    return num / den


class _Refiner(ParticleJob):
    def __init__(self, opt: Refine3DOptions) -> None:
        self.opt = opt
        self.open_particles(opt)
        n_bps = 4 if opt.ssri is not None and opt.ssri.search and opt.ssri.holdout > 0 else 2
        check_fits(n_bps * backprojector_bytes(self.box, opt.pad), self.xp,
                   f"refinement at box {self.box}", "downsample the particles or use --pad 1")
        self.ctf = CtfSource(self.table, self.box, self.px) if opt.ctf else None
        self.n = len(self.table)
        self.half = _halves(self.table, opt.seed)
        self.mask3d = self.xp.asarray(soft_sphere((self.box,) * 3, opt.particle_diameter / (2 * self.px), 5.0))
        self.rng = np.random.default_rng(opt.seed)
        data = self.table.data
        self.poses = euler_to_matrix(*(data.get(c, pd.Series(np.zeros(self.n))).to_numpy()
                                       for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
        self.offsets = origins_px(self.table, self.px)  # (n, 2) px
        self.pmax = np.zeros(self.n)
        self.nsig = np.zeros(self.n, dtype=int)
        self.loglik = np.zeros(self.n)
        self.ssri_halves: list[np.ndarray] = []
        # SSRI cross-validates its parameters on a fixed subset of each half's particles, back-projected
        # a second time into their own accumulators (no effect on the maps themselves).
        s = opt.ssri
        self.held_out = (np.random.default_rng(opt.seed + 1).random(self.n) < s.holdout
                         if s is not None and s.search and s.holdout > 0 else None)
        self.held_out_bps: list[BackProjector] = []

    # -- set-up --------------------------------------------------------------------------------
    def initial_state(self) -> tuple[_State, list[Any]]:
        ref, ref_px = read_map(self.opt.ref)
        if ref.shape != (self.box,) * 3:
            raise InputError(self.opt.ref, f"reference is {ref.shape}, particles are {self.box} px",
                             "rescale the reference to the particles' box and pixel size")
        if ref_px > 0 and abs(ref_px - self.px) > 0.01 * self.px:
            raise InputError(self.opt.ref, f"reference pixel size {ref_px:.3f} Å differs from the particles' "
                             f"{self.px:.3f} Å", "rescale the reference (e.g. relion_image_handler --rescale_angpix)")
        ref = lowpass_filter(ref, self.px, self.opt.ini_high, ndim=3)
        st = _State(order=self.opt.healpix_order, resolution=self.opt.ini_high)
        st.sigma2 = self.initial_sigma2()
        scale = self.calibrate_scale(self.xp.asarray(ref), st)
        log.info("reference grey-scale matched to the data: scale %.4g", scale)
        # Later references are reconstructed from the data, so they are on its grey-scale already.
        refs = [self.xp.asarray(ref * scale), self.xp.asarray(ref * scale)]
        return st, refs

    def calibrate_scale(self, ref: Any, st: _State) -> float:
        """The data's intensity relative to the reference (see :func:`reference_scale`)."""
        opt = self.opt
        mats, _ = orientations(opt.healpix_order, opt.sym)
        scale = reference_scale(self.src, self.ctf, ref * self.mask3d, st.sigma2,
                                _current_size(st.resolution, self.box, self.px), mats,
                                translations(opt.offset_range, opt.offset_step), opt.pad, opt.batch, self.xp)
        if scale is None:
            raise InputError(opt.ref, "the reference does not correlate with the particles",
                             "check that the particles' contrast is inverted (protein white) as RELION expects")
        return scale

    def initial_sigma2(self) -> np.ndarray:
        """Noise power per shell from the images' power spectra (RELION's starting estimate)."""
        return image_power_spectrum(self.src, np.arange(min(self.n, 1000)), self.opt.batch, self.xp)

    # -- one iteration -------------------------------------------------------------------------
    def iterate(self, st: _State, refs: list[Any]) -> tuple[list[BackProjector], dict[str, Any]]:
        xp, opt = self.xp, self.opt
        size = _current_size(st.resolution, self.box, self.px)
        mask2d = fourier_mask(size, size / 2 - 1, xp)
        inv_s2 = _inverse_sigma2(st.sigma2, size, mask2d, xp)
        local = st.order >= opt.auto_local_healpix_order
        fine_step = angular_step(st.order)
        fine_shift_step = max(0.25, opt.offset_step * 0.5 ** (st.order - opt.healpix_order))
        if local:
            # RELION oversamples local searches by one HEALPix order; the search reaches 1.5 steps
            # (a cube grid of step/2 within 3 grid units) and two translation steps around the
            # previous pose, whose Gaussian prior weighs the candidates.
            if st.local_offset_step > 0:
                fine_shift_step = st.local_offset_step
            deltas = local_rotations(fine_step / 2, 1.5 * fine_step)
            rel_shifts = translations(2 * fine_shift_step, fine_shift_step)
        else:
            coarse_mats, _ = orientations(opt.healpix_order, opt.sym, perturb=0.5, rng=self.rng)
            coarse_shifts = translations(opt.offset_range, opt.offset_step)
            refine = st.order > opt.healpix_order
            deltas = local_rotations(fine_step, angular_step(opt.healpix_order)) if refine else None
            rel_shifts = translations(opt.offset_step, fine_shift_step) if refine else None
        backprojectors = []
        self.held_out_bps = []
        n_shells = self.box // 2 + 1
        resid = xp.zeros(n_shells)
        resid_count = xp.zeros(n_shells)
        counts_full = _shell_sums(xp.ones((1, size, size // 2 + 1)), size, n_shells, xp)
        changes = np.zeros(self.n)
        spread_rot = np.zeros(self.n)
        spread_trans = np.zeros(self.n)
        for h in (1, 2):
            vol = refs[h - 1] * self.mask3d
            proj = Projector(vol, padding=opt.pad)
            bp = BackProjector(self.box, padding=opt.pad, xp=xp, symmetry=opt.sym)
            hold_bp = BackProjector(self.box, padding=opt.pad, xp=xp, symmetry=opt.sym) \
                if self.held_out is not None else None
            coarse = None if local else proj.project(xp.asarray(coarse_mats), size=size)
            rows_h = np.nonzero(self.half == h)[0]
            batches = self.src.batches(opt.batch, rows_h)
            nb = -(-rows_h.size // opt.batch)
            for rows, imgs in progress(batches, nb, f"iteration {st.iteration} half {h}", "batch"):
                b = rows.size
                x = crop_half(centred_fft(xp.asarray(imgs), 2), size)
                c = crop_half(self.ctf(rows, xp), size) if self.ctf else xp.ones(x.shape, xp.float32)
                if local or deltas is not None:
                    if local:
                        centre_r = self.poses[rows]
                        centre_t = self.offsets[rows]
                    else:
                        logl = score_poses(x, c, coarse, coarse_shifts, inv_s2, self.box, mask2d)
                        best = to_numpy(logl.reshape(b, -1).argmax(axis=1))
                        centre_r = coarse_mats[best // len(coarse_shifts)]
                        centre_t = coarse_shifts[best % len(coarse_shifts)]
                    cand = np.einsum("lij,bjk->blik", deltas, centre_r)  # (B, L, 3, 3)
                    xc = phase_shift_2d(x, xp.asarray(centre_t * (size / self.box)), size)
                    pr = proj.project(xp.asarray(cand.reshape(-1, 3, 3)), size=size).reshape(
                        b, len(deltas), size, size // 2 + 1)
                    logl = score_local_poses(xc, c, pr, rel_shifts, inv_s2, self.box, mask2d)
                    if local:  # Gaussian priors around the previous pose and offset
                        ang = np.rad2deg(np.arccos(np.clip((np.trace(deltas, axis1=1, axis2=2) - 1) / 2, -1, 1)))
                        sig_a = fine_step * 1.5
                        logl = logl - xp.asarray(ang**2 / (2 * sig_a**2))[None, :, None]
                        sig_t = max(fine_shift_step * 3, 1.0)
                        logl = logl - xp.asarray((rel_shifts**2).sum(1) / (2 * sig_t**2))[None, None, :]
                    shifts_used = rel_shifts
                    x_use = xc
                else:
                    logl = score_poses(x, c, coarse, coarse_shifts, inv_s2, self.box, mask2d)
                    centre_t = np.zeros((b, 2))
                    shifts_used = coarse_shifts
                    cand = np.broadcast_to(coarse_mats, (b,) + coarse_mats.shape)
                    x_use = x
                sig = significant_posteriors(logl, opt.adaptive_fraction, opt.max_significant)
                img_i, ori_i, sh_i = (to_numpy(a) for a in (sig.image, sig.orient, sig.shift))
                w = sig.weight
                # best pose per particle
                flat = to_numpy(logl.reshape(b, -1).argmax(axis=1))
                t_n = logl.shape[2]
                bo, bt = flat // t_n, flat % t_n
                new_r = cand[np.arange(b), bo]
                changes[rows] = to_numpy(angle_between(new_r, self.poses[rows]))
                self.poses[rows] = new_r
                self.offsets[rows] = centre_t + shifts_used[bt]
                spread_rot[rows], spread_trans[rows] = _posterior_spread(
                    b, img_i, to_numpy(w), cand[img_i, ori_i], new_r[img_i], shifts_used[sh_i] - shifts_used[bt[img_i]])
                self.pmax[rows] = to_numpy(sig.pmax)
                self.nsig[rows] = to_numpy(sig.n_significant)
                self.loglik[rows] = to_numpy(sig.log_max)
                # M-step: every significant pose, weighted by its posterior and 1/sigma2
                for e in range(0, img_i.size, 4096):  # bounded temporaries
                    sl = slice(e, e + 4096)
                    ii = img_i[sl]
                    xs = phase_shift_2d(x_use[ii], xp.asarray(shifts_used[sh_i[sl]] * (size / self.box)), size)
                    bp.insert(xs, xp.asarray(cand[ii, ori_i[sl]]), ctf=c[ii], weights=w[sl], freq_weight=inv_s2)
                    if hold_bp is not None:
                        held = np.nonzero(self.held_out[rows[ii]])[0]
                        if held.size:
                            hi = ii[held]
                            hold_bp.insert(xs[held], xp.asarray(cand[hi, ori_i[sl][held]]), ctf=c[hi],
                                           weights=w[sl][held], freq_weight=inv_s2)
                # noise: residual of the best pose
                best_proj = proj.project(xp.asarray(new_r), size=size)
                xb = phase_shift_2d(x_use, xp.asarray(shifts_used[bt] * (size / self.box)), size)
                r2 = xp.abs(xb - c * best_proj) ** 2 * mask2d
                resid += _shell_sums(r2, size, n_shells, xp)
                resid_count += counts_full * b
            backprojectors.append(bp)
            if hold_bp is not None:
                self.held_out_bps.append(hold_bp)
        sigma2 = st.sigma2.copy()
        inner = (to_numpy(resid_count) > 0) & (np.arange(n_shells) <= size / 2 - 1)  # shells inside the mask
        sigma2[inner] = to_numpy(resid)[inner] / to_numpy(resid_count)[inner]
        stats = {"size": size, "sigma2": sigma2, "changes": changes, "local": local,
                 "acc_rot": float(np.median(spread_rot)), "acc_trans": float(np.median(spread_trans))}
        return backprojectors, stats

    # -- maximisation --------------------------------------------------------------------------
    def maximise(self, bps: list[BackProjector], prev: list[Any]) -> tuple[list[Any], np.ndarray, float]:
        """Half maps regularised by tau2 from their FSC (or by SSRI), joined below ``low_resol_join_halves``.

        Returns the new references, the gold-standard FSC of the plain (unregularised) half maps and
        the seconds SSRI took (0 without it).
        """
        xp = self.xp
        plain = [bp.reconstruct() for bp in bps]
        # Unmasked, as RELION during refinement: a shared mask would correlate the halves' noise.
        curve = fsc(plain[0], plain[1])
        if self.opt.ssri is not None:
            t = time.perf_counter()
            held = self.held_out_bps or [None, None]
            refs = [self._ssri(bp, p, curve, f"half {h}", hb)
                    for h, (bp, p, hb) in enumerate(zip(bps, prev, held), 1)]
            seconds = time.perf_counter() - t
            self.ssri_halves = [to_numpy(r) for r in refs]
            log.info("  SSRI half maps: FSC 0.143 at %.2f Å (plain half maps %.2f Å), %.1f s",
                     resolution_at(fsc(refs[0], refs[1]), self.box, self.px, 0.143).angstrom,
                     resolution_at(curve, self.box, self.px, 0.143).angstrom, seconds)
            if self.opt.ssri.fsc_weight:
                # The prior may put detail beyond what the halves support, and the same detail in
                # both: aligning to it would make the plain halves agree on it too (model bias).
                refs = [fsc_weighted(r, curve) for r in refs]
        else:
            seconds = 0.0
            refs = [bp.reconstruct(tau2=xp.asarray(self.wiener_tau2(curve, bp))) for bp in bps]
        refs = self._join_low_resolution(refs)
        return refs, curve, seconds

    def wiener_tau2(self, curve: np.ndarray, bp: BackProjector, joined: bool = False) -> np.ndarray:
        """RELION's tau2 per shell for ``bp``'s map: fudge x SSNR / mean weight, the SSNR from the half
        maps' FSC (from the FSC of the whole, 2 FSC / (1 + FSC), when ``bp`` holds both halves)."""
        c = np.clip(2 * curve / (1 + curve) if joined else curve, 1e-6, 0.999)
        return self.opt.tau2_fudge * (c / (1 - c)) / np.maximum(to_numpy(bp.mean_weight_per_shell()), 1e-30)

    def _ssri(self, bp: BackProjector, prev: Any, curve: np.ndarray, what: str,
              held_out: BackProjector | None, joined: bool = False) -> Any:
        """SSRI's map from one back-projector, starting from (and kept close to) ``prev``; its
        parameters cross-validated on the ``held_out`` particles' accumulators when given."""
        res = resolution_at(curve, self.box, self.px, 0.143).angstrom
        radius = min(self.box / 2 - 1, self.box * self.px / max(res, 2 * self.px))
        out = ssri_reconstruct(bp, prev * self.mask3d, radius, self.opt.ssri, held_out,
                               self.wiener_tau2(curve, bp, joined))
        log.info("  SSRI %s: %s", what, describe(out))
        return out.volume

    def _join_low_resolution(self, refs: list[Any]) -> list[Any]:
        xp = self.xp
        fft = fft_module(xp)
        r = self.box * self.px / self.opt.low_resol_join_halves
        from .fourier import radius_grid

        low = radius_grid((self.box,) * 3, xp) <= r
        f1, f2 = fft.rfftn(refs[0]), fft.rfftn(refs[1])
        avg = (f1 + f2) / 2
        f1 = xp.where(low, avg, f1)
        f2 = xp.where(low, avg, f2)
        shape = (self.box,) * 3
        return [fft.irfftn(f1, s=shape).astype(xp.float32), fft.irfftn(f2, s=shape).astype(xp.float32)]

    # -- output --------------------------------------------------------------------------------
    def write_iteration(self, st: _State, refs: list[Any], curve: np.ndarray, prefix: str) -> None:
        for h in (1, 2):
            write_map(self.out / f"{prefix}_half{h}_class001.mrc", to_numpy(refs[h - 1]), self.px)
        self.write_data(self.out / f"{prefix}_data.star")
        self.write_model(st, curve, self.out / f"{prefix}_model.star", f"{prefix}_half1_class001.mrc")
        self.write_optimiser(st, prefix)

    def write_optimiser(self, st: _State, prefix: str) -> None:
        """``{prefix}_optimiser.star``, pointing at ``{prefix}_model.star`` and ``{prefix}_data.star``."""
        write_star(self.out / f"{prefix}_optimiser.star", {"optimiser_general": {
            "rlnOutputRootName": str(self.out / "run"), "rlnModelStarFile": str(self.out / f"{prefix}_model.star"),
            "rlnExperimentalDataStarFile": str(self.out / f"{prefix}_data.star"),
            "rlnCurrentIteration": st.iteration, "rlnParticleDiameter": self.opt.particle_diameter,
            "rlnDoCorrectCtf": int(self.opt.ctf), "rlnDoAutoRefine": 1, "rlnHealpixOrder": st.order,
            "rlnBestResolutionThusFar": 1.0 / st.best_resolution if st.best_resolution < 1e8 else 0.0,
            "rlnNumberOfIterWithoutResolutionGain": st.no_gain, "rlnHasConverged": int(st.converged),
            "rlnSymmetryGroup": self.opt.sym, "rlnIniHighResolution": self.opt.ini_high,
            "rlnOffsetRange": self.opt.offset_range, "rlnOffsetStep": st.local_offset_step or self.opt.offset_step}})

    def write_data(self, path: Path) -> None:
        rot, tilt, psi = matrix_to_euler(self.poses)
        d = self.table.data.copy()
        d["rlnAngleRot"], d["rlnAngleTilt"], d["rlnAnglePsi"] = rot, tilt, psi
        d["rlnOriginXAngst"] = self.offsets[:, 0] * self.px
        d["rlnOriginYAngst"] = self.offsets[:, 1] * self.px
        d["rlnClassNumber"] = 1
        d["rlnRandomSubset"] = self.half
        d["rlnNormCorrection"] = 1.0
        d["rlnLogLikeliContribution"] = self.loglik
        d["rlnMaxValueProbDistribution"] = self.pmax
        d["rlnNrOfSignificantSamples"] = self.nsig
        write_star(path, {"optics": self.table.optics, "particles": d})

    def write_model(self, st: _State, curve: np.ndarray, path: Path, ref_name: str) -> None:
        k = shell_resolutions(self.box, self.px)
        ang = np.where(k > 0, 1.0 / np.maximum(k, 1e-12), 999.0)
        fsc_c = np.clip(curve, 1e-6, 0.999)
        write_star(path, {
            "model_general": {"rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2,
                              "rlnOriginalImageSize": self.box, "rlnCurrentResolution": st.resolution,
                              "rlnCurrentImageSize": _current_size(st.resolution, self.box, self.px),
                              "rlnPaddingFactor": self.opt.pad, "rlnPixelSize": self.px, "rlnNrClasses": 1,
                              "rlnNrGroups": 1, "rlnNrOpticsGroups": len(self.table.optics),
                              "rlnTau2FudgeFactor": self.opt.tau2_fudge,
                              "rlnAveragePmax": float(self.pmax.mean()),
                              "rlnLogLikelihood": float(self.loglik.sum())},
            "model_classes": pd.DataFrame({"rlnReferenceImage": [str(self.out / ref_name)],
                                           "rlnClassDistribution": [1.0],
                                           "rlnAccuracyRotations": [angular_step(st.order)],
                                           "rlnAccuracyTranslationsAngst": [self.opt.offset_step * self.px],
                                           "rlnEstimatedResolution": [st.resolution]}),
            "model_class_1": pd.DataFrame({"rlnSpectralIndex": np.arange(len(curve)), "rlnResolution": k,
                                           "rlnAngstromResolution": ang, "rlnGoldStandardFsc": curve,
                                           "rlnSsnrMap": fsc_c / (1 - fsc_c)}),
            "model_groups": pd.DataFrame({"rlnGroupNumber": [1], "rlnGroupName": ["group_1"],
                                          "rlnGroupNrParticles": [self.n], "rlnGroupScaleCorrection": [1.0]}),
            "model_optics_group_1": pd.DataFrame({"rlnSpectralIndex": np.arange(len(st.sigma2)),
                                                  "rlnResolution": k, "rlnSigma2Noise": st.sigma2}),
        })


def _last_iteration(out: Path) -> int:
    its = sorted(int(p.name[6:9]) for p in out.glob("run_it[0-9][0-9][0-9]_optimiser.star"))
    return its[-1] if its else -1


def refine3d(opt: Refine3DOptions) -> RefineResult:
    """Run (or ``continue_run``: resume) a gold-standard 3D auto-refinement; returns the final outputs."""
    r = _Refiner(opt)
    xp = r.xp
    last = _last_iteration(Path(opt.out)) if opt.continue_run else -1
    if last >= 0:
        prefix = f"run_it{last:03d}"
        o = read_star(Path(opt.out) / f"{prefix}_optimiser.star")["optimiser_general"].iloc[0]
        m = read_star(Path(opt.out) / f"{prefix}_model.star")
        best = float(o["rlnBestResolutionThusFar"])
        st = _State(iteration=last, order=int(o["rlnHealpixOrder"]),
                    resolution=float(m["model_general"]["rlnCurrentResolution"].iloc[0]),
                    best_resolution=1.0 / best if best > 0 else 1e9,
                    no_gain=int(o["rlnNumberOfIterWithoutResolutionGain"]), converged=bool(o["rlnHasConverged"]),
                    local_offset_step=float(o.get("rlnOffsetStep", 0.0)) if int(o["rlnHealpixOrder"])
                    >= opt.auto_local_healpix_order else 0.0,
                    sigma2=m["model_optics_group_1"]["rlnSigma2Noise"].to_numpy(dtype=float))
        refs = [xp.asarray(read_map(Path(opt.out) / f"{prefix}_half{h}_class001.mrc")[0]) for h in (1, 2)]
        prev = read_particles(Path(opt.out) / f"{prefix}_data.star")
        r.poses = euler_to_matrix(*(prev.data[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
        r.offsets = origins_px(prev, r.px)
        r.half = prev.data["rlnRandomSubset"].to_numpy(dtype=int)
        log.info("continuing from iteration %d (resolution %.2f Å, HEALPix order %d)", last, st.resolution, st.order)
    else:
        st, refs = r.initial_state()
    bps: list[BackProjector] = []
    curve = np.zeros(r.box // 2 + 1)
    ssri_seconds: list[float] = []
    while not st.converged and st.iteration < opt.max_iter:
        st.iteration += 1
        bps, stats = r.iterate(st, refs)
        prev = refs
        refs, curve, ssri_s = r.maximise(bps, prev)
        res = resolution_at(curve, r.box, r.px, 0.143).angstrom
        gained = res < st.best_resolution - 1e-3 and (r.box * r.px / res - r.box * r.px / st.best_resolution) >= 0.5
        st.no_gain = 0 if gained else st.no_gain + 1
        # The first iteration's FSC is inflated by both halves starting from one reference: not a record.
        st.best_resolution = min(st.best_resolution, res) if st.iteration > 1 else 1e9
        st.resolution = res
        st.sigma2 = stats["sigma2"]
        change = float(np.median(stats["changes"]))
        step = angular_step(st.order)
        log.info("iteration %d: resolution %.2f Å (size %d), HEALPix order %d (%.2f°), median pose change %.2f°, "
                 "mean Pmax %.3f", st.iteration, res, stats["size"], st.order, step, change, float(r.pmax.mean()))
        if opt.ssri is not None:
            log.info("  SSRI added %.1f s to this iteration", ssri_s)
            ssri_seconds.append(ssri_s)
        # RELION's rule: when the resolution stops improving and poses barely change, sample finer --
        # unless the (oversampled) step is already below 75% of the accuracy with which the data
        # fix the poses, in which case finer sampling cannot help and the run has converged.
        acc_rot, acc_trans = stats["acc_rot"], stats["acc_trans"]
        log.info("  pose accuracy (posterior spread): %.2f°, %.2f px", acc_rot, acc_trans)
        if st.no_gain >= 1 and change < 1.5 * step:
            # Global searches always go on to the local ones: there a broad posterior only says the
            # reference is still poor.
            fine_enough = (st.order >= opt.auto_local_healpix_order and step / 2 < 0.75 * acc_rot) \
                or st.order >= opt.max_healpix_order
            if fine_enough:
                st.converged = True
            else:
                st.order += 1
                st.no_gain = 0
                if st.order >= opt.auto_local_healpix_order:
                    st.local_offset_step = float(np.clip(0.75 * acc_trans, 0.25, opt.offset_step))
                log.info("sampling made finer: HEALPix order %d (%.2f°), local offset step %.2f px", st.order,
                         angular_step(st.order), st.local_offset_step)
        r.write_iteration(st, refs, curve, f"run_it{st.iteration:03d}")
    result = _finish(r, st, bps, refs, curve)
    result.ssri_seconds = ssri_seconds
    return result


def _finish(r: _Refiner, st: _State, bps: list[BackProjector], refs: list[Any], curve: np.ndarray) -> RefineResult:
    """Final outputs: both halves joined into run_class001.mrc, unfiltered half maps, run_*.star."""
    xp = r.xp
    out = r.out
    if not bps:  # resumed after the last iteration had already converged: rebuild from the half maps
        final = (refs[0] + refs[1]) / 2
        halves = [to_numpy(refs[0]), to_numpy(refs[1])]
    else:
        halves = [to_numpy(bp.reconstruct()) for bp in bps]
        joined = BackProjector(r.box, padding=r.opt.pad, xp=xp, symmetry=r.opt.sym)
        joined.add(bps[0])
        joined.add(bps[1])
        if r.opt.ssri is not None:
            held = None
            if r.held_out_bps:
                held = r.held_out_bps[0]
                held.add(r.held_out_bps[1])
            final = r._ssri(joined, (refs[0] + refs[1]) / 2, curve, "both halves joined", held, joined=True)
            for h, vol in enumerate(r.ssri_halves, 1):
                write_map(out / f"run_half{h}_class001_ssri.mrc", vol, r.px)
        else:
            final = joined.reconstruct(tau2=xp.asarray(r.wiener_tau2(curve, joined, joined=True)))
    h1, h2 = out / "run_half1_class001_unfil.mrc", out / "run_half2_class001_unfil.mrc"
    write_map(h1, halves[0], r.px)
    write_map(h2, halves[1], r.px)
    final_path = out / "run_class001.mrc"
    write_map(final_path, to_numpy(final), r.px)
    r.write_data(out / "run_data.star")
    r.write_model(st, curve, out / "run_model.star", "run_class001.mrc")
    r.write_optimiser(st, "run")
    res = resolution_at(curve, r.box, r.px, 0.143).angstrom
    log.info("final resolution (gold-standard FSC 0.143): %.2f Å after %d iterations", res, st.iteration)
    return RefineResult(final_path, (h1, h2), out / "run_data.star", res, curve, st.iteration)

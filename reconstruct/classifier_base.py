"""What 2D and 3D classification share around their E-step and their map update.

:class:`ClassifierBase` holds the parts of RELION's Class2D, Class3D and InitialModel jobs that do
not depend on the references' dimension: the running averages of the "other parameters" (class
sizes, noise spectrum, offset spread, accuracies), the per-iteration summary (resolution, Fourier
completeness, mean Pmax), RELION's class replacement, and the job files' common columns -- the
particle table of ``run_itNNN_data.star``, the ``optimiser_general`` block, ``run_itNNN_model.star``
-- and reading them back for ``--continue``.  The 2D and 3D classifiers set the attributes listed
in the class and add what is theirs (in-plane angle or 3D orientation, sampling, moments' files).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backend import to_numpy
from .class_grids import ClassGrids
from .class_model_star import write_class_model
from .files.errors import InputError
from .files.star import read_particles, read_star
from .fsc import resolution_at
from .oversampling import max_per_image
from .particles import CtfSource, ParticleJob
from .vdam import direction_power, shell_curve, shell_means

log = logging.getLogger("reconstruct")


class ClassifierBase(ParticleJob):
    """Shared state handling of a classification job; subclasses set these attributes."""

    opt: Any
    em: bool
    grids: Any
    ctf: Any
    floor: float
    n: int
    k: int
    schedule: Any
    maxsig: int
    n_iter: int
    cls: np.ndarray
    offsets: np.ndarray
    pmax: np.ndarray
    nsig: np.ndarray
    loglik: np.ndarray

    def open_job(self, opt: Any, ndim: int) -> float:
        """The set-up every classification job shares: check the options, read the particles, make the
        class grids and per-particle arrays; returns the particle radius in pixels."""
        if opt.algorithm not in ("vdam", "em"):
            raise ValueError(f"--algorithm must be vdam or em, not {opt.algorithm!r}")
        if opt.n_classes < 1:
            raise ValueError("--K must be at least 1")
        if not opt.particle_diameter > 0:
            raise ValueError(f"--particle_diameter must be positive (Å), not {opt.particle_diameter:g}")
        self.opt = opt
        self.em = opt.algorithm == "em"
        self.open_particles(opt)
        self.n, self.k = len(self.table), opt.n_classes
        radius_px = opt.particle_diameter / (2 * self.px)
        if radius_px > self.box / 2:
            raise InputError(opt.star, f"--particle_diameter {opt.particle_diameter:g} Å is larger than the "
                             f"box ({self.box} px x {self.px:.3f} Å)", "give the particle's diameter in Å")
        self.grids = ClassGrids(self.box, self.k, ndim, opt.pad, self.xp)
        self.ctf = CtfSource(self.table, self.box, self.px) if opt.ctf else None
        self.n_iter = opt.n_iter or (25 if self.em else 200)
        self.cls = np.arange(self.n) % self.k
        self.pmax = np.zeros(self.n)
        self.nsig = np.zeros(self.n, dtype=int)
        self.loglik = np.zeros(self.n)
        # RELION's F floor of 1: F sums c^2 / sigma2 of 2D image transforms, which RELION normalises by
        # 1/N^2 and we do not, so its 1 is our N^-4.
        self.floor = float(self.box) ** -4
        return radius_px

    def batch_rows(self, it: int) -> tuple[np.ndarray, bool]:
        """The particles of iteration ``it`` (all of them for EM, else a random mini-batch of the
        schedule's size, the same for a given seed and iteration so ``--continue`` repeats it) and
        whether that is a full pass."""
        if self.em:
            return np.arange(self.n), True
        size = self.schedule.subset_size(it, self.k)
        rows = np.sort(np.random.default_rng(self.opt.seed + it).permutation(self.n)[:size])
        return rows, size >= self.n

    # -- E-step bookkeeping ---------------------------------------------------------------------
    def tally(self, rows: np.ndarray, sig: Any, pw: Any, cls_e: Any, d_ang: np.ndarray, d_off: np.ndarray,
              best_cls: np.ndarray, new_off: np.ndarray, acc: dict[str, Any]) -> None:
        """A batch's per-particle Pmax and number of significant samples, and its sums for the other
        parameters: per class, the posterior spreads of angle and offset around each particle's best
        pose (``d_ang`` (E, C) degrees and ``d_off`` (E, S, 2) px from it, for the E significant
        coarse poses' C finer angles and S finer offsets), the class masses, and the class changes
        and squared offsets.  Call before the particles' classes are updated to ``best_cls``."""
        b = rows.size
        img_np = to_numpy(sig.image)
        pw_np = to_numpy(pw).reshape(*d_ang.shape, d_off.shape[1])
        rot2 = np.bincount(img_np, weights=(pw_np * (d_ang**2)[:, :, None]).sum((1, 2)), minlength=b)
        tr2 = np.bincount(img_np, weights=(pw_np * (d_off**2).sum(-1)[:, None, :]).sum((1, 2)), minlength=b)
        np.add.at(acc["spread_rot"], best_cls, np.sqrt(rot2))
        np.add.at(acc["spread_trans"], best_cls, np.sqrt(tr2))
        np.add.at(acc["spread_n"], best_cls, 1)
        acc["changed"] += int((self.cls[rows] != best_cls).sum())
        self.pmax[rows] = to_numpy(max_per_image(self.xp, sig.image, pw, b))
        self.nsig[rows] = to_numpy(sig.n_significant)
        np.add.at(acc["class_mass"], to_numpy(cls_e), to_numpy(pw.sum(axis=1)))
        acc["offset2"] += float((new_off**2).sum())
        acc["n"] += b

    # -- maximisation ---------------------------------------------------------------------------
    def update_other_parameters(self, st: Any, acc: dict[str, Any], full_pass: bool) -> np.ndarray:
        """Class sizes, noise spectrum, offset spread and accuracies from this batch's sums, as
        running averages (mu 0.9) over VDAM mini-batches and replaced outright by EM or a full pass.
        Returns the class sizes before the update (what class replacement looks at)."""
        mu = 0.0 if (full_pass or self.em) else 0.9
        n = max(acc["n"], 1)
        pi_prev = st.pi.copy()
        st.changes_classes = acc["changed"] / n
        st.pi = mu * st.pi + (1 - mu) * acc["class_mass"] / n
        st.pi /= max(st.pi.sum(), 1e-30)
        valid = acc["resid_n"] > 0
        st.sigma2[valid] = mu * st.sigma2[valid] + (1 - mu) * acc["resid"][valid] / acc["resid_n"][valid]
        st.sigma_offset = max(0.5, math.sqrt(mu * st.sigma_offset**2 + (1 - mu) * acc["offset2"] / (2 * n)))
        seen = acc["spread_n"] > 0
        st.acc_rot[seen] = acc["spread_rot"][seen] / acc["spread_n"][seen]
        st.acc_trans[seen] = acc["spread_trans"][seen] / acc["spread_n"][seen]
        return pi_prev

    def summarise(self, st: Any, acc: dict[str, Any], fsc: Any) -> None:
        """After the update: the per-shell weights, Fourier completeness, the resolution of the best
        active class (which sets the next image size), mean Pmax and the total log-likelihood."""
        xp, g = self.xp, self.grids
        st.fsc = to_numpy(fsc)
        covered = (acc["f_half"].sum(axis=0) > 0).astype(xp.float32)
        shells = g.shell_index()
        st.completeness = to_numpy(shell_means(covered, shells, self.box // 2 + 2, shells <= self.box // 2 + 1))
        active = st.pi > 0.5 / (self.k * max(acc["n"], 1)) if self.k > 1 else np.ones(1, bool)
        res_shells = [self.resolved_shell(st, k) for k in np.nonzero(active)[0]]
        st.resolution_shell = max(5, max(res_shells, default=5))
        st.avg_pmax = float(self.pmax[self.pmax > 0].mean()) if bool((self.pmax > 0).any()) else 0.0
        st.loglik = float(self.loglik.sum())

    def resolved_shell(self, st: Any, k: int) -> int:
        """Last shell of class ``k`` before its SNR estimate drops below 1 (FSC weight 0.5)."""
        return resolution_at(st.fsc[k], self.box, self.px, 0.5).shell

    def replace_class(self, st: Any, v: Any, direction: Any, fsc: Any, pi_prev: np.ndarray,
                      radius: float) -> list[int]:
        """RELION's class replacement: the emptiest class becomes a copy of the busiest one, if tiny."""
        k_active = int((pi_prev > 0).sum())
        a = int(np.argmin(pi_prev))
        b = int(np.argmax(st.pi * direction_power(self.grids, direction, radius)))
        if a == b or k_active == 0 or pi_prev[a] >= self.opt.class_inactivity_threshold / k_active:
            return []
        v[a] = v[b]
        st.mom.m[:, a] = st.mom.m[:, b]
        st.mom.m[0, a] *= 0.9  # so that the two copies drift apart
        st.mom.u[a] = st.mom.u[b]
        fsc[a] = fsc[b]
        st.pi[a] = st.pi[b]
        st.pi /= st.pi.sum()
        st.acc_rot[a], st.acc_trans[a] = st.acc_rot[b], st.acc_trans[b]
        log.info("  class %d (%.2f%% of the particles) replaced by a copy of class %d", a + 1, 100 * pi_prev[a],
                 b + 1)
        return [a]

    # -- job files ------------------------------------------------------------------------------
    def particle_table(self, drop: tuple[str, ...]) -> pd.DataFrame:
        """The input particles with this job's offsets, classes and per-particle statistics (the
        ``drop`` columns removed: old-style pixel origins, angles a 2D job does not set)."""
        df = self.table.data.drop(columns=[c for c in drop if c in self.table.data.columns])
        df["rlnOriginXAngst"] = self.offsets[:, 0] * self.px
        df["rlnOriginYAngst"] = self.offsets[:, 1] * self.px
        df["rlnClassNumber"] = self.cls + 1
        df["rlnNormCorrection"] = 1.0
        df["rlnLogLikeliContribution"] = self.loglik
        df["rlnMaxValueProbDistribution"] = self.pmax
        df["rlnNrOfSignificantSamples"] = self.nsig
        if "rlnGroupNumber" not in df.columns:
            df["rlnGroupNumber"] = df["rlnOpticsGroup"].astype(int)
        return df

    def write_model(self, st: Any, path: Path, references: list[str], moments: tuple[list[str], list[str]],
                    extra_class_columns: dict[str, Any] | None = None) -> None:
        """``run_itNNN_model.star``; ``moments`` names the VDAM moments' files (not written for EM)."""
        power = np.abs(to_numpy(self.grids.transform(st.refs, False))) ** 2
        write_class_model(path, st, ndim=self.grids.ndim, box=self.box, pixel_size=self.px, pad=self.opt.pad,
                          current_size=self.current_size(st),
                          tau2_fudge=self.opt.tau2_fudge if self.em else self.schedule.tau2_fudge_at(st.it),
                          optics=self.table.optics, n_particles=self.n,
                          resolved=[max(self.resolved_shell(st, k), 1) for k in range(self.k)],
                          references=references, moments=None if self.em else moments,
                          tau2=to_numpy(shell_curve(power, self.grids, self.box // 2 + 1)),
                          extra_class_columns=extra_class_columns)

    def current_size(self, st: Any) -> int:
        """Image size of the next E-step (subclasses: from the resolution)."""
        raise NotImplementedError

    def optimiser_general(self, st: Any, it: int, root: str) -> dict[str, Any]:
        """The ``optimiser_general`` entries every classification job writes (RELION's labels)."""
        opt, sch = self.opt, self.schedule
        return {"rlnOutputRootName": str(self.out / "run"), "rlnModelStarFile": f"{self.out / root}_model.star",
                "rlnExperimentalDataStarFile": f"{self.out / root}_data.star", "rlnCurrentIteration": it,
                "rlnNumberOfIterations": self.n_iter, "rlnDoSplitRandomHalves": 0,
                "rlnDoGradientRefine": int(not self.em), "rlnDoStochasticGradientDescent": 0,
                "rlnGradEmIters": 0, "rlnGradHasConverged": int(it >= self.n_iter),
                "rlnGradCurrentStepsize": 1.0 if self.em else sch.step(max(it, 1)),
                "rlnSgdInitialIterationsFraction": sch.ini_frac, "rlnSgdFinalIterationsFraction": sch.fin_frac,
                "rlnSgdInitialSubsetSize": sch.ini_subset, "rlnSgdFinalSubsetSize": sch.fin_subset,
                "rlnSgdMuFactor": 0.9, "rlnSgdStepsize": sch.stepsize, "rlnSgdStepsizeScheme": "",
                "rlnTau2FudgeArg": opt.tau2_fudge, "rlnTau2FudgeScheme": "",
                "rlnSgdWriteEverySubset": opt.write_every,
                "rlnSgdClassInactivityThreshold": opt.class_inactivity_threshold,
                "rlnMaximumSignificantPoses": self.maxsig, "rlnParticleDiameter": opt.particle_diameter,
                "rlnRandomSeed": opt.seed, "rlnDoCtfCorrection": int(opt.ctf), "rlnDoZeroMask": int(opt.zero_mask),
                "rlnAdaptiveOversampleFraction": opt.adaptive_fraction,
                "rlnSigmaOffsetsAngst": st.sigma_offset * self.px,
                "rlnDoCorrectCtf": int(opt.ctf), "rlnRefsAreCtfCorrected": 1, "rlnCtfDataArePhaseFlipped": 0,
                "rlnDoCorrectNorm": 0, "rlnDoCorrectScale": 0, "rlnDoAutoRefine": 0, "rlnDoMapEstimation": 1,
                "rlnDoSkipAlign": 0, "rlnDoSkipRotate": 0, "rlnDoStochasticEM": 0,
                "rlnHasConverged": int(it >= self.n_iter), "rlnIncrementImageSize": 10, "rlnWidthMaskEdge": 5,
                "rlnChangesOptimalClasses": st.changes_classes,
                "rlnOverallAccuracyRotations": float(np.sum(st.pi * st.acc_rot)),
                "rlnOverallAccuracyTranslationsAngst": float(np.sum(st.pi * st.acc_trans)) * self.px,
                "rlnAlgorithm": opt.algorithm}

    # -- --continue -----------------------------------------------------------------------------
    def last_written(self) -> tuple[int, Path, dict[str, pd.DataFrame]] | None:
        """Iteration, file root and model blocks of the last fully written iteration (its optimiser
        file is written last), checked against this run's algorithm and K; None if there is none."""
        done = sorted(self.out.glob("run_it[0-9][0-9][0-9]_optimiser.star"))
        if not done:
            return None
        opt_star = done[-1]
        it = int(re.search(r"run_it(\d{3})_", opt_star.name).group(1))
        general = read_star(opt_star)["optimiser_general"].iloc[0]
        if str(general.get("rlnAlgorithm", self.opt.algorithm)) != self.opt.algorithm:
            raise InputError(opt_star, f"was written by --algorithm {general['rlnAlgorithm']}",
                             "continue with the same algorithm, or use a new output directory")
        root = self.out / f"run_it{it:03d}"
        model = read_star(f"{root}_model.star")
        if len(model["model_classes"]) != self.k:
            raise InputError(Path(f"{root}_model.star"), f"has {len(model['model_classes'])} classes, --K is "
                             f"{self.k}", "continue with the same --K")
        return it, root, model

    def model_numbers(self, model: dict[str, pd.DataFrame]) -> dict[str, Any]:
        """What the state keeps from ``run_itNNN_model.star``: class sizes, noise spectrum, offset
        spread (px), resolution shell, accuracies (degrees, px) and the per-class FSC weights."""
        classes, general = model["model_classes"], model["model_general"].iloc[0]
        sigma2 = model[f"model_optics_group_{int(self.table.optics['rlnOpticsGroup'].iloc[0])}"]
        fsc = np.zeros((self.k, self.box // 2 + 2))
        for k in range(self.k):
            ssnr = model[f"model_class_{k + 1}"]["rlnSsnrMap"].to_numpy(float)
            fsc[k, : ssnr.size] = ssnr / (1 + ssnr)
        return {"pi": np.array(classes["rlnClassDistribution"], dtype=float),
                "sigma2": np.array(sigma2["rlnSigma2Noise"], dtype=float),
                "sigma_offset": float(general["rlnSigmaOffsetsAngst"]) / self.px,
                "resolution_shell": max(5, round(self.box * self.px / float(general["rlnCurrentResolution"]))),
                "acc_rot": np.array(classes["rlnAccuracyRotations"], dtype=float),
                "acc_trans": np.array(classes["rlnAccuracyTranslationsAngst"], dtype=float) / self.px,
                "fsc": fsc}

    def load_particles(self, root: Path) -> pd.DataFrame:
        """Per-particle classes, offsets and statistics from ``run_itNNN_data.star``; the table is
        returned for the angles, which are the subclass's."""
        data = read_particles(f"{root}_data.star").data
        if len(data) != self.n:
            raise InputError(Path(f"{root}_data.star"), f"has {len(data)} particles, the input has {self.n}",
                             "continue with the same --i")
        self.cls = np.array(data["rlnClassNumber"], dtype=int) - 1
        self.offsets = np.stack([data["rlnOriginXAngst"], data["rlnOriginYAngst"]], 1).astype(float) / self.px
        self.pmax = np.array(data["rlnMaxValueProbDistribution"], dtype=float)
        self.nsig = np.array(data["rlnNrOfSignificantSamples"], dtype=int)
        self.loglik = np.array(data["rlnLogLikeliContribution"], dtype=float)
        return data

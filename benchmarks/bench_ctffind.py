"""CTF estimation (reconstruct ctffind's fit) against simulated truth, its speed, and torch-ctf's CTF beside ours.

Three sets, all with RELION's prep-scheme search (box 512, 30-5 Å, 5,000-50,000 Å in 500 Å steps, dast 100):
- dense: 1024 x 1024 micrographs of an amorphous specimen (white object) through RELION's CTF (B 60 Å^2)
  plus ice/detector noise (reconstruct.simulate.noise), pixels 1.0/1.2/1.4 Å, astigmatism 0-1,500 Å;
- movies: reconstruct.simulate.movies (particles of a pseudo-atomic map, no drift), frames summed;
- noise: micrographs with no specimen (their fit must be rejected by a 6 Å cut);
then the wall time of one 4096 x 4096 micrograph (1.0 Å/px).  RELION 3.1 ships no CTFFIND, so there is
no peer timing.  torch-ctf (teamtomo, if installed) is compared with reconstruct.ctf.ctf_2d.

    python benchmarks/bench_ctffind.py [--n 12] [--out benchmarks/out/ctffind]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from reconstruct.backend import fft_module
from reconstruct.ctf import Optics, ctf_2d
from reconstruct.ctf_fit import CtfSearch, estimate_ctf
from reconstruct.simulate.noise import coloured_noise, noise_spectrum

SEARCH = CtfSearch()
NOTE = (
    "The movie simulator's micrographs carry Thon rings only from sparse particles (its noise is not CTF-"
    "modulated, there is no amorphous ice), so their rings are too weak to fit: the significance test "
    "rejects every one (rlnCtfMaxResolution = box x pixel) rather than report a wrong defocus as good. "
    "torch-ctf matches ctf_2d without astigmatism and with astigmatism along x or y, but not at oblique "
    "angles (no rotation or U/V swap of ours matches it); it would also add a torch dependency to the "
    "NumPy/CuPy core, so it is of no use to us.")


def dense_micrograph(size: int, px: float, du: float, dv: float, angle: float, snr: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Amorphous specimen through the CTF plus coloured noise (as tests/test_ctffind.py)."""
    obj = rng.standard_normal((size, size)).astype(np.float32)
    ctf = ctf_2d(size, px, du, dv, angle, Optics(), bfactor=60.0)[0]
    fft = fft_module(np)
    sig = fft.irfft2(fft.rfft2(obj) * ctf, s=(size, size))
    sig /= sig.std()
    return (sig + coloured_noise(1, size, noise_spectrum(size, px), rng, 1 / np.sqrt(snr))[0]).astype(np.float32)


def angle_error(a: float, b: float) -> float:
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


def dense_set(n: int, snr: float, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    errs, ang_errs, maxres, fom, times = [], [], [], [], []
    for i in range(n):
        px = (1.0, 1.2, 1.4)[i % 3]
        mean, astig, ang = rng.uniform(8000, 35000), rng.uniform(0, 1500), rng.uniform(0, 180)
        du, dv = mean + astig / 2, mean - astig / 2
        mic = dense_micrograph(1024, px, du, dv, ang, snr, rng)
        t = time.perf_counter()
        f = estimate_ctf(mic, px, Optics(), SEARCH)
        times.append(time.perf_counter() - t)
        errs += [abs(f.defocus_u - du), abs(f.defocus_v - dv)]
        if astig >= 300:
            ang_errs.append(angle_error(f.defocus_angle, ang))
        maxres.append(f.max_resolution)
        fom.append(f.score)
    return {"n": n, "median_err": float(np.median(errs)), "p90_err": float(np.percentile(errs, 90)),
            "median_ang": float(np.median(ang_errs)) if ang_errs else float("nan"), "n_ang": len(ang_errs),
            "maxres": float(np.median(maxres)), "maxres_range": (min(maxres), max(maxres)),
            "fom": float(np.median(fom)), "time": float(np.median(times))}


def blob_map(n: int, n_atoms: int, seed: int = 0) -> np.ndarray:
    """A pseudo-atomic map: Gaussian atoms (sigma 1 px) scattered around the centre of an n^3 box."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(0.0, 0.11 * n, (n_atoms, 3)) + n // 2
    idx = np.clip(np.rint(atoms).astype(int), 0, n - 1)
    vol = np.zeros((n, n, n), np.float32)
    np.add.at(vol, (idx[:, 0], idx[:, 1], idx[:, 2]), 1.0)
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(vol, 1.0).astype(np.float32)


def movie_set(out: Path, n: int, snr: float) -> dict[str, float]:
    """Micrographs from the movie simulator (drift 0, frames summed)."""
    import mrcfile

    from reconstruct.simulate.movies import MovieSimulation, simulate_movies

    cfg = MovieSimulation(n_movies=n, size=1024, pixel_size=1.4, n_frames=8, particles_per_movie=200, snr=snr,
                          particle_diameter=70.0, drift_step=0.0, defocus_range=(8000.0, 30000.0),
                          max_astigmatism=1200.0, seed=3)
    truth = simulate_movies([blob_map(48, 400)], 1.4, cfg, out)
    errs, ang_errs, maxres, fom = [], [], [], []
    for name, grp in truth.groupby("movie"):
        with mrcfile.open(out / name, permissive=True) as m:
            mic = np.asarray(m.data, np.float32).sum(axis=0)
        row = grp.iloc[0]
        f = estimate_ctf(mic, 1.4, Optics(), SEARCH)
        errs += [abs(f.defocus_u - row.rlnDefocusU), abs(f.defocus_v - row.rlnDefocusV)]
        if row.rlnDefocusU - row.rlnDefocusV >= 300:
            ang_errs.append(angle_error(f.defocus_angle, row.rlnDefocusAngle))
        maxres.append(f.max_resolution)
        fom.append(f.score)
    return {"n": n, "median_err": float(np.median(errs)), "p90_err": float(np.percentile(errs, 90)),
            "median_ang": float(np.median(ang_errs)) if ang_errs else float("nan"), "n_ang": len(ang_errs),
            "maxres": float(np.median(maxres)), "maxres_range": (min(maxres), max(maxres)),
            "fom": float(np.median(fom)), "time": float("nan")}


def noise_set(n: int) -> tuple[int, int, float]:
    """(kept by a 6 Å cut, n, median FOM) for specimen-free micrographs."""
    kept, foms = 0, []
    for i in range(n):
        rng = np.random.default_rng(1000 + i)
        mic = coloured_noise(1, 1024, noise_spectrum(1024, 1.4), rng)[0]
        f = estimate_ctf(mic, 1.4, Optics(), SEARCH)
        kept += f.max_resolution <= 6.0
        foms.append(f.score)
    return kept, n, float(np.median(foms))


def time_4k() -> tuple[float, float, float]:
    rng = np.random.default_rng(5)
    mic = dense_micrograph(4096, 1.0, 20400.0, 19600.0, 70.0, 0.1, rng)
    t = time.perf_counter()
    f = estimate_ctf(mic, 1.0, Optics(), SEARCH)
    return time.perf_counter() - t, abs(f.defocus_u - 20400.0), abs(f.defocus_v - 19600.0)


def torch_ctf_comparison() -> list[str]:
    """Max |difference| between torch-ctf's calculate_ctf_2d and ctf_2d for a few parameters."""
    try:
        from torch_ctf import calculate_ctf_2d
    except ImportError:
        return ["torch-ctf is not installed (pip install torch-ctf)"]
    rows = ["| defocus U / V (Å) | angle (°) | phase (°) | max abs difference |", "|---|---:|---:|---:|"]
    box, px = 128, 1.2
    for du, dv, ang, ph in [(9000, 9000, 0, 0), (9000, 9000, 0, 60), (15000, 14000, 0, 0), (15000, 14000, 90, 0),
                            (15000, 14000, 30, 0), (22000, 20500, 110, 0)]:
        t = calculate_ctf_2d(defocus=(du + dv) / 2e4, astigmatism=(du - dv) / 2e4, astigmatism_angle=float(ang),
                             voltage=300.0, spherical_aberration=2.7, amplitude_contrast=0.1, phase_shift=float(ph),
                             pixel_size=px, image_shape=(box, box), rfft=True, fftshift=False)
        ours = ctf_2d(box, px, du, dv, ang, Optics(300, 2.7, 0.1), phase_shift=ph)[0]
        rows.append(f"| {du} / {dv} | {ang} | {ph} | {float(np.abs(t.numpy().reshape(ours.shape) - ours).max()):.4f} |")
    return rows


def _row(name: str, r: dict) -> str:
    lo, hi = r["maxres_range"]
    t = f"{r['time']:.2f}" if np.isfinite(r["time"]) else "-"
    return (f"| {name} | {r['n']} | {r['median_err']:.0f} | {r['p90_err']:.0f} | "
            f"{r['median_ang']:.1f} ({r['n_ang']}) | {r['maxres']:.2f} ({lo:.2f}-{hi:.2f}) | {r['fom']:.3f} | {t} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12, help="micrographs per dense set")
    ap.add_argument("--out", default="benchmarks/out/ctffind")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_row("dense, SNR 0.1", dense_set(a.n, 0.1)), _row("dense, SNR 0.03", dense_set(a.n, 0.03, seed=1)),
            _row("movie simulator, particle SNR 0.05", movie_set(out / "movies", 4, 0.05)),
            _row("movie simulator, particle SNR 1", movie_set(out / "movies1", 4, 1.0))]
    kept, n_noise, noise_fom = noise_set(8)
    t4k, e_u, e_v = time_4k()
    lines = [
        "# CTF estimation (reconstruct ctffind)", "",
        f"CPU: {platform.machine()}, {os.cpu_count()} cores, NumPy; search as RELION's prep scheme (box 512, "
        "30-5 Å, 5,000-50,000 Å step 500, dast 100). Errors are |fit - truth| over defocus U and V; angle errors "
        "only where the astigmatism is >= 300 Å (count in brackets). Max resolution is rlnCtfMaxResolution "
        "(median, range); time is the fit per 1024 x 1024 micrograph (spectrum + search + fit resolution).", "",
        "| set | micrographs | median defocus error (Å) | 90th pct (Å) | median angle error (°) | "
        "max resolution (Å) | FOM | s / micrograph |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows, "",
        f"Specimen-free (noise) micrographs: {kept} of {n_noise} pass `select --maxval 6` "
        f"(median FOM {noise_fom:.3f}).",
        "",
        f"4096 x 4096 micrograph at 1.0 Å/px (binned to 1.4 Å as CTFFIND does): {t4k:.1f} s, "
        f"defocus errors {e_u:.0f} / {e_v:.0f} Å.", "",
        "No peer timing: RELION 3.1 does not ship CTFFIND (its CtfFind job calls an external ctffind binary).", "",
        "## torch-ctf 0.6.0 (teamtomo) against reconstruct.ctf.ctf_2d", "",
        *torch_ctf_comparison(), "",
        NOTE, "",
        "Reproduce: `python benchmarks/bench_ctffind.py`",
    ]
    res = Path("benchmarks/results/ctffind.md")
    res.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

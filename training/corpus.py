"""The ranker's training corpus: many small simulated Class2D jobs, laid out as EMPIAR-10812 is.

Each job draws a protein, a signal-to-noise ratio, a junk fraction (ice, carbon edges, aggregates,
noise), a fraction of particles with a neighbour at their edge, a defocus range, a box and a pixel
size; simulates particles; runs our VDAM 2D classification on them; and keeps what EMPIAR-10812 keeps
per job: ``run_classes.mrcs``, ``run_model.star``, ``run_data.star``, ``run_optimiser.star``,
``job_score.txt`` and ``backup_selection.star``, whose categories come from the truth
(:mod:`training.targets`). The particle images are deleted once classified. ``corpus.csv`` indexes the
jobs with their parameters, so a split can hold out a protein.

    python -m training.corpus --o corpus --n_jobs 100              # or: ranker make-corpus
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reconstruct.class2d import Class2DOptions, class2d
from reconstruct.files import read_map, read_particles, read_star, write_star
from reconstruct.files.atomic import atomic_path
from reconstruct.progress import progress
from reconstruct.simulate import ParticleSimulation, atomic_model_map, simulate_particles
from reconstruct.simulate.particles import particle_truth_table

from .chimeras import chimera_map, chimera_radius, chimera_seed, is_chimera
from .targets import categories, class_categories, class_views, ideal_class_averages, simulated_job_score

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "models"

@dataclass(frozen=True)
class Protein:
    """A particle of the corpus: an atomic model, or a point-group assembly of copies of it."""

    model: str  # file in the models directory
    radius: float  # Å, holding 99% of the density (measured)
    symmetry: str = "C1"  # assemblies: copies of the model placed by this group's operators
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # Å, the copy's centre before the operators


#: The corpus's proteins: the shared models, and assemblies of them that add shapes (more shapes is what
#: lets the ranker carry over to a protein it never saw).
PROTEINS: dict[str, Protein] = {
    "cftr": Protein("6msm.pdb", 65.0),
    "adk_open": Protein("4ake_adk_open.pdb", 35.0),
    "adk_closed": Protein("1ake_adk_closed.pdb", 35.0),
    "hiv_protease": Protein("1hvr.pdb", 30.0),
    "tcr_hla": Protein("3kpr.cif.gz", 90.0),
    "adk_d2": Protein("4ake_adk_open.pdb", 45.0, "D2", (18.0, 10.0, 6.0)),
    "adk_c3": Protein("1ake_adk_closed.pdb", 45.0, "C3", (22.0, 0.0, 8.0)),
    "hiv_c4": Protein("1hvr.pdb", 53.0, "C4", (30.0, 6.0, 0.0)),
}
#: Proteins drawn for training jobs by default (the assemblies are opt-in: --proteins).
DEFAULT_TRAINING = ("cftr", "adk_open", "adk_closed", "hiv_protease")
HELD_OUT = "tcr_hla"  # the protein the validation jobs come from, never seen in training


@dataclass
class CorpusJob:
    """Parameters of one simulated Class2D job."""

    name: str
    protein: str
    n_particles: int
    box: int
    pixel_size: float
    diameter: float  # Å, the mask diameter given to class2d
    snr: float
    junk_fraction: float
    neighbour_fraction: float
    defocus_min: float
    defocus_max: float
    n_classes: int
    n_iter: int
    seed: int
    job_score: float = 0.0


def draw_job(index: int, protein: str, rng: np.random.Generator) -> CorpusJob:
    """A random job for ``protein``: the particle fills ~55-70% of the box."""
    radius = protein_radius(protein)
    box = int(rng.choice([48, 64]))
    diameter = 2.3 * radius
    pixel_size = round(diameter / (box * rng.uniform(0.62, 0.8)), 2)
    lo = rng.uniform(5000, 15000)
    snr = float(np.exp(rng.uniform(np.log(0.015), np.log(0.3))))
    junk = float(rng.choice([0.0, rng.uniform(0.05, 0.45)], p=[0.2, 0.8]))
    name = f"{protein}_{index:04d}"
    return CorpusJob(name=name, protein=protein, n_particles=int(rng.integers(600, 1300)), box=box,
                     pixel_size=pixel_size, diameter=round(diameter, 1), snr=snr, junk_fraction=junk,
                     neighbour_fraction=float(rng.choice([0.0, rng.uniform(0.05, 0.3)])),
                     defocus_min=lo, defocus_max=lo + rng.uniform(5000, 20000),
                     n_classes=int(rng.integers(8, 17)), n_iter=int(rng.integers(20, 61)), seed=index,
                     job_score=simulated_job_score(snr, junk))


def protein_radius(name: str) -> float:
    """Radius (Å) of corpus protein ``name`` (a named one or ``chimera_<N>``) holding 99% of its density."""
    return chimera_radius(chimera_seed(name), models_dir()) if is_chimera(name) else PROTEINS[name].radius


def protein_map(name: str, box: int, pixel_size: float) -> np.ndarray:
    """The density of corpus protein ``name`` (a named one or ``chimera_<N>``) on a box^3 grid."""
    from reconstruct.align_maps import transform_map
    from reconstruct.symmetry import group_order, symmetrise_map

    if is_chimera(name):
        return chimera_map(chimera_seed(name), box, pixel_size, models_dir())
    p = PROTEINS[name]
    vol = atomic_model_map(models_dir() / p.model, box, pixel_size)
    if p.symmetry.upper() == "C1":
        return vol
    shifted = transform_map(vol, np.eye(3), np.asarray(p.offset) / pixel_size, order=3)
    return (symmetrise_map(shifted, p.symmetry) * group_order(p.symmetry)).astype(np.float32)


def models_dir() -> Path:
    """The atomic models: $AUTOPROC_MODELS, else ../shared/data/models next to the checkout."""
    import os

    return Path(os.environ.get("AUTOPROC_MODELS", MODELS_DIR)).resolve()


def make_job(job: CorpusJob, out: Path, work: Path) -> Path:
    """Simulate, classify and store one job in EMPIAR-10812's layout under ``out/job.name``."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    vol = protein_map(job.protein, job.box, job.pixel_size)
    truth = simulate_particles([vol], simulation_of(job), work)
    res = class2d(Class2DOptions(star=work / "Extract/job001/particles.star", out=work / "Class2D",
                                 particle_diameter=job.diameter, n_classes=job.n_classes, n_iter=job.n_iter,
                                 ini_subset=100, fin_subset=300, write_every=1000, seed=job.seed,
                                 project_dir=work))
    dest = out / job.name
    tmp = out / f".{job.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(res.classes, tmp / "run_classes.mrcs")
    model = read_star(res.model_star)
    model["model_classes"]["rlnReferenceImage"] = [f"{k + 1:06d}@run_classes.mrcs"
                                                   for k in range(len(model["model_classes"]))]
    model["model_classes"] = model["model_classes"].drop(columns=["rlnGradMoment1", "rlnGradMoment2"],
                                                         errors="ignore")
    write_star(tmp / "run_model.star", model)
    shutil.copy(res.data_star, tmp / "run_data.star")
    opt = read_star(res.model_star.with_name(res.model_star.name.replace("_model", "_optimiser")))
    general = opt["optimiser_general"]
    general["rlnModelStarFile"] = "run_model.star"
    general["rlnExperimentalDataStarFile"] = "run_data.star"
    write_star(tmp / "run_optimiser.star", opt)
    cats = categorise(job, truth.table, read_particles(res.data_star).data, read_map(res.classes)[0], vol)
    write_star(tmp / "backup_selection.star", {"": pd.DataFrame({"rlnSelected": cats.category.astype(int)})})
    cats.to_csv(tmp / "class_truth.csv", index=False)
    (tmp / "job_score.txt").write_text(f"{job.job_score:.4f}\n")
    (tmp / "job.json").write_text(json.dumps(asdict(job), indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    shutil.rmtree(work, ignore_errors=True)
    return dest


def simulation_of(job: CorpusJob) -> ParticleSimulation:
    """The simulation parameters of ``job`` (deterministic: the same job gives the same particles)."""
    return ParticleSimulation(n_particles=job.n_particles, box=job.box, pixel_size=job.pixel_size, snr=job.snr,
                              particle_diameter=job.diameter, junk_fraction=job.junk_fraction,
                              neighbour_fraction=job.neighbour_fraction,
                              defocus_range=(job.defocus_min, job.defocus_max), max_offset=2 * job.pixel_size,
                              seed=job.seed)


def categorise(job: CorpusJob, truth: pd.DataFrame, data: pd.DataFrame, averages: np.ndarray,
               vol: np.ndarray) -> pd.DataFrame:
    """Per class, the truth make-up and category of a classified job. What decides sharp or blurred is
    the noise-free class average's :func:`~training.targets.blur_resolution`; its 15 Å view match and
    that of the job's own (noisy) class average are kept as ``view_match`` and ``average_match``."""
    ideal = ideal_class_averages(truth, data, vol, job.pixel_size, job.n_classes)
    views = class_views(ideal, averages, vol, job.pixel_size, job.diameter)
    cats = class_categories(data.rlnClassNumber.to_numpy(), truth, job.n_classes, views.blur_resolution.to_numpy())
    cats["view_match"] = views.view_match.to_numpy()
    cats["average_match"] = views.average_match.to_numpy()
    return cats


def recategorise(job_dir: Path) -> pd.DataFrame:
    """Re-derive a stored job's categories with the current rule and rewrite class_truth.csv and
    backup_selection.star; used when the rule changes after jobs were made.

    Jobs made before the blur resolution was measured (no ``blur_resolution`` column) get it from their
    truth, drawn again without making the images (the simulation is deterministic; if the truth's make-up
    of the classes differs from the stored one, this stops); the rest are re-labelled from their table.
    """
    cats = pd.read_csv(job_dir / "class_truth.csv")
    if "blur_resolution" not in cats.columns:
        job = CorpusJob(**json.loads((job_dir / "job.json").read_text()))
        vol = protein_map(job.protein, job.box, job.pixel_size)
        truth = particle_truth_table(simulation_of(job), 1)
        fresh = categorise(job, truth, read_particles(job_dir / "run_data.star").data,
                           read_map(job_dir / "run_classes.mrcs")[0], vol)
        if not np.allclose(fresh[["n", "good", "junk"]].to_numpy(), cats[["n", "good", "junk"]].to_numpy()):
            raise RuntimeError(f"{job_dir}: the simulation no longer gives the particles this job classified "
                               "(its truth make-up differs); make the job again (delete its folder)")
        cats = fresh
    cats["category"] = categories(cats)
    with atomic_path(job_dir / "class_truth.csv") as tmp:
        cats.to_csv(tmp, index=False)
    write_star(job_dir / "backup_selection.star", {"": pd.DataFrame({"rlnSelected": cats.category.astype(int)})})
    return cats


def plan_corpus(n_jobs: int, n_held_out: int, seed: int,
                proteins: tuple[str, ...]) -> tuple[list[CorpusJob], list[CorpusJob]]:
    """Every job's parameters, drawn up front from ``seed``: the training jobs (proteins in turn) and the
    held-out protein's."""
    rng = np.random.default_rng(seed)
    plan = [draw_job(i, proteins[i % len(proteins)], rng) for i in range(n_jobs)]
    return plan, [draw_job(n_jobs + i, HELD_OUT, rng) for i in range(n_held_out)]


def write_index(out: Path, plan: list[CorpusJob], held: list[CorpusJob], seed: int,
                proteins: tuple[str, ...]) -> pd.DataFrame:
    """Write the corpus's plan, ``corpus.csv`` (every job's parameters, made or not) and ``corpus.json`` (the
    command's settings), atomically; written before any job is made, so an interrupted corpus is described."""
    index = pd.DataFrame([asdict(j) for j in plan + held])
    index["held_out"] = index.protein == HELD_OUT
    with atomic_path(out / "corpus.csv") as tmp:
        index.to_csv(tmp, index=False)
    with atomic_path(out / "corpus.json") as tmp:
        tmp.write_text(json.dumps({"n_jobs": len(plan), "n_held_out": len(held), "seed": seed,
                                   "proteins": list(proteins)}))
    return index


def build_corpus(out: Path, n_jobs: int, n_held_out: int, seed: int = 0,
                 proteins: tuple[str, ...] = DEFAULT_TRAINING, workers: int = 1) -> pd.DataFrame:
    """Make ``n_jobs`` training jobs over ``proteins`` and ``n_held_out`` of the held-out one.

    Jobs already in ``out`` are kept (the corpus resumes after an interruption). ``workers`` > 1 makes
    that many jobs at once, each in its own single-threaded process; the jobs' parameters are the same
    either way, since all are drawn before any is made.
    """
    unknown = sorted(p for p in set(proteins) if p not in PROTEINS and not is_chimera(p))
    if unknown or HELD_OUT in proteins:
        allowed = sorted(set(PROTEINS) - {HELD_OUT})
        raise ValueError(f"training proteins must be among {allowed} or chimera_<N>: got {unknown or HELD_OUT}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1: got {workers}")
    out.mkdir(parents=True, exist_ok=True)
    plan, held = plan_corpus(n_jobs, n_held_out, seed, proteins)
    index = write_index(out, plan, held, seed, proteins)
    order = sorted(plan + held, key=lambda j: (j.seed if j.protein != HELD_OUT else
                                                (j.seed - n_jobs + 0.5) * n_jobs / max(n_held_out, 1)))
    made = [out / j.name for j in order if (out / j.name / "job.json").exists()]
    todo = [j for j in order if not (out / j.name / "job.json").exists()]
    log.info("corpus %s: %d jobs to categorise again, %d of %d to make, %d worker(s)", out, len(made), len(todo),
             len(order), workers)
    if workers == 1:
        for job_dir in progress(made, len(made), desc="categories", unit="job"):
            recategorise(job_dir)
        for job in progress(todo, len(todo), desc="corpus jobs", unit="job"):
            make_job(job, out, out / ".work")
    else:
        _in_parallel(recategorise, [(d,) for d in made], workers, "categories")
        _in_parallel(make_job, [(j, out, out / ".work" / j.name) for j in todo], workers, "corpus jobs")
    shutil.rmtree(out / ".work", ignore_errors=True)
    return index


def _single_threaded() -> None:
    """Process-pool initialiser: one FFT and one BLAS/OpenMP thread per worker, so N workers use N cores."""
    from threadpoolctl import threadpool_limits

    from reconstruct.backend import set_fft_threads

    threadpool_limits(1)
    set_fft_threads(1)


def _in_parallel(fn: Callable[..., Any], calls: list[tuple[Any, ...]], workers: int, desc: str) -> None:
    """``fn(*args)`` for each of ``calls`` in ``workers`` single-threaded processes (jobs each in their own
    work folder); a failure (or Ctrl-C) stops the run at once (finished jobs are kept: the next run resumes)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if not calls:
        return
    pool = ProcessPoolExecutor(workers, initializer=_single_threaded)
    try:
        futures = [pool.submit(fn, *args) for args in calls]
        for fut in progress(as_completed(futures), len(futures), desc=desc, unit="job"):
            fut.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # queued jobs dropped; the error is raised at once
        raise
    pool.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Command line of the corpus builder."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--o", required=True, help="corpus directory")
    ap.add_argument("--n_jobs", type=int, default=100, help="training jobs (default 100)")
    ap.add_argument("--n_held_out", type=int, default=12, help=f"jobs of the held-out protein {HELD_OUT} (default 12)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the job parameters (default 0)")
    ap.add_argument("--proteins", nargs="+", default=list(DEFAULT_TRAINING),
                    help=f"training proteins (default {' '.join(DEFAULT_TRAINING)}; also: adk_d2 adk_c3 hiv_c4, "
                         "chimera_<N>)")
    ap.add_argument("--chimeras", type=int, default=0,
                    help="add chimera_0 ... chimera_<N-1> to the training proteins (default 0)")
    ap.add_argument("--workers", type=int, default=1, help="jobs made at once, one core each (default 1)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    build_corpus(Path(a.o), a.n_jobs, a.n_held_out, a.seed, with_chimeras(a.proteins, a.chimeras),
                 a.workers)


def with_chimeras(proteins: list[str], n: int) -> tuple[str, ...]:
    """``proteins`` and ``n`` chimeras (``--chimeras``): new shapes from the training models' domains."""
    return (*proteins, *(f"chimera_{i}" for i in range(n)))


if __name__ == "__main__":
    main()

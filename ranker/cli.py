"""``ranker``: score and select 2D classes, train the ranker, build its training corpus."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from reconstruct.cli import run_command
from reconstruct.files.errors import InputError

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter
NO_CONTEXT_HELP = ("score each class on its own (the network alone), without the job-context stage that otherwise "
                   "re-scores the classes in the light of the whole job (class sizes, the spread of its scores, its "
                   "accuracies and resolutions)")
log = logging.getLogger("ranker")


def _cmd_prepare(a: argparse.Namespace) -> None:
    from reconstruct.files.mrc import read_map, write_stack

    from .preprocess import NET_SIZE, network_images

    stack, px = read_map(a.i)
    px = a.angpix if a.angpix > 0 else px
    if px <= 0:
        raise InputError(a.i, "the header has no pixel size", "pass --angpix")
    imgs = network_images(stack, a.particle_diameter, px)
    write_stack(a.o, imgs, px * stack.shape[-1] / NET_SIZE)
    print(f"wrote {len(imgs)} images of {NET_SIZE}x{NET_SIZE} to {a.o}")


def _cmd_score(a: argparse.Namespace) -> None:
    import numpy as np

    from .job import read_class_job
    from .model_store import load_model
    from .score import rank_job, select_classes, write_rank_outputs

    job_path = a.opt or a.job
    if not job_path:
        raise InputError(None, "no Class2D job given", "pass the job directory or --opt run_itNNN_optimiser.star")
    model = load_model(a.model, a.model_sha256, context=not a.no_context)
    log.info("ranker model %s (sha256 %s...) from %s, %s", model.version, model.sha256[:12], model.path,
             "with its job-context stage" if model.context is not None else "network scores only")
    job = read_class_job(job_path, a.project_dir)
    log.info("job %s: %d classes, box %d, %.3f Å/px, mask diameter %.0f Å, %d particles", job.optimiser_star,
             job.n_classes, job.box, job.pixel_size, job.diameter, len(job.data.data))
    scores, inputs = rank_job(job, model, "cuda" if a.gpu else "cpu")
    threshold = a.min_score if a.min_score is not None else model.threshold
    sel = select_classes(scores, job.class_sizes(), threshold, a.max_score, a.select_min_nr_particles,
                         a.select_min_nr_classes)
    out = Path(a.o)
    paths = write_rank_outputs(job, scores, sel, out, a.fn_root, a.fn_sel_parts, a.fn_sel_classavgs)
    np.save(out / "features.npy", inputs.features)
    np.save(out / "images.npy", inputs.images)
    n_sel = int(np.isin(job.data.data.rlnClassNumber.to_numpy(int) - 1, np.nonzero(sel.selected)[0]).sum())
    print(f"scored {len(inputs.class_index)} of {job.n_classes} classes (classes of <= 10 particles get -999); "
          f"selected {int(sel.selected.sum())} classes with score >= {threshold:.3f}"
          + (f" (+{sel.added_for_minimum} to reach the minimum)" if sel.added_for_minimum else "")
          + f", {n_sel} of {len(job.data.data)} particles -> {paths['particles']}")
    for k in np.argsort(-scores)[: min(10, len(scores))]:
        if scores[k] > -999:
            print(f"  class {k + 1:3d}: score {scores[k]:.3f}  {'selected' if sel.selected[k] else ''}")


def _cmd_train(a: argparse.Namespace) -> None:
    from training.train import TrainOptions, train

    m = train(TrainOptions(data=[Path(d) for d in a.data], out=Path(a.o), epochs=a.epochs, lr=a.lr,
                           weight_decay=a.weight_decay, batch_size=a.batch_size, seed=a.seed,
                           val_fraction=a.val_fraction, held_out=a.held_out, val_by=a.val_by, patience=a.patience,
                           accelerator="gpu" if a.gpu else "cpu", resume=a.resume, use_features=not a.no_features,
                           cache=Path(a.cache) if a.cache else None, job_context=not a.no_context))
    print(json.dumps({k: m[k] for k in ("validation", "test", "default_threshold", "sha256")}, indent=1))
    print(f"weights: {Path(a.o) / 'class_ranker.pt'}; metrics: {Path(a.o) / 'metrics.json'}")


def _cmd_evaluate(a: argparse.Namespace) -> None:
    from training.data import load_samples
    from training.train import evaluate, sample_scores

    from .model_store import load_model

    model = load_model(a.model, context=not a.no_context)
    samples = load_samples([Path(d) for d in a.data], Path(a.cache) if a.cache else None)
    if a.group:
        samples = samples.subset(samples.group == a.group)
    threshold = a.min_score if a.min_score is not None else model.threshold
    result = evaluate(sample_scores(model, samples), samples, threshold)
    print(json.dumps({"job_context": model.context is not None} | result, indent=1))


def _cmd_fit_context(a: argparse.Namespace) -> None:
    import numpy as np

    from training.data import load_samples
    from training.train import fit_and_save_context

    from .context import context_path
    from .model_store import load_model

    if a.model is None and a.o is None:
        raise InputError(None, "the shipped model's stage is checked against its card and cannot be replaced",
                         "copy the weights elsewhere and pass --model COPY, or pass --o FILE")
    model = load_model(a.model, context=False)
    samples = load_samples([Path(d) for d in a.data], Path(a.cache) if a.cache else None)
    test = samples.group == a.held_out if a.held_out else np.zeros(len(samples), bool)
    out = Path(a.o) if a.o else context_path(model.path)
    report = fit_and_save_context(model, samples.subset(~test), samples.subset(test), out, a.seed)
    print(json.dumps({k: v for k, v in report.items() if k != "trees"}, indent=1))
    print(f"job-context stage: {out} (threshold {report['default_threshold']:.3f}; report {out.with_suffix('.json')})"
          + ("" if out == context_path(model.path) else
             f"; `ranker score` uses it when it lies at {context_path(model.path)}"))


def _cmd_corpus(a: argparse.Namespace) -> None:
    from training.corpus import build_corpus, with_chimeras

    index = build_corpus(Path(a.o), a.n_jobs, a.n_held_out, a.seed, with_chimeras(a.proteins, a.chimeras),
                         a.workers)
    print(f"{len(index)} jobs in {a.o} ({int(index.held_out.sum())} held out)")


def _cmd_serve(a: argparse.Namespace) -> None:
    import os

    import uvicorn

    from .service import LOOPBACK, ServiceConfig, create_app, read_token

    token = read_token(a.token_file) if a.token_file else None
    if a.host not in LOOPBACK and token is None:
        raise InputError(None, f"refusing to listen on {a.host} without a token",
                         "pass --token-file with a long random token (clients send 'Authorization: Bearer TOKEN'), "
                         "or bind to 127.0.0.1")
    device = "cuda" if a.gpu else "cpu"
    if a.workers > 1:
        os.environ.update({"RANKER_MODEL": a.model or "", "RANKER_MAX_UPLOAD_MB": str(a.max_upload_mb),
                           "RANKER_MAX_CLASSES": str(a.max_classes), "RANKER_DEVICE": device,
                           "RANKER_TOKEN_FILE": str(a.token_file or "")})
        uvicorn.run("ranker.service:app_from_env", factory=True, host=a.host, port=a.port, workers=a.workers)
        return
    app = create_app(ServiceConfig(model_path=a.model, max_upload_mb=a.max_upload_mb, max_classes=a.max_classes,
                                   token=token, device=device))
    log.info("serving the class ranker %s on http://%s:%d (docs at /docs)", app.state.model.version, a.host, a.port)
    uvicorn.run(app, host=a.host, port=a.port)


def _cmd_score_remote(a: argparse.Namespace) -> None:
    from .client import score_remote
    from .service import read_token

    result = score_remote(a.url, Path(a.stack), Path(a.model_star) if a.model_star else None,
                          Path(a.data_star) if a.data_star else None, a.particle_diameter, a.pixel_size,
                          read_token(a.token_file) if a.token_file else None, a.timeout)
    if a.json:
        print(json.dumps(result, indent=1))
        return
    print(f"# model {result['model']['version']}; {result['note']}")
    print("class\tscore")
    for c in result["classes"]:
        print(f"{c['class']}\t{c['score']:.4f}")


def _labelled_jobs_and_model(s: argparse.ArgumentParser) -> None:
    """The options of commands that score labelled jobs: where they are, which weights, the inputs' cache."""
    s.add_argument("--data", nargs="+", required=True, help="directories of job directories")
    s.add_argument("--model", default=None, help="weights (default: the shipped model)")
    s.add_argument("--cache", default=None, help="directory of prepared inputs (.npz)")


def build_parser() -> argparse.ArgumentParser:
    """The ``ranker`` argument parser."""
    p = argparse.ArgumentParser(prog="ranker", formatter_class=HELP_FORMAT,
                                description="Score 2D class averages as RELION's class ranker does.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("prepare-images", formatter_class=HELP_FORMAT,
                       help="cut and resample class averages to the network's 64x64 input",
                       description="Cut a centred window of ceil(D/p)+1 pixels (even) around each class "
                                   "average and Fourier-resample it to 64x64, without intensity normalisation.")
    s.add_argument("--i", required=True, help="class averages (.mrcs stack, e.g. run_it025_classes.mrcs)")
    s.add_argument("--o", required=True, help="output stack of 64x64 images")
    s.add_argument("--particle_diameter", type=float, required=True, help="mask diameter D in Å")
    s.add_argument("--angpix", type=float, default=-1.0, help="pixel size in Å (-1: from the header)")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser(
        "score", formatter_class=HELP_FORMAT, help="score a Class2D job's classes and select the good ones",
        description="Score each class average of a 2D classification job from 0 (useless) to 1 (best classes of "
                    "the best data sets) with the class ranker (CNN on the 64x64 image + 24 features from the image "
                    "and the job's metadata), select the classes scoring at least --min_score, and write RELION's "
                    "outputs into --o: rank_model.star (rlnClassScore per class, -999 for classes of 10 particles "
                    "or fewer), rank_data.star, rank_optimiser.star, backup_selection.star (rlnSelected), the "
                    "selected particles (particles.star), class_averages.star, features.npy and images.npy (the "
                    "network's inputs) and rank_gallery.png (classes sorted by score, selected ones framed green).")
    s.add_argument("job", nargs="?",
                   help="Class2D job directory (its last iteration is used) or run_itNNN_optimiser.star")
    s.add_argument("--opt", help="the optimiser STAR file, as RELION's --opt (instead of JOB)")
    s.add_argument("--o", required=True, help="output directory, e.g. Select/job010")
    s.add_argument("--min_score", type=float, default=None,
                   help="select classes scoring at least this (default: the threshold calibrated for the model, "
                        "written in its card; RELION's GUI uses 0.5, its proc scheme 0.45)")
    s.add_argument("--max_score", type=float, default=999.0, help="select classes scoring at most this")
    s.add_argument("--select_min_nr_particles", type=int, default=-1,
                   help="add the best unselected classes until this many particles are selected (-1: off)")
    s.add_argument("--select_min_nr_classes", type=int, default=-1,
                   help="add the best unselected classes until this many classes are selected (-1: off)")
    s.add_argument("--fn_root", default="rank", help="root of the output names (rank_model.star, ...)")
    s.add_argument("--fn_sel_parts", default="particles.star", help="file name of the selected particles")
    s.add_argument("--fn_sel_classavgs", default="class_averages.star", help="file name of the selected classes")
    s.add_argument("--model", default=None,
                   help="ranker weights: ours or a RELION-5 v1.0 checkpoint (.ckpt or .ckpt.gz), loaded as weights "
                        "only (default: the model shipped in the package, checked against its card's checksum)")
    s.add_argument("--model_sha256", default=None, help="refuse --model unless its SHA-256 is this")
    s.add_argument("--project_dir", default=None,
                   help="RELION project directory the job's paths are relative to (default: the current directory; "
                        "files are also looked for next to the optimiser file)")
    s.add_argument("--no_context", action="store_true", help=NO_CONTEXT_HELP)
    s.add_argument("--gpu", action="store_true", help="run the network on the GPU")
    s.set_defaults(func=_cmd_score)

    s = sub.add_parser(
        "train", formatter_class=HELP_FORMAT, help="train the ranker on Class2D jobs (EMPIAR-10812 or our corpus)",
        description="Train the ranker network with PyTorch Lightning on job directories laid out as EMPIAR-10812 "
                    "(run_model.star, run_data.star, run_optimiser.star, run_classes.mrcs, job_score.txt, "
                    "backup_selection.star per job). Targets as RELION's script: job score x class category x "
                    "relative resolution. Validation jobs are split off by job (or by protein: --val_by); "
                    "--held_out names a group (protein) kept for testing. Writes class_ranker.pt, metrics.json, "
                    "checkpoints/ (resume with --resume) "
                    "and CSV logs into --o; then fits the job-context stage (class_ranker.context.npz: trees that "
                    "re-score a job's classes from their network scores and the job's make-up) on the training and "
                    "validation jobs; the threshold balancing particle false positives and false negatives on "
                    "their out-of-fold scores becomes the model's default --min_score.")
    s.add_argument("--data", nargs="+", required=True, help="directories of job directories (or single jobs)")
    s.add_argument("--o", required=True, help="output directory")
    s.add_argument("--epochs", type=int, default=200, help="maximum epochs (RELION: 200)")
    s.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate (RELION: 5e-5)")
    s.add_argument("--weight_decay", type=float, default=5e-4, help="L2 weight decay (RELION: 5e-4)")
    s.add_argument("--batch_size", type=int, default=32, help="batch size (RELION: 32)")
    s.add_argument("--seed", type=int, default=12, help="random seed of the split, the weights and the batches")
    s.add_argument("--val_fraction", type=float, default=0.2, help="fraction of the (not held-out) jobs for validation")
    s.add_argument("--held_out", default=None, help="group (protein in job.json) whose jobs form the test set")
    s.add_argument("--val_by", choices=("job", "protein"), default="job",
                   help="split validation off by job (default), or by protein: all jobs of a fraction of the "
                        "proteins, so early stopping and the threshold are chosen on shapes the network never saw "
                        "(EMPIAR-10812's jobs have no protein: each is its own group)")
    s.add_argument("--patience", type=int, default=20, help="stop after this many epochs without a better val_mse")
    s.add_argument("--no_features", action="store_true", help="train on the images alone (features zeroed)")
    s.add_argument("--cache", default=None, help="directory to keep each job's prepared inputs (.npz) in")
    s.add_argument("--resume", action="store_true", help="continue from --o/checkpoints/last.ckpt")
    s.add_argument("--no_context", action="store_true", help="do not fit the job-context stage")
    s.add_argument("--gpu", action="store_true", help="train on the GPU")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("evaluate", formatter_class=HELP_FORMAT, help="metrics of a model on labelled jobs",
                       description="MSE, Spearman correlation, AUC (truth-good classes vs the rest) and particle "
                                   "false-positive/negative rates at the threshold, on job directories as for train; "
                                   "'targets_as_scores' gives the rates of the targets themselves at their best "
                                   "threshold, which no score that follows the targets can beat with one threshold.")
    _labelled_jobs_and_model(s)
    s.add_argument("--group", default=None, help="only jobs of this group (protein)")
    s.add_argument("--min_score", type=float, default=None, help="threshold (default: the model's calibrated one)")
    s.add_argument("--no_context", action="store_true", help=NO_CONTEXT_HELP)
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser(
        "fit-context", formatter_class=HELP_FORMAT, help="fit the job-context stage of existing weights",
        description="Fit the job-context stage (gradient-boosted trees, scikit-learn) on the network's scores of "
                    "labelled jobs (as for train; the --held_out group is kept out and reported as a test), "
                    "calibrate its threshold on out-of-fold scores and write it beside the weights as "
                    "NAME.context.npz (plain arrays), where `ranker score` finds it. Works for RELION-5 weights too.")
    _labelled_jobs_and_model(s)
    s.add_argument("--held_out", default=None, help="group (protein) kept out of the fit and reported as a test")
    s.add_argument("--o", default=None,
                   help="output file (default: beside --model's weights, NAME.context.npz; required without --model)")
    s.add_argument("--seed", type=int, default=12, help="seed of the trees' subsampling")
    s.set_defaults(func=_cmd_fit_context)

    s = sub.add_parser("make-corpus", formatter_class=HELP_FORMAT, help="simulate Class2D jobs for training",
                       description="Simulate particles of each protein in ../shared/data/models (or $AUTOPROC_MODELS) "
                                   "with random SNR, junk, neighbours, defocus, box and pixel size, classify them with "
                                   "VDAM and store each job in EMPIAR-10812's layout with truth-derived categories. "
                                   "Resumes: jobs already there are kept.")
    s.add_argument("--o", required=True, help="corpus directory")
    s.add_argument("--n_jobs", type=int, default=100, help="training jobs, spread over the training proteins")
    s.add_argument("--n_held_out", type=int, default=12, help="jobs of the held-out protein (TCR-HLA, 3KPR)")
    s.add_argument("--seed", type=int, default=0, help="seed of the job parameters")
    s.add_argument("--proteins", nargs="+", default=["cftr", "adk_open", "adk_closed", "hiv_protease"],
                   help="training proteins; point-group assemblies that add shapes: adk_d2 adk_c3 hiv_c4; "
                        "chimera_<N>: 2-4 domains cut from the training models and packed into a new shape")
    s.add_argument("--chimeras", type=int, default=0,
                   help="add chimera_0 ... chimera_<N-1> to --proteins: new shapes, so the ranker learns classes "
                        "of proteins it has not seen rather than the shapes of the few it has")
    s.add_argument("--workers", type=int, default=1,
                   help="jobs made at once, each in its own single-threaded process (one core each); the jobs' "
                        "parameters are the same whatever the number")
    s.set_defaults(func=_cmd_corpus)

    s = sub.add_parser(
        "serve", formatter_class=HELP_FORMAT, help="HTTP scoring service (FastAPI + uvicorn)",
        description="Serve the ranker over HTTP: POST /v1/score (multipart: stack = an MRC stack of class averages; "
                    "optionally model_star and data_star, the Class2D job's _model.star and _data.star, for the "
                    "metadata features; form fields particle_diameter and pixel_size in Å), GET /v1/health, "
                    "GET /v1/model; OpenAPI docs at /docs. Listening on anything but loopback needs --token-file; "
                    "clients then send 'Authorization: Bearer TOKEN'.")
    s.add_argument("--host", default="127.0.0.1", help="address to bind")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--model", default=None, help="weights (default: the shipped model)")
    s.add_argument("--workers", type=int, default=1, help="server processes (each loads the model)")
    s.add_argument("--token-file", dest="token_file", default=None,
                   help="file whose first line is the bearer token required on every request but /v1/health")
    s.add_argument("--max-upload-mb", dest="max_upload_mb", type=float, default=256.0,
                   help="largest accepted request (MB); larger ones get 413")
    s.add_argument("--max-classes", dest="max_classes", type=int, default=2000,
                   help="most class averages in one request; more get 413")
    s.add_argument("--gpu", action="store_true", help="score on the GPU (concurrent requests share batches)")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("score-remote", formatter_class=HELP_FORMAT, help="score class averages on a ranker server",
                       description="Client of `ranker serve`: upload a class-average stack (and optionally the job's "
                                   "model and data STAR files) and print one score per class.")
    s.add_argument("url", help="server address, e.g. http://127.0.0.1:8000")
    s.add_argument("stack", help="class averages (.mrcs)")
    s.add_argument("--model-star", dest="model_star", default=None, help="the Class2D job's _model.star")
    s.add_argument("--data-star", dest="data_star", default=None, help="the Class2D job's _data.star")
    s.add_argument("--particle_diameter", type=float, default=None, help="mask diameter (Å)")
    s.add_argument("--pixel_size", type=float, default=None, help="pixel size (Å) if the stack's header has none")
    s.add_argument("--token-file", dest="token_file", default=None, help="file holding the server's bearer token")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    s.add_argument("--json", action="store_true", help="print the server's whole JSON answer")
    s.set_defaults(func=_cmd_score_remote)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ranker`` console script."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

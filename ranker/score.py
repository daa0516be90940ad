"""Score a Class2D job's classes, select the good ones and write RELION's Select-job outputs.

Outputs (as ``relion_class_ranker --auto_select`` writes them, in ``--o``): ``rank_optimiser.star``,
``rank_model.star`` (every class with ``rlnClassScore``; -999 for classes of 10 particles or fewer),
``rank_data.star``, ``backup_selection.star`` (``rlnSelected`` 0/1 per class), ``particles.star`` (the
selected particles in their original order, with the optics table), ``class_averages.star`` (one row
per selected class) and ``rank_gallery.png`` (classes sorted by score, selected ones framed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from reconstruct.files import write_star

from .features import GRANULO
from .inputs import JobInputs, job_inputs
from .job import ClassJob
from .model_store import RankerModel

log = logging.getLogger(__name__)
UNSCORED = -999.0


def predict(net: torch.nn.Module, images: np.ndarray, features: np.ndarray, batch: int = 256,
            device: str = "cpu") -> np.ndarray:
    """Scores (k,) of prepared inputs, in eval mode, batched; granulometry slots are used as given."""
    if len(images) == 0:
        return np.zeros(0, np.float32)
    if not (np.isfinite(images).all() and np.isfinite(features).all()):
        raise ValueError("class images or features contain NaN or infinite values")
    net = net.to(device).eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = torch.as_tensor(images[s:s + batch], dtype=torch.float32, device=device)[:, None]
            y = torch.as_tensor(features[s:s + batch], dtype=torch.float32, device=device)
            out.append(net(x, y)[:, 0].float().cpu().numpy())
    return np.concatenate(out)


def score_inputs(model: RankerModel, inputs: JobInputs, n_classes: int, device: str = "cpu") -> np.ndarray:
    """Scores of all K classes of one job: for retained classes the network's, re-scored by the model's
    job-context stage when it has one (:mod:`ranker.context`); -999 for the rest."""
    scores = np.full(n_classes, UNSCORED, np.float32)
    features = network_features(model, inputs.features)
    net_scores = predict(model.net, inputs.images, features, device=device)
    scores[inputs.class_index] = in_context(model, net_scores, inputs.sizes, features)
    return scores


def network_features(model: RankerModel, features: np.ndarray) -> np.ndarray:
    """The features as ``model`` was trained to see them (granulometry zeroed for ours)."""
    return zero_granulometry(features) if model.zero_granulometry else features


def in_context(model: RankerModel, net_scores: np.ndarray, sizes: np.ndarray, features: np.ndarray) -> np.ndarray:
    """One job's final scores from its network scores: the job-context stage's, or the network's without one."""
    return net_scores if model.context is None else model.context.rescore(net_scores, sizes, features)


@dataclass
class Selection:
    """Which classes (0-based) are selected, and why."""

    selected: np.ndarray  # bool (K,)
    added_for_minimum: int  # classes added below the threshold to reach a minimum


def select_classes(scores: np.ndarray, sizes: np.ndarray, min_score: float, max_score: float = 999.0,
                   min_particles: int = -1, min_classes: int = -1) -> Selection:
    """Classes with min <= score <= max; if that gives too few particles or classes, the best unselected
    classes are added in order of score until the minimum is met (RELION's rule)."""
    scores = np.asarray(scores, float)
    scored = scores > UNSCORED
    sel = scored & (scores >= min_score) & (scores <= max_score)
    added = 0
    for k in np.argsort(-scores, kind="stable"):
        short_p = min_particles > 0 and sizes[sel].sum() < min_particles
        short_c = min_classes > 0 and sel.sum() < min_classes
        if not (short_p or short_c):
            break
        if scored[k] and not sel[k]:
            sel[k] = True
            added += 1
    return Selection(sel, added)


def write_rank_outputs(job: ClassJob, scores: np.ndarray, selection: Selection, out: Path,
                       fn_root: str = "rank", fn_parts: str = "particles.star",
                       fn_classavgs: str = "class_averages.star") -> dict[str, Path]:
    """Write RELION's ranker outputs for ``job`` into ``out``; returns the paths by role."""
    out.mkdir(parents=True, exist_ok=True)
    classes = job.classes.copy()
    classes["rlnClassScore"] = scores.astype(float)
    cols = ["rlnReferenceImage", "rlnClassScore", "rlnClassDistribution", "rlnAccuracyRotations",
            "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution", "rlnOverallFourierCompleteness",
            "rlnClassPriorOffsetX", "rlnClassPriorOffsetY"]
    model_path = out / f"{fn_root}_model.star"
    write_star(model_path, {"model_classes": classes[[c for c in cols if c in classes.columns]]})
    data = job.data.data
    class_no = data.rlnClassNumber.to_numpy(int) - 1  # validated to lie in 1..K when the job was read
    keep_rows = selection.selected[class_no]
    order = np.argsort(-scores[class_no], kind="stable")
    sorted_index = np.empty(len(data), int)
    sorted_index[order] = np.arange(len(data))
    data_path = out / f"{fn_root}_data.star"
    write_star(data_path, {"optics": job.data.optics, "particles": data.assign(rlnSortedIndex=sorted_index)})
    opt_path = out / f"{fn_root}_optimiser.star"
    write_star(opt_path, {"optimiser_general": {"rlnModelStarFile": str(model_path),
                                                "rlnExperimentalDataStarFile": str(data_path)}})
    backup = out / "backup_selection.star"
    write_star(backup, {"": pd.DataFrame({"rlnSelected": selection.selected.astype(int)})})
    parts_path = out / fn_parts
    write_star(parts_path, {"optics": job.data.optics, "particles": data[keep_rows].reset_index(drop=True)})
    avg_cols = ["rlnReferenceImage", "rlnClassDistribution", "rlnAccuracyRotations", "rlnAccuracyTranslationsAngst",
                "rlnEstimatedResolution"]
    avgs = classes.loc[selection.selected, [c for c in avg_cols if c in classes.columns]].copy()
    avgs.insert(1, "rlnPredictedClassScore", scores[selection.selected].astype(float))
    avgs = avgs.iloc[np.argsort(-scores[selection.selected], kind="stable")]
    avg_path = out / fn_classavgs
    write_star(avg_path, {"": avgs.reset_index(drop=True)})
    from reconstruct.plots import plot_class_gallery

    title = (f"{len(scores)} classes by ranker score ({int(selection.selected.sum())} selected, "
             f"{int(keep_rows.sum())} particles)")
    gallery = plot_class_gallery(job.images, classes.rlnClassDistribution.to_numpy(float),
                                 out / f"{fn_root}_gallery.png", title=title, scores=scores,
                                 selected=selection.selected)
    return {"model": model_path, "data": data_path, "optimiser": opt_path, "backup_selection": backup,
            "particles": parts_path, "class_averages": avg_path, "gallery": gallery}


def zero_granulometry(features: np.ndarray) -> np.ndarray:
    """Features with the granulometry slots zeroed (as in training, for models trained that way)."""
    f = np.array(features, copy=True)
    f[:, GRANULO] = 0.0
    return f


def rank_job(job: ClassJob, model: RankerModel, device: str = "cpu") -> tuple[np.ndarray, JobInputs]:
    """Scores of all classes of ``job`` and the inputs they came from."""
    inputs = job_inputs(job)
    return score_inputs(model, inputs, job.n_classes, device), inputs

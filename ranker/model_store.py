"""Which ranker weights to use: the shipped model (checked against its card's checksum) or a user's file."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from models import CLASS_RANKER, CLASS_RANKER_CARD
from reconstruct.files import InputError

from .context import JobContext, context_path
from .network import ClassRankerNet, load_network, sha256

log = logging.getLogger(__name__)


@dataclass
class RankerModel:
    """A loaded network with what a user needs to know about it."""

    net: ClassRankerNet
    path: Path
    sha256: str
    version: str
    card: dict[str, Any] = field(default_factory=dict)
    zero_granulometry: bool = False  # trained with slots 15-20 zeroed, and scored so (ours); RELION's: False
    threshold: float = 0.5  # the calibrated selection threshold (card or checkpoint; 0.5 = RELION's GUI)
    context: JobContext | None = None  # the job-context stage fitted on this network's scores, if any
    network_threshold: float | None = None  # the threshold for the network's own scores (no context)

    def describe(self) -> dict[str, Any]:
        """Version, checksum, file and training metrics (for logs and the HTTP service)."""
        return {"version": self.version, "sha256": self.sha256, "path": str(self.path),
                "metrics": self.card.get("metrics", {}), "default_threshold": self.threshold,
                "job_context": self.context is not None, "network_threshold": self.threshold_for(False)}

    def threshold_for(self, with_context: bool) -> float:
        """The calibrated threshold for scores with or without the job-context stage."""
        if with_context or self.context is None:
            return self.threshold
        return self.network_threshold if self.network_threshold is not None else self.threshold

    def without_context(self) -> RankerModel:
        """The same network scoring each class on its own (``--no_context``)."""
        return replace(self, threshold=self.threshold_for(False), context=None, network_threshold=None)


def model_card() -> dict[str, Any]:
    """The shipped model's card (version, checksum, training data, metrics, calibrated threshold)."""
    if not CLASS_RANKER_CARD.exists():
        raise InputError(CLASS_RANKER_CARD, "the shipped model card is missing", "reinstall the package")
    return json.loads(CLASS_RANKER_CARD.read_text())


def load_model(path: str | Path | None = None, expected_sha256: str | None = None, context: bool = True
               ) -> RankerModel:
    """The shipped model (default) or ``path``; refuses a file whose checksum or architecture is wrong.

    With ``context``, the job-context stage beside the weights (``NAME.context.npz``) is loaded too when it
    exists and was fitted on these weights (the shipped one is checked against its card's checksum).
    """
    if path is None:
        card = model_card()
        path, expected_sha256 = CLASS_RANKER, expected_sha256 or card["sha256"]
    else:
        card = {}
    path = Path(path)
    digest = sha256(path) if path.is_file() else ""
    if expected_sha256 and digest != expected_sha256:
        raise InputError(path, f"checksum {digest[:16]}... does not match the expected {expected_sha256[:16]}...",
                         "the file is damaged or not the model it claims to be: reinstall or download it again")
    net, ckpt = load_network(path)
    version = str(card.get("version") or ckpt.get("version") or ("relion-v1.0" if "model_definition" in ckpt
                                                                   else "unknown"))
    threshold = float(card.get("default_threshold", ckpt.get("default_threshold", 0.5)))
    model = RankerModel(net, path, digest, version, card, bool(ckpt.get("zero_granulometry", False)), threshold)
    stage = _load_context(path, digest, card) if context else None
    if stage is None:
        return model
    model.context = stage
    model.threshold = float(card.get("context", {}).get("default_threshold", stage.default_threshold or threshold))
    model.network_threshold = threshold
    return model


def _load_context(weights: Path, digest: str, card: dict[str, Any]) -> JobContext | None:
    """The job-context stage of ``weights``, or None (with a log line saying why) when there is none to use."""
    where = context_path(weights)
    if not where.is_file():
        if card.get("context"):
            raise InputError(where, "the shipped job-context stage is missing", "reinstall the package")
        return None
    expected = card.get("context", {}).get("sha256")
    if expected and sha256(where) != expected:
        raise InputError(where, "checksum does not match the model card", "reinstall the package")
    stage = JobContext.load(where)
    if stage.network_sha256 != digest:
        log.warning("%s was fitted on other weights (sha256 %s...): scoring with the network alone", where,
                    stage.network_sha256[:12])
        return None
    return stage


"""Which ranker weights to use: the shipped model (checked against its card's checksum) or a user's file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import CLASS_RANKER, CLASS_RANKER_CARD
from reconstruct.files import InputError

from .network import ClassRankerNet, load_network, sha256


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

    def describe(self) -> dict[str, Any]:
        """Version, checksum, file and training metrics (for logs and the HTTP service)."""
        return {"version": self.version, "sha256": self.sha256, "path": str(self.path),
                "metrics": self.card.get("metrics", {}), "default_threshold": self.threshold}


def model_card() -> dict[str, Any]:
    """The shipped model's card (version, checksum, training data, metrics, calibrated threshold)."""
    if not CLASS_RANKER_CARD.exists():
        raise InputError(CLASS_RANKER_CARD, "the shipped model card is missing", "reinstall the package")
    return json.loads(CLASS_RANKER_CARD.read_text())


def load_model(path: str | Path | None = None, expected_sha256: str | None = None) -> RankerModel:
    """The shipped model (default) or ``path``; refuses a file whose checksum or architecture is wrong."""
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
    threshold = card.get("default_threshold", ckpt.get("default_threshold", 0.5))
    return RankerModel(net, path, digest, version, card, bool(ckpt.get("zero_granulometry", False)), float(threshold))


"""The class ranker's network, laid out exactly as RELION-5's model "v1.0", and safe weight loading.

A CNN on the 64x64 class image (three blocks of 3x3 convolutions, no pooling or normalisation) gives 48
image features; they are joined to the 24 metadata/image features and mapped to one linear score. The
layer order and state-dict keys match RELION-5's checkpoint, so a user's ``v1.0.ckpt`` loads as is.
Weights are read with ``torch.load(weights_only=True)``: code stored in a checkpoint is never run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reconstruct.files import InputError

from .features import N_FEATURES

IMAGE_SIZE = 64
P_DROPOUT = 0.3


def _block(c_in: int, c: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c, 3, 1, 1), nn.ReLU(), nn.Dropout(P_DROPOUT), nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, 2, 1), nn.Dropout(P_DROPOUT)]


class ClassRankerNet(nn.Module):
    """Image CNN + feature vector -> score (linear output, trained towards targets in [0, 1])."""

    def __init__(self, dropout: float = P_DROPOUT) -> None:
        super().__init__()
        self.cnn_layers = nn.Sequential(*_block(1, 16), *_block(32, 32), *_block(64, 64))
        self.feature_extractor = nn.Sequential(nn.Linear(128 * 8 * 8, 48))
        self.classifier_images_and_features = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(48 + N_FEATURES, 48), nn.ReLU(), nn.Dropout(dropout), nn.Linear(48, 1))
        # Unused heads kept so that RELION-5's state dict maps one to one.
        self.classifier_images = nn.Sequential(nn.Dropout(dropout), nn.Linear(48, 1))
        self.classifier_features = nn.Sequential(nn.Linear(N_FEATURES, 12), nn.ReLU(), nn.Dropout(dropout),
                                                 nn.Linear(12, 1))
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """images (B, 1, 64, 64), features (B, 24) -> scores (B, 1)."""
        x = self.cnn_layers(images).flatten(1)
        x = self.feature_extractor(x)
        return self.classifier_images_and_features(torch.cat([x, features], dim=1))


def sha256(path: str | Path) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict (ours, RELION-5's ``v1.0.ckpt`` or its ``.gz``), loaded without running code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found", "pass --model with a ranker checkpoint, or omit it")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise InputError(path, f"is a damaged gzip file ({e})", "download the model again") from e
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad or unsafe pickles
        raise InputError(path, f"cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})",
                         "pass a checkpoint holding tensors only (ours or RELION-5's v1.0)") from e
    if isinstance(ckpt, dict) and "model_state_dict" not in ckpt and "state_dict" in ckpt:
        ckpt = {**ckpt, "model_state_dict": _strip_prefix(ckpt["state_dict"], "net.")}
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise InputError(path, "holds no model_state_dict", "pass a class ranker checkpoint")
    return ckpt


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_network(path: str | Path) -> tuple[ClassRankerNet, dict[str, Any]]:
    """The network with a checkpoint's weights, in eval mode, after checking the architecture matches."""
    ckpt = read_checkpoint(path)
    net = ClassRankerNet()
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ckpt["model_state_dict"].items() if hasattr(v, "shape")}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or extra or wrong:
        detail = "; ".join(s for s in (
            f"missing {', '.join(missing[:4])}" if missing else "",
            f"unexpected {', '.join(extra[:4])}" if extra else "",
            "shape of " + ", ".join(f"{k} {got[k]} (expected {expected[k]})" for k in wrong[:3]) if wrong else "",
        ) if s)
        raise InputError(path, f"is not a class ranker v1.0 network ({detail})",
                         "use a checkpoint of this architecture: ours (models/) or RELION-5's v1.0")
    net.load_state_dict(ckpt["model_state_dict"])
    net.eval()
    torch.set_flush_denormal(True)  # subnormal weights would slow CPU inference many times over
    return net, ckpt


def save_checkpoint(net: ClassRankerNet, path: str | Path, **info: Any) -> None:
    """Write the weights and plain metadata (numbers, strings, lists) in a weights-only-loadable file."""
    from reconstruct.files.atomic import atomic_path

    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        torch.save({"model_state_dict": state, **info}, tmp)

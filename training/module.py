"""Lightning module and data module of the class ranker.

Training follows RELION's script: MSE loss, Adam with coupled L2 weight decay, batches of 32, and per
training batch one random rotation for the whole batch (bilinear, zeros outside), a flip along x with
probability 0.5, and the granulometry features zeroed. Validation sees the inputs unaugmented (with the
granulometry zeroed too, as the model will be scored).
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.metrics import mean_squared_error
from torch.utils.data import DataLoader, TensorDataset

from ranker.features import GRANULO
from ranker.network import ClassRankerNet

from .data import Samples


def rotate_batch(images: torch.Tensor, angle: float, flip: bool) -> torch.Tensor:
    """Rotate (B, 1, H, W) images by ``angle`` radians (bilinear, zeros outside) and optionally flip x."""
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.flip(-1) if flip else out


class RankerModule(L.LightningModule):
    """The ranker network trained on (image, features) -> target score."""

    def __init__(self, lr: float = 5e-5, weight_decay: float = 5e-4, dropout: float = 0.3,
                 use_features: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = ClassRankerNet(dropout)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        y = y.clone()
        y[:, GRANULO] = 0.0
        if not self.hparams.use_features:
            y.zero_()
        return y

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of images (B, 64, 64) and features (B, 24)."""
        return self.net(x[:, None], self._features(y))[:, 0]

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """MSE on one rotated (and maybe flipped) batch."""
        x, y, t = batch
        angle = float(torch.rand(1)) * 2 * math.pi
        flip = bool(torch.rand(1) < 0.5)
        x = rotate_batch(x[:, None], angle, flip)[:, 0]
        loss = F.mse_loss(self(x, y), t)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(t))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """Collect predictions for the epoch's metrics."""
        x, y, t = batch
        self._val.append((self(x, y).detach().cpu(), t.detach().cpu()))

    def on_validation_epoch_end(self) -> None:
        """Validation MSE and Spearman correlation over the whole validation set."""
        if not self._val:
            return
        pred = torch.cat([p for p, _ in self._val]).numpy()
        true = torch.cat([t for _, t in self._val]).numpy()
        self._val.clear()
        rho = spearmanr(pred, true).statistic if len(pred) > 2 and np.std(true) > 0 else 0.0
        self.log("val_mse", float(mean_squared_error(true, pred)), prog_bar=True)
        self.log("val_spearman", float(np.nan_to_num(rho)), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with coupled L2 weight decay, as RELION's script."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _dataset(s: Samples) -> TensorDataset:
    return TensorDataset(*(torch.as_tensor(a, dtype=torch.float32) for a in (s.images, s.features, s.targets)))


class RankerData(L.LightningDataModule):
    """Training and validation samples (already split by job) as shuffled batches."""

    def __init__(self, train: Samples, val: Samples, batch_size: int = 32, seed: int = 12) -> None:
        super().__init__()
        self.train_samples, self.val_samples = train, val
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (seeded)."""
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(_dataset(self.train_samples), batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        return DataLoader(_dataset(self.val_samples), batch_size=256)

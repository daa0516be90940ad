"""Trained weights shipped with the package (the class ranker) and their model cards."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
CLASS_RANKER = MODELS_DIR / "class_ranker_v1.pt"
CLASS_RANKER_CARD = MODELS_DIR / "class_ranker_v1.json"

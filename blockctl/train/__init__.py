"""The concept trainer: a slot adapter with Randomized Output Erasure (``blockctl train``).

Importing the package is cheap (the CLI reads ``TrainConfig``'s defaults and choices for its
help); the trainer itself, which needs torch and diffusers, loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from blockctl.train.config import TrainConfig

if TYPE_CHECKING:
    from blockctl.train.run import TrainRequest, TrainResult, train

__all__ = ["TrainConfig", "TrainRequest", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainRequest", "TrainResult", "train"):
        return getattr(importlib.import_module("blockctl.train.run"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

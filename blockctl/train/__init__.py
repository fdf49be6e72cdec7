"""The concept trainer: a slot adapter with Randomized Output Erasure (``blockctl train``)."""

from __future__ import annotations

from blockctl.train.config import TrainConfig
from blockctl.train.run import TrainRequest, TrainResult, train

__all__ = ["TrainConfig", "TrainRequest", "TrainResult", "train"]

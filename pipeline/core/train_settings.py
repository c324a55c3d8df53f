"""The hyperparameters of one training, checked before any work starts.

Torch-free: `train`'s cache key is built from them in a `main` that may not load torch at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import PipelineError

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    # Eval runs in chunks: large enough for efficient matmuls, small enough to stay in cache.
    eval_batch_size: int = 2000

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise PipelineError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise PipelineError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.precision not in PRECISIONS:
            raise PipelineError(
                f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}"
            )

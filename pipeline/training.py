"""The training loop: SGD over shuffled mini-batches, then eval-mode metrics on both splits.

Knows nothing about MLflow; the `on_epoch` callback is how a caller sees progress.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError

PRECISIONS = ("fp32", "bf16")
METRIC_NAMES = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s")


class TrainingDiverged(PipelineError):
    """The loss stopped being a finite number."""


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


def resolve_device(requested: str) -> str:
    """`auto` takes a GPU when there is one."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in ("cpu", "cuda") and not requested.startswith("cuda:"):
        raise PipelineError(f"unknown device {requested!r}: use auto, cpu or cuda")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device={requested} but no CUDA GPU is visible; use device=auto or cpu")
    return requested


def _autocast(settings: TrainSettings):
    if settings.precision == "bf16":
        return torch.autocast(torch.device(settings.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def per_example_results(
    model: nn.Module, features: torch.Tensor, labels: torch.Tensor, settings: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode cross-entropy and correctness for every example, computed in chunks."""
    model.eval()
    losses = torch.empty(len(labels), device=features.device)
    correct = torch.empty(len(labels), dtype=torch.bool, device=features.device)
    start = 0
    with _autocast(settings):
        for chunk in features.split(settings.eval_batch_size):
            stop = start + len(chunk)
            logits = model(chunk).float()
            losses[start:stop] = F.cross_entropy(logits, labels[start:stop], reduction="none")
            correct[start:stop] = logits.argmax(dim=1) == labels[start:stop]
            start = stop
    return losses, correct


def train(
    model: nn.Module,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    settings: TrainSettings,
    on_epoch: Callable[[dict], None] = lambda record: None,
) -> list[dict]:
    """Train `model` in place and return one record per epoch (1-based `epoch`).

    Each record holds METRIC_NAMES: losses are mean cross-entropy, accuracies fractions, and
    `epoch_time_s` covers that epoch's training and evaluation, like the seed's timer.
    Raises TrainingDiverged, after calling `on_epoch` for that epoch, when the loss is not finite.
    """
    settings.validate()
    device = torch.device(settings.device)
    model.to(device)
    x_train, y_train = (t.to(device) for t in train_data)
    x_test, y_test = (t.to(device) for t in test_data)
    # Both splits are evaluated in one pass: fewer, larger matmuls than two separate passes.
    eval_x = torch.cat([x_train, x_test])
    eval_y = torch.cat([y_train, y_test])
    n_train = len(y_train)

    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, fused=True
    )
    shuffle = torch.Generator().manual_seed(settings.seed)
    history = []
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n_train, generator=shuffle).to(device)
        for xb, yb in zip(
            x_train[order].split(settings.batch_size), y_train[order].split(settings.batch_size)
        ):
            with _autocast(settings):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        losses, correct = per_example_results(model, eval_x, eval_y, settings)
        record = {
            "epoch": epoch,
            "train_loss": losses[:n_train].mean().item(),
            "train_accuracy": correct[:n_train].double().mean().item(),
            "test_loss": losses[n_train:].mean().item(),
            "test_accuracy": correct[n_train:].double().mean().item(),
            "epoch_time_s": time.perf_counter() - started,
        }
        history.append(record)
        on_epoch(record)
        if not math.isfinite(record["train_loss"]):
            raise TrainingDiverged(
                f"the training loss became {record['train_loss']} at epoch {epoch}; training "
                f"stopped. Lower lr (now {settings.lr}) or set normalize=true."
            )
    return history

"""The training loop: SGD over shuffled mini-batches, then eval-mode metrics on both splits.

Knows nothing about MLflow; the `on_epoch` callback is how a caller sees progress, and the
`on_checkpoint` callback hands out the state that `resume` continues from
(pipeline.core.checkpoint writes it to disk).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.mlp_step import MlpStep
from pipeline.core.train_settings import TrainSettings
from pipeline.errors import PipelineError

METRIC_NAMES = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s")


class TrainingDiverged(PipelineError):
    """The loss stopped being a finite number."""


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
    *,
    resume: dict | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 1,
) -> list[dict]:
    """Train `model` in place and return one record per epoch (1-based `epoch`).

    Each record holds METRIC_NAMES: losses are mean cross-entropy, accuracies fractions, and
    `epoch_time_s` covers that epoch's training and evaluation, like the seed's timer.
    Raises TrainingDiverged, after calling `on_epoch` for that epoch, when the loss is not finite.

    Checkpoints: after every `checkpoint_every`-th epoch and after the last one (0: never), once
    the epoch's record has gone to `on_epoch`, `on_checkpoint(state)` gets the training state
    (pipeline.core.checkpoint.TRAINING_KEYS). Its tensors are the live parameters, buffers and
    momentum, which the next epoch overwrites in place: write it before the callback returns
    (checkpoint.save_checkpoint does, synchronously), or copy it first
    (checkpoint.clone_state, or a checkpoint.BackgroundCheckpointWriter, which writes the copy
    in a thread). An epoch whose loss diverged gets no checkpoint: the last one stays usable.

    `resume`, a checkpoint (checkpoint.load_checkpoint, or a state on_checkpoint received),
    restores the model's weights and buffers, the momentum, the shuffle generator and the global
    RNG (dropout) and continues with the next epoch. On the same machine and thread count the
    result is bit for bit that of an uninterrupted run with the same settings (tested on CPU).
    The returned history holds the checkpoint's records, then the new ones (only new ones go to
    `on_epoch`). Build `model` as for a fresh run; `resume` itself is left unchanged.
    """
    settings.validate()
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) \
            or checkpoint_every < 0:
        raise PipelineError(
            f"checkpoint_every must be 0 (no checkpoints) or a positive integer, got "
            f"{checkpoint_every!r}"
        )
    if resume is not None:
        _check_resumable(resume, model, settings)
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
    history: list[dict] = []
    if resume is not None:
        history = _restore(resume, model, optimizer, shuffle, device)
    # Each epoch's shuffled copy of the training split goes into the same two buffers: no fresh
    # copy of the split (19 MB at 600 images per digit) allocated and freed every epoch.
    shuffled_x, shuffled_y = torch.empty_like(x_train), torch.empty_like(y_train)
    # A plain MLP on the CPU skips autograd's bookkeeping, bit for bit the same step.
    mlp_step = MlpStep.for_model(model, optimizer, device, settings.precision)
    for epoch in range(len(history) + 1, settings.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n_train, generator=shuffle).to(device)
        torch.index_select(x_train, 0, order, out=shuffled_x)
        torch.index_select(y_train, 0, order, out=shuffled_y)
        for xb, yb in zip(
            shuffled_x.split(settings.batch_size), shuffled_y.split(settings.batch_size)
        ):
            if mlp_step is not None:
                mlp_step(xb, yb)
                continue
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
        due = checkpoint_every and (epoch % checkpoint_every == 0 or epoch == settings.epochs)
        if on_checkpoint is not None and due:
            on_checkpoint(_training_state(model, optimizer, shuffle, history, device))
    return history


def _training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, shuffle: torch.Generator,
    history: list[dict], device: torch.device,
) -> dict:
    """Everything the next epoch depends on, without copying a tensor (see train())."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        # get_state()/get_rng_state() return copies: these three are the caller's own.
        "shuffle_rng": shuffle.get_state(),
        "cpu_rng": torch.get_rng_state(),
        # Dropout on a GPU draws from that GPU's generator, not the CPU one.
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "history": [dict(record) for record in history],
        "epochs_done": len(history),
    }


def _check_resumable(resume: dict, model: nn.Module, settings: TrainSettings) -> None:
    """Refuse a checkpoint that cannot continue this run, before anything is changed."""
    done = resume["epochs_done"]
    if done > settings.epochs:
        raise PipelineError(
            f"the checkpoint has {done} finished epochs, more than epochs={settings.epochs}; "
            f"raise epochs or delete the checkpoint"
        )
    # optimizer.load_state_dict would silently replace the settings' lr and momentum with the
    # checkpoint's, so a changed hyperparameter must be caught here.
    for group in resume["optimizer"]["param_groups"]:
        for name in ("lr", "momentum"):
            if group.get(name) != getattr(settings, name):
                raise PipelineError(
                    f"the checkpoint was trained with {name} {group.get(name)}, this run has "
                    f"{name} {getattr(settings, name)}; use the checkpoint's value or delete it"
                )
    # Checked by hand: load_state_dict copies what fits before it complains about the rest.
    expected = model.state_dict()
    found = resume["model"]
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [f"{key} {list(found[key].shape)} vs {list(expected[key].shape)}"
                for key in expected if key in found and found[key].shape != expected[key].shape]
    problems = [f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                f"shapes differ: {', '.join(reshaped[:3])}" if reshaped else ""]
    if any(problems):
        raise PipelineError(
            f"the checkpoint's weights do not fit this model "
            f"({'; '.join(p for p in problems if p)}); it was saved for another config: delete "
            f"it or train that config"
        )


def _restore(
    resume: dict, model: nn.Module, optimizer: torch.optim.Optimizer, shuffle: torch.Generator,
    device: torch.device,
) -> list[dict]:
    """Put the checkpoint's state into the fresh model, optimizer and generators."""
    model.load_state_dict(resume["model"])
    # load_state_dict keeps the given momentum tensors when dtype and device already match, so
    # training would update the caller's checkpoint in place; a copy keeps it reusable.
    try:
        optimizer.load_state_dict(copy.deepcopy(resume["optimizer"]))
    except ValueError as err:
        raise PipelineError(
            f"the checkpoint's optimizer state does not fit this model ({err}); delete it"
        ) from err
    shuffle.set_state(resume["shuffle_rng"])
    # Last: nothing may draw from the global RNG between here and the first batch.
    torch.set_rng_state(resume["cpu_rng"])
    if device.type == "cuda" and resume["cuda_rng"] is not None:
        torch.cuda.set_rng_state(resume["cuda_rng"], device)
    return [dict(record) for record in resume["history"]]

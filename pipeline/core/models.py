"""Networks built from the `model:` block of an experiment config.

Every model takes flattened raw pixels, shape (N, 784), float values 0..255, and returns
(N, 10) logits, so a logged model can be served without knowing how it was trained.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.data import IMAGE_PIXELS, NUM_CLASSES
from pipeline.core.model_spec import POOL, validate_model_spec


class Scale(nn.Module):
    """Multiplies inputs by a constant; puts the `normalize` option inside the saved model."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def _mlp(spec: dict) -> list[nn.Module]:
    layers: list[nn.Module] = []
    width = IMAGE_PIXELS
    for hidden in spec.get("hidden", []):
        layers.append(nn.Linear(width, hidden["units"]))
        if hidden.get("batch_norm", False):
            layers.append(nn.BatchNorm1d(hidden["units"]))
        layers.append(nn.ReLU())
        width = hidden["units"]
    layers.append(nn.Linear(width, NUM_CLASSES))
    return layers


def _vgg(spec: dict) -> list[nn.Module]:
    size = spec.get("input_size", 32)
    layers: list[nn.Module] = [nn.Unflatten(1, (1, 28, 28))]
    if size != 28:
        layers.append(nn.Upsample(size=(size, size), mode="bilinear", align_corners=False))
    channels = 1
    for item in spec["conv"]:
        if item == POOL:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
    layers.append(nn.Flatten())
    width = channels * size * size
    for units in spec.get("classifier", []):
        layers += [nn.Linear(width, units), nn.ReLU(), nn.Dropout(spec.get("dropout", 0.5))]
        width = units
    layers.append(nn.Linear(width, NUM_CLASSES))
    return layers


BUILDERS = {"mlp": _mlp, "vgg": _vgg}


def build_model(spec: dict, normalize: bool = False) -> nn.Sequential:
    """The network a config's `model:` block describes; `normalize` scales pixels to 0..1."""
    validate_model_spec(spec)
    layers = _scale(normalize) + BUILDERS[spec["type"]](spec)
    return nn.Sequential(*layers)


def _scale(normalize: bool) -> list[nn.Module]:
    return [Scale(1 / 255)] if normalize else []


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

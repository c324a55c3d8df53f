"""Matplotlib figures; callers save or log them. Uses the non-interactive Agg backend."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

SPLIT_STYLES = {"test": "-", "train": "--"}


def learning_curve(history: pd.DataFrame, metric: str, title: str) -> Figure:
    """The seed's figure: train and test `metric` ('accuracy' or 'loss') against epoch."""
    fig, ax = plt.subplots(figsize=(8, 6))
    for split, style in SPLIT_STYLES.items():
        ax.plot(
            history["epoch"], history[f"{split}_{metric}"], marker="o", linestyle=style,
            label=f"{split.capitalize()} {metric}",
        )
    _decorate(ax, title, metric)
    return fig


def overlaid_curves(histories: dict[str, pd.DataFrame], column: str, title: str) -> Figure:
    """One line per model for one per-epoch column, e.g. test_accuracy."""
    fig, ax = plt.subplots(figsize=(8, 6))
    for label, history in histories.items():
        ax.plot(history["epoch"], history[column], marker="o", markersize=3, label=label)
    _decorate(ax, title, column.replace("_", " "))
    return fig


def _decorate(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel.capitalize())
    ax.grid(True)
    ax.legend()
    ax.figure.tight_layout()


def digit_grid(images: torch.Tensor, titles: list[str], columns: int = 10) -> Figure:
    """A grid of 28x28 digits, each with a caption."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image.numpy(), cmap="gray_r")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)

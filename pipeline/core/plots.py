"""Matplotlib figures; callers save or log them. Uses the non-interactive Agg backend."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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


def grouped_curves(
    groups: dict[str, list[pd.DataFrame]], columns: dict[str, str], title: str, ylabel: str
) -> Figure:
    """Per config, the mean over its runs of each column (style from `columns`, e.g.
    {"test_accuracy": "-", "train_accuracy": "--"}), with a +-1 std band when it has several."""
    fig, ax = plt.subplots(figsize=(8, 6))
    for color, (label, histories) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10,
                                         groups.items()):
        by_epoch = pd.concat(histories).groupby("epoch")
        for column, style in columns.items():
            mean, std = by_epoch[column].mean(), by_epoch[column].std()
            name = column.split("_")[0] if len(columns) > 1 else ""
            runs = f" (mean of {len(histories)})" if len(histories) > 1 else ""
            ax.plot(mean.index, mean, linestyle=style, marker="o", markersize=3, color=color,
                    label=f"{label} {name}{runs}".strip())
            if len(histories) > 1:
                ax.fill_between(mean.index, mean - std, mean + std, color=color, alpha=0.15)
    if any(len(histories) > 1 for histories in groups.values()):
        title += " (band: mean +- 1 std over seeds)"
    _decorate(ax, title, ylabel)
    return fig


def _decorate(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("Epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel.capitalize())
    ax.grid(True)
    ax.legend()


def digit_grid(images: torch.Tensor, captions: list[str], columns: int = 10) -> Figure:
    """28x28 digits tiled into one image (one imshow, not one axes per digit: ~20x faster),
    each with its caption in the padding above it."""
    if len(images) == 0:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, "no digits to show", ha="center", va="center")
        ax.axis("off")
        return fig
    # Imported here: only sample_data draws digits, and torchvision costs 2.4 s of CPU to import.
    from torchvision.utils import make_grid

    pad, cell = 12, 28 + 12
    tiles = make_grid(images.unsqueeze(1).float() / 255, nrow=columns, padding=pad, pad_value=0)
    rows = -(-len(images) // columns)
    fig, ax = plt.subplots(figsize=(columns * 0.85, rows * 0.85 + 0.3))
    ax.imshow(tiles[0].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    for i, caption in enumerate(captions):
        row, col = divmod(i, columns)
        ax.text(col * cell + pad + 14, row * cell + pad - 1, caption, ha="center", va="bottom",
                fontsize=6)
    ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92)
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)

"""Loading MNIST through torchvision and drawing the balanced per-class sample.

Pure functions: nothing here knows about MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.core.sampling import ALL, SAMPLING_METHODS
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from torchvision.datasets import MNIST

SPLITS = ("train", "test")
NUM_CLASSES = 10
IMAGE_PIXELS = 28 * 28


@dataclass(frozen=True)
class Split:
    """One split of the sample: uint8 images, int64 labels, and where they sit in MNIST."""

    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64
    indices: torch.Tensor  # (N,) int64, positions in the full MNIST split

    def features(self) -> torch.Tensor:
        """Flattened raw pixels as float32 in 0..255, the input every model takes."""
        return self.images.reshape(len(self.images), IMAGE_PIXELS).float()

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=NUM_CLASSES).tolist()


@dataclass(frozen=True)
class Sample:
    train: Split
    test: Split

    def split(self, name: str) -> Split:
        return getattr(self, name)


def _missing_data_message(root: Path, reason: str) -> str:
    return (
        f"MNIST not found under {root} ({reason}). Either go online and let it download, or put "
        f"the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) in {root / 'MNIST' / 'raw'}, or point "
        f"data_dir at a folder that already holds MNIST/raw/... (on these machines: "
        f"data_dir=../shared/datasets)."
    )


def load_mnist(root: str | Path, train: bool, download: bool = True) -> MNIST:
    """The torchvision MNIST dataset under `root`, with errors that say what to do."""
    # Imported here: torchvision costs 2.4 s of CPU to import, and a process that reads a
    # logged sample (a pool worker, a train or evaluate stage) never needs it.
    from torchvision.datasets import MNIST

    root = Path(root).expanduser()
    raw = root / "MNIST" / "raw"
    try:
        dataset = MNIST(root=str(root), train=train, download=False)
    except RuntimeError as err:
        if "not found" not in str(err).lower():
            raise PipelineError(_corrupt_message(raw, err)) from err
        if not download:
            raise PipelineError(_missing_data_message(root, "download=false")) from err
        try:
            dataset = MNIST(root=str(root), train=train, download=True)
        except Exception as download_err:  # offline: URLError, RuntimeError, OSError...
            reason = (str(download_err).strip().splitlines() or [type(download_err).__name__])[0]
            raise PipelineError(
                _missing_data_message(root, f"download failed: {reason}")
            ) from download_err
    except (AssertionError, ValueError, KeyError, TypeError) as err:
        # torchvision's IDX parser fails in several ways on truncated or damaged headers.
        raise PipelineError(_corrupt_message(raw, err)) from err
    if len(dataset.data) != len(dataset.targets) or dataset.data.shape[1:] != (28, 28):
        raise PipelineError(
            _corrupt_message(
                raw,
                f"{len(dataset.data)} images of shape {tuple(dataset.data.shape[1:])} "
                f"but {len(dataset.targets)} labels",
            )
        )
    return dataset


def _corrupt_message(raw: Path, err: object) -> str:
    return (
        f"could not read the MNIST IDX files in {raw}: {str(err) or type(err).__name__}. They look "
        f"truncated or corrupt: replace them with intact copies (md5 sums are in the torchvision "
        f"MNIST source) or delete them so they download again."
    )


def per_class_indices(
    targets: torch.Tensor,
    samples_per_class: int | None,
    sampling: str = "first",
    seed: int = 0,
) -> torch.Tensor:
    """Indices of `samples_per_class` items of each digit, grouped by digit.

    `first` takes the first N of each class in dataset order, as the seed notebook does;
    `random` draws N per class with a seeded generator (kept in dataset order within a class).
    None takes every item, in dataset order.
    """
    if sampling not in SAMPLING_METHODS:
        raise PipelineError(
            f"unknown sampling {sampling!r}: use one of {', '.join(SAMPLING_METHODS)}"
        )
    if samples_per_class is None:
        return torch.arange(len(targets))
    if samples_per_class < 1:
        raise PipelineError(f"samples_per_class must be at least 1, got {samples_per_class}")
    counts = torch.bincount(targets, minlength=NUM_CLASSES)
    scarcest = int(counts.argmin())
    if counts[scarcest] < samples_per_class:
        raise PipelineError(
            f"digit {scarcest} has only {int(counts[scarcest])} images in this split, the fewest "
            f"of any digit, so samples_per_class={samples_per_class} is too many: use at most "
            f"{int(counts[scarcest])}, or samples_per_class={ALL} for the whole (unbalanced) split"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for digit in range(NUM_CLASSES):
        members = (targets == digit).nonzero().flatten()
        if sampling == "first":
            chosen.append(members[:samples_per_class])
        else:
            draw = torch.randperm(len(members), generator=generator)[:samples_per_class]
            chosen.append(members[draw.sort().values])
    return torch.cat(chosen)


def draw_sample(
    root: str | Path,
    samples_per_class: int | None,
    sampling: str = "first",
    seed: int = 0,
    download: bool = True,
) -> Sample:
    """The balanced sample of both MNIST splits (None per class: both splits whole)."""
    splits = {}
    for offset, name in enumerate(SPLITS):
        dataset = load_mnist(root, train=(name == "train"), download=download)
        try:
            indices = per_class_indices(dataset.targets, samples_per_class, sampling, seed + offset)
        except PipelineError as err:
            raise PipelineError(f"{name} split: {err}") from None
        splits[name] = Split(
            images=dataset.data[indices].clone(),
            labels=dataset.targets[indices].long(),
            indices=indices,
        )
    return Sample(**splits)


def save_sample(sample: Sample, path: str | Path) -> None:
    """Write the sample compactly: uint8 pixels, uint8 labels, int32 indices."""
    arrays = {}
    for name in SPLITS:
        split = sample.split(name)
        arrays[f"{name}_images"] = split.images.numpy().astype(np.uint8)
        arrays[f"{name}_labels"] = split.labels.numpy().astype(np.uint8)
        arrays[f"{name}_indices"] = split.indices.numpy().astype(np.int32)
    np.savez_compressed(path, **arrays)


def load_sample(path: str | Path) -> Sample:
    try:
        with np.load(path) as arrays:
            splits = {
                name: Split(
                    images=torch.from_numpy(arrays[f"{name}_images"]),
                    labels=torch.from_numpy(arrays[f"{name}_labels"].astype(np.int64)),
                    indices=torch.from_numpy(arrays[f"{name}_indices"].astype(np.int64)),
                )
                for name in SPLITS
            }
    except (OSError, KeyError, ValueError) as err:
        raise PipelineError(f"{path} is not a sample written by sample_data: {err}") from err
    return Sample(**splits)

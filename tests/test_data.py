"""Loading MNIST through torchvision and the per-class sampling rule (pipeline.core.data)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from conftest import (
    REAL_DATA_ROOT,
    TINY_TEST_PER_CLASS,
    TINY_TRAIN_PER_CLASS,
    requires_real_mnist,
    write_idx_labels,
)
from torchvision.datasets import MNIST

from pipeline.core.data import (
    IMAGE_PIXELS,
    draw_sample,
    load_mnist,
    load_sample,
    per_class_indices,
    save_sample,
)
from pipeline.errors import PipelineError

RAW_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def notebook_sample(dataset: MNIST, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed notebook's sampling, verbatim: per class, targets == c, then the first n."""
    x, y = [], []
    for c in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9):
        subset_idx = torch.isin(dataset.targets, torch.as_tensor(c))
        x.append(dataset.data[subset_idx][:n].view(-1, 28 * 28).float())
        y.append(dataset.targets[subset_idx][:n].long())
    return torch.cat(x, dim=0), torch.cat(y, dim=0)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_tiny_idx_files_load_through_torchvision(tiny_mnist, split):
    dataset = load_mnist(tiny_mnist.root, train=(split == "train"), download=False)
    assert isinstance(dataset, MNIST)
    images, labels = tiny_mnist.split(split)
    assert dataset.data.dtype == torch.uint8
    assert torch.equal(dataset.data, torch.from_numpy(images))
    assert torch.equal(dataset.targets, torch.from_numpy(labels).long())


# ---------------------------------------------------------------------------------------------
# The sampling rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, TINY_TEST_PER_CLASS])
def test_first_sampling_is_the_seed_notebooks_rule(tiny_mnist, n):
    sample = draw_sample(tiny_mnist.root, n, "first", download=False)
    for split, train in (("train", True), ("test", False)):
        expected_x, expected_y = notebook_sample(MNIST(str(tiny_mnist.root), train=train), n)
        part = sample.split(split)
        assert torch.equal(part.features(), expected_x), split
        assert torch.equal(part.labels, expected_y), split


def test_first_sampling_takes_the_first_n_of_each_class_in_file_order(tiny_mnist):
    n = 7
    sample = draw_sample(tiny_mnist.root, n, "first", download=False)
    for split in ("train", "test"):
        images, labels = tiny_mnist.split(split)
        expected = np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(10)])
        part = sample.split(split)
        assert part.indices.tolist() == expected.tolist()
        assert torch.equal(part.images, torch.from_numpy(images[expected]))
        # Grouped by digit, 0 first, as the notebook concatenates them.
        assert part.labels.tolist() == np.repeat(np.arange(10), n).tolist()


def test_first_sampling_does_not_depend_on_the_seed(tiny_mnist):
    a = draw_sample(tiny_mnist.root, 6, "first", seed=0, download=False)
    b = draw_sample(tiny_mnist.root, 6, "first", seed=123, download=False)
    assert torch.equal(a.train.indices, b.train.indices)
    assert torch.equal(a.test.indices, b.test.indices)


def test_random_sampling_is_seeded_reproducible_and_within_class(tiny_mnist):
    n = 10
    a = draw_sample(tiny_mnist.root, n, "random", seed=3, download=False)
    again = draw_sample(tiny_mnist.root, n, "random", seed=3, download=False)
    other = draw_sample(tiny_mnist.root, n, "random", seed=4, download=False)
    first = draw_sample(tiny_mnist.root, n, "first", download=False)
    for split in ("train", "test"):
        _, labels = tiny_mnist.split(split)
        part = a.split(split)
        assert torch.equal(part.indices, again.split(split).indices), "same seed, same draw"
        assert not torch.equal(part.indices, other.split(split).indices), "seed is ignored"
        if split == "train":  # 10 of 30 per class: the first 10 would be a tiny coincidence
            assert not torch.equal(part.indices, first.train.indices)
        idx = part.indices.numpy()
        assert len(set(idx.tolist())) == len(idx), "an image was drawn twice"
        assert (labels[idx] == part.labels.numpy()).all(), "labels do not match the images"
        assert torch.equal(part.images, torch.from_numpy(tiny_mnist.split(split)[0][idx]))
        for c in range(10):
            members = idx[part.labels.numpy() == c]
            assert len(members) == n
            assert (labels[members] == c).all()
            assert (np.diff(members) > 0).all(), "within a class, kept in dataset order"


def test_random_sampling_class_counts_are_balanced(tiny_mnist):
    sample = draw_sample(tiny_mnist.root, 4, "random", seed=0, download=False)
    assert sample.train.class_counts() == [4] * 10
    assert sample.test.class_counts() == [4] * 10


@pytest.mark.parametrize("n", [1, 12])
def test_class_counts_are_balanced(tiny_mnist, n):
    sample = draw_sample(tiny_mnist.root, n, download=False)
    assert sample.train.class_counts() == [n] * 10
    assert sample.test.class_counts() == [n] * 10
    assert len(sample.train.labels) == len(sample.test.labels) == 10 * n


def test_features_are_flattened_raw_pixels_as_float(tiny_mnist):
    sample = draw_sample(tiny_mnist.root, 3, download=False)
    features = sample.train.features()
    assert features.shape == (30, IMAGE_PIXELS)
    assert features.dtype == torch.float32
    assert torch.equal(features, sample.train.images.reshape(30, -1).float())
    assert features.max() > 200, "pixels must stay 0..255 by default (the seed's inputs)"


def test_sample_artifact_roundtrip_is_compact_uint8(tiny_mnist, tmp_path):
    sample = draw_sample(tiny_mnist.root, 12, "random", seed=1, download=False)
    path = tmp_path / "sample.npz"
    save_sample(sample, path)
    with np.load(path) as arrays:
        assert arrays["train_images"].dtype == np.uint8
        assert arrays["train_images"].shape == (120, 28, 28)
        assert arrays["test_images"].dtype == np.uint8
        assert arrays["train_labels"].dtype == np.uint8
        assert arrays["train_indices"].dtype == np.int32
    loaded = load_sample(path)
    for split in ("train", "test"):
        original, back = sample.split(split), loaded.split(split)
        assert torch.equal(back.images, original.images)
        assert back.images.dtype == torch.uint8
        assert torch.equal(back.labels, original.labels)
        assert back.labels.dtype == torch.int64
        assert torch.equal(back.indices, original.indices)
        assert torch.equal(back.features(), original.features())


def test_load_sample_rejects_a_file_that_is_not_a_sample(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, something=np.zeros(3))
    with pytest.raises(PipelineError, match="not a sample written by sample_data"):
        load_sample(path)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["no folder", "empty raw folder", "one file missing"])
def test_missing_mnist_with_download_false_says_where_to_put_it(tmp_path, tiny_mnist, layout):
    if layout == "no folder":
        root = tmp_path / "nowhere"
    elif layout == "empty raw folder":
        root = tmp_path / "empty"
        (root / "MNIST" / "raw").mkdir(parents=True)
    else:
        root = tiny_mnist.root
        (tiny_mnist.raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(PipelineError) as info:
        draw_sample(root, 5, download=False)
    message = str(info.value)
    assert "data_dir" in message
    assert str(root) in message
    assert "MNIST/raw" in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])


CORRUPTIONS = {
    "train images lose their last 100 bytes": (("train", "images"), lambda p: _truncate(p, -100)),
    "train images cut inside the header": (("train", "images"), lambda p: _truncate(p, 10)),
    "train labels lose their last 5 bytes": (("train", "labels"), lambda p: _truncate(p, -5)),
    "test images cut to half": (("test", "images"), lambda p: _truncate(p, 4000)),
    "test labels empty": (("test", "labels"), lambda p: _truncate(p, 0)),
    "images left gzip-compressed": (
        ("train", "images"), lambda p: p.write_bytes(gzip.compress(p.read_bytes()))
    ),
    "fewer labels than images": (
        ("train", "labels"),
        lambda p: write_idx_labels(p, np.zeros(TINY_TRAIN_PER_CLASS * 10 - 3, dtype=np.uint8)),
    ),
}


@pytest.mark.parametrize(
    "where, corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS)
)
def test_truncated_or_corrupt_idx_file_gives_a_clear_error(tiny_mnist, where, corrupt):
    corrupt(tiny_mnist.raw / RAW_NAMES[where])
    with pytest.raises(PipelineError) as info:
        draw_sample(tiny_mnist.root, 5, download=False)
    message = str(info.value)
    assert "truncated or corrupt" in message
    assert str(tiny_mnist.raw) in message


def test_idx_header_with_unknown_type_code_gives_a_clear_error(tiny_mnist):
    path = tiny_mnist.raw / RAW_NAMES[("train", "images")]
    data = path.read_bytes()
    path.write_bytes(struct.pack(">I", 0x00000A03) + data[4:])  # type byte 0x08 -> 0x0A
    with pytest.raises(PipelineError, match="truncated or corrupt"):
        draw_sample(tiny_mnist.root, 5, download=False)


def test_corrupt_idx_message_names_what_went_wrong(tiny_mnist):
    path = tiny_mnist.raw / RAW_NAMES[("train", "images")]
    path.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(PipelineError) as info:
        draw_sample(tiny_mnist.root, 5, download=False)
    assert "raw: ." not in str(info.value)


@pytest.mark.parametrize(
    "n, split, most",
    [(TINY_TEST_PER_CLASS + 1, "test", TINY_TEST_PER_CLASS),
     (TINY_TRAIN_PER_CLASS + 1, "train", TINY_TRAIN_PER_CLASS)],
)
def test_samples_per_class_larger_than_a_class_has(tiny_mnist, n, split, most):
    with pytest.raises(PipelineError) as info:
        draw_sample(tiny_mnist.root, n, download=False)
    message = str(info.value)
    assert message.startswith(f"{split} split:")
    assert f"samples_per_class={n}" in message
    assert f"at most {most}" in message


@pytest.mark.parametrize("n", [0, -1])
def test_samples_per_class_must_be_positive(n):
    targets = torch.arange(10).repeat(3)
    with pytest.raises(PipelineError, match="samples_per_class must be at least 1"):
        per_class_indices(targets, n)


def test_unknown_sampling_method_is_rejected():
    with pytest.raises(PipelineError, match="unknown sampling 'stratified'.*first, random"):
        per_class_indices(torch.arange(10).repeat(3), 2, "stratified")


# ---------------------------------------------------------------------------------------------
# The real MNIST files (fast: reading them takes well under a second)
# ---------------------------------------------------------------------------------------------


@requires_real_mnist
def test_real_mnist_default_sample_is_the_notebooks():
    sample = draw_sample(REAL_DATA_ROOT, 600, "first", download=False)
    for split, train, total in (("train", True, 60000), ("test", False, 10000)):
        dataset = MNIST(str(REAL_DATA_ROOT), train=train)
        assert len(dataset) == total
        expected_x, expected_y = notebook_sample(dataset, 600)
        part = sample.split(split)
        assert part.class_counts() == [600] * 10
        assert torch.equal(part.features(), expected_x)
        assert torch.equal(part.labels, expected_y)

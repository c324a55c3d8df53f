"""sample_data's run name and cache key: the sampling rule and the raw MNIST files by content."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache.code_digest import cache_key
from pipeline.cache.file_digests import file_digest
from pipeline.core import sampling

RAW_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


def raw_folder(data_dir: str) -> Path:
    return Path(data_dir).expanduser().resolve() / "MNIST" / "raw"


def raw_digests(data_dir: str) -> dict[str, str | None]:
    """sha256 of each raw MNIST file under `data_dir` (None for a missing one)."""
    raw = raw_folder(data_dir)
    return {name: file_digest(raw / name) for name in RAW_FILES}


def sample_description(params: dict) -> str:
    return sampling.describe(params["samples_per_class"], params["sampling"], params["seed"])


def sample_data_run_name(params: dict) -> str:
    return f"sample_data-{sample_description(params)}"


def sample_data_key(params: dict) -> str:
    """What the sample depends on: the sampling rule and the exact raw files it reads."""
    count = sampling.normalized(params["samples_per_class"])
    whole = count == sampling.ALL
    identity = {
        # By content: a copy of MNIST elsewhere is the same input; a changed file is not.
        "files": raw_digests(params["data_dir"]),
        "samples_per_class": count,
        "sampling": None if whole else params["sampling"],
        "seed": params["seed"] if params["sampling"] == "random" and not whole else None,
    }
    return cache_key("sample_data", identity, "pipeline.stages.sample_data")

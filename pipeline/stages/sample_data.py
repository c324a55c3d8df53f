"""sample_data: draw the balanced MNIST sample and log it for the stages after it."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.exceptions import MlflowException

from pipeline import plots, tracking
from pipeline.cli import stage_params
from pipeline.data import SPLITS, Sample, draw_sample, load_sample, save_sample
from pipeline.file_digests import file_digest

STAGE = "sample_data"
SAMPLE_ARTIFACT = "sample/sample.npz"
RAW_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


def run_name(params: dict) -> str:
    return f"sample_data-{describe(params)}"


def describe(params: dict) -> str:
    if params["sampling"] == "random":
        return f"random{params['samples_per_class']}-seed{params['seed']}"
    return f"first{params['samples_per_class']}"


def identity(params: dict) -> dict:
    """What the sample depends on: the sampling rule and the exact raw files it reads."""
    raw = Path(params["data_dir"]).expanduser().resolve() / "MNIST" / "raw"
    return {
        # By content: a copy of MNIST elsewhere is the same input; a changed file is not.
        "files": {name: file_digest(raw / name) for name in RAW_FILES},
        "samples_per_class": params["samples_per_class"],
        "sampling": params["sampling"],
        "seed": params["seed"] if params["sampling"] == "random" else None,
    }


def cache_key(params: dict) -> str:
    return tracking.cache_key(STAGE, identity(params), __name__)


def run(params: dict) -> str:
    """Draw and log a sample; returns the run id."""
    tags = {tracking.CACHE_KEY_TAG: cache_key(params)}
    with tracking.stage_run(STAGE, run_name(params), params, tags) as run:
        sample = draw_sample(
            params["data_dir"], params["samples_per_class"], params["sampling"],
            params["seed"], params["download"],
        )
        mlflow.set_tag("data_root", str(Path(params["data_dir"]).expanduser().resolve()))
        counts = pd.DataFrame(
            {split: sample.split(split).class_counts() for split in SPLITS}
        ).rename_axis("digit")
        mlflow.log_metrics({f"{split}_examples": int(counts[split].sum()) for split in SPLITS})
        mlflow.log_table(counts.reset_index(), "class_counts.json")
        fig = plots.digit_grid(*_grid_of_firsts(sample))
        mlflow.log_figure(fig, "sample_digits.png")
        plots.close(fig)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(SAMPLE_ARTIFACT).name
            save_sample(sample, path)
            mlflow.log_artifact(str(path), artifact_path=str(Path(SAMPLE_ARTIFACT).parent))
        log_sample_inputs(sample, run.info.run_id)
        return run.info.run_id


def _grid_of_firsts(sample: Sample, per_digit: int = 10) -> tuple[torch.Tensor, list[str]]:
    """Ten training images of each digit, one row per digit."""
    picks = torch.cat(
        [(sample.train.labels == d).nonzero().flatten()[:per_digit] for d in range(10)]
    )
    return sample.train.images[picks], [str(int(sample.train.labels[i])) for i in picks]


def log_sample_inputs(sample: Sample, data_run_id: str) -> None:
    """Record both splits as MLflow dataset inputs; equal samples get equal digests."""
    source = _dataset_source(mlflow.get_run(data_run_id).info.artifact_uri + "/" + SAMPLE_ARTIFACT)
    for split, context in (("train", "training"), ("test", "testing")):
        part = sample.split(split)
        dataset = mlflow.data.from_numpy(
            features=part.images.reshape(len(part.images), -1).numpy(),
            targets=part.labels.numpy(),
            source=source,
            name=f"mnist-{split}-sample",
        )
        mlflow.log_input(dataset, context=context)


def _dataset_source(uri: str) -> DatasetSource:
    """The artifact's source where MLflow can resolve its scheme, else a tag naming it."""
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that the path is ambiguous.
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
        try:
            return resolve_dataset_source(uri)
        except MlflowException:
            return CodeDatasetSource(tags={"artifact_uri": uri})


def fetch_sample(run_id: str) -> Sample:
    """The sample a finished sample_data run logged."""
    tracking.get_stage_run(run_id, STAGE, "data_run_id")
    return load_sample(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SAMPLE_ARTIFACT))


def resolve_data_run(params: dict) -> str:
    """For a consuming stage: the given sample_data run, a finished one with the same
    sampling (`sampling_seed` is sample_data's `seed`), or a new one."""
    if params["data_run_id"]:
        tracking.get_stage_run(params["data_run_id"], STAGE, "data_run_id")
        return params["data_run_id"]
    wanted = stage_params(
        STAGE,
        {
            "data_dir": params["data_dir"],
            "samples_per_class": params["samples_per_class"],
            "sampling": params["sampling"],
            "seed": params["sampling_seed"],
        },
    )
    cached = tracking.find_cached_run(cache_key(wanted))
    if cached:
        print(f"using sample_data run {cached.info.run_id} ({describe(wanted)})")
        return cached.info.run_id
    print(f"no finished sample_data run for {describe(wanted)}: drawing one")
    return run(wanted)

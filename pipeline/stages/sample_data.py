"""sample_data: draw the balanced MNIST sample (or take the whole of it) and log it for the
stages after it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import torch

from pipeline.cache import sample_keys
from pipeline.core import plots, sampling
from pipeline.core.data import SPLITS, Sample, draw_sample, save_sample
from pipeline.runs import samples, tracking

STAGE = samples.STAGE
SAMPLE_ARTIFACT = samples.SAMPLE_ARTIFACT
RAW_DIGESTS_ARTIFACT = samples.RAW_DIGESTS_ARTIFACT
DATA_ROOT_TAG = samples.DATA_ROOT_TAG


def run(params: dict) -> str:
    """Draw and log a sample; returns the run id."""
    with tracking.stage_run(STAGE, sample_keys.sample_data_run_name(params), params) as run:
        per_class = sampling.parse_samples_per_class(params["samples_per_class"])
        sample = draw_sample(
            params["data_dir"], per_class, params["sampling"], params["seed"], params["download"],
        )
        # Keyed only now: the key holds the raw files' digests, and on a first run into an
        # empty data_dir the files exist only once draw_sample has downloaded them.
        mlflow.set_tag(tracking.CACHE_KEY_TAG, sample_keys.sample_data_key(params))
        mlflow.set_tag(DATA_ROOT_TAG, str(Path(params["data_dir"]).expanduser().resolve()))
        counts = pd.DataFrame(
            {split: sample.split(split).class_counts() for split in SPLITS}
        ).rename_axis("digit")
        mlflow.log_metrics({f"{split}_examples": int(counts[split].sum()) for split in SPLITS})
        mlflow.log_table(counts.reset_index(), "class_counts.json")
        fig = plots.digit_grid(*_grid_of_firsts(sample))
        mlflow.log_figure(fig, "sample_digits.png")
        plots.close(fig)
        if per_class is None:
            # The whole of MNIST is the raw files themselves: their digests pin it exactly, and
            # a 55 MB copy per sample run would buy nothing but disk use.
            mlflow.log_dict(sample_keys.raw_digests(params["data_dir"]), RAW_DIGESTS_ARTIFACT)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(SAMPLE_ARTIFACT).name
                save_sample(sample, path)
                mlflow.log_artifact(str(path), artifact_path=str(Path(SAMPLE_ARTIFACT).parent))
        samples.log_sample_inputs(sample, run.info.run_id)
        return run.info.run_id


def _grid_of_firsts(sample: Sample, per_digit: int = 10) -> tuple[torch.Tensor, list[str]]:
    """Ten training images of each digit, one row per digit."""
    picks = torch.cat(
        [(sample.train.labels == d).nonzero().flatten()[:per_digit] for d in range(10)]
    )
    return sample.train.images[picks], [str(int(sample.train.labels[i])) for i in picks]

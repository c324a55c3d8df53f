"""One sweep trial, as a Ray Tune function trainable: train the sampled point on the fit part
of the training sample, score it on the validation part every epoch, log it as an MLflow run
nested under the `tune` run, and report `val_loss` to Ray Tune (ASHA decides on it).

Runs in a Ray worker. It never sees the test split: the driver sends only the fit and
validation parts. The training itself is pipeline.core.training.train, the loop `train` uses, with
the validation part in the place of the test split.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from pipeline.cache.code_digest import cache_key
from pipeline.cache.machine import numerics
from pipeline.errors import PipelineError

TRIAL_STAGE = "tune_trial"
# Tags of a trial run.
TRIAL_KEY_TAG = "pipeline.trial_key"  # the sweep's trial key: equal keys, interchangeable trials
POINT_TAG = "pipeline.trial_point"  # the point as JSON, with its types (params are strings)
RAY_TRIAL_TAG = "pipeline.ray_trial_id"
EPOCHS_RUN_TAG = "pipeline.epochs_run"
EARLY_STOP_TAG = "pipeline.early_stopped"
# What a trial logs per epoch (step = epoch): train's names, with val_* for the validation part.
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s")


@dataclass(frozen=True)
class TrialData:
    """The fit and validation parts as uint8 pixels (N, 784) and int64 labels: compact in Ray's
    object store, turned into float32 in the trial as `train` does."""

    fit_images: np.ndarray
    fit_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


@dataclass(frozen=True)
class TrialContext:
    env: dict  # ray_cluster.worker_env: where to log, and the torch threads
    credentials: dict  # ray_cluster.credentials: the tracking login, set only while it runs
    experiment_id: str
    parent_run_id: str
    trial_key: str
    space_name: str
    epochs: int
    seed: int
    normalize: bool
    device: str


def run_trial(config: dict, data: TrialData, context: TrialContext) -> None:
    """The trainable: `config` is the point Optuna proposed (with the fixed values added)."""
    from pipeline.scale import ray_cluster

    os.environ.update(context.env)
    with ray_cluster.credentials_set(context.credentials):
        _run_trial(config, data, context)


def _run_trial(config: dict, data: TrialData, context: TrialContext) -> None:
    import mlflow
    import torch
    from mlflow.entities import Metric, RunTag
    from ray import tune

    from pipeline.core import search_space
    from pipeline.core.models import build_model, count_parameters
    from pipeline.core.train_settings import TrainSettings
    from pipeline.core.training import train
    from pipeline.runs import tracking

    torch.set_num_threads(int(context.env["OMP_NUM_THREADS"]))
    # MLflow keeps the URI it first saw in this process; the trial's environment names the
    # sweep's.
    mlflow.set_tracking_uri(context.env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    trial_id = tune.get_context().get_trial_id()
    name = (f"trial-{config['layers']}x{config['width']}{'-bn' if config['batch_norm'] else ''}"
            f"-{trial_id}")
    tags = {TRIAL_KEY_TAG: context.trial_key, RAY_TRIAL_TAG: trial_id,
            POINT_TAG: json.dumps(config, sort_keys=True), "pipeline.sweep": context.space_name}
    params = {**config, "epochs": context.epochs, "seed": context.seed,
              "normalize": context.normalize, "device": context.device,
              "torch_threads": torch.get_num_threads()}
    # The stages' run lifecycle: FINISHED, or FAILED with pipeline.error (a diverged loss, a
    # bug; Ray then records an errored trial). A trial ASHA stops leaves through tune.report
    # (SystemExit): its run ends FINISHED, and the driver tags why (TrialRunCloser), or ends
    # it itself when the trial's thread never comes back.
    with tracking.nested_under(context.parent_run_id, {}), \
            tracking.stage_run(TRIAL_STAGE, name, params, tags) as run:
        run_id = run.info.run_id
        torch.manual_seed(context.seed)
        model = build_model(search_space.model_spec(config), normalize=context.normalize)
        client.log_metric(run_id, "num_params", count_parameters(model))
        settings = TrainSettings(epochs=context.epochs, batch_size=int(config["batch_size"]),
                                 lr=float(config["lr"]), momentum=float(config["momentum"]),
                                 seed=context.seed, device=context.device)

        def on_epoch(record: dict) -> None:
            values = {"train_loss": record["train_loss"],
                      "train_accuracy": record["train_accuracy"],
                      "val_loss": record["test_loss"], "val_accuracy": record["test_accuracy"],
                      "epoch_time_s": record["epoch_time_s"]}
            now = int(time.time() * 1000)
            # Written before the report: when ASHA stops the trial at this report, the run
            # already holds the epoch it was judged on.
            client.log_batch(run_id, metrics=[Metric(k, v, now, record["epoch"])
                                              for k, v in values.items()],
                             tags=[RunTag(EPOCHS_RUN_TAG, str(record["epoch"]))])
            tune.report({**values, "epoch": record["epoch"]})

        # Copies: arrays from Ray's object store are read-only.
        train(model, (torch.tensor(data.fit_images).float(), torch.tensor(data.fit_labels)),
              (torch.tensor(data.val_images).float(), torch.tensor(data.val_labels)),
              settings, on_epoch=on_epoch, checkpoint_every=0)


def split_arrays(images: np.ndarray, labels: np.ndarray, fit: np.ndarray,
                 val: np.ndarray) -> TrialData:
    if len(fit) == 0 or len(val) == 0:
        raise PipelineError("the validation split left no images on one side; change val_size")
    flat = images.reshape(len(images), -1)
    return TrialData(flat[fit], labels[fit], flat[val], labels[val])


def trial_key(space, data_run_id: str, threads: int, device: str) -> str:
    """What makes two sweep trials interchangeable: the sweep's space, epochs, split, seed and
    ASHA rules (`space.digest`, not the number of trials), the sample, the trial's code and
    what changes its bits here (torch build, the trial's threads, the processor or GPU).
    Kept with the trial so that tune's keys enter no key of main's stages."""
    identity = {
        "space": space.digest, "data_run_id": data_run_id, "device": device,
        "numerics": {**numerics(device), "torch_threads": threads},
    }
    return cache_key(TRIAL_STAGE, identity, __name__)

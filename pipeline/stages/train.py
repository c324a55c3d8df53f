"""train: fit one configured model on a logged sample and track everything about it."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import cloudpickle

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Metric
from mlflow.models import infer_signature

from pipeline import interrupts, models, plots, tracking
from pipeline.comparison import summarize
from pipeline.config import load_model_config
from pipeline.machine import numerics
from pipeline.models import build_model, count_parameters
from pipeline.stages import sample_data
from pipeline.training import TrainSettings, resolve_device, train

STAGE = "train"
MODEL_ARTIFACT = "model"
MODEL_URI_TAG = "pipeline.model_uri"
# Pinned without local version suffixes (+cpu/+cu130) so pip can install them when serving.
MODEL_REQUIREMENTS = [
    f"torch=={torch.__version__.split('+')[0]}",
    f"mlflow=={mlflow.__version__}",
    f"numpy=={np.__version__}",
]


def run_name(params: dict) -> str:
    return f"train-{Path(params['config']).stem}-seed{params['seed']}"


def settings_from(params: dict) -> TrainSettings:
    settings = TrainSettings(
        epochs=params["epochs"], batch_size=params["batch_size"], lr=params["lr"],
        momentum=params["momentum"], seed=params["seed"],
        device=resolve_device(params["device"]), precision=params["precision"],
    )
    settings.validate()
    return settings


def cache_key(params: dict, data_run_id: str) -> str:
    """What a trained model depends on: the config's content, hyperparameters, data, and what
    about this machine changes the bits (torch build, threads, processor)."""
    config = load_model_config(params["config"])
    settings = settings_from(params)
    identity = {
        "config_digest": config.digest,
        "settings": asdict(settings),
        "normalize": params["normalize"],
        "log_model": params["log_model"],
        "data_run_id": data_run_id,
        "numerics": numerics(settings.device),
    }
    return tracking.cache_key(STAGE, identity, __name__)


def run(params: dict) -> str:
    """Train and log one model; returns the run id."""
    config_name = Path(params["config"]).stem
    tags = {"pipeline.model": config_name}
    with tracking.stage_run(STAGE, run_name(params), params, tags) as run:
        config = load_model_config(params["config"])
        mlflow.set_tag("mlflow.note.content", f"{config.name}: {config.description}")
        settings = settings_from(params)
        data_run_id = sample_data.resolve_data_run(params)
        mlflow.set_tag(tracking.CACHE_KEY_TAG, cache_key(params, data_run_id))
        tracking.log_params_once(
            {"model_config": config.name, "sample_run_id": data_run_id,
             "torch_device": settings.device, **numerics(settings.device)}
        )
        sample = sample_data.fetch_sample(data_run_id)
        sample_data.log_sample_inputs(sample, data_run_id)

        torch.manual_seed(settings.seed)
        model = build_model(config.model, normalize=params["normalize"])
        mlflow.log_metric("num_params", count_parameters(model))
        print(f"training {config.name} ({count_parameters(model):,} parameters) on "
              f"{settings.device}, {settings.epochs} epochs")

        history: list[dict] = []
        client = mlflow.MlflowClient()
        started = time.perf_counter()
        try:
            train(
                model,
                (sample.train.features(), sample.train.labels),
                (sample.test.features(), sample.test.labels),
                settings,
                on_epoch=lambda record: _log_epoch(client, run.info.run_id, record,
                                                   settings.epochs, history),
            )
        finally:
            # Even a diverged run keeps the epochs it finished.
            _log_history(history, config.name)
        summary = summarize(pd.DataFrame(history))
        summary["train_time_s"] = time.perf_counter() - started
        mlflow.log_metrics(summary)
        if params["log_model"]:
            log_model(model.cpu(), sample.test.features()[:5])
        print(f"final test accuracy {summary['final_test_accuracy']:.4f}, best "
              f"{summary['best_test_accuracy']:.4f} at epoch {summary['best_epoch']}")
        return run.info.run_id


def _log_epoch(client: mlflow.MlflowClient, run_id: str, record: dict, epochs: int,
               history: list[dict]) -> None:
    history.append(record)
    # One synchronous batch write, a few ms on SQLite (bench/logging_cost.py); MLflow's
    # asynchronous queue polls with a 1 s timeout, so flushing it can add up to a second per run.
    timestamp = int(time.time() * 1000)
    metrics = [
        Metric(key, value, timestamp, record["epoch"])
        for key, value in record.items() if key != "epoch"
    ]
    with interrupts.deferred():  # a stop signal waits for the epoch's points to be written
        client.log_batch(run_id, metrics=metrics)
    print(
        f"epoch {record['epoch']:>3}/{epochs}  "
        f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  "
        f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}  "
        f"{record['epoch_time_s']:.2f}s",
        file=sys.stderr, flush=True,
    )


def _log_history(history: list[dict], name: str) -> None:
    if not history:
        return
    frame = pd.DataFrame(history)
    mlflow.log_text(frame.to_csv(index=False), "history.csv")
    for metric, title in (("accuracy", "Accuracy"), ("loss", "Loss")):
        fig = plots.learning_curve(frame, metric, f"{name}: training and test {title.lower()} vs. epoch")
        mlflow.log_figure(fig, f"{metric}.png")
        plots.close(fig)


def log_model(model: torch.nn.Module, example: torch.Tensor) -> None:
    """Log the model with a signature; explicit requirements skip MLflow's slow inference."""
    model.eval()
    with torch.inference_mode():
        output = model(example).numpy()
    # Our own layers (models.Scale) are pickled by value, so the model loads where this
    # package is not installed.
    cloudpickle.register_pickle_by_value(models)
    try:
        info = mlflow.pytorch.log_model(
            model,
            name=MODEL_ARTIFACT,
            signature=infer_signature(example.numpy(), output),
            input_example=example.numpy(),
            pip_requirements=MODEL_REQUIREMENTS,
        )
    finally:
        cloudpickle.unregister_pickle_by_value(models)
    # MLflow 3 keeps the model as a LoggedModel (models:/m-...); record where it is.
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)

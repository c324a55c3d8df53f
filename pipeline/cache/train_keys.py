"""train's run name, settings and cache key: the config's content, the hyperparameters, the
sample run, and what about the machine changes a training's bits."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.cache.code_digest import cache_key
from pipeline.cache.machine import numerics, resolve_device
from pipeline.core.config import load_model_config
from pipeline.core.train_settings import TrainSettings


def train_run_name(params: dict) -> str:
    return f"train-{Path(params['config']).stem}-seed{params['seed']}"


def train_settings(params: dict, device: str | None = None) -> TrainSettings:
    """The training's settings, on `device` when the machine that trains it resolved it
    already (a Ray worker), else on what params' device resolves to here."""
    settings = TrainSettings(
        epochs=params["epochs"], batch_size=params["batch_size"], lr=params["lr"],
        momentum=params["momentum"], seed=params["seed"],
        device=device or resolve_device(params["device"]), precision=params["precision"],
    )
    settings.validate()
    return settings


def train_key(params: dict, data_run_id: str, machine: dict | None = None) -> str:
    """What a trained model depends on: the config's content, hyperparameters, data, and what
    about the machine that trains it changes the bits (device, torch build, threads,
    processor): this one's, unless `machine` gives a worker's (its resolved `device` and
    `numerics`, as ray_tasks.machine_numerics reports them)."""
    config = load_model_config(params["config"])
    settings = train_settings(params, machine["device"] if machine is not None else None)
    identity = {
        "config_digest": config.digest,
        "settings": asdict(settings),
        "normalize": params["normalize"],
        "log_model": params["log_model"],
        "data_run_id": data_run_id,
        "numerics": machine["numerics"] if machine is not None else numerics(settings.device),
    }
    return cache_key("train", identity, "pipeline.stages.train")

"""Each stage's run names and cache keys, worked out from parameters, configs, file digests and
source text only.

Nothing here imports torch, matplotlib or scikit-learn, so a `main` whose stages are all cached
decides that in the time it takes to import MLflow; a stage module loads its heavy parts only
when it runs. Each key still covers the stage module's whole source (tracking.cache_key).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import mlflow

from pipeline import sampling, tracking
from pipeline.config import load_model_config
from pipeline.file_digests import file_digest
from pipeline.machine import numerics, resolve_device
from pipeline.train_settings import TrainSettings

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
    return tracking.cache_key("sample_data", identity, "pipeline.stages.sample_data")


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
    return tracking.cache_key("train", identity, "pipeline.stages.train")


def evaluate_run_name(source_run: str | None) -> str:
    if source_run:
        name = mlflow.get_run(source_run).info.run_name or source_run
        return "evaluate-" + name.removeprefix("train-")
    return "evaluate"


def evaluate_key(params: dict, source_run: str | None, data_run_id: str) -> str:
    identity = {"model_uri": params["model_uri"], "source_run": source_run, "data": data_run_id}
    return tracking.cache_key("evaluate", identity, "pipeline.stages.evaluate")


def compare_key(params: dict, train_run_ids: list[str]) -> str:
    identity = {"runs": sorted(train_run_ids), "name": params["registered_model_name"],
                "register": params["register"],
                **{k: params[k] for k in ("detectable_difference_pp", "equivalence_margin_pp",
                                          "first_stage_seeds", "target_half_width_pp")}}
    return tracking.cache_key("compare", identity, "pipeline.stages.compare")


def tune_trial_key(space, data_run_id: str, threads: int, device: str) -> str:
    """What makes two sweep trials interchangeable: the sweep's space, epochs, split, seed and
    ASHA rules (`space.digest`, not the number of trials), the sample, the trial's code and
    what changes its bits here (torch build, the trial's threads, the processor or GPU)."""
    identity = {
        "space": space.digest, "data_run_id": data_run_id, "device": device,
        "numerics": {**numerics(device), "torch_threads": threads},
    }
    return tracking.cache_key("tune_trial", identity, "pipeline.tune_trial")

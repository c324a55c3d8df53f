"""The MLflow side of every stage: experiments, stage runs, parameters, and the stage cache."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from typing import Iterator

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError

DEFAULT_EXPERIMENT = "mnist-mlp"
STAGE_TAG = "pipeline.stage"
CACHE_KEY_TAG = "pipeline.cache_key"
ERROR_TAG = "pipeline.error"
# Without this tag MLflow 3's UI opens the experiment in GenAI mode instead of runs and charts.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def use_experiment(name: str | None = None) -> None:
    """Select the experiment for runs this process starts.

    Under `mlflow run` the experiment is already chosen (MLFLOW_EXPERIMENT_ID), so leave it.
    """
    if os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_RUN_ID"):
        return
    mlflow.set_experiment(name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)


def format_param(value: object) -> str:
    """One spelling per value, so runs started either way show identical params."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def log_params_once(params: dict) -> None:
    """Log params the run does not hold yet.

    `mlflow run` logs every entry-point parameter before our code starts (as the user typed
    it, e.g. `1e-2`); logging the same key again with another spelling would fail.
    """
    run = mlflow.active_run()
    present = mlflow.get_run(run.info.run_id).data.params
    missing = {k: format_param(v) for k, v in params.items() if k not in present}
    if missing:
        mlflow.log_params(missing)


@contextmanager
def stage_run(stage: str, run_name: str, params: dict, tags: dict | None = None) -> Iterator:
    """A run for one stage: nested under the active run if there is one.

    A PipelineError inside marks the run FAILED and records the message as a tag, so the UI
    says why the run failed.
    """
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        _tag_experiment(run)
        mlflow.set_tags({STAGE_TAG: stage, **(tags or {})})
        log_params_once(params)
        try:
            yield run
        except PipelineError as err:
            mlflow.set_tag(ERROR_TAG, str(err)[:5000])
            raise


def _tag_experiment(run) -> None:
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(run.info.experiment_id)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(run.info.experiment_id, key, value)


def code_version(modules: tuple[str, ...]) -> str:
    """Digest of the source of the modules a stage's output depends on."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        origin = importlib.util.find_spec(name).origin
        with open(origin, "rb") as source:
            digest.update(name.encode() + b"\0" + source.read())
    return digest.hexdigest()[:16]


def cache_key(stage: str, identity: dict, modules: tuple[str, ...]) -> str:
    """What makes two runs of a stage interchangeable: stage, inputs, upstream runs, code."""
    payload = json.dumps(
        {"stage": stage, "identity": identity, "code": code_version(modules)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def find_cached_run(key: str) -> Run | None:
    """The newest FINISHED run in the current experiment with this cache key, if any."""
    runs = mlflow.search_runs(
        filter_string=f"tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def get_stage_run(run_id: str, stage: str, purpose: str) -> Run:
    """A FINISHED run of `stage`, or a PipelineError saying what is wrong with `run_id`."""
    try:
        run = mlflow.get_run(run_id)
    except MlflowException as err:
        raise PipelineError(
            f"{purpose}: run {run_id!r} does not exist in the tracking store "
            f"{mlflow.get_tracking_uri()}; check the id in the MLflow UI"
        ) from err
    actual = run.data.tags.get(STAGE_TAG)
    if actual != stage:
        raise PipelineError(
            f"{purpose}: run {run_id} is a {actual or 'non-pipeline'} run, not a {stage} run"
        )
    if run.info.status != "FINISHED":
        raise PipelineError(
            f"{purpose}: run {run_id} is {run.info.status}, not FINISHED; wait for it to finish "
            f"or pass a finished run"
        )
    return run

"""Registering the best model and keeping the `champion` alias on the most accurate version."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError

CHAMPION = "champion"
OWNER_TAG = "pipeline.project"
OWNER = "mnist-mlp-pipeline"
ACCURACY_TAG = "test_accuracy"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    champion_version: str
    alias_moved: bool


def _ensure_registered_model(client: mlflow.MlflowClient, name: str) -> None:
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, tags={OWNER_TAG: OWNER},
            description="MNIST classifiers from the mnist-mlp pipeline; @champion is the most "
                        "accurate on the test sample.",
        )
        return
    if model.tags.get(OWNER_TAG) != OWNER:
        raise PipelineError(
            f"registered model {name!r} already exists and was not created by this pipeline; "
            f"pass another registered_model_name (or tag it {OWNER_TAG}={OWNER} to adopt it)"
        )


def register_best(
    name: str, run_id: str, model_uri: str, config: str, test_accuracy: float
) -> Registration:
    """Register the model of `run_id` (once per run) and make it champion if it beats the
    current champion's recorded test accuracy."""
    client = mlflow.MlflowClient()
    _ensure_registered_model(client, name)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0]
    else:
        version = mlflow.register_model(
            model_uri, name,
            tags={"source_run_id": run_id, "config": config, ACCURACY_TAG: f"{test_accuracy:.6f}"},
        )
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    beats = champion is None or test_accuracy > float(champion.tags.get(ACCURACY_TAG, "-inf"))
    if beats and (champion is None or champion.version != version.version):
        client.set_registered_model_alias(name, CHAMPION, version.version)
        return Registration(name, str(version.version), str(version.version), True)
    return Registration(name, str(version.version), str(champion.version), False)

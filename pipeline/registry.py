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
# The digest MLflow gave the test split the accuracy was measured on (the run's dataset input).
SAMPLE_TAG = "test_sample_digest"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    champion_version: str
    alias_moved: bool
    note: str = ""  # why the alias stayed, when the accuracies could not be compared


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
    name: str, run_id: str, model_uri: str, config: str, test_accuracy: float,
    test_sample_digest: str,
) -> Registration:
    """Register the model of `run_id` (once per run) and make it champion if it beats the
    current champion's recorded test accuracy on the same test sample.

    Accuracies on different test samples are not comparable (a smaller or easier sample can
    score higher), so a champion scored on another sample keeps the alias, with a note.
    """
    client = mlflow.MlflowClient()
    _ensure_registered_model(client, name)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0]
    else:
        version = mlflow.register_model(
            model_uri, name,
            tags={"source_run_id": run_id, "config": config, ACCURACY_TAG: f"{test_accuracy:.6f}",
                  SAMPLE_TAG: test_sample_digest},
        )
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and champion.version == version.version:
        return Registration(name, str(version.version), str(version.version), False)
    if champion is not None and champion.tags.get(SAMPLE_TAG) != test_sample_digest:
        note = (f"champion version {champion.version} was scored on another test sample "
                f"(digest {champion.tags.get(SAMPLE_TAG) or 'unknown'}, this one "
                f"{test_sample_digest}), so their accuracies are not comparable and the alias "
                f"stays; use another registered_model_name for this sample, or move the alias "
                f"by hand")
        return Registration(name, str(version.version), str(champion.version), False, note)
    if champion is None or test_accuracy > float(champion.tags.get(ACCURACY_TAG, "-inf")):
        client.set_registered_model_alias(name, CHAMPION, version.version)
        return Registration(name, str(version.version), str(version.version), True)
    return Registration(name, str(version.version), str(champion.version), False)

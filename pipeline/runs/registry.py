"""Registering the best model and keeping the `champion` alias on the most accurate version."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError
from pipeline.runs import tracking

CHAMPION = "champion"
OWNER_TAG = "pipeline.project"
OWNER = "mnist-mlp-pipeline"
ACCURACY_TAG = "test_accuracy"
# The digest MLflow gave the test split the accuracy was measured on (the run's dataset input).
SAMPLE_TAG = "test_sample_digest"
# On a compare run: the train run whose model it registered.
BEST_RUN_TAG = "pipeline.best_run_id"


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


def register(registered_model_name: str, train_run_id: str) -> Registration:
    """Register a train run's model and let it compete for the alias."""
    trained = mlflow.get_run(train_run_id)
    model_uri = trained.data.tags.get(tracking.MODEL_URI_TAG)
    if not model_uri:
        raise PipelineError(f"train run {train_run_id} logged no model (log_model=false); "
                            f"pass register=false or retrain with log_model=true")
    config = trained.data.params.get("model_config", "")
    result = register_best(
        registered_model_name, train_run_id, model_uri, config,
        float(trained.data.metrics["final_test_accuracy"]), test_sample_digest(trained),
    )
    print(f"registered {config} ({train_run_id}) as {result.name} version {result.version}; "
          f"champion is version {result.champion_version}"
          f"{' (alias moved)' if result.alias_moved else ''}")
    if result.note:
        print(f"note: {result.note}")
    return result


def test_sample_digest(run) -> str:
    """The digest of the test split a train run was scored on (its `testing` dataset input)."""
    for item in run.inputs.dataset_inputs:
        if {t.key: t.value for t in item.tags}.get("mlflow.data.context") == "testing":
            return item.dataset.digest
    raise PipelineError(f"train run {run.info.run_id} records no test dataset input, so its "
                        f"accuracy cannot be compared with the champion's; retrain it")


def restore_registration(compare_run) -> None:
    """For a reused compare run: put back a deleted version or a moved alias.

    The registry is not part of compare's cache key (it changes outside any run), so a reused
    compare re-checks it.
    """
    params = compare_run.data.params
    best = compare_run.data.tags.get(BEST_RUN_TAG)
    if params.get("register", "true") == "true" and best:
        register(params["registered_model_name"], best)

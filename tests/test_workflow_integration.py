"""The whole study through `mlflow run .` (default entry point `main`) on the real MNIST files.

Two epochs of the default depth study (mlp3 vs mlp4, one seed, the first 600 images of each
digit), then the same command again, which must reuse every stage.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import (
    download,
    REAL_DATA_ROOT,
    REPO_ROOT,
    Experiment,
    create_experiment,
    requires_real_mnist,
    runs_in,
    subprocess_env,
)
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, requires_real_mnist]

MLFLOW = Path(sys.executable).parent / "mlflow"
STAGE_TAG = "pipeline.stage"
PARENT_TAG = "mlflow.parentRunId"
COMPARE_ARTIFACTS = {
    "accuracy.png", "loss.png", "epoch_time.png", "comparison.csv", "comparison.md",
    "comparison.html", "runs.csv", "pairwise.csv", "conclusion.md",
}


def mlflow_run_main(store, experiment: Experiment, *params: str, timeout: float = 300):
    """`mlflow run .` with the default entry point (main), as a user types it."""
    command = [str(MLFLOW), "run", ".", "--env-manager", "local",
               "--experiment-name", experiment.name]
    for param in params:
        command += ["-P", param]
    return subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(store),
                          capture_output=True, text=True, timeout=timeout)


def output(result) -> str:
    return result.stdout[-3000:] + result.stderr[-3000:]




@dataclass(frozen=True)
class Study:
    experiment: Experiment
    model_name: str
    params: tuple[str, ...]
    parent_id: str


@pytest.fixture(scope="module")
def study(tracking_store) -> Study:
    experiment = create_experiment(tracking_store, "integration-main")
    model_name = f"mnist-mlp-it-{uuid.uuid4().hex[:8]}"
    params = (f"data_dir={REAL_DATA_ROOT}", "epochs=2", f"registered_model_name={model_name}")
    result = mlflow_run_main(tracking_store, experiment, *params)
    assert result.returncode == 0, output(result)
    [parent] = runs_in(experiment, "main")
    return Study(experiment, model_name, params, parent.info.run_id)


def test_mlflow_run_main_leaves_a_parent_with_every_stage_nested(study: Study):
    parent = mlflow.get_run(study.parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["epochs"] == "2"
    assert parent.data.metrics["stages_run"] == 6

    everything = runs_in(study.experiment)
    children = [r for r in everything if r.info.run_id != study.parent_id]
    assert all(r.data.tags.get(PARENT_TAG) == study.parent_id for r in children), \
        "a stage run is not nested under the parent"
    stages: dict[str, list] = {}
    for run in children:
        assert run.info.status == "FINISHED", run.info.run_name
        stages.setdefault(run.data.tags[STAGE_TAG], []).append(run)
    assert {s: len(r) for s, r in stages.items()} == {
        "sample_data": 1, "train": 2, "evaluate": 2, "compare": 1}

    [sample] = stages["sample_data"]
    assert sample.data.metrics["train_examples"] == 6000
    assert sample.data.metrics["test_examples"] == 6000
    trains = {r.data.params["model_config"]: r for r in stages["train"]}
    assert set(trains) == {"mlp3", "mlp4"}
    for run in trains.values():
        assert run.data.params["epochs"] == "2"
        assert run.data.params["sample_run_id"] == sample.info.run_id
        assert run.data.metrics["final_test_accuracy"] > 0.85
    scored = {r.data.tags["pipeline.source_run_id"]: r for r in stages["evaluate"]}
    assert set(scored) == {r.info.run_id for r in trains.values()}
    for train_id, run in scored.items():
        assert run.data.metrics["test_accuracy"] == \
            mlflow.get_run(train_id).data.metrics["final_test_accuracy"]
        assert {"confusion_matrix.png", "misclassified.png"} <= {
            a.path for a in MlflowClient().list_artifacts(run.info.run_id)}


def test_mlflow_run_main_compares_both_models(study: Study):
    [comparison] = [r for r in runs_in(study.experiment, "compare")
                    if r.data.tags.get(PARENT_TAG) == study.parent_id]
    run_id = comparison.info.run_id
    assert COMPARE_ARTIFACTS <= {a.path for a in MlflowClient().list_artifacts(run_id)}
    for document in ("comparison.md", "comparison.html", "conclusion.md"):
        text = download(run_id, document).read_text()
        assert "mlp3" in text and "mlp4" in text, document
    table = pd.read_csv(download(run_id, "comparison.csv"), index_col="config")
    assert set(table.index) == {"mlp3", "mlp4"}
    assert table.loc["mlp3", "num_params"] == 670_730
    assert table.loc["mlp4", "num_params"] == 934_410
    note = comparison.data.tags["mlflow.note.content"]
    best, other = table.sort_values("final_test_accuracy", ascending=False).index
    # one seed per model: no winner, no significance
    assert note.splitlines()[0].startswith(
        f"No winner between {best} and {other} on final test accuracy: ")
    assert "no significance can be claimed" in note.splitlines()[0]


def test_mlflow_run_main_registers_a_champion_that_loads_and_predicts(study: Study):
    from pipeline.runs.samples import fetch_sample

    trains = {r.info.run_id: r.data.metrics["final_test_accuracy"]
              for r in runs_in(study.experiment, "train")}
    version = MlflowClient().get_model_version_by_alias(study.model_name, "champion")
    assert version.run_id in trains
    assert trains[version.run_id] == max(trains.values())

    [sample] = runs_in(study.experiment, "sample_data")
    data = fetch_sample(sample.info.run_id)
    model = mlflow.pyfunc.load_model(f"models:/{study.model_name}@champion")
    x = data.test.features().numpy()
    digits = model.predict(x)["digit"].to_numpy()
    assert digits.shape == (len(x),)
    accuracy = float((digits == data.test.labels.numpy()).mean())
    assert accuracy == pytest.approx(trains[version.run_id], abs=1e-9)


def test_a_second_mlflow_run_reuses_every_stage(tracking_store, study: Study):
    before = {r.info.run_id for r in runs_in(study.experiment)}
    trains_before = {r.info.run_id for r in runs_in(study.experiment, "train")}
    result = mlflow_run_main(tracking_store, study.experiment, *study.params)
    assert result.returncode == 0, output(result)

    new = [r for r in runs_in(study.experiment) if r.info.run_id not in before]
    assert [r.data.tags[STAGE_TAG] for r in new] == ["main"], "a stage ran again"
    assert {r.info.run_id for r in runs_in(study.experiment, "train")} == trains_before
    [parent] = new
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["stages_reused"] == 6
    assert parent.data.metrics["stages_run"] == 0
    table = pd.read_csv(download(parent.info.run_id, "stages.csv"))
    assert table["reused"].all() and set(table["run_id"]) <= before


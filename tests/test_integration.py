"""The train entry point through `mlflow run . --env-manager local`: MLproject's wiring of its
parameters, its exit code and error line. On the session's tiny MNIST: what training reaches on
the real files is proven by tests/test_workflow_integration.py's study."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import REPO_ROOT, create_experiment, runs_in, subprocess_env
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

MLFLOW = Path(sys.executable).parent / "mlflow"
PER_EPOCH = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def mlflow_run(store, experiment, *params: str, timeout: float = 300):
    command = [str(MLFLOW), "run", ".", "-e", "train"]
    for param in params:
        command += ["-P", param]
    command += ["--env-manager", "local", "--experiment-name", experiment.name]
    return subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(store),
                          capture_output=True, text=True, timeout=timeout)


def output(result) -> str:
    return result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def mlp4_run(tracking_store, shared_tiny_mnist):
    experiment = create_experiment(tracking_store, "integration-mlp4")
    result = mlflow_run(tracking_store, experiment, "config=experiments/mlp4.yaml", "epochs=2",
                        f"data_dir={shared_tiny_mnist.root}", "samples_per_class=12")
    assert result.returncode == 0, output(result)
    return experiment, result


def test_mlflow_run_train_mlp4_leaves_a_complete_finished_run(mlp4_run):
    experiment, result = mlp4_run
    client = MlflowClient()
    [run] = runs_in(experiment, "train")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["config"] == "experiments/mlp4.yaml"
    assert run.data.params["model_config"] == "mlp4"
    assert run.data.params["epochs"] == "2"
    assert run.data.params["samples_per_class"] == "12"
    assert run.data.metrics["num_params"] == 934_410

    for key in (*PER_EPOCH, "epoch_time_s"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert all(math.isfinite(m.value) for m in history), key
    test_accuracy = [m.value for m in client.get_metric_history(run_id, "test_accuracy")]
    assert run.data.metrics["final_test_accuracy"] == test_accuracy[-1]

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"accuracy.png", "loss.png", "history.csv"} <= artifacts
    history = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                              artifact_path="history.csv"))
    assert history["epoch"].tolist() == [1, 2]

    # It drew the sample itself: the first 12 of each digit, in a finished sample run.
    [sample] = runs_in(experiment, "sample_data")
    assert sample.info.status == "FINISHED"
    assert run.data.params["sample_run_id"] == sample.info.run_id
    assert sample.data.metrics["train_examples"] == 120
    assert sample.data.metrics["test_examples"] == 120


def test_mlflow_run_train_with_zero_epochs_leaves_a_failed_run(tracking_store, shared_tiny_mnist):
    experiment = create_experiment(tracking_store, "integration-epochs-0")
    result = mlflow_run(tracking_store, experiment, "epochs=0",
                        f"data_dir={shared_tiny_mnist.root}",
                        timeout=120)
    # `python -m pipeline` exits 2 (tests/test_cli.py); `mlflow run` turns any failed entry
    # point into its own exit code 1 (its CLI catches ExecutionException and calls
    # sys.exit(1)). The stage's one-line error comes first, then MLflow's line naming the
    # failed run. The one process boundary of a refused parameter: no traceback on the way.
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr, output(result)
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == ["error: epochs must be a positive integer, got 0"], output(result)
    stage_error = lines.index(errors[0])
    assert any("=== Run (ID" in line and "failed ===" in line for line in lines[stage_error:])
    [run] = runs_in(experiment)
    assert run.info.status == "FAILED"
    assert run.data.tags["pipeline.error"] == "epochs must be a positive integer, got 0"

"""The tracking server goes away mid-training: a real `mlflow server` on 127.0.0.1, stopped
and restarted by the test. Training must not wait for it, and no metric point may be lost."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, subprocess_env
from mlflow import MlflowClient
from test_interrupts import Stage

from pipeline.server.tracking_server import TrackingServer

OUTAGE_S = 30
EPOCHS = 40


@pytest.fixture
def server(tmp_path):
    """`mlflow server` on SQLite with proxied artifacts; the tests stop and restart it."""
    tracking = TrackingServer(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.start()
    yield tracking
    tracking.stop()


def train_command(data_dir: Path, experiment: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--experiment", experiment,
            "--config", "mlp4", "--epochs", str(EPOCHS), "--batch_size", "2", "--device", "cpu",
            "--log_model", "false", "--samples_per_class", "12", "--data_dir", str(data_dir)]


def server_env(tracking_store, server: TrackingServer, **extra: str) -> dict:
    # Training on one thread leaves the other core to the server (which on a team sits on
    # another machine): the test is about waiting for the server, not sharing two cores with it.
    return {**subprocess_env(tracking_store), "MLFLOW_TRACKING_URI": server.uri,
            "OMP_NUM_THREADS": "1", **extra}


def epochs_printed(stage: Stage) -> int:
    return sum(line.startswith("epoch ") for line in list(stage.lines))


def only_train_run(server: TrackingServer, experiment: str):
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("pipeline.stage") == "train"]
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.integration
def test_a_30_second_outage_neither_stops_training_nor_loses_a_point(
    tracking_store, shared_tiny_mnist, server
):
    # MLflow's own HTTP retries back off for up to minutes; without them the pipeline's
    # writer retries every second, so the points arrive as soon as the server is back.
    stage = Stage(train_command(shared_tiny_mnist.root, "outage"),
                  server_env(tracking_store, server, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"))
    try:
        stage.wait_for("epoch   5/")
        server.stop()
        before = epochs_printed(stage)
        time.sleep(OUTAGE_S)
        during = epochs_printed(stage) - before
        server.start()
        assert stage.process.wait(timeout=600) == 0, "\n".join(stage.lines[-20:])
    finally:
        stage.stop()

    client, run = only_train_run(server, "outage")
    assert run.info.status == "FINISHED"
    for metric in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), metric
    # Behaviour, not a timing: an epoch takes about a second, so a training that waited for
    # the server would finish at most one epoch while it was down (timings: bench/).
    assert during >= 3, f"{during} epochs in a {OUTAGE_S} s outage: training waited for the server"
    assert "checkpoints/checkpoint.pt" in {
        a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}


@pytest.mark.integration
def test_a_server_gone_for_good_fails_the_run_in_one_line_and_resume_finishes_it(
    tracking_store, shared_tiny_mnist, server
):
    env = server_env(tracking_store, server, PIPELINE_TRACKING_RETRY_S="3",
                     MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    stage = Stage(train_command(shared_tiny_mnist.root, "gone"), env)
    try:
        stage.wait_for("epoch   3/")
        server.stop()
        assert stage.process.wait(timeout=300) == 2
    finally:
        stage.stop()
    errors = [line for line in stage.lines if line.startswith("error:")]
    assert len(errors) == 1 and server.uri in errors[0]
    assert "resume the run with resume_run_id=" in errors[0]
    assert not any("Traceback" in line for line in stage.lines)

    server.start()
    client, run = only_train_run(server, "gone")
    assert run.info.status == "RUNNING"  # the server could not be told otherwise
    resumed = subprocess.run(
        [*train_command(shared_tiny_mnist.root, "gone"), "--resume_run_id", run.info.run_id],
        cwd=REPO_ROOT, env=server_env(tracking_store, server), capture_output=True, text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))

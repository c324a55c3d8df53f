"""The tracking server goes away mid-training: a real `mlflow server` on 127.0.0.1, stopped
and restarted by the test. Training must not wait for it, and no metric point may be lost."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, subprocess_env
from mlflow import MlflowClient
from test_interrupts import Stage

from pipeline.server.tracking_server import TrackingServer, healthy

# The run the server leaves for good: long enough to still be training when it goes (after
# epoch 3), each epoch one more to train and resume.
EPOCHS = 20
# MLflow's HTTP retries as the pipeline sets them (tracking_access.HTTP_DEFAULTS): a request to
# a stopped server gives up after pauses of 0, 2 and 4 s. A tracking call on the training
# thread would hold an epoch up at least that long.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
ONE_REQUEST_GIVING_UP_S = 6
# Training's own time between two epochs (writing down the record, handing over the
# checkpoint) is milliseconds; generous, and well below what one tracking call would take.
MAX_WAIT_BETWEEN_EPOCHS_S = 3
EPOCH_LINE = re.compile(r"^epoch +(\d+)/\d+ .* ([0-9.]+)s$")


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """`mlflow server` on SQLite with proxied artifacts, started once for this module (each
    test has an experiment of its own on it)."""
    root = tmp_path_factory.mktemp("outage-server")
    tracking = TrackingServer(root, f"sqlite:///{root / 'mlflow.db'}")
    tracking.start()
    yield tracking
    tracking.stop()


@pytest.fixture
def server(module_server):
    """The module's server, up: the tests stop and restart it (and one that failed during its
    outage may have left it down)."""
    if not healthy(module_server.uri):
        module_server.stop()
        module_server.start()
    return module_server


class TimedStage(Stage):
    """A Stage that also notes when each of its lines arrived."""

    def __init__(self, command: list[str], env: dict):
        self.arrived: list[float] = []
        super().__init__(command, env)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.arrived.append(time.monotonic())
            self.lines.append(line.rstrip("\n"))

    def epochs(self) -> list[tuple[int, float, float]]:
        """(epoch, when its line arrived, its own epoch_time_s) for each epoch line so far."""
        found = []
        for line, arrived in zip(list(self.lines), self.arrived):
            match = EPOCH_LINE.match(line)
            if match:
                found.append((int(match[1]), arrived, float(match[2])))
        return found


def train_command(data_dir: Path, experiment: str, epochs: int = EPOCHS) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--experiment", experiment,
            "--config", "mlp4", "--epochs", str(epochs), "--batch_size", "2", "--device", "cpu",
            "--log_model", "false", "--samples_per_class", "12", "--data_dir", str(data_dir)]


def server_env(tracking_store, server: TrackingServer, **extra: str) -> dict:
    # Training on one thread leaves the other core to the server (which on a team sits on
    # another machine): the test is about waiting for the server, not sharing two cores with it.
    return {**subprocess_env(tracking_store), "MLFLOW_TRACKING_URI": server.uri,
            "OMP_NUM_THREADS": "1", **extra}


def only_train_run(server: TrackingServer, experiment: str):
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("pipeline.stage") == "train"]
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.integration
def test_no_epoch_waits_for_a_server_that_is_down_and_no_point_is_lost(
    tracking_store, shared_tiny_mnist, server
):
    epochs = 80  # goes on through the outage, on a fast machine too
    # Every tracking call of a training meets the outage: metric points, a checkpoint upload
    # each second, system metrics each second.
    env = server_env(tracking_store, server, **HTTP_RETRIES, PIPELINE_CHECKPOINT_UPLOAD_S="1",
                     MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    stage = TimedStage(train_command(shared_tiny_mnist.root, "outage", epochs), env)
    try:
        stage.wait_for("epoch   5/")
        server.stop()
        stopped, before = time.monotonic(), len(stage.epochs())
        # Down until a tracking call has had the time to give up once, and epochs went on
        # meanwhile: whatever would wait for the server has had its chance to.
        while (time.monotonic() - stopped < ONE_REQUEST_GIVING_UP_S + 2
               or len(stage.epochs()) - before < 3):
            assert stage.process.poll() is None, "\n".join(stage.lines[-20:])
            time.sleep(0.1)
        server.start()
        assert stage.process.wait(timeout=600) == 0, "\n".join(stage.lines[-20:])
    finally:
        stage.stop()

    # Between two epoch lines: the training thread's own time (the later epoch's epoch_time_s,
    # which a busy machine stretches) and anything else it did, such as waiting for the server.
    timeline = stage.epochs()
    waited = {epoch: round(arrived - prior - epoch_time, 2)
              for (_, prior, _), (epoch, arrived, epoch_time) in zip(timeline, timeline[1:])}
    slowest = sorted(waited.items(), key=lambda item: -item[1])[:3]
    assert slowest[0][1] < MAX_WAIT_BETWEEN_EPOCHS_S, (
        f"the training thread waited between epochs (epoch, s): {slowest}")
    client, run = only_train_run(server, "outage")
    assert run.info.status == "FINISHED"
    for metric in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == list(range(1, epochs + 1)), metric
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

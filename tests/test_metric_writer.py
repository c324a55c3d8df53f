"""MetricWriter against a real store that refuses writes for a while: a deleted run refuses
every write until it is restored, the way a server refuses them while it is away."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest

from pipeline.errors import PipelineError
from pipeline.runs import metric_writer
from pipeline.runs.metric_writer import MetricWriter


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """A tenth of the writer's pause between tries: the tests wait for what happens, and the
    pause only stretched each wait to the next second."""
    monkeypatch.setattr(metric_writer, "RETRY_PAUSE_S", 0.1)


@pytest.fixture
def run_id(experiment) -> str:
    return mlflow.MlflowClient().create_run(experiment.id).info.run_id


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.05)


def test_an_outage_that_ended_leaves_no_error_behind(run_id):
    client = mlflow.MlflowClient()
    writer = MetricWriter(client, run_id)
    client.delete_run(run_id)
    writer.log({"test_loss": 1.0}, step=1)
    wait_until(lambda: writer.last_error is not None)
    client.restore_run(run_id)
    writer.flush(timeout=30)
    writer.log({"test_loss": 0.5}, step=2)
    writer.flush(timeout=30)
    writer.close()
    # The failure path of train skips its flush while the writer is failing: it is not.
    assert writer.last_error is None
    assert [m.step for m in client.get_metric_history(run_id, "test_loss")] == [1, 2]


def test_the_retry_window_counts_from_the_end_of_training(run_id, monkeypatch):
    monkeypatch.setenv(metric_writer.RETRY_WINDOW_ENV, "2")
    client = mlflow.MlflowClient()
    writer = MetricWriter(client, run_id)
    client.delete_run(run_id)
    writer.log({"test_loss": 1.0}, step=1)
    wait_until(lambda: writer.last_error is not None)
    time.sleep(2.5)  # training goes on while the store refuses, longer than the window
    # Training ends; the store takes writes again 0.5 s later, well inside the window.
    threading.Timer(0.5, client.restore_run, [run_id]).start()
    writer.flush()
    writer.close()
    assert [m.step for m in client.get_metric_history(run_id, "test_loss")] == [1]


def test_past_the_window_after_training_the_points_are_declared_lost(run_id, monkeypatch):
    monkeypatch.setenv(metric_writer.RETRY_WINDOW_ENV, "1")
    client = mlflow.MlflowClient()
    writer = MetricWriter(client, run_id)
    client.delete_run(run_id)
    writer.log({"test_loss": 1.0}, step=1)
    started = time.monotonic()
    with pytest.raises(PipelineError, match=f"resume_run_id={run_id}"):
        writer.flush()
    assert time.monotonic() - started < 30
    writer.close()

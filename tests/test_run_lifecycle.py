"""The edges of a train run's life: what it records when it is short, and how it ends when a
stop signal comes at the very end."""

from __future__ import annotations

import os
import signal
import time

import mlflow
import pytest
from conftest import runs_in, train_overrides
from mlflow import MlflowClient

from pipeline import interrupts
from pipeline.parameters import stage_params
from pipeline.runs import tracking
from pipeline.stages import train

SYSTEM_METRICS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")


def test_a_run_shorter_than_the_sampling_interval_records_system_metrics(
    experiment, sample_run, monkeypatch
):
    """A 1-epoch tiny training is over long before MLflow's first sample (10 s by default,
    here 10 minutes so that a slow machine cannot reach it); it still gets one sample at its
    start and one at its end."""
    monkeypatch.setenv(tracking.SYSTEM_METRICS_INTERVAL_ENV, "600")
    run_id = train.run(stage_params("train", train_overrides(sample_run, epochs=1)))
    for name in SYSTEM_METRICS:
        steps = [m.step for m in MlflowClient().get_metric_history(run_id, name)]
        assert sorted(steps) == [0, 1], (name, steps)


SUMMARY = ("final_test_accuracy", "best_test_accuracy", "best_epoch", "train_time_s")


def logged_models(run) -> list:
    return [m for m in mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")]


def stopped_after(function):
    """`function`, which once it has run sends this process a real SIGTERM."""
    def then_stopped(*args, **kwargs):
        result = function(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, long before this is over
        return result
    return then_stopped


def upload_then_stopped(close):
    """CheckpointStore.close, stopped by SIGTERM as it sets out to upload the final checkpoint."""
    def closing(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return close(self, *args, **kwargs)
    return closing


@pytest.mark.parametrize("moment", ["after log_model", "as the final checkpoint upload starts"])
def test_a_stop_at_the_very_end_is_resumed_without_logging_anything_twice(
    experiment, sample_run, monkeypatch, moment
):
    """SIGTERM arrives once the model is logged: the run ends KILLED with all its work done;
    the resume finishes it and logs nothing again."""
    log_model, close = train.log_model, train.CheckpointStore.close
    if moment == "after log_model":
        monkeypatch.setattr(train, "log_model", stopped_after(log_model))
    else:
        monkeypatch.setattr(train.CheckpointStore, "close", upload_then_stopped(close))
    params = stage_params("train", train_overrides(sample_run, epochs=2, log_model=True))
    with interrupts.installed(), pytest.raises(interrupts.Interrupted):
        train.run(params)
    [run] = runs_in(experiment, "train")
    assert run.info.status == "KILLED"
    assert len(logged_models(run)) == 1
    model_uri = run.data.tags[tracking.MODEL_URI_TAG]
    monkeypatch.setattr(train, "log_model", log_model)
    monkeypatch.setattr(train.CheckpointStore, "close", close)

    assert train.run({**params, "resume_run_id": run.info.run_id}) == run.info.run_id
    after = mlflow.get_run(run.info.run_id)
    assert after.info.status == "FINISHED"
    client = MlflowClient()
    for name in SUMMARY:
        assert len(client.get_metric_history(run.info.run_id, name)) == 1, name
    assert after.data.metrics["train_time_s"] == run.data.metrics["train_time_s"]
    assert len(logged_models(after)) == 1, "the model was logged a second time"
    assert after.data.tags[tracking.MODEL_URI_TAG] == model_uri

"""The edges of a train run's life: what it records when it is short, and how it ends when a
stop signal comes at the very end."""

from __future__ import annotations

import mlflow
from conftest import train_overrides
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.cli import stage_params
from pipeline.stages import train

SYSTEM_METRICS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")


def test_a_run_shorter_than_the_sampling_interval_records_system_metrics(
    experiment, sample_run, monkeypatch
):
    """With the default 10 s interval a 1-epoch tiny training is over long before the first
    sample; it still gets one at its start and one at its end."""
    monkeypatch.delenv(tracking.SYSTEM_METRICS_INTERVAL_ENV, raising=False)
    run_id = train.run(stage_params("train", train_overrides(sample_run, epochs=1)))
    run = mlflow.get_run(run_id)
    assert (run.info.end_time - run.info.start_time) / 1000 < tracking.SYSTEM_METRICS_INTERVAL_S
    for name in SYSTEM_METRICS:
        steps = [m.step for m in MlflowClient().get_metric_history(run_id, name)]
        assert sorted(steps) == [0, 1], (name, steps)

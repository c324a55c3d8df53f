"""What MLflow logging costs per call on the default SQLite store: per-epoch metrics three ways,
and one mlflow.pytorch.log_model of each MLP. Not a test: it prints.

    python bench/logging_cost.py --data_dir ../shared/datasets
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric  # noqa: E402

from pipeline.core.config import load_model_config  # noqa: E402
from pipeline.core.data import draw_sample  # noqa: E402
from pipeline.core.models import build_model  # noqa: E402
from pipeline.stages.train import log_model  # noqa: E402
from scratch import scratch_folder  # noqa: E402

METRICS = {"train_loss": 0.1, "train_accuracy": 0.9, "test_loss": 0.2, "test_accuracy": 0.8,
           "epoch_time_s": 0.4}


def per_call_ms(fn, calls=20):
    started = time.perf_counter()
    for step in range(calls):
        fn(step)
    return (time.perf_counter() - started) / calls * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    args = parser.parse_args()
    mlflow.set_tracking_uri(f"sqlite:///{scratch_folder('bench-logging-')}/mlflow.db")
    mlflow.set_experiment("bench-logging")
    example = draw_sample(args.data_dir, 1).test.features()[:5]
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        fluent = per_call_ms(lambda s: mlflow.log_metrics(METRICS, step=s))
        batch = per_call_ms(lambda s: client.log_batch(run.info.run_id, metrics=[
            Metric(k, v, int(time.time() * 1000), 100 + s) for k, v in METRICS.items()]))
        queued = per_call_ms(lambda s: mlflow.log_metrics(METRICS, step=200 + s, synchronous=False))
        started = time.perf_counter()
        mlflow.flush_async_logging()
        flush = time.perf_counter() - started
    print("per-epoch metrics (5 values), SQLite store:")
    print(f"  mlflow.log_metrics (sync)      {fluent:6.1f} ms/epoch")
    print(f"  MlflowClient.log_batch (used)  {batch:6.1f} ms/epoch")
    print(f"  log_metrics(synchronous=False) {queued:6.1f} ms/epoch + {flush:.2f} s to flush")
    print("mlflow.pytorch.log_model (pickle, signature, input example, pinned requirements):")
    for config in ("mlp3", "mlp4", "mlp3"):
        model = build_model(load_model_config(config).model)
        times = []
        with mlflow.start_run():
            started = time.perf_counter()
            log_model(model, example)
            times.append(time.perf_counter() - started)
        print(f"  {config}: {statistics.median(times):.2f} s")
    print("  (the first call in a process also builds MLflow's package index, ~1-2 s)")


if __name__ == "__main__":
    main()

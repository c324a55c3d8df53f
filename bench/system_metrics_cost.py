"""What MLflow's system metrics cost a training, two ways, in one run.

1. One sampling cycle as the monitor thread does it (psutil readings, the batch logged, the run
   read back to see whether it still runs), timed over many cycles: its CPU time divided by the
   sampling interval (pipeline.runs.tracking's) is the share of one core it takes.
2. Side by side: the same training with and without system metrics, alternating rounds; the
   median epoch time of each and their ratio (noise on this machine is a few %, so this shows
   only that nothing large is hidden).

    python bench/system_metrics_cost.py --data_dir ../shared/datasets [--rounds 3 --epochs 4]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import torch  # noqa: E402
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: E402

from full_mnist_epoch import epoch_times as training_epoch_times  # noqa: E402
from pipeline.runs import tracking  # noqa: E402
from pipeline.core.data import draw_sample  # noqa: E402
from scratch import scratch_folder  # noqa: E402


def cycle_cost(cycles: int) -> tuple[float, float]:
    """CPU and wall seconds of one monitor cycle."""
    with mlflow.start_run() as run:
        monitor = SystemMetricsMonitor(run.info.run_id)
        client = mlflow.MlflowClient()
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(cycles):
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
            client.get_run(run.info.run_id)
        return (time.thread_time() - cpu) / cycles, (time.perf_counter() - wall) / cycles


def epoch_times(sample, config: str, epochs: int, seed: int, system_metrics: bool) -> list[float]:
    with mlflow.start_run(log_system_metrics=system_metrics):
        return training_epoch_times(config, sample, epochs, seed)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--config", default="mlp4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=50)
    args = parser.parse_args()

    mlflow.set_tracking_uri(f"sqlite:///{scratch_folder('bench-system-metrics-')}/mlflow.db")
    mlflow.set_experiment("bench-system-metrics")
    tracking.sample_system_metrics()
    interval = float(os.environ[tracking.SYSTEM_METRICS_INTERVAL_ENV])

    cpu, wall = cycle_cost(args.cycles)
    print(f"one sampling cycle ({args.cycles} timed): {cpu * 1000:.1f} ms CPU, {wall * 1000:.1f} ms "
          f"wall; every {interval:g} s that is {100 * cpu / interval:.2f}% of one core")

    sample = draw_sample(args.data_dir, 600)
    times = {False: [], True: []}
    for round_ in range(args.rounds):
        for system_metrics in (False, True):
            times[system_metrics] += epoch_times(sample, args.config, args.epochs, round_,
                                                 system_metrics)
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.config}, torch {torch.get_num_threads()} threads, {args.rounds} rounds x "
          f"{args.epochs} epochs per arm: median epoch {without:.3f} s without, {with_:.3f} s "
          f"with system metrics: ratio {with_ / without:.3f}")


if __name__ == "__main__":
    main()

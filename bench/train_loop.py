"""Our train epoch loop (with its MLflow logging) against the seed notebook's loop.

Both run on the same real sample, alternating rounds of epochs in one process, and the median
wall time of an epoch is reported for each and as a ratio, per model. Not a test: it prints.

    python bench/train_loop.py --data_dir ../shared/datasets [--rounds 3 --epochs 5]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlflow  # noqa: E402
import torch  # noqa: E402
from torch import nn, optim  # noqa: E402

from pipeline.core.config import load_model_config  # noqa: E402
from pipeline.core.data import draw_sample  # noqa: E402
from pipeline.core.models import build_model  # noqa: E402
from pipeline.core.training import TrainSettings, train  # noqa: E402
from pipeline.runs.metric_writer import MetricWriter  # noqa: E402
from pipeline.stages.train import _log_epoch  # noqa: E402
from seed_notebook import MLP3, MLP4, load_seed_data, seed_epoch  # noqa: E402


def our_epoch_times(model, sample, settings, run_id):
    """Wall time between successive epoch ends, logging and console line included."""
    marks, history = [time.perf_counter()], []
    writer = MetricWriter(mlflow.MlflowClient(), run_id)

    def on_epoch(record):
        _log_epoch(writer, record, settings.epochs, history, {})
        marks.append(time.perf_counter())

    train(model, (sample.train.features(), sample.train.labels),
          (sample.test.features(), sample.test.labels), settings, on_epoch)
    writer.flush()
    writer.close()
    return [b - a for a, b in zip(marks, marks[1:])], history


def seed_epoch_times(model_class, X, Y, epochs):
    model = model_class()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    accuracies, losses = {"train": [], "test": []}, {"train": [], "test": []}
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        seed_epoch(model, loss_fn, optimizer, X, Y, accuracies, losses)
        times.append(time.perf_counter() - started)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per round")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()

    sample = draw_sample(args.data_dir, 600)
    X, Y = load_seed_data(args.data_dir)
    assert torch.equal(sample.train.features(), X["train"]), "the two loaders drew different samples"

    store = tempfile.mkdtemp()
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    mlflow.set_experiment("bench-train-loop")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.epochs} epochs per loop, precision {args.precision}")
    print(f"{'model':6} {'seed loop s/epoch':>18} {'ours s/epoch':>13} {'ours/seed':>10}")
    for config, seed_class in (("mlp3", MLP3), ("mlp4", MLP4)):
        ours, seeds = [], []
        for round_ in range(args.rounds):
            torch.manual_seed(round_)
            model = build_model(load_model_config(config).model)
            settings = TrainSettings(epochs=args.epochs, seed=round_, precision=args.precision)
            with mlflow.start_run() as run:
                times, _ = our_epoch_times(model, sample, settings, run.info.run_id)
            ours += times
            seeds += seed_epoch_times(seed_class, X, Y, args.epochs)
        ours_median, seed_median = statistics.median(ours), statistics.median(seeds)
        print(f"{config:6} {seed_median:18.3f} {ours_median:13.3f} {ours_median / seed_median:10.2f}",
              flush=True)


if __name__ == "__main__":
    main()

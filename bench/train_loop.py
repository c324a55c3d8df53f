"""Our training epoch against the seed notebook's loop and the matmul floor, side by side.

For each thread count and model, rounds alternate (in a rotating order, one process) between:
the seed notebook's epoch (`bench/seed_notebook.py`); our `train` epoch with its per-epoch
MLflow logging and console line; optionally an older `training.py` (`--baseline`, a copy kept
outside the package) timed the same way; and the matmul floor, the same matrix products an
epoch of training and evaluation does (forward, both backward products, the eval forward over
both splits), with nothing else. It prints seconds per epoch, min and median of wall time and of
process CPU time (CPU time is steadier on a loaded machine), and each loop / seed ratio of
medians. Not a test: it prints.

    python bench/train_loop.py --data_dir ../shared/datasets [--threads 1,2 --rounds 3 --epochs 3]
    python bench/train_loop.py --baseline /tmp/training_old.py   # before/after in one run
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlflow  # noqa: E402
import torch  # noqa: E402
from torch import nn, optim  # noqa: E402

from pipeline.core import training  # noqa: E402
from pipeline.core.config import load_model_config  # noqa: E402
from pipeline.core.data import draw_sample  # noqa: E402
from pipeline.core.models import build_model  # noqa: E402
from pipeline.core.train_settings import TrainSettings  # noqa: E402
from pipeline.runs.metric_writer import MetricWriter  # noqa: E402
from pipeline.stages.train import _log_epoch  # noqa: E402
from scratch import scratch_folder  # noqa: E402
from seed_notebook import MLP3, MLP4, load_seed_data, seed_epoch  # noqa: E402

SEED_CLASSES = {"mlp3": MLP3, "mlp4": MLP4}


def clocks():
    return time.perf_counter(), time.process_time()


def elapsed(marks):
    """(wall, cpu) seconds between successive marks."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]


def our_epoch_times(train_fn, config, sample, settings, results):
    """Per-epoch (wall, cpu) between successive epoch ends, logging and console line included;
    the epochs' metrics go to `results`."""
    torch.manual_seed(settings.seed)
    model = build_model(load_model_config(config).model)
    history = []
    with mlflow.start_run() as run:
        writer = MetricWriter(mlflow.MlflowClient(), run.info.run_id)
        marks = [clocks()]

        def on_epoch(record):
            _log_epoch(writer, record, settings.epochs, history, {})
            marks.append(clocks())

        train_fn(model, (sample.train.features(), sample.train.labels),
                 (sample.test.features(), sample.test.labels), settings, on_epoch)
        writer.flush()
        writer.close()
    results.append([{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history])
    return elapsed(marks)


def seed_epoch_times(config, X, Y, epochs):
    model = SEED_CLASSES[config]()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    accuracies, losses = {"train": [], "test": []}, {"train": [], "test": []}
    marks = [clocks()]
    for _ in range(epochs):
        seed_epoch(model, loss_fn, optimizer, X, Y, accuracies, losses)
        marks.append(clocks())
    return elapsed(marks)


def matmul_floor_times(config, sample, settings):
    """The matrix products of an epoch and nothing else: per batch each Linear's forward addmm,
    its weight-gradient mm and (but the first) its input-gradient mm; then the eval forward
    over both splits in eval_batch_size chunks."""
    model = build_model(load_model_config(config).model)
    layers = [(m.weight.detach(), m.bias.detach()) for m in model if isinstance(m, nn.Linear)]
    x_train = sample.train.features()
    x_eval = torch.cat([x_train, sample.test.features()])
    grad_out = torch.randn(settings.batch_size, layers[-1][0].shape[0])
    marks = [clocks()]
    for _ in range(settings.epochs):
        for xb in x_train.split(settings.batch_size):
            inputs, a = [], xb
            for weight, bias in layers:
                inputs.append(a)
                a = torch.addmm(bias, a, weight.t())
            grad = grad_out[:len(xb)]
            for i in reversed(range(len(layers))):
                torch.mm(grad.t(), inputs[i])
                if i:
                    grad = torch.mm(grad, layers[i][0])
        for chunk in x_eval.split(settings.eval_batch_size):
            a = chunk
            for weight, bias in layers:
                a = torch.addmm(bias, a, weight.t())
        marks.append(clocks())
    return elapsed(marks)


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("baseline_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train


def summary(times, which):
    values = [t[which] for t in times]
    return min(values), statistics.median(values)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per round and loop")
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    parser.add_argument("--configs", default="mlp3,mlp4")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--baseline", help="an older training.py to time beside ours")
    args = parser.parse_args()

    sample = draw_sample(args.data_dir, 600)
    X, Y = load_seed_data(args.data_dir)
    assert torch.equal(sample.train.features(), X["train"]), "the two loaders drew different samples"
    store = scratch_folder("bench-train-loop-")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    mlflow.set_experiment("bench-train-loop")

    results = {"ours": [], "baseline": []}
    loops = {"ours": lambda config, settings: our_epoch_times(
        training.train, config, sample, settings, results["ours"])}
    if args.baseline:
        baseline = load_baseline(args.baseline)
        loops["baseline"] = lambda config, settings: our_epoch_times(
            baseline, config, sample, settings, results["baseline"])
    loops["seed"] = lambda config, settings: seed_epoch_times(config, X, Y, settings.epochs)
    loops["floor"] = lambda config, settings: matmul_floor_times(config, sample, settings)

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start; {args.rounds} rounds x {args.epochs} epochs per "
          f"loop, precision {args.precision}; s/epoch as min / median, wall and process CPU")
    print(f"{'model':5} {'thr':>3} {'loop':8} {'wall min':>8} {'median':>7} {'cpu min':>8} "
          f"{'median':>7}   {'/seed wall':>10} {'/seed cpu':>9}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for config in args.configs.split(","):
            times = {name: [] for name in loops}
            results["ours"].clear()
            results["baseline"].clear()
            names = list(loops)
            for round_ in range(args.rounds):
                settings = TrainSettings(epochs=args.epochs, seed=round_,
                                         precision=args.precision)
                # A rotating order: no loop always runs first, right after another one's garbage.
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                    times[name] += loops[name](config, settings)
            seed_wall, seed_cpu = summary(times["seed"], 0)[1], summary(times["seed"], 1)[1]
            for name in loops:
                wall_min, wall_median = summary(times[name], 0)
                cpu_min, cpu_median = summary(times[name], 1)
                print(f"{config:5} {threads:3} {name:8} {wall_min:8.3f} {wall_median:7.3f} "
                      f"{cpu_min:8.3f} {cpu_median:7.3f}   {wall_median / seed_wall:10.2f} "
                      f"{cpu_median / seed_cpu:9.2f}", flush=True)
            if args.baseline:
                same = results["ours"] == results["baseline"]
                print(f"{config:5} {threads:3} ours and baseline: "
                      f"{'the same metrics, bit for bit' if same else 'METRICS DIFFER'}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()

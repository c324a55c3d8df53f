"""Where an epoch of `train` goes: torch.profiler's self CPU time per operator, summed by kind.

Profiles a few epochs of `pipeline.core.training.train` (training steps and the eval pass over
both splits), and the eval pass alone, for each model and thread count, after one warm-up
epoch. Prints each kind's share of the profiled wall time; "outside any operator" is wall time
the profiler did not attribute to an aten operator (Python per batch, the interpreter, and
with 2 threads the time the second thread worked in parallel shows as a negative share). The
profiler inflates small operators, so the shares are a guide; bench/train_loop.py gives the
timings. Not a test: it prints.

    python bench/epoch_profile.py --data_dir ../shared/datasets [--threads 1,2 --epochs 2]
"""

import argparse
import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.core.config import load_model_config
from pipeline.core.data import draw_sample
from pipeline.core.models import build_model
from pipeline.core.train_settings import TrainSettings
from pipeline.core.training import per_example_results, train

# First match wins; operator names are torch's (aten::..., autograd nodes, optimizer spans).
KINDS = (
    ("matmul", ("aten::addmm", "aten::mm")),
    ("BatchNorm", ("batch_norm",)),
    ("cross entropy", ("log_softmax", "nll_loss")),
    ("ReLU", ("clamp_min", "aten::relu", "threshold_backward")),
    ("SGD", ("sgd", "Optimizer.")),
    ("shuffle and gather", ("aten::index", "randperm")),
    ("bias gradients (sum)", ("aten::sum",)),
    ("eval bookkeeping (argmax, ==, mean)", ("argmax", "aten::eq", "aten::mean")),
    ("autograd engine and nodes", ("autograd::", "Backward", "AccumulateGrad")),
)


def kind_of(name):
    for kind, patterns in KINDS:
        if any(pattern in name for pattern in patterns):
            return kind
    return "other operators (copies, views, allocation)"


def profiled(fn):
    """(wall seconds, {kind: self CPU seconds}) of fn() under the profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        fn()
        wall = time.perf_counter() - started
    by_kind = defaultdict(float)
    for event in prof.key_averages():
        by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    return wall, by_kind


def report(title, wall, by_kind, per):
    print(f"\n{title}: {wall / per:.3f} s per epoch under the profiler")
    for kind, seconds in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:44} {seconds / per:7.3f} s {100 * seconds / wall:6.1f}%")
    outside = wall - sum(by_kind.values())
    print(f"  {'outside any operator (Python, interpreter)':44} {outside / per:7.3f} s "
          f"{100 * outside / wall:6.1f}%")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--configs", default="mlp3,mlp4")
    args = parser.parse_args()

    sample = draw_sample(args.data_dir, 600)
    train_data = (sample.train.features(), sample.train.labels)
    test_data = (sample.test.features(), sample.test.labels)
    eval_x, eval_y = (torch.cat([a, b]) for a, b in zip(train_data, test_data))
    print(f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start",
          file=sys.stderr)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for config in args.configs.split(","):
            torch.manual_seed(0)
            model = build_model(load_model_config(config).model)
            train(model, train_data, test_data, TrainSettings(epochs=1))
            settings = TrainSettings(epochs=args.epochs)
            wall, by_kind = profiled(lambda: train(model, train_data, test_data, settings))
            report(f"{config}, {threads} thread(s), train (steps and eval)", wall, by_kind,
                   args.epochs)

            def evaluations():
                for _ in range(args.epochs):
                    per_example_results(model, eval_x, eval_y, settings)
            wall, by_kind = profiled(evaluations)
            report(f"{config}, {threads} thread(s), the eval pass alone", wall, by_kind,
                   args.epochs)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()

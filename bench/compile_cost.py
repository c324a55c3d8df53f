"""Would `torch.compile` pay for itself in `train`? Its compile time against what it saves.

Trains the same model with `train` eagerly and wrapped in `torch.compile` (inductor, which
needs a C compiler), and prints the first epoch (compile included: the train-mode graph with
its backward, then the eval-mode graph) and the median of the later epochs. Compiled twice:
with an empty inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR: a new machine or torch build)
and again with the cache the first one filled (each later training process). Break-even is
the compile time over the seconds saved per epoch; the default study trains 2 models for 20
epochs, each training in its own process. Not a test: it prints.

    python bench/compile_cost.py --data_dir ../shared/datasets [--config mlp3 --epochs 4]
"""

import argparse
import os
import statistics

from scratch import scratch_folder

os.environ["TORCHINDUCTOR_CACHE_DIR"] = scratch_folder("inductor-cache-")

import torch  # noqa: E402

from pipeline.core.config import load_model_config  # noqa: E402
from pipeline.core.data import draw_sample  # noqa: E402
from pipeline.core.models import build_model  # noqa: E402
from pipeline.core.train_settings import TrainSettings  # noqa: E402
from pipeline.core.training import train  # noqa: E402


def epoch_times(config, sample, epochs, compiled):
    torch.manual_seed(0)
    model = build_model(load_model_config(config).model)
    if compiled:
        model = torch.compile(model)
    history = train(model, (sample.train.features(), sample.train.labels),
                    (sample.test.features(), sample.test.labels), TrainSettings(epochs=epochs))
    return [record["epoch_time_s"] for record in history], history[-1]["test_accuracy"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--config", default="mlp3")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sample = draw_sample(args.data_dir, 600)
    print(f"torch {torch.__version__}, {args.config}, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.2f} at start")
    eager, eager_accuracy = epoch_times(args.config, sample, args.epochs, compiled=False)
    eager_epoch = statistics.median(eager[1:])
    print(f"eager:    first epoch {eager[0]:7.2f} s, later epochs {eager_epoch:.3f} s (median), "
          f"test accuracy {eager_accuracy:.4f}", flush=True)
    for name in ("cold cache", "warm cache"):
        times, accuracy = epoch_times(args.config, sample, args.epochs, compiled=True)
        later = statistics.median(times[1:])
        compile_s = times[0] - later
        saved = eager_epoch - later
        payback = f"{compile_s / saved:.0f} epochs" if saved > 0 else "never (no epoch saved)"
        print(f"compiled, {name}: first epoch {times[0]:7.2f} s (about {compile_s:.1f} s of "
              f"compiling), later epochs {later:.3f} s ({later / eager_epoch:.2f}x eager); "
              f"pays back after {payback}; test accuracy {accuracy:.4f} (not the eager bits: "
              f"fused kernels round differently)", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()

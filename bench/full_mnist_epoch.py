"""Per-sample cost at full MNIST: an epoch on the whole splits against ten epochs' worth at the
notebook's 600 per digit.

An epoch at `all` trains on 60,000 images (10x the 6,000 of 600 per digit) and scores 70,000
(train + test; 5.8x the 12,000). If nothing grows faster than the data, it costs at most 10x
an epoch at 600 per digit. Both sizes alternate in one process, same model and settings; the
median epoch time of each and the ratio all / (10 x 600) are printed. Not a test.

    python bench/full_mnist_epoch.py --data_dir ../shared/datasets [--rounds 2]
"""

import argparse
import statistics

import torch

from pipeline.core.config import load_model_config
from pipeline.core.data import draw_sample
from pipeline.core.models import build_model
from pipeline.core.train_settings import TrainSettings
from pipeline.core.training import train


def epoch_times(config: str, sample, epochs: int, seed: int) -> list[float]:
    torch.manual_seed(seed)
    model = build_model(load_model_config(config).model)
    history = train(model, (sample.train.features(), sample.train.labels),
                    (sample.test.features(), sample.test.labels),
                    TrainSettings(epochs=epochs, seed=seed))
    return [record["epoch_time_s"] for record in history]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default="mlp3,mlp4")
    args = parser.parse_args()

    samples = {"600": draw_sample(args.data_dir, 600), "all": draw_sample(args.data_dir, None)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; per round: 3 epochs at "
          f"600 per digit, 1 at all; {args.rounds} rounds")
    print(f"{'model':6} {'600/digit s/epoch':>18} {'all s/epoch':>12} {'all / (10 x 600)':>17}")
    for config in args.configs.split(","):
        times = {"600": [], "all": []}
        for round_ in range(args.rounds):
            times["600"] += epoch_times(config, samples["600"], 3, round_)
            times["all"] += epoch_times(config, samples["all"], 1, round_)
        small, whole = statistics.median(times["600"]), statistics.median(times["all"])
        print(f"{config:6} {small:18.2f} {whole:12.2f} {whole / (10 * small):17.2f}", flush=True)


if __name__ == "__main__":
    main()

"""What one VGG11 epoch costs on this machine: one epoch of our train loop (train on the 6,000
training images, then eval on both splits) on the default 600-per-digit sample. Prints.

    python bench/vgg_epoch.py --data_dir ../shared/datasets [--device auto]
"""

import argparse
import time

import torch

from pipeline.cache.machine import resolve_device
from pipeline.core.config import load_model_config
from pipeline.core.data import draw_sample
from pipeline.core.models import build_model, count_parameters
from pipeline.core.training import TrainSettings, train


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    sample = draw_sample(args.data_dir, 600)
    torch.manual_seed(0)
    model = build_model(load_model_config("vgg11").model)
    settings = TrainSettings(epochs=1, device=resolve_device(args.device), precision=args.precision)
    started = time.perf_counter()
    history = train(model, (sample.train.features(), sample.train.labels),
                    (sample.test.features(), sample.test.labels), settings)
    wall = time.perf_counter() - started
    record = history[0]
    print(f"vgg11 ({count_parameters(model):,} parameters) on {settings.device} "
          f"({torch.get_num_threads()} threads), precision {args.precision}: one epoch "
          f"{record['epoch_time_s']:.1f} s (wall {wall:.1f} s); after it test accuracy "
          f"{record['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()

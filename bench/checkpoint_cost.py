"""What a checkpoint after every epoch costs: our train loop on the real sample with no
checkpoints, with a synchronous save_checkpoint after each epoch, and with a clone handed to a
background thread that saves it (pipeline.runs.checkpoint_store, as the train stage does). Rounds of each alternate in one process; it prints the median
wall time of an epoch (its checkpoint included) for each, its ratio to no checkpoints (pooled,
and the median of the ratios within a round), the checkpoint's size and the median time of one
save. Not a test: it prints.

    python bench/checkpoint_cost.py --data_dir ../shared/datasets [--rounds 3 --epochs 5]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# This checkout's pipeline, not whichever one the environment has installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402
import torch  # noqa: E402

from pipeline.cache.file_digests import CACHE_ENV  # noqa: E402
from pipeline.core.checkpoint import save_checkpoint  # noqa: E402
from pipeline.core.config import load_model_config  # noqa: E402
from pipeline.core.data import draw_sample  # noqa: E402
from pipeline.core.models import build_model  # noqa: E402
from pipeline.core.training import TrainSettings, train  # noqa: E402
from pipeline.runs.checkpoint_store import UPLOAD_INTERVAL_ENV, CheckpointStore  # noqa: E402
from scratch import scratch_folder  # noqa: E402

META = {"config_digest": "bench", "lr": 0.01, "sample_run_id": "bench"}
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
mlflow.set_tracking_uri(f"sqlite:///{scratch_folder('bench-checkpoint-store-')}/mlflow.db")
EXPERIMENT_ID = mlflow.create_experiment("bench-checkpoints")


class SyncSaver:
    """Saves inside the callback, before the live tensors change: save_checkpoint as it is."""

    def __init__(self, path: Path):
        self.path, self.save_times, self.callback_times = path, [], []

    def __call__(self, state: dict) -> None:
        started = time.perf_counter()
        save_checkpoint(self.path, state, META)
        self.save_times.append(time.perf_counter() - started)
        self.callback_times.append(self.save_times[-1])

    def finish(self) -> None:
        pass


class BackgroundSaver(CheckpointStore):
    """The train stage's store: clones in the callback, writes in its thread (uploads only when
    closed, into a temporary tracking store); timed."""

    def __init__(self, path: Path):
        os.environ[CACHE_ENV] = str(path.parent)
        os.environ[UPLOAD_INTERVAL_ENV] = "3600"
        super().__init__(mlflow.MlflowClient().create_run(EXPERIMENT_ID).info.run_id)
        self.save_times, self.callback_times = [], []

    def __call__(self, state: dict) -> None:
        started = time.perf_counter()
        self.save(state, META)
        self.callback_times.append(time.perf_counter() - started)

    def _write(self, state: dict, meta: dict) -> None:
        started = time.perf_counter()
        super()._write(state, meta)
        self.save_times.append(time.perf_counter() - started)

    def finish(self) -> None:
        self.close()


def epoch_times(config: str, sample, settings: TrainSettings, saver) -> tuple[list[float], float]:
    """Wall time from each epoch's end to the next one's, so each span holds one epoch and the
    checkpoint taken before it; and the whole run's wall time per epoch, setup and last save
    (and waiting for a background save) included."""
    torch.manual_seed(settings.seed)
    model = build_model(load_model_config(config).model)
    marks = []
    started = time.perf_counter()
    train(model, (sample.train.features(), sample.train.labels),
          (sample.test.features(), sample.test.labels), settings,
          lambda record: marks.append(time.perf_counter()),
          on_checkpoint=saver, checkpoint_every=0 if saver is None else 1)
    if saver is not None:
        saver.finish()
    total = time.perf_counter() - started
    return [b - a for a, b in zip(marks, marks[1:])], total / settings.epochs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--config", default="mlp4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run")
    parser.add_argument("--checkpoint_dir", default=None,
                        help="where checkpoints are written, kept (default: a temporary "
                             "folder, removed at exit)")
    args = parser.parse_args()

    sample = draw_sample(args.data_dir, 600)
    folder = Path(args.checkpoint_dir or scratch_folder("checkpoint-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint.pt"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.config}, "
          f"{args.rounds} rounds x {args.epochs} epochs per variant, checkpoints in {folder}")

    variants = {"none": lambda: None, "sync": lambda: SyncSaver(path),
                "background": lambda: BackgroundSaver(path)}
    names = list(variants)
    spans = {name: [] for name in names}
    per_round = {name: [] for name in names}  # median span of each round
    per_epoch = {name: [] for name in names}
    saves, callbacks = {name: [] for name in names}, {name: [] for name in names}
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes skew wall times)")
    for round_ in range(args.rounds):
        # A different order each round, so a slow drift of the machine favours no variant.
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            saver = variants[name]()
            settings = TrainSettings(epochs=args.epochs, seed=round_)
            times, total = epoch_times(args.config, sample, settings, saver)
            spans[name] += times
            per_round[name].append(statistics.median(times))
            per_epoch[name].append(total)
            if saver is not None:
                saves[name] += saver.save_times
                callbacks[name] += saver.callback_times
        print(f"round {round_ + 1}: s/epoch " + ", ".join(
            f"{name} {per_round[name][-1]:.3f}" for name in names), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    # Ratios within a round compare runs a minute apart, so a busy spell that covers a whole
    # round cancels out; their median is the headline figure.
    round_ratio = {name: statistics.median(r / b for r, b in zip(per_round[name],
                                                                  per_round["none"]))
                   for name in names}
    base_span = statistics.median(spans["none"])
    base_total = statistics.median(per_epoch["none"])
    size_mb = os.path.getsize(path) / 1e6
    print(f"checkpoint file {size_mb:.1f} MB")
    print(f"{'checkpoints':12} {'s/epoch':>8} {'ratio':>6} {'ratio in round':>15} "
          f"{'run s/epoch':>12} {'ratio':>6} {'save ms':>8} {'in callback ms':>15}")
    for name in names:
        span, total = statistics.median(spans[name]), statistics.median(per_epoch[name])
        save_ms = f"{statistics.median(saves[name]) * 1e3:8.1f}" if saves[name] else f"{'-':>8}"
        callback_ms = (f"{statistics.median(callbacks[name]) * 1e3:15.1f}" if callbacks[name]
                       else f"{'-':>15}")
        print(f"{name:12} {span:8.3f} {span / base_span:6.3f} {round_ratio[name]:15.3f} "
              f"{total:12.3f} {total / base_total:6.3f} {save_ms} {callback_ms}", flush=True)

if __name__ == "__main__":
    main()

"""A real `tune` sweep here: trials per minute, and the epochs ASHA saved.

Runs `python -m pipeline tune` in a fresh temporary store (so no trial is reused) and reads the
tune run back: trials per minute of the sweep's wall time (Ray start-up, worker start-up and
every trial; not the sampling nor the retraining of the winner), and the share of epochs ASHA
saved against running every trial to the end: 1 - (epochs run) / (trials x epochs). Also the
winner, its validation accuracy and its test accuracy after retraining. Not a test: it prints.

    python bench/tune_sweep.py --data_dir ../shared/datasets --trials 6 --epochs 3
    python bench/tune_sweep.py --data_dir ../shared/datasets          # the file's 30 x 10
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from scratch import scratch_folder

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--space", default="experiments/mlp_sweep.yaml")
    parser.add_argument("--trials", default="", help="empty: the space file's")
    parser.add_argument("--epochs", default="", help="empty: the space file's")
    parser.add_argument("--samples_per_class", default="600")
    parser.add_argument("--cpus_per_trial", default="1")
    parser.add_argument("--store", default="",
                        help="tracking store folder, kept (default: a temporary one, "
                             "removed at exit)")
    args = parser.parse_args()

    store = args.store or scratch_folder("bench-tune-")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PIPELINE_CACHE_DIR": f"{store}/cache"}
    command = [sys.executable, "-m", "pipeline", "tune", "--experiment", "bench-tune",
               "--space", args.space, "--trials", args.trials, "--epochs", args.epochs,
               "--data_dir", str(Path(args.data_dir).resolve()),
               "--samples_per_class", args.samples_per_class,
               "--cpus_per_trial", args.cpus_per_trial,
               "--registered_model_name", "bench-tune"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"tune failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    run_id = done.stdout.strip().splitlines()[-1].split()[-1]

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run = mlflow.get_run(run_id)
    m = run.data.metrics
    print(f"tune {args.space} on {os.cpu_count()} CPUs, {args.cpus_per_trial} per trial "
          f"(store {store}):")
    print(f"  {int(m['trials_run'])} trials of up to {run.data.params['sweep_epochs']} epochs in "
          f"{m['sweep_time_s']:.1f} s: {m['trials_per_minute']:.2f} trials per minute "
          f"(whole command {wall:.1f} s)")
    print(f"  epochs run {int(m['epochs_run'])} of {int(m['trials'])} x "
          f"{run.data.params['sweep_epochs']}: ASHA saved {m['epochs_saved_share']:.1%} "
          f"({int(m['trials_stopped_early'])} trials stopped early)")
    print(f"  best validation accuracy {m['best_val_accuracy']:.4f}; retrained on the whole "
          f"training sample: test accuracy {m['best_test_accuracy']:.4f}")
    print("  " + run.data.tags["mlflow.note.content"])


if __name__ == "__main__":
    main()

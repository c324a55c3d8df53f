"""The 5-seed depth study with executor=local against executor=ray, on this machine.

Each variant runs `python -m pipeline main --force true` in a fresh temporary store (so every
variant draws its sample, trains, evaluates and compares from scratch, Ray's start-up
included) and the wall times are printed side by side with their ratio to local. Then the
epoch times: a training's median epoch under Ray against the same training alone in a bare
1-thread process (`python -m pipeline train`, OMP_NUM_THREADS=1). Not a test: it prints.

    python bench/ray_study.py --data_dir ../shared/datasets [--epochs 20] \
        [--variants local,ray:1,ray:2]
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from pipeline_vs_seed import timed


def environment(store: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
            "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}


def epoch_times(store: str) -> dict[str, list[float]]:
    """Per train run name: its epoch_time_s values."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    times = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id],
                                      "tags.`pipeline.stage` = 'train'"):
            times[run.info.run_name] = [m.value for m in client.get_metric_history(
                run.info.run_id, "epoch_time_s")]
    return times


def sample_run(store: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    [experiment] = [e for e in client.search_experiments() if e.name == "bench-ray"]
    [run] = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'sample_data'")
    return run.info.run_id


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--study", default="experiments/depth_seeds.yaml")
    parser.add_argument("--epochs", default="", help="empty: the study's (20)")
    parser.add_argument("--variants", default="local,ray:1",
                        help="local and ray:<cpus_per_trial>, comma-separated")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())

    results = {}
    for variant in args.variants.split(","):
        executor, _, cpus = variant.partition(":")
        store = tempfile.mkdtemp(prefix=f"bench-ray-{executor}{cpus}-")
        command = [sys.executable, "-m", "pipeline", "main", "--experiment", "bench-ray",
                   "--study", args.study, "--data_dir", data_dir, "--epochs", args.epochs,
                   "--force", "true", "--executor", executor]
        if cpus:
            command += ["--cpus_per_trial", cpus]
        seconds = timed(command, environment(store))
        results[variant] = (seconds, store)
        print(f"{variant}: {seconds:.1f} s", flush=True)

    local = results.get("local", (None, None))[0]
    print("\n| executor | study wall time (s) | / local |\n| --- | ---: | ---: |")
    for variant, (seconds, _) in results.items():
        ratio = f"{seconds / local:.2f}" if local else "-"
        print(f"| {variant} | {seconds:.1f} | {ratio} |")

    ray_variants = [v for v in results if v.startswith("ray")]
    if not ray_variants:
        return
    store = results[ray_variants[0]][1]
    times = epoch_times(store)
    bare_store = tempfile.mkdtemp(prefix="bench-ray-bare-")
    # Seed 0 of each config again, alone, with one thread, on the same sample (600 per digit).
    epochs = len(next(iter(times.values())))
    print(f"\nmedian epoch time, {epochs} epochs (s): under Ray ({ray_variants[0]}) vs a bare "
          f"1-thread process\n| training | Ray | bare | Ray / bare |\n| --- | ---: | ---: | ---: |")
    bare_env = {**environment(bare_store), "OMP_NUM_THREADS": "1"}
    timed([sys.executable, "-m", "pipeline", "sample_data", "--experiment", "bench-ray",
           "--data_dir", data_dir], bare_env)
    for name in sorted(times):
        if not name.endswith("seed0"):
            continue
        config = name.split("-")[1]
        timed([sys.executable, "-m", "pipeline", "train", "--experiment", "bench-ray",
               "--config", config, "--epochs", str(epochs), "--seed", "0",
               "--data_run_id", sample_run(bare_store), "--log_model", "false"], bare_env)
        bare = epoch_times(bare_store)[name]
        on_ray = statistics.median(times[name])
        print(f"| {name} | {on_ray:.2f} | {statistics.median(bare):.2f} | "
              f"{on_ray / statistics.median(bare):.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""The default study, `mlflow run .` with a cold cache, against the bare seed script it
replaces, interleaved in one run (issue 21, items 1 and 5). Not a test: it prints, never asserts.

Each repeat runs, in turn:
  - the seed script once per model, one process after the other (each imports torch and loads
    MNIST: how the issue measured it), and the seed script with both models in one process;
  - `mlflow run . --env-manager local` on a fresh temporary tracking store (cold cache) with
    the defaults (trainings side by side in the local pool, one torch thread each), and with
    `-P workers=1 -P threads=<physical cores>` (one after another in main's process with every
    core: the study before the pool), which shows what the pool gained.
It prints min and median wall times, each against the two-process seed script, and the stages
table (seconds per stage) of the last cold default run: where the remaining seconds go.

    python bench/study_vs_seed.py --data_dir ../shared/datasets [--repeats 3] [--epochs 20]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from scratch import scratch_folder

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SEED = [sys.executable, "bench/seed_notebook.py"]


def timed(commands: list[list[str]], env: dict) -> float:
    started = time.perf_counter()
    for command in commands:
        subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def fresh_store_env() -> tuple[dict, str]:
    uri = f"sqlite:///{scratch_folder('study-vs-seed-')}/mlflow.db"
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}, uri


def stages_table(uri: str) -> str:
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    import mlflow

    mlflow.set_tracking_uri(uri)
    [main] = mlflow.search_runs(experiment_names=["bench"], output_format="list",
                                filter_string="tags.`pipeline.stage` = 'main'")
    return mlflow.artifacts.load_text(f"runs:/{main.info.run_id}/stages.csv")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", default="20")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    cores = psutil.cpu_count(logical=False) or os.cpu_count()
    seed = SEED + ["--data_dir", data_dir, "--epochs", args.epochs]
    study = [str(BIN / "mlflow"), "run", ".", "--env-manager", "local", "--experiment-name",
             "bench", "-P", f"data_dir={data_dir}", "-P", f"epochs={args.epochs}"]
    variants = {
        "seed script, a process per model": [seed + ["--models", "mlp3"],
                                             seed + ["--models", "mlp4"]],
        "seed script, one process": [seed],
        "mlflow run . (cold, pool)": [study],
        f"mlflow run . (cold, workers=1 threads={cores})": [
            study + ["-P", "workers=1", "-P", f"threads={cores}"]],
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    last_uri = ""
    for repeat in range(args.repeats):
        for name, commands in variants.items():
            env, uri = fresh_store_env()
            times[name].append(timed(commands, env))
            if name == "mlflow run . (cold, pool)":
                last_uri = uri
            print(f"  repeat {repeat + 1}: {name}: {times[name][-1]:.1f} s", flush=True)
    load = os.getloadavg()
    print(f"\n{args.repeats} repeats, {args.epochs} epochs, {cores} physical cores, load "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; wall time min / median, and the ratio "
          f"of each to the seed script run a process per model (min / median):")
    base = times["seed script, a process per model"]
    for name, values in times.items():
        print(f"  {name:44s} {min(values):6.1f} / {statistics.median(values):6.1f} s   "
              f"{min(values) / min(base):.2f}x / "
              f"{statistics.median(values) / statistics.median(base):.2f}x")
    print("\nstages of the last cold `mlflow run .` (stages.csv):")
    print(stages_table(last_uri))


if __name__ == "__main__":
    main()

"""The whole tracked pipeline against the seed notebook's own work, one after the other.

Runs `python bench/seed_notebook.py` (load the data, train both MLPs for 20 epochs) and
`mlflow run . --env-manager local` (sample, train both, evaluate both, compare, register, all
MLflow I/O) on a fresh temporary tracking store (cold cache), then the pipeline again (warm
cache), then `python -m pipeline main` on another fresh store (the same work without
`mlflow run`'s own process), `--repeats` times, and prints wall times and ratios. Not a test.

    python bench/pipeline_vs_seed.py --data_dir ../shared/datasets [--repeats 2]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scratch import scratch_folder

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(command, env):
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", default="20")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    seed_times, cold_times, warm_times, direct_times = [], [], [], []
    for _ in range(args.repeats):
        store = scratch_folder("bench-pipeline-vs-seed-")
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        seed_times.append(timed([sys.executable, "bench/seed_notebook.py", "--data_dir", data_dir,
                                 "--epochs", args.epochs], env))
        pipeline = [str(BIN / "mlflow"), "run", ".", "--env-manager", "local",
                    "--experiment-name", "bench", "-P", f"data_dir={data_dir}",
                    "-P", f"epochs={args.epochs}"]
        cold_times.append(timed(pipeline, env))
        warm_times.append(timed(pipeline, env))
        # The same study without `mlflow run`'s own process, on another fresh store.
        direct_store = scratch_folder("bench-pipeline-vs-seed-")
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{direct_store}/mlflow.db"
        direct_times.append(timed([sys.executable, "-m", "pipeline", "main", "--data_dir",
                                   data_dir, "--epochs", args.epochs], env))
    seed, cold, warm, direct = (statistics.median(t) for t in
                                (seed_times, cold_times, warm_times, direct_times))
    print(f"{args.repeats} repeats, {args.epochs} epochs, median wall time:")
    print(f"  seed notebook script           {seed:6.1f} s")
    print(f"  mlflow run . (cold cache)      {cold:6.1f} s   {cold / seed:.2f}x the seed script")
    print(f"  mlflow run . (every stage hit) {warm:6.1f} s   {warm / seed:.2f}x")
    print(f"  python -m pipeline main (cold) {direct:6.1f} s   {direct / seed:.2f}x")


if __name__ == "__main__":
    main()

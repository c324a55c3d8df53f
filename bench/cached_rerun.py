"""A fully cached `mlflow run .` against a cold one, and what the cached one imports.

Runs the default study (MLproject's `main`) cold in a fresh temporary store, then twice more
with every stage reused, and prints the wall times and the ratio cached / cold. Then one cached
`python -m pipeline main` under `-X importtime`: which heavy packages it loaded (none expected)
and where its start-up goes. Not a test: it prints.

    python bench/cached_rerun.py --data_dir ../shared/datasets [--epochs 20]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline_vs_seed import ROOT, timed

HEAVY = ("torch", "torchvision", "matplotlib", "sklearn")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--epochs", default="20")
    args = parser.parse_args()

    store = tempfile.mkdtemp()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    data_dir = str(Path(args.data_dir).resolve())
    run = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "--env-manager", "local",
           "--experiment-name", "bench-cached", "-P", f"data_dir={data_dir}",
           "-P", f"epochs={args.epochs}"]
    cold = timed(run, env)
    cached = [timed(run, env) for _ in range(2)]
    print(f"mlflow run . (default study, {args.epochs} epochs): cold {cold:.1f} s, fully cached "
          f"{', '.join(f'{t:.1f}' for t in cached)} s; cached / cold = {min(cached) / cold:.2f}")

    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline", "main", "--data_dir", data_dir,
         "--epochs", args.epochs, "--experiment", "bench-cached"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )
    rows = [line.split("|") for line in result.stderr.splitlines()
            if line.startswith("import time:") and line.split("|")[1].strip().isdigit()]
    imported = {row[2].strip(): int(row[1]) / 1e6 for row in rows}
    heavy = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    tops = {name: seconds for name, seconds in imported.items() if "." not in name}
    print(f"cached python -m pipeline main: heavy packages imported: {heavy or 'none'}; "
          f"slowest top-level imports: " + ", ".join(
              f"{name} {seconds:.1f} s" for name, seconds in
              sorted(tops.items(), key=lambda item: -item[1])[:4]))


if __name__ == "__main__":
    main()

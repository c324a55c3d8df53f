"""A fully cached `mlflow run .` against MLflow's own floor, side by side, and where its seconds go.

Runs the default study (MLproject's `main`) cold in a fresh temporary store, then `--rounds`
rounds, interleaved, each timing:

  (a) `mlflow run` of an entry point that does nothing (bench/empty_entry_point.py: the same
      project, `--env-manager local`, experiment and parameters, so the same `mlflow run`
      machinery: its CLI, the run it creates, logs and ends, the command's process);
  (b) `mlflow run .`, every stage reused;
  (c) `python -m pipeline main`, every stage reused (no `mlflow run` process around it);
  (d) the floors `python -c pass` and `python -c "import mlflow"`.

It prints min and median of each, (b) - (a) (the issue's goal: at most 1.5 s), then one cached
main timed by phase (bench/cached_main_phases.py) and the heavy packages a cached main imports
beyond those `import mlflow` imports itself (`-X importtime`; none expected). Not a test: it prints.

    python bench/cached_rerun.py --data_dir ../shared/datasets [--epochs 1] [--rounds 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from pipeline_vs_seed import ROOT, timed
from scratch import scratch_folder

BIN = Path(sys.executable).parent
HEAVY = ("torch", "torchvision", "matplotlib", "sklearn", "scipy")
EXPERIMENT = "bench-cached"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--epochs", default="1",
                        help="epochs of the cold run; a cached rerun does not depend on them")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    load_at_start = load()
    store = scratch_folder("bench-cached-rerun-")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    data_dir = str(Path(args.data_dir).resolve())
    params = ["-P", f"data_dir={data_dir}", "-P", f"epochs={args.epochs}"]
    mlflow_run = [str(BIN / "mlflow"), "run", ".", "--env-manager", "local",
                  "--experiment-name", EXPERIMENT]
    main_args = ["main", "--data_dir", data_dir, "--epochs", args.epochs,
                 "--experiment", EXPERIMENT]
    commands = {
        "(a) mlflow run, empty entry point": [*mlflow_run, "-e", "bench/empty_entry_point.py",
                                              *params],
        "(b) mlflow run ., fully cached": [*mlflow_run, *params],
        "(c) python -m pipeline main, fully cached": [sys.executable, "-m", "pipeline",
                                                      *main_args],
        "(d) python -c pass": [sys.executable, "-c", "pass"],
        "(d) python -c 'import mlflow'": [sys.executable, "-c", "import mlflow"],
    }

    cold = timed(commands["(b) mlflow run ., fully cached"], env)
    times = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, command in commands.items():
            times[name].append(timed(command, env))

    print(f"load average (1, 5, 15 min) at start {load_at_start}, after the rounds {load()}; "
          f"{args.rounds} rounds, interleaved")
    print(f"cold mlflow run . ({args.epochs} epochs): {cold:.2f} s")
    for name, seconds in times.items():
        print(f"  {name:45s} min {min(seconds):5.2f} s  median {statistics.median(seconds):5.2f} s")
    a, b = (times[name] for name in ("(a) mlflow run, empty entry point",
                                     "(b) mlflow run ., fully cached"))
    print(f"(b) - (a): min {min(b) - min(a):.2f} s, median "
          f"{statistics.median(b) - statistics.median(a):.2f} s (goal: at most 1.5 s); "
          f"cached / cold = {min(b) / cold:.2f}")

    phases = json.loads(subprocess.run(
        [sys.executable, "bench/cached_main_phases.py", *main_args], cwd=ROOT, env=env,
        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print("one cached python -m pipeline main, by phase: "
          f"import mlflow {phases['import_mlflow_s']:.2f} s, open the store "
          f"{phases['open_store_s']:.2f} s, the study {phases['main_s']:.2f} s, of which "
          f"{phases['sql_statements']} SQL statements {phases['sql_s']:.2f} s")

    imported = imports_of(["-m", "pipeline", *main_args], env)
    by_mlflow = imports_of(["-c", "import mlflow"], env)
    heavy = sorted({name.split(".")[0] for name in set(imported) - set(by_mlflow)
                    if name.split(".")[0] in HEAVY})
    ours = {name: seconds for name, seconds in imported.items()
            if name not in by_mlflow and "." not in name}
    print(f"cached python -m pipeline main: heavy packages imported beyond import mlflow's: "
          f"{heavy or 'none'}; import mlflow {imported.get('mlflow', 0):.2f} s; slowest other "
          f"top-level imports: " + ", ".join(
              f"{name} {seconds:.2f} s" for name, seconds in
              sorted(ours.items(), key=lambda item: -item[1])[:4]))


def imports_of(args: list[str], env: dict) -> dict[str, float]:
    """Every module `python <args>` imports, with its cumulative import time in seconds."""
    result = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True)
    rows = [line.split("|") for line in result.stderr.splitlines()
            if line.startswith("import time:") and line.split("|")[1].strip().isdigit()]
    return {row[2].strip(): int(row[1]) / 1e6 for row in rows}


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()

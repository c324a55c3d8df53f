"""The 5-seed depth study with executor=local against executor=ray, on this machine.

Each variant runs `python -m pipeline main --force true` in a fresh temporary store (so every
variant draws its sample, trains, evaluates and compares from scratch, Ray's start-up
included) and the wall times are printed side by side with their ratio to `local` (one
training after another in main's process with every core: `--workers 1 --threads <cores>`,
the study before the local pool). `--repeats` rounds run the variants interleaved (min and
median per variant). A variant is `local`, `pool` (executor=local's default: the trainings side
by side, one thread each), `ray:<cpus_per_trial>`, or, with
`--variant LABEL='ARGS'`, any other arguments to main (an executor added later, say).

Then, per variant, where each training's time went besides its epochs: a task's overhead is
from the moment it could start (sent to Ray or to a pool worker, or told to run; for a task
that follows another on the same worker, the end of that run) to the start of its first epoch
(its first epoch_time_s point's time less that epoch), split into the part before its run
exists (Ray dispatch, worker start and imports) and the part after (params, sample, model);
first tasks on a worker and later ones apart. Last, the epoch times: a training's median
epoch under Ray against the same training in a bare 1-thread process (`python -m pipeline
train`, OMP_NUM_THREADS=1), alone and beside another seed (as two Ray tasks share two cores),
which separates Ray's own cost from the neighbour's. Not a test: it prints.

    python bench/ray_study.py --data_dir ../shared/datasets [--epochs 10] [--repeats 3] \
        [--variants local,pool,ray:1] [--variant pool3='--executor local --workers 3']
"""

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from scratch import scratch_folder

ROOT = Path(__file__).resolve().parents[1]
DISPATCHED = re.compile(r"^\[main\] (\S+): (sent to Ray|sent to a worker|running)")


def environment(store: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
            "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def timed_lines(command: list[str], env: dict) -> tuple[float, dict[str, float]]:
    """Wall time of `command`, and when (time.time) it printed that each job was dispatched."""
    dispatched = {}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        found = DISPATCHED.match(line)
        if found:
            dispatched.setdefault(found.group(1), time.time())
    if process.wait():
        raise SystemExit(f"{shlex.join(command)} failed with exit code {process.returncode}")
    return time.perf_counter() - started, dispatched


def stage_runs(store: str, stage: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    return [run for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id],
                                          f"tags.`pipeline.stage` = '{stage}'")]


def epoch_points(store: str, run_id: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    return sorted(client.get_metric_history(run_id, "epoch_time_s"), key=lambda m: m.step)


def overheads(store: str, dispatched: dict[str, float]) -> dict[str, list[tuple[float, float]]]:
    """Per 'first' and 'later' task on its worker: (before its run, in its run) seconds."""
    by_worker: dict[str, list] = {}
    for run in stage_runs(store, "train"):
        # The process that ran it: a Ray worker, a pool worker, or main's own process.
        worker = (run.data.tags.get("pipeline.ray_worker")
                  or run.data.tags.get("pipeline.local_worker") or "main")
        by_worker.setdefault(worker, []).append(run)
    found: dict[str, list[tuple[float, float]]] = {"first": [], "later": []}
    for runs in by_worker.values():
        runs.sort(key=lambda r: r.info.start_time)
        previous_end = None
        for run in runs:
            first_epoch = epoch_points(store, run.info.run_id)[0]
            training_starts = first_epoch.timestamp / 1000 - first_epoch.value
            could_start = dispatched[run.info.run_name] if previous_end is None else previous_end
            found["first" if previous_end is None else "later"].append(
                (run.info.start_time / 1000 - could_start,
                 training_starts - run.info.start_time / 1000))
            previous_end = run.info.end_time / 1000
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--study", default="experiments/depth_seeds.yaml")
    parser.add_argument("--epochs", default="", help="empty: the study's (20)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds, variants interleaved")
    parser.add_argument("--variants", default="local,pool,ray:1",
                        help="local (one after another, every core), pool (executor=local's "
                             "default) and ray:<cpus_per_trial>, comma-separated")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL='ARGS'",
                        help="another variant: LABEL, then main's arguments (repeatable)")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())

    variants: dict[str, list[str]] = {}
    cores = str(psutil.cpu_count(logical=False) or os.cpu_count())
    for variant in args.variants.split(","):
        executor, _, cpus = variant.partition(":")
        if executor == "local":  # the study before the pool: one after another, every core
            variants[variant] = ["--executor", "local", "--workers", "1", "--threads", cores]
        elif executor == "pool":  # executor=local's default: side by side, one thread each
            variants[variant] = ["--executor", "local"]
        else:
            variants[variant] = ["--executor", executor] + (["--cpus_per_trial", cpus]
                                                            if cpus else [])
    for extra in args.variant:
        label, _, arguments = extra.partition("=")
        variants[label] = shlex.split(arguments)

    epochs = args.epochs or "the study's"
    print(f"{args.study}, {epochs} epochs, {os.cpu_count()} CPUs, "
          f"{args.repeats} round(s); before: {load()}", flush=True)
    seconds: dict[str, list[float]] = {label: [] for label in variants}
    last: dict[str, tuple[str, dict]] = {}
    for round_ in range(args.repeats):
        for label, extra in variants.items():
            store = scratch_folder(f"bench-ray-{label.replace(':', '')}-")
            command = [sys.executable, "-m", "pipeline", "main", "--experiment", "bench-ray",
                       "--study", args.study, "--data_dir", data_dir, "--epochs", args.epochs,
                       "--force", "true", *extra]
            wall, dispatched = timed_lines(command, environment(store))
            seconds[label].append(wall)
            last[label] = (store, dispatched)
            print(f"round {round_ + 1} {label}: {wall:.1f} s ({load()})", flush=True)

    local = min(seconds["local"]) if seconds.get("local") else None
    print(f"\nafter: {load()}\n| variant | min (s) | median (s) | min / local min |\n"
          f"| --- | ---: | ---: | ---: |")
    for label, times in seconds.items():
        ratio = f"{min(times) / local:.2f}" if local else "-"
        print(f"| {label} | {min(times):.1f} | {statistics.median(times):.1f} | {ratio} |")

    print("\nper-training overhead (s), last round, median [max]: before its run exists "
          "(dispatch, worker start, imports) + in its run before epoch 1\n"
          "| variant | tasks | first on a worker | | later on a worker | |\n"
          "| --- | --- | ---: | ---: | ---: | ---: |")
    for label, (store, dispatched) in last.items():
        found = overheads(store, dispatched)
        cells = []
        for kind in ("first", "later"):
            before = [b for b, _ in found[kind]]
            inside = [i for _, i in found[kind]]
            cells += [f"{statistics.median(before):.2f} [{max(before):.2f}] + "
                      f"{statistics.median(inside):.2f}" if before else "-",
                      f"{len(before)} tasks"]
        print(f"| {label} | {len(found['first']) + len(found['later'])} | " + " | ".join(cells)
              + " |")

    ray_variants = [label for label in last if label.startswith("ray")]
    if ray_variants:
        epoch_ratio(last[ray_variants[0]][0], ray_variants[0], data_dir)


def epoch_ratio(store: str, variant: str, data_dir: str) -> None:
    """Each config's seed 0 again with one thread, on the same sample: alone, and beside its
    seed 1 (two processes at once, as two Ray tasks share the cores)."""
    times = {run.info.run_name: [m.value for m in epoch_points(store, run.info.run_id)]
             for run in stage_runs(store, "train")}
    epochs = len(next(iter(times.values())))
    print(f"\nmedian epoch time, {epochs} epochs (s): under Ray ({variant}, side by side) vs "
          f"bare 1-thread processes, alone and two side by side ({load()})\n"
          f"| training | Ray | bare alone | bare, two at once | Ray / alone | Ray / two at once |"
          f"\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in sorted(times):
        if not name.endswith("seed0"):
            continue
        config = name.split("-")[1]
        alone = bare_epochs(data_dir, config, epochs, seeds=[0])[name]
        pair = bare_epochs(data_dir, config, epochs, seeds=[0, 1])[name]
        on_ray = statistics.median(times[name])
        print(f"| {name} | {on_ray:.3f} | {alone:.3f} | {pair:.3f} | {on_ray / alone:.2f} | "
              f"{on_ray / pair:.2f} |", flush=True)


def bare_epochs(data_dir: str, config: str, epochs: int, seeds: list[int]) -> dict[str, float]:
    """`python -m pipeline train` with OMP_NUM_THREADS=1 for each seed at once, in a fresh
    store; each training's median epoch time."""
    store = scratch_folder("bench-ray-bare-")
    env = {**environment(store), "OMP_NUM_THREADS": "1"}
    timed_lines([sys.executable, "-m", "pipeline", "sample_data", "--experiment", "bench-ray",
                 "--data_dir", data_dir], env)
    [sample] = stage_runs(store, "sample_data")
    processes = [subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--experiment", "bench-ray", "--config",
         config, "--epochs", str(epochs), "--seed", str(seed), "--data_run_id",
         sample.info.run_id, "--log_model", "false"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for seed in seeds]
    if any(process.wait() for process in processes):
        raise SystemExit(f"a bare training of {config} failed")
    return {run.info.run_name: statistics.median(
        m.value for m in epoch_points(store, run.info.run_id))
        for run in stage_runs(store, "train")}


if __name__ == "__main__":
    main()

"""How many tasks per second Ray's scheduler sustains on this machine: trivial tasks (they
return at once) sent in one burst to a local Ray, in the pool of workers a study's tasks use
(pipeline.scale.ray_cluster.task_options), after one task has warmed the workers. The rate
is what dispatching costs, the upper bound for a study whose tasks took no time at all; a
training of minutes asks for one task per minutes. Not a test: it prints.

    python bench/ray_scheduler.py [--tasks 2000] [--rounds 3]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.scale.ray_cluster import task_options  # noqa: E402


def nothing() -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             logging_level="WARNING")
    try:
        task = ray.remote(nothing).options(**task_options(1, 0.0))
        ray.get([task.remote() for _ in range(os.cpu_count())])  # workers started
        rates = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            ray.get([task.remote() for _ in range(args.tasks)])
            rates.append(args.tasks / (time.perf_counter() - started))
            print(f"{args.tasks} tasks: {rates[-1]:.0f} tasks/s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
        print(f"\n{os.cpu_count()} CPUs, 1 CPU per task: min {min(rates):.0f}, median "
              f"{statistics.median(rates):.0f} tasks/s")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

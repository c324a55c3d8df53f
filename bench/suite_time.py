"""How long the test suite takes: `make test` (everything) and `make test-fast` (-m "not
integration"), each in one process and spread over pytest-xdist workers, side by side.

Runs each variant `--repeats` times, interleaved, and prints the wall time of each, the min and
median per variant and the ratio xdist / one process, with the load average before and after
and the commit. Not a test: it prints (a run that fails is reported as such, not timed as a
pass). The full suite takes minutes per run: start it on a quiet machine.

    python bench/suite_time.py [--workers 2] [--repeats 1] [--fast-only]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_suite(marker: str | None, workers: int) -> tuple[float, str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if marker:
        command += ["-m", marker]
    if workers:
        command += ["-n", str(workers), "--dist", "loadgroup"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    return seconds, summary if result.returncode == 0 else f"FAILED ({result.returncode}): {summary}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--fast-only", action="store_true", help="only make test-fast's tests")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, {os.cpu_count()} CPUs, load average before: {load()}")
    suites = [("test-fast", "not integration")] + ([] if args.fast_only else [("test", None)])
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for name, marker in suites:
            for workers in (0, args.workers):
                seconds, summary = run_suite(marker, workers)
                times.setdefault((name, workers), []).append(seconds)
                print(f"  {name:9} workers={workers}: {seconds:6.0f} s  {summary}  "
                      f"(load {load()})", flush=True)
    for name, _ in suites:
        one, spread = times[(name, 0)], times[(name, args.workers)]
        print(f"{name:9} one process: min {min(one):.0f} s, median {statistics.median(one):.0f} s; "
              f"{args.workers} workers: min {min(spread):.0f} s, median "
              f"{statistics.median(spread):.0f} s; ratio {min(spread) / min(one):.2f}")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()

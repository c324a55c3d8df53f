"""N concurrent trainings logging their per-epoch metrics into one tracking store.

Each of `--processes` processes creates a run and logs `--epochs` epochs of the five
per-epoch metrics `train` logs (one `log_batch` per epoch, as pipeline/metric_writer.py does),
as fast as the store takes them (`--pace 0`) or one epoch every `--pace` seconds. All start
together once every process has imported MLflow. `--processes 1,2,4,8` measures each count in
turn against the same server (a new experiment each). With `--checkpoint_mb S`, every
`--checkpoint_every` epochs each process also uploads a file of S MB to its run's artifacts
(`checkpoints/checkpoint.pt`, through the server's proxy, as train's checkpoint upload does).
Stores:

- `postgresql`: `mlflow server` on a PostgreSQL cluster of its own (durable: fsync on), with
  proxied artifacts, as `make server` starts it (`--auth` adds the basic-auth logins);
- `server-sqlite`: the same server on a SQLite file;
- `sqlite`: every process writing the SQLite file itself (the default `./mlflow.db` setup).

Then every run's metric history is read back: lost points, failed writes ("database is
locked" counted apart), and the metric points and requests (log_batch, create_run,
set_terminated, uploads) per second the store sustained while all wrote.
Everything runs on 127.0.0.1 in a temporary folder and is stopped at the end. Not a test: it
prints.

    python bench/tracking_load.py --processes 8 --epochs 20
    python bench/tracking_load.py --stores postgresql --processes 1,2,4,8,16 --epochs 20 \
        [--checkpoint_mb 3.7 --checkpoint_every 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.runs.tracking_access import HTTP_DEFAULTS  # noqa: E402
from pipeline.server.postgres import LocalPostgres  # noqa: E402
from pipeline.server.tracking_server import TrackingServer, free_port  # noqa: E402

METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s")
ADMIN_PASSWORD = "bench-admin-password"
STORES = ("postgresql", "server-sqlite", "sqlite")


def writer(uri: str, experiment_id: str, epochs: int, pace: float, go: Path, out: Path,
           checkpoint_mb: float = 0.0, checkpoint_every: int = 1) -> None:
    """One training's logging: runs in its own process (`--writer`)."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    checkpoint = out.with_name(f"{out.stem}-checkpoints") / "checkpoint.pt"
    if checkpoint_mb:
        checkpoint.parent.mkdir()
        checkpoint.write_bytes(os.urandom(int(checkpoint_mb * 1e6)))  # incompressible
    out.with_suffix(".ready").touch()
    while not go.exists():
        time.sleep(0.01)
    started = time.time()
    run_id = client.create_run(experiment_id).info.run_id
    failures: list[str] = []
    requests = 2  # create_run, set_terminated
    upload_s: list[float] = []
    for epoch in range(1, epochs + 1):
        now = int(time.time() * 1000)
        batch = [Metric(name, epoch / 100, now, epoch) for name in METRICS]
        try:
            requests += 1
            client.log_batch(run_id, metrics=batch)
        except Exception as err:  # noqa: BLE001 - counted, not retried: a lost point is the result
            failures.append(str(err).splitlines()[0][:300])
        if checkpoint_mb and epoch % checkpoint_every == 0:
            before = time.perf_counter()
            try:
                requests += 1
                client.log_artifact(run_id, str(checkpoint), "checkpoints")
                upload_s.append(time.perf_counter() - before)
            except Exception as err:  # noqa: BLE001 - counted like a lost point
                failures.append(str(err).splitlines()[0][:300])
        if pace:
            time.sleep(pace)
    client.set_terminated(run_id)
    out.write_text(json.dumps({"run_id": run_id, "started": started, "ended": time.time(),
                               "failures": failures, "requests": requests,
                               "upload_s": upload_s}))


def run_store(store: str, args, folder: Path) -> list[dict]:
    """One row per process count, all against one server (or SQLite file) of `store`."""
    server = cluster = None
    # Our commands' HTTP retries and timeouts (pipeline/tracking_access.py), unless set.
    env = {**HTTP_DEFAULTS, **os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    try:
        if store == "postgresql":
            cluster = LocalPostgres(folder / "postgres", free_port())
            cluster.init()
            cluster.start()
            backend, extra = cluster.uri(), cluster.env()
        else:
            backend, extra = f"sqlite:///{folder / 'mlflow.db'}", {}
        if store == "sqlite":
            uri = backend
        else:
            auth = args.auth and store == "postgresql"
            server = TrackingServer(folder / "server", backend, workers=args.workers, auth=auth,
                                    env={**extra, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD})
            server.start()
            uri = server.uri
            if auth:
                env["MLFLOW_TRACKING_USERNAME"] = "admin"
                env["MLFLOW_TRACKING_PASSWORD"] = ADMIN_PASSWORD
        os.environ.update({k: v for k, v in env.items() if k.startswith("MLFLOW_TRACKING_")})
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        name = store + (" + logins" if server and server.auth else "")
        return [_load(client, uri, env, name, count, args, folder / f"n{count}")
                for count in args.processes]
    finally:
        if server:
            server.stop()
        if cluster:
            cluster.stop()


def _load(client, uri: str, env: dict, store: str, count: int, args, folder: Path) -> dict:
    """`count` writers at once into a new experiment; what the store sustained."""
    folder.mkdir()
    # A server's experiments keep its default artifact root: proxied (mlflow-artifacts:/).
    experiment_id = client.create_experiment(
        f"load-{count}", artifact_location=None if client.tracking_uri.startswith("http")
        else (folder / "artifacts").as_uri())
    go = folder / "go"
    outs = [folder / f"writer{i}.json" for i in range(count)]
    processes = [subprocess.Popen(
        [sys.executable, __file__, "--writer", uri, experiment_id, str(args.epochs),
         str(args.pace), str(go), str(out), str(args.checkpoint_mb),
         str(args.checkpoint_every)], env=env) for out in outs]
    deadline = time.monotonic() + 600
    while not all(o.with_suffix(".ready").exists() for o in outs):
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in processes):
            raise RuntimeError(f"{store}: a writer did not start")
        time.sleep(0.2)
    go.touch()
    for process in processes:
        process.wait(timeout=1800)
    results = [json.loads(o.read_text()) for o in outs if o.exists()]
    failures = [f for r in results for f in r["failures"]]
    found = sum(len(client.get_metric_history(r["run_id"], name))
                for r in results for name in METRICS)
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    expected = count * args.epochs * len(METRICS)
    uploads = [s for r in results for s in r["upload_s"]]
    return {"store": store, "processes": count,
            "expected": expected, "found": found, "failed_writes": len(failures),
            "locked": sum("database is locked" in f for f in failures),
            "seconds": seconds, "points_per_s": found / seconds,
            "requests_per_s": sum(r["requests"] for r in results) / seconds,
            "uploads": len(uploads), "uploads_per_s": len(uploads) / seconds,
            "upload_mb_per_s": len(uploads) * args.checkpoint_mb / seconds,
            "median_upload_s": statistics.median(uploads) if uploads else None,
            "first_failure": failures[0] if failures else ""}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--writer":
        uri, experiment_id, epochs, pace, go, out, checkpoint_mb, every = sys.argv[2:]
        writer(uri, experiment_id, int(epochs), float(pace), Path(go), Path(out),
               float(checkpoint_mb), int(every))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="8", help="concurrent writers; 1,2,4: each in turn")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between epochs")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument("--auth", action="store_true", help="logins on the PostgreSQL server")
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--checkpoint_mb", type=float, default=0.0,
                        help="also upload a file of this size to each run's artifacts")
    parser.add_argument("--checkpoint_every", type=int, default=1, help="epochs between uploads")
    args = parser.parse_args()
    args.processes = [int(n) for n in args.processes.split(",")]
    rows = []
    for store in args.stores.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"tracking-load-{store}-"))
        folder.chmod(0o711)  # the cluster's owner must reach its folder
        try:
            for row in run_store(store, args, folder):
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    uploads = f", a {args.checkpoint_mb:g} MB upload every {args.checkpoint_every} epoch(s)" \
        if args.checkpoint_mb else ""
    print(f"\nprocesses x {args.epochs} epochs x {len(METRICS)} metrics{uploads}, "
          f"pace {args.pace} s, {args.workers} server workers, load {os.getloadavg()[0]:.2f}\n")
    print("| store | processes | points logged / expected | failed writes | of them \"database is "
          "locked\" | seconds | metric points/s | requests/s | uploads/s | upload MB/s | "
          "median upload (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        median = f"{r['median_upload_s']:.2f}" if r["median_upload_s"] is not None else "-"
        print(f"| {r['store']} | {r['processes']} | {r['found']} / {r['expected']} | "
              f"{r['failed_writes']} | {r['locked']} | {r['seconds']:.1f} | "
              f"{r['points_per_s']:.0f} | {r['requests_per_s']:.0f} | "
              f"{r['uploads_per_s']:.1f} | {r['upload_mb_per_s']:.1f} | {median} |")
    for r in rows:
        if r["first_failure"]:
            print(f"{r['store']}: first failure: {r['first_failure']}")


if __name__ == "__main__":
    main()

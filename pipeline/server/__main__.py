"""`python -m pipeline.server start|stop`: the team's tracking server in the background.

start: a PostgreSQL cluster of our own in the server folder (unless --backend-store-uri names
a database), then `mlflow server` on it with proxied artifacts and logins, detached; its pid
goes to the folder. stop: the server's process group, then that cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.server.postgres import LocalPostgres, PostgresError
from pipeline.server.tracking_server import ServerError, TrackingServer, healthy, stop_group

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FOLDER = PROJECT_ROOT / ".mlflow-server"
PID_FILE = "mlflow-server.json"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.server",
                                     description="The team's MLflow tracking server.")
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER,
                        help="where the cluster, artifacts, logins and logs live "
                             "(default .mlflow-server in the project, git-ignored)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 for a network)")
    parser.add_argument("--port", type=int, default=5050)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend-store-uri", default="",
                        help="postgresql://user@host:port/db (password through PGPASSFILE or "
                             "the URI); empty: a local cluster in the folder")
    parser.add_argument("--pg-port", type=int, default=5433,
                        help="port of the local cluster (127.0.0.1 only)")
    parser.add_argument("--artifacts-destination", default="",
                        help="where the server stores artifacts (default: folder/artifacts; "
                             "e.g. s3://bucket, with the server's own credentials)")
    parser.add_argument("--no-auth", action="store_true", help="no logins (not for a team)")
    return parser.parse_args(argv)


def start(args: argparse.Namespace) -> str:
    folder = args.folder.resolve()
    recorded = _recorded(folder)
    if recorded and healthy(recorded["uri"]):
        raise ServerError(f"a server from {folder} is already running at {recorded['uri']} "
                          f"(pid {recorded['pid']}); stop it first: make server-stop")
    auth = not args.no_auth
    if auth and not (folder / "basic_auth.db").is_file() and not os.environ.get(ADMIN_PASSWORD_ENV):
        raise ServerError(f"set {ADMIN_PASSWORD_ENV} for the first start: the server creates its "
                          f"user `admin` with that password (MLflow has no default one)")
    folder.mkdir(parents=True, exist_ok=True)
    env, cluster = {}, None
    backend = args.backend_store_uri
    if not backend:
        cluster = LocalPostgres(folder / "postgres", args.pg_port)
        cluster.init()
        cluster.start()
        backend, env = cluster.uri(), cluster.env()
    elif not backend.startswith("postgresql"):
        raise ServerError(f"--backend-store-uri must be a postgresql:// URI, got {backend!r}")
    server = TrackingServer(folder, backend, host=args.host, port=args.port,
                            workers=args.workers, auth=auth,
                            artifacts_destination=args.artifacts_destination or None, env=env)
    try:
        server.start()
    except ServerError:
        if cluster is not None:
            cluster.stop()
        raise
    (folder / PID_FILE).write_text(json.dumps(
        {"pid": server.process.pid, "uri": server.uri, "pg_port": args.pg_port}))
    login = ("\n  export MLFLOW_TRACKING_USERNAME=<user> MLFLOW_TRACKING_PASSWORD=<password>"
             if auth else "")
    return (f"MLflow tracking server at {server.uri} (backend {backend}, artifacts proxied to "
            f"{server.artifacts_destination}, log {server.log}). Point clients and workers at "
            f"it:\n  export MLFLOW_TRACKING_URI={server.uri}{login}\nStop it: make server-stop")


def stop(args: argparse.Namespace) -> str:
    folder = args.folder.resolve()
    recorded = _recorded(folder)
    said = []
    if recorded:
        if _is_other_program(recorded["pid"]):
            raise ServerError(f"pid {recorded['pid']} in {folder / PID_FILE} is no longer the "
                              f"mlflow server; delete that file and stop the server by hand")
        stop_group(recorded["pid"])
        (folder / PID_FILE).unlink()
        said.append(f"stopped the server at {recorded['uri']}")
    cluster_folder = folder / "postgres"
    if (cluster_folder / "data").is_dir():
        cluster = LocalPostgres(cluster_folder, recorded["pg_port"] if recorded else 0)
        if cluster.running():
            cluster.stop()
            said.append(f"stopped PostgreSQL in {cluster_folder}")
    return "; ".join(said) or f"nothing was running from {folder}"


def _is_other_program(pid: int) -> bool:
    """The recorded pid was reused by another program (the server's workers, if the leader
    died, are still its process group, which no new process can join)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"mlflow" not in command


def _recorded(folder: Path) -> dict | None:
    path = folder / PID_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        print(start(args) if args.action == "start" else stop(args))
    except (ServerError, PostgresError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

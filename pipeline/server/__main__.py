"""`python -m pipeline.server start|stop`: the team's tracking server in the background.

start: a PostgreSQL cluster of our own in the server folder (unless --backend-store-uri names
a database), then `mlflow server` on it with proxied artifacts and logins, detached; its pid
goes to the folder. stop: the server's process group, then that cluster.

The folder is its owner's alone (0700; 0710 with PostgreSQL's group when we are root and run a
cluster inside, so that its user can pass through). A database password (in BACKEND_STORE_URI)
is taken from the environment, never printed, never put on a command line. Without logins
the server stays on this machine unless the user says otherwise in so many words.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from pathlib import Path

from pipeline.server import backend
from pipeline.server.postgres import CLUSTER_OWNER, LocalPostgres, PostgresError
from pipeline.server.private import private_folder, write_private
from pipeline.server.tracking_server import ServerError, TrackingServer, healthy, stop_group

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FOLDER = PROJECT_ROOT / ".mlflow-server"
PID_FILE = "mlflow-server.json"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
ALLOWED_HOSTS_ENV = "MLFLOW_SERVER_ALLOWED_HOSTS"


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
    parser.add_argument("--backend-store-uri", default=None,
                        help=f"postgresql://user@host:port/db without a password (that goes in "
                             f"~/.pgpass, or the whole URI in ${backend.ENV}, the default); "
                             f"empty: a local cluster in the folder")
    parser.add_argument("--pg-port", type=int, default=5433,
                        help="port of the local cluster (127.0.0.1 only)")
    parser.add_argument("--artifacts-destination", default="",
                        help="where the server stores artifacts (default: folder/artifacts; "
                             "e.g. s3://bucket, with the server's own credentials)")
    parser.add_argument("--allowed-hosts", default=os.environ.get(ALLOWED_HOSTS_ENV),
                        help="Host headers the server answers besides 127.0.0.1 and localhost, "
                             "e.g. mlflow.team.example:* (default $MLFLOW_SERVER_ALLOWED_HOSTS, "
                             "else MLflow's: localhost and private IPs)")
    parser.add_argument("--no-auth", action="store_true",
                        help="no logins (refused off loopback without --allow-anonymous-remote)")
    parser.add_argument("--allow-anonymous-remote", action="store_true",
                        help="with --no-auth on a non-loopback --host: yes, anyone who reaches "
                             "the port may read and change everything")
    return parser.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it resolves to whatever the network says
        return False


def check_exposure(host: str, port: int, auth: bool, allow_anonymous_remote: bool) -> None:
    """No logins is for a server only this machine reaches, unless the user says otherwise."""
    if auth or allow_anonymous_remote or is_loopback(host):
        return
    raise ServerError(
        f"--no-auth on {host} lets anyone who reaches port {port} read, change and delete every "
        f"run and model: keep logins on (drop AUTH=false), listen on 127.0.0.1, or, if that is "
        f"what you want, add --allow-anonymous-remote (make: ANONYMOUS_REMOTE=yes)")


def backend_uri(args: argparse.Namespace) -> str:
    """The database URI: --backend-store-uri without a password, else $BACKEND_STORE_URI."""
    if args.backend_store_uri is None:
        uri = backend.from_environment()
        source = backend.ENV
    else:
        uri, source = args.backend_store_uri, "--backend-store-uri"
        if backend.has_password(uri):
            raise ServerError(
                f"--backend-store-uri {backend.masked(uri)} holds a password, which every local "
                f"user can read on a command line: pass the URI in the environment instead "
                f"({backend.ENV}=... make server) or the password in ~/.pgpass")
    if uri and not uri.startswith("postgresql"):
        raise ServerError(f"{source} must be a postgresql:// URI, got {backend.masked(uri)!r}")
    return uri


def start(args: argparse.Namespace) -> str:
    folder = args.folder.resolve()
    auth = not args.no_auth
    check_exposure(args.host, args.port, auth, args.allow_anonymous_remote)
    backend_store = backend_uri(args)
    recorded = _recorded(folder)
    if recorded and healthy(recorded["uri"]):
        raise ServerError(f"a server from {folder} is already running at {recorded['uri']} "
                          f"(pid {recorded['pid']}); stop it first: make server-stop")
    if auth and not (folder / "basic_auth.db").is_file() and not os.environ.get(ADMIN_PASSWORD_ENV):
        raise ServerError(f"set {ADMIN_PASSWORD_ENV} for the first start: the server creates its "
                          f"user `admin` with that password (MLflow has no default one)")
    env, cluster = {}, None
    if backend_store:
        backend.check_connection(backend_store)
        private_folder(folder)
    else:
        # As root the cluster runs as PostgreSQL's user, who must pass through the folder.
        private_folder(folder, group=CLUSTER_OWNER if os.geteuid() == 0 else None)
        cluster = LocalPostgres(folder / "postgres", args.pg_port)
        cluster.init()
        cluster.start()
        backend_store, env = cluster.uri(), cluster.env()
    server = TrackingServer(folder, backend_store, host=args.host, port=args.port,
                            workers=args.workers, auth=auth,
                            artifacts_destination=args.artifacts_destination or None, env=env,
                            allowed_hosts=args.allowed_hosts)
    try:
        server.start()
    except ServerError:
        if cluster is not None:
            cluster.stop()
        raise
    write_private(folder / PID_FILE, json.dumps(
        {"pid": server.process.pid, "uri": server.uri, "pg_port": args.pg_port}))
    login = ("\n  export MLFLOW_TRACKING_USERNAME=<user> MLFLOW_TRACKING_PASSWORD=<password>"
             if auth else "")
    return (f"MLflow tracking server at {server.uri} (backend {backend.masked(backend_store)}, "
            f"artifacts proxied to "
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
    except (ServerError, PostgresError, backend.BackendError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

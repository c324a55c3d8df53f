"""`mlflow server` in a process group of its own: start, wait until healthy, stop.

Artifacts are always proxied (`--artifacts-destination`): clients upload and download through
the server and need no storage credentials. With `auth`, MLflow's basic-auth app asks every
request for a login (see `write_auth_config`).

The database URI, which may hold a password, reaches the server through its environment
(`MLFLOW_BACKEND_STORE_URI`, which `mlflow server` reads and hands its workers the same way),
never its command line, which every local user can read. The server runs with umask 077:
its folder, artifacts, logins database and log are its owner's alone.

The server forks uvicorn workers (and, unless turned off, GenAI job workers) that outlive a
SIGTERM to its own pid, so it starts in a new session and is stopped by its process group.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.server.backend import scrub
from pipeline.server.private import open_private_log, private_folder, write_private

MLFLOW = Path(sys.executable).parent / "mlflow"
STARTUP_TIMEOUT_S = 300  # a first start on an empty PostgreSQL runs every migration
AUTH_CONFIG = "basic_auth.ini"
AUTH_CACHE_TTL_S = 60
# Without it MLflow 3 starts GenAI job workers whose background imports keep a 2-core machine
# busy for minutes; a tracking server for training runs needs none of them.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
# Allowed Host headers replace MLflow's defaults (localhost and private IPs); these keep the
# URI `start` prints, http://127.0.0.1:port, working on the server's own machine.
LOOPBACK_HOSTS = ("127.0.0.1", "127.0.0.1:*", "localhost", "localhost:*")


class ServerError(Exception):
    """The server did not come up; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_auth_config(folder: Path, database_uri: str | None = None) -> Path:
    """The basic-auth app's config: users and grants in `database_uri` (default: a SQLite file
    in `folder`), and no access without a grant, so READ and EDIT grants mean something.
    The admin's password comes from MLFLOW_AUTH_ADMIN_PASSWORD on the first start.

    Checking a password (scrypt) costs 0.6 s of CPU here, on every request: a training's
    requests waited seconds each. A checked login is remembered for AUTH_CACHE_TTL_S per
    worker; a changed password or a deleted user takes up to that long to reach the other
    workers."""
    path = folder / AUTH_CONFIG
    write_private(
        path,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {database_uri or 'sqlite:///' + str(folder / 'basic_auth.db')}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n"
    )
    return path


def secret_key(folder: Path) -> str:
    """One Flask secret for all workers (the auth app's CSRF tokens), kept across restarts."""
    path = folder / "flask_secret_key"
    if not path.is_file():
        write_private(path, secrets.token_hex(32))
    return path.read_text().strip()


class TrackingServer:
    """`mlflow server` with `backend_store_uri`, artifacts proxied to `folder/artifacts` (or
    `artifacts_destination`), its log in `folder/mlflow-server.log`. `allowed_hosts`: the Host
    headers it answers (MLflow's --allowed-hosts, e.g. "mlflow.team.example:*"), besides
    127.0.0.1 and localhost; None: MLflow's default, localhost and private IPs."""

    def __init__(self, folder: Path, backend_store_uri: str, host: str = "127.0.0.1",
                 port: int | None = None, workers: int = 1, auth: bool = False,
                 artifacts_destination: str | None = None, env: dict | None = None,
                 allowed_hosts: str | None = None):
        self.folder = Path(folder).resolve()
        self.backend_store_uri = backend_store_uri
        self.host, self.port, self.workers, self.auth = host, port or free_port(), workers, auth
        self.artifacts_destination = artifacts_destination or str(self.folder / "artifacts")
        self.extra_env = env or {}
        self.allowed_hosts = allowed_hosts
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / "mlflow-server.log"

    def command(self) -> list[str]:
        return [str(MLFLOW), "server", "--host", self.host, "--port", str(self.port),
                "--artifacts-destination", self.artifacts_destination,
                "--workers", str(self.workers),
                *(["--app-name", "basic-auth"] if self.auth else [])]

    def environment(self) -> dict[str, str]:
        # Not the caller's MLFLOW_* settings (a tracking URI, a run id): the server's own only.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(SERVER_ENV)
        env["MLFLOW_BACKEND_STORE_URI"] = self.backend_store_uri
        if self.allowed_hosts:
            env["MLFLOW_SERVER_ALLOWED_HOSTS"] = ",".join((self.allowed_hosts, *LOOPBACK_HOSTS))
        env["PATH"] = f"{MLFLOW.parent}{os.pathsep}{env.get('PATH', '')}"
        if self.auth:
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.folder / AUTH_CONFIG)
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret_key(self.folder)
            if os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
                env["MLFLOW_AUTH_ADMIN_PASSWORD"] = os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start it and wait until /health answers; ServerError (with its log) if it does not."""
        if not self.folder.is_dir():
            private_folder(self.folder)
        if self.auth and not (self.folder / AUTH_CONFIG).is_file():
            write_auth_config(self.folder)
        with open_private_log(self.log) as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.folder, env=self.environment(), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                umask=0o077)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if healthy(self.uri):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        self.stop()
        tail = scrub(self.log.read_text(errors="replace")[-3000:], self.backend_store_uri)
        raise ServerError(f"mlflow server on {self.uri} did not start (log {self.log}):\n{tail}")

    def stop(self) -> None:
        """SIGTERM to the whole group, then SIGKILL to whatever of it is left."""
        if self.process is not None:
            stop_group(self.process.pid, reap=self.process.poll)


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def stop_group(pgid: int, reap=lambda: None, grace_s: float = 10) -> None:
    """End process group `pgid` (its leader's pid): SIGTERM, up to `grace_s` for all of it
    to exit, then SIGKILL for what is left (workers can outlive their leader). `reap` collects
    the leader when it is our child, else it would count as alive."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while True:
        reap()
        if not _group_alive(pgid):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while _group_alive(pgid) and time.monotonic() < deadline + 10:
        reap()
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: an orphaned worker's
    exit status may never be collected where PID 1 is not an init."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _parent, group = text[text.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state != "Z":
            return True
    return False

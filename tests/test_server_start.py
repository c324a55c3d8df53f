"""Starting the team's tracking server safely: `make server` / `python -m pipeline.server start`.

A database password never shows (not printed, not on a command line, not in a file others can
read), the server's folder and secrets are private from their first byte, paths reach programs
without a shell, and serving beyond this machine is a decision the user states.

The fast refusals need nothing; the rest start a real PostgreSQL cluster (in a folder whose path
has a space and a dollar sign) and one real `mlflow server` through `make server`, shared by this
module and stopped at its end, on failure too.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from conftest import REPO_ROOT, reachable_folder, requires_postgres

from pipeline.server import tracking_server
from pipeline.server.__main__ import main as server_main
from pipeline.server.__main__ import parse
from pipeline.server.postgres import LocalPostgres
from pipeline.server.tracking_server import (
    TrackingServer, free_port, secret_key, stop_group, write_auth_config,
)

ADMIN = ("admin", "admin-password-for-tests")
PASSWORD = "db-Pa55word-that-must-never-show"


def server_env(**extra: str) -> dict:
    """A user's shell: none of the caller's MLFLOW_* settings, the venv's programs first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# Refused before anything starts
# --------------------------------------------------------------------------------------------


def test_an_unreachable_postgresql_is_refused_in_one_line_within_seconds(tmp_path):
    port = free_port()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.server", "start", "--folder", str(tmp_path / "srv"),
         "--no-auth", "--port", str(free_port()), "--workers", "1",
         "--backend-store-uri", f"postgresql://alice@127.0.0.1:{port}/mlflow"],
        cwd=REPO_ROOT, env=server_env(), capture_output=True, text=True, timeout=200)
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot connect to PostgreSQL at 127.0.0.1:{port} "), line
    assert "Connection refused" in line and "BACKEND_STORE_URI" in line
    assert took < 60, f"took {took:.0f} s"


def test_a_password_on_the_command_line_is_refused_without_echoing_it(tmp_path, capsys):
    code = server_main(["start", "--folder", str(tmp_path / "srv"), "--no-auth",
                        "--backend-store-uri", f"postgresql://alice:{PASSWORD}@db.example/mlflow"])
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert PASSWORD not in line
    assert "postgresql://alice:***@db.example/mlflow" in line and "BACKEND_STORE_URI" in line
    assert not (tmp_path / "srv").exists(), "nothing is set up before the refusal"


def test_a_refused_backend_from_the_environment_is_named_without_its_password(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("BACKEND_STORE_URI", f"mysql://alice:{PASSWORD}@db.example/mlflow")
    assert server_main(["start", "--folder", str(tmp_path / "srv"), "--no-auth"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert PASSWORD not in line
    assert line == ("error: BACKEND_STORE_URI must be a postgresql:// URI, got "
                    "'mysql://alice:***@db.example/mlflow'")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "team-host.example"])
def test_no_logins_off_loopback_is_refused_unless_said_in_so_many_words(
    tmp_path, capsys, host
):
    code = server_main(["start", "--folder", str(tmp_path / "srv"), "--host", host, "--no-auth"])
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --no-auth on {host} lets anyone who reaches port 5050 ")
    assert "--allow-anonymous-remote" in line and "ANONYMOUS_REMOTE=yes" in line
    assert not (tmp_path / "srv").exists(), "nothing is set up before the refusal"


@pytest.mark.parametrize("host, auth, allow, refused", [
    ("127.0.0.1", False, False, False),
    ("localhost", False, False, False),
    ("::1", False, False, False),
    ("0.0.0.0", True, False, False),
    ("0.0.0.0", False, True, False),
    ("0.0.0.0", False, False, True),
])
def test_which_starts_count_as_anonymous_remote(host, auth, allow, refused):
    from pipeline.server.__main__ import check_exposure
    from pipeline.server.tracking_server import ServerError

    if refused:
        with pytest.raises(ServerError, match="--allow-anonymous-remote"):
            check_exposure(host, 5050, auth=auth, allow_anonymous_remote=allow)
    else:
        check_exposure(host, 5050, auth=auth, allow_anonymous_remote=allow)


def test_allowed_hosts_reach_the_server_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", "from-env.example:*")
    from_env = parse(["start"]).allowed_hosts
    from_flag = parse(["start", "--allowed-hosts", "team-host.example:5050"]).allowed_hosts
    for given, expected in ((from_env, "from-env.example:*"),
                            (from_flag, "team-host.example:5050")):
        env = TrackingServer(tmp_path, "postgresql://x@127.0.0.1/db",
                             allowed_hosts=given).environment()
        hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
        assert hosts[0] == expected
        # The URI `start` prints (127.0.0.1) keeps working for this machine's clients.
        assert "127.0.0.1:*" in hosts and "localhost:*" in hosts


# --------------------------------------------------------------------------------------------
# Secrets are private from their first byte
# --------------------------------------------------------------------------------------------


@contextmanager
def chmod_disabled():
    """What a file is created with is what it keeps: a later chmod cannot hide a wider start."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "chmod", lambda *args, **kwargs: None)
        mp.setattr(os, "fchmod", lambda *args, **kwargs: None)
        yield


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_servers_secrets_are_created_private(tmp_path):
    folder = tmp_path / "srv"
    folder.mkdir()
    with chmod_disabled():
        secret_key(folder)
        write_auth_config(folder)
    assert mode(folder / "flask_secret_key") == 0o600
    assert mode(folder / tracking_server.AUTH_CONFIG) == 0o600
    assert secret_key(folder) == (folder / "flask_secret_key").read_text().strip()


# --------------------------------------------------------------------------------------------
# Real clusters: the user's own in a folder with a space and a dollar sign, one under
# `make server`
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A PostgreSQL of the user's own, reached with a password in BACKEND_STORE_URI, in a folder
    whose path has a space and a dollar sign. Created with chmod turned off: what its secrets
    are created with is what they keep."""
    root = reachable_folder("mnist server $HOME ")
    cluster = LocalPostgres(root / "postgres", free_port(), durable=False)
    try:
        with chmod_disabled():
            cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@requires_postgres
@pytest.mark.integration
def test_the_clusters_password_file_is_created_private(cluster):
    assert mode(cluster.password_file) == 0o600
    assert mode(cluster.folder) == 0o700


@requires_postgres
@pytest.mark.integration
def test_a_cluster_in_a_folder_with_a_space_and_a_dollar_sign_runs(cluster):
    assert " " in str(cluster.folder) and "$HOME" in str(cluster.folder)
    assert cluster.running()
    # Its socket is where -k said, the path taken literally.
    assert (cluster.folder / f".s.PGSQL.{cluster.port}").is_socket()
    assert cluster._run("psql", *cluster._connect(), "-tAc", "SELECT 41 + 1").strip() == "42"
    cluster.stop()
    assert not cluster.running()
    cluster.start()  # the module's `make server` runs on it next


def cluster_password(cluster: LocalPostgres) -> str:
    return cluster.password_file.read_text().splitlines()[0].rsplit(":", 1)[1]


def group_cmdlines(pgid: int) -> list[bytes]:
    lines = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            text = (proc / "stat").read_text()
            if int(text[text.rindex(")") + 2:].split()[2]) == pgid:
                lines.append((proc / "cmdline").read_bytes())
        except (OSError, ValueError):
            continue
    return lines


def make(*args: str, env: dict, watch_for: str = "", timeout: float = 600):
    """The Makefile's target with this interpreter's venv, never reinstalling into it; while it
    runs, every process's command line is read for `watch_for`: (result, command lines seen
    holding it)."""
    venv = Path(sys.executable).parent.parent
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            ["make", "-o", "setup", "-o", str(venv / ".installed"), *args, f"VENV={venv}"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=err, text=True)
        leaks, deadline = set(), time.monotonic() + timeout
        while process.poll() is None:
            if watch_for:
                leaks.update(c for c in all_cmdlines() if watch_for.encode() in c)
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"make {' '.join(args)} ran past {timeout} s")
            time.sleep(0.2)
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(process.args, process.returncode, out.read(),
                                             err.read())
    return result, sorted(leaks)


def all_cmdlines() -> list[bytes]:
    lines = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            lines.append((proc / "cmdline").read_bytes())
        except OSError:
            continue
    return lines


@pytest.fixture(scope="module")
def made_server(cluster):
    """`BACKEND_STORE_URI=postgresql://postgres:<password>@... make server`, allowed hosts set."""
    root = reachable_folder("mnist-made-server-")
    folder, port = root / "srv", free_port()
    env = server_env(
        BACKEND_STORE_URI=f"postgresql://postgres:{cluster_password(cluster)}@127.0.0.1:"
                          f"{cluster.port}/mlflow",
        MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1])
    settings = [f"SERVER_DIR={folder}", f"SERVER_PORT={port}", "SERVER_WORKERS=1",
                "SERVER_ALLOWED_HOSTS=team-host.example:*"]
    pid = None
    try:
        password = cluster_password(cluster)
        started, leaks = make("server", *settings, env=env, watch_for=password)
        recorded = folder / "mlflow-server.json"
        assert recorded.is_file(), started.stdout[-3000:] + started.stderr[-3000:]
        pid = json.loads(recorded.read_text())["pid"]
        yield {"folder": folder, "port": port, "uri": f"http://127.0.0.1:{port}",
               "password": password, "started": started, "leaks": leaks,
               "cmdlines": group_cmdlines(pid)}
        stopped, leaks = make("server-stop", *settings, env=env, watch_for=password, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert password not in stopped.stdout + stopped.stderr and not leaks
    finally:
        if pid is not None:
            stop_group(pid)
        shutil.rmtree(root, ignore_errors=True)


@requires_postgres
@pytest.mark.integration
def test_a_password_in_backend_store_uri_shows_nowhere(made_server):
    password, started = made_server["password"], made_server["started"]
    assert started.returncode == 0, started.stderr[-3000:]
    assert password not in started.stdout and password not in started.stderr
    assert "(backend postgresql://postgres:***@127.0.0.1:" in started.stdout
    assert not made_server["leaks"], "a command line held the password while starting"
    assert made_server["cmdlines"], "no process of the server's group was found"
    assert not [c for c in made_server["cmdlines"] if password.encode() in c]
    holding = [p for p in made_server["folder"].rglob("*")
               if p.is_file() and password.encode() in p.read_bytes()]
    assert not holding, f"files holding the password: {holding}"


@requires_postgres
@pytest.mark.integration
def test_the_server_folder_is_private_to_its_owner(made_server):
    folder = made_server["folder"]
    assert mode(folder) == 0o700
    for name in ("flask_secret_key", tracking_server.AUTH_CONFIG, "basic_auth.db",
                 "mlflow-server.log"):
        assert mode(folder / name) == 0o600, name
    others = {str(p.relative_to(folder)): oct(mode(p)) for p in folder.rglob("*")
              if mode(p) & 0o077}
    assert not others, f"open to group or others: {others}"


@requires_postgres
@pytest.mark.integration
def test_clients_reach_the_server_by_an_allowed_host_name(made_server):
    url = f"{made_server['uri']}/api/2.0/mlflow/experiments/search?max_results=1"
    port = made_server["port"]

    def status(host: str) -> int:
        return requests.get(url, headers={"Host": host}, auth=ADMIN, timeout=60).status_code

    assert status(f"team-host.example:{port}") == 200
    assert status(f"127.0.0.1:{port}") == 200
    assert status(f"elsewhere.example:{port}") == 403


@requires_postgres
@pytest.mark.integration
def test_make_server_runs_its_own_cluster_in_a_folder_with_a_space():
    root = reachable_folder("mnist-team-")
    # (Not a dollar sign here: make itself would expand it before any program saw the path.)
    folder, port, pg_port = root / "the team's server", free_port(), free_port()
    settings = [f"SERVER_DIR={folder}", f"SERVER_PORT={port}", f"PG_PORT={pg_port}",
                "SERVER_WORKERS=1"]
    env = server_env(MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1])
    pid = None
    try:
        started, _ = make("server", *settings, env=env)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        pid = json.loads((folder / "mlflow-server.json").read_text())["pid"]
        assert tracking_server.healthy(f"http://127.0.0.1:{port}")
        # As root the cluster runs as `postgres`, who may pass through the folder, not list it.
        if os.geteuid() == 0:
            assert mode(folder) == 0o710 and folder.stat().st_gid == grp_id("postgres")
        else:
            assert mode(folder) == 0o700
        assert mode(folder / "postgres.pgpass") == 0o600
        stopped, _ = make("server-stop", *settings, env=env, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped PostgreSQL" in stopped.stdout
        assert not LocalPostgres(folder / "postgres", pg_port).running()
    finally:
        if pid is not None:
            stop_group(pid)
        cluster = LocalPostgres(folder / "postgres", pg_port)
        if cluster.running():
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def grp_id(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid

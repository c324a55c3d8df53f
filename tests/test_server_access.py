"""Fast checks of the team-server pieces that need no server: `python -m pipeline.server`
refusing what it cannot start, and the one-line messages for a refused login or an
unreachable server. The real server is in test_team_server.py."""

from __future__ import annotations

import os
import socket

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from pipeline.runs import tracking_access
from pipeline.server.__main__ import main as server_main

URI = "http://127.0.0.1:5999"


@pytest.fixture
def remote(monkeypatch):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(URI)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    yield monkeypatch
    mlflow.set_tracking_uri(previous)


def test_the_first_start_needs_the_admin_password(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    assert server_main(["start", "--folder", str(tmp_path / "server")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: set MLFLOW_AUTH_ADMIN_PASSWORD for the first start")
    assert not (tmp_path / "server").exists(), "nothing is set up before the refusal"


def test_the_backend_must_be_postgresql(tmp_path, capsys):
    code = server_main(["start", "--folder", str(tmp_path), "--no-auth",
                        "--backend-store-uri", "sqlite:///mlflow.db"])
    assert code == 2
    assert "must be a postgresql:// URI" in capsys.readouterr().err


def test_stop_with_nothing_running_says_so(tmp_path, capsys):
    assert server_main(["stop", "--folder", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"nothing was running from {tmp_path}"


# A refused login and a denied write are checked against the real server with logins, in
# test_team_server.py (test_a_wrong_password_stops_the_command_in_one_line,
# test_a_stage_without_the_right_login_says_so_and_leaves_no_run).


@pytest.fixture
def quick_http(monkeypatch):
    """One try, a short wait: the real client's real errors, in a second."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _explained_failure(uri: str) -> str:
    mlflow.set_tracking_uri(uri)
    with pytest.raises(MlflowException) as raised:
        mlflow.search_experiments()
    explained = tracking_access.explain(raised.value)
    assert explained is not None, f"not recognised: {raised.value}"
    return str(explained)


def test_a_refused_connection_names_the_uri(remote, quick_http):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    assert _explained_failure(uri).startswith(
        f"cannot reach the tracking server {uri} (connection refused; ")


def test_a_server_that_never_answers_names_the_wait(remote, quick_http):
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        message = _explained_failure(uri)
    assert message.startswith(f"cannot reach the tracking server {uri} (no answer")


def test_other_errors_are_left_alone(remote):
    assert tracking_access.explain(MlflowException("RESOURCE_DOES_NOT_EXIST")) is None
    assert tracking_access.explain(ValueError("a bug")) is None


def test_http_defaults_do_not_override_the_users_choice(monkeypatch):
    for name in tracking_access.HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    tracking_access.apply_http_defaults()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"

"""Fast checks of the team-server pieces that need no server: `python -m pipeline.server`
refusing what it cannot start, and the one-line messages for a refused login or an
unreachable server. The real server is in test_team_server.py."""

from __future__ import annotations

import os

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

from pipeline import tracking_access
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


def test_a_refused_login_names_the_user_and_the_variables(remote):
    remote.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    refused = MlflowException("API request ... failed with error code 401", UNAUTHENTICATED)
    assert str(tracking_access.explain(refused)) == (
        f"the tracking server {URI} refused the login of user 'alice' (wrong password or no "
        f"such user): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")


def test_no_login_says_which_variables_to_set(remote):
    refused = MlflowException("API request ... failed with error code 401", UNAUTHENTICATED)
    assert str(tracking_access.explain(refused)) == (
        f"the tracking server {URI} requires a login: set MLFLOW_TRACKING_USERNAME and "
        f"MLFLOW_TRACKING_PASSWORD")


def test_a_denied_write_names_the_experiment(remote):
    denied = MlflowException("Permission denied", PERMISSION_DENIED)
    message = str(tracking_access.explain(denied, "mnist-mlp"))
    assert "a stage needs EDIT on experiment 'mnist-mlp'" in message


def test_a_refused_connection_names_the_uri(remote):
    try:
        try:
            raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")
        except requests.exceptions.ConnectionError as cause:
            raise MlflowException(f"API request to {URI}/api/2.0/x failed with exception "
                                  f"{cause}")  # as MLflow's REST client does
    except MlflowException as err:
        message = str(tracking_access.explain(err))
    assert message.startswith(f"cannot reach the tracking server {URI} (connection refused; ")


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

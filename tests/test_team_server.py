"""The team's tracking server for real: a PostgreSQL cluster and `mlflow server` on it (proxied
artifacts, logins), on free 127.0.0.1 ports in a temporary folder, shared by this module and
stopped at its end, on failure too.

Through it: the study with `mlflow run .` as a user with EDIT (then again, reusing every
stage), the refused logins and permissions, and the champion served over HTTP.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import (REAL_DATA_ROOT, REPO_ROOT, reachable_folder, requires_postgres,
                      requires_real_mnist, subprocess_env)
from mlflow import MlflowClient

from pipeline import cli
from pipeline.runs.tracking_access import HTTP_DEFAULTS
from pipeline.server.postgres import LocalPostgres
from pipeline.server.tracking_server import MLFLOW, TrackingServer, free_port, stop_group

pytestmark = [
    pytest.mark.integration, requires_real_mnist, requires_postgres,
]

ADMIN = ("admin", "admin-password-for-tests")
TRAINER = ("trainer", "trainer-password-1")  # EDIT on the experiment
READER = ("reader", "reader-password-1")  # READ on the experiment
EXPERIMENT = "team-study"
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class TeamServer:
    uri: str
    experiment_id: str
    artifacts: Path  # where the server keeps the artifacts it proxies


@pytest.fixture(scope="module")
def team_server():
    root = reachable_folder("mnist-team-server-")
    cluster = LocalPostgres(root / "postgres", free_port(), durable=False)
    server = TrackingServer(root / "server", cluster.uri(), auth=True,
                            env={**cluster.env(), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1]})
    try:
        cluster.init()
        cluster.start()
        server.start()
        experiment_id = admin(server.uri, "2.0/mlflow/experiments/create",
                              {"name": EXPERIMENT})["experiment_id"]
        for (user, password), permission in ((TRAINER, "EDIT"), (READER, "READ")):
            admin(server.uri, "2.0/mlflow/users/create",
                  {"username": user, "password": password})
            admin(server.uri, "3.0/mlflow/users/permissions/grant",
                  {"username": user, "resource_type": "experiment",
                   "resource_id": experiment_id, "permission": permission})
        yield TeamServer(server.uri, experiment_id, Path(server.artifacts_destination))
    finally:
        server.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def admin(uri: str, path: str, body: dict) -> dict:
    """What the README's curl commands do, as the server's admin."""
    answer = requests.post(f"{uri}/api/{path}", json=body, auth=ADMIN, timeout=30)
    answer.raise_for_status()
    return answer.json()


def client_env(tracking_store, server: TeamServer, login: tuple[str, str] | None) -> dict:
    env = {**subprocess_env(tracking_store), "MLFLOW_TRACKING_URI": server.uri}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", *HTTP_DEFAULTS):
        env.pop(name, None)
    if login:
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = login
    return env


@contextmanager
def talking_to(uri: str, login: tuple[str, str] | None):
    """This process's MLflow pointed at `uri` with `login` (or none), as a user's shell."""
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", *HTTP_DEFAULTS):
            mp.delenv(name, raising=False)
        if login:
            mp.setenv("MLFLOW_TRACKING_USERNAME", login[0])
            mp.setenv("MLFLOW_TRACKING_PASSWORD", login[1])
        mlflow.set_tracking_uri(uri)
        try:
            yield MlflowClient(uri)
        finally:
            mlflow.set_tracking_uri(previous)


def runs(client: MlflowClient, server: TeamServer) -> list:
    return client.search_runs([server.experiment_id], order_by=["attributes.start_time ASC"])


# --------------------------------------------------------------------------------------------
# The study through the server, as the user with EDIT
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    model_name: str
    parent_id: str
    command: list[str]
    path: Path  # the study file


# Real MNIST, the first 10 images of each digit: the 100 test images the served champion is
# asked about. The point is the way through the server, not accuracy: 6,000 images a split
# took a minute more of a 2-core machine. Stages one after another in main's process
# (workers=1): a pool worker's start and shutdown cost the study twice its own time.
STUDY_FILE = """\
name: team
configs: [mlp3]
seeds: [0]
sample: {samples_per_class: 10, sampling: first, download: false}
train: {epochs: 2, batch_size: 16}
"""


def mlflow_run(tracking_store, server: TeamServer, command: list[str]):
    return subprocess.run(command, cwd=REPO_ROOT, env=client_env(tracking_store, server, TRAINER),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def study(tracking_store, team_server, tmp_path_factory) -> Study:
    model_name = f"mnist-mlp-team-{uuid.uuid4().hex[:8]}"
    path = tmp_path_factory.mktemp("team-study") / "team.yaml"
    path.write_text(STUDY_FILE)
    command = [str(MLFLOW), "run", ".", "--env-manager", "local", "--experiment-name", EXPERIMENT,
               "-P", f"study={path}", "-P", f"data_dir={REAL_DATA_ROOT}", "-P", "workers=1",
               "-P", f"registered_model_name={model_name}"]
    result = mlflow_run(tracking_store, team_server, command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with talking_to(team_server.uri, TRAINER) as client:
        [parent] = [r for r in runs(client, team_server)
                    if r.data.tags.get("pipeline.stage") == "main"]
    return Study(model_name, parent.info.run_id, command, path)


def test_the_study_runs_through_the_server_with_proxied_artifacts(team_server, study):
    with talking_to(team_server.uri, TRAINER) as client:
        everything = runs(client, team_server)
        children = [r for r in everything if r.info.run_id != study.parent_id]
        assert client.get_run(study.parent_id).info.status == "FINISHED"
        assert sorted(r.data.tags["pipeline.stage"] for r in children) == [
            "compare", "evaluate", "sample_data", "train"]
        assert all(r.data.tags.get(PARENT_TAG) == study.parent_id for r in children)
        assert all(r.info.status == "FINISHED" for r in children)

        # Artifacts go through the server (mlflow-artifacts:/), land in its folder, and come
        # back to a client that has no access to that folder's storage of its own.
        [trained] = [r for r in children if r.data.tags["pipeline.stage"] == "train"]
        assert trained.info.artifact_uri.startswith("mlflow-artifacts:/")
        history = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=trained.info.run_id, artifact_path="history.csv"))
        assert history["epoch"].tolist() == [1, 2]
        stored = list(team_server.artifacts.rglob(f"{trained.info.run_id}/artifacts/history.csv"))
        assert len(stored) == 1

        champion = client.get_model_version_by_alias(study.model_name, "champion")
        assert champion.run_id == trained.info.run_id


def test_the_same_study_again_reuses_every_stage(team_server, study):
    """Reuse through the server: the cache keys are found in its store. In this process (the
    `mlflow run` wiring is proven by the study above and tests/test_workflow_integration.py)."""
    with talking_to(team_server.uri, TRAINER) as client:
        before = {r.info.run_id for r in runs(client, team_server)}
        assert cli.main(["main", "--experiment", EXPERIMENT, "--study", str(study.path),
                         "--data_dir", str(REAL_DATA_ROOT), "--workers", "1",
                         "--registered_model_name", study.model_name]) == 0
        new = [r for r in runs(client, team_server) if r.info.run_id not in before]
    assert [r.data.tags["pipeline.stage"] for r in new] == ["main"], "a stage ran again"
    assert new[0].data.metrics["stages_reused"] == 4
    assert new[0].data.metrics["stages_run"] == 0


# --------------------------------------------------------------------------------------------
# Logins
# --------------------------------------------------------------------------------------------


def test_a_wrong_password_stops_the_command_in_one_line(tracking_store, team_server):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "compare", "--experiment", EXPERIMENT,
         "--run_ids", "0"],
        cwd=REPO_ROOT, env=client_env(tracking_store, team_server, (TRAINER[0], "not-it")),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: the tracking server {team_server.uri} refused the login of user 'trainer' "
        f"(wrong password or no such user): check MLFLOW_TRACKING_USERNAME and "
        f"MLFLOW_TRACKING_PASSWORD"]


@pytest.mark.parametrize("login, problem", [
    (None, "requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    (READER, "denied user 'reader' a write (permission denied): a stage needs EDIT on "
             f"experiment '{EXPERIMENT}'"),
], ids=["no-login", "read-only-user"])
def test_a_stage_without_the_right_login_says_so_and_leaves_no_run(
    team_server, study, capsys, login, problem
):
    with talking_to(team_server.uri, TRAINER) as client:
        before = {r.info.run_id for r in runs(client, team_server)}
        [trained] = [r for r in runs(client, team_server)
                     if r.data.tags.get("pipeline.stage") == "train"]
    with talking_to(team_server.uri, login):
        code = cli.main(["compare", "--experiment", EXPERIMENT, "--run_ids", trained.info.run_id,
                         "--registered_model_name", study.model_name])
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: the tracking server {team_server.uri} ") and problem in line
    with talking_to(team_server.uri, TRAINER) as client:
        after = runs(client, team_server)
    assert {r.info.run_id for r in after} == before
    assert not [r for r in after if r.info.status == "RUNNING"]


def test_an_unreachable_server_is_named_in_one_line(tracking_store, team_server):
    nobody = f"http://127.0.0.1:{free_port()}"
    # The pipeline's own retries (HTTP_DEFAULTS) still run, so a line they might print would
    # show; only their pauses (seconds of backoff and jitter) are taken out.
    env = {**client_env(tracking_store, team_server, TRAINER), "MLFLOW_TRACKING_URI": nobody,
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "compare", "--run_ids", "0"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach the tracking server {nobody} (connection refused")


# --------------------------------------------------------------------------------------------
# Serving the champion
# --------------------------------------------------------------------------------------------


@contextmanager
def serving(tracking_store, server: TeamServer, model_uri: str):
    """`mlflow models serve` of `model_uri` (what `make serve` runs) on a free port."""
    port = free_port()
    process = subprocess.Popen(
        [str(MLFLOW), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT, env=client_env(tracking_store, server, TRAINER),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _answers(f"{url}/ping"):
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the model server did not start in 300 s"
            time.sleep(0.2)
        yield url
    finally:
        stop_group(process.pid, reap=process.poll)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def test_the_served_champion_answers_evaluates_digits_with_probabilities(
    tracking_store, team_server, study
):
    from pipeline.runs.samples import fetch_sample

    with talking_to(team_server.uri, TRAINER) as client:
        champion = client.get_model_version_by_alias(study.model_name, "champion")
        [scored] = [r for r in runs(client, team_server)
                    if r.data.tags.get("pipeline.source_run_id") == champion.run_id]
        evaluated = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=scored.info.run_id, artifact_path="predictions.csv"))
        sample = fetch_sample(scored.data.params["sample_run_id"])
    pixels = sample.test.images[:100].reshape(100, 784).numpy().astype(int)  # raw 0-255

    with serving(tracking_store, team_server, f"models:/{study.model_name}@champion") as url:
        answer = requests.post(f"{url}/invocations", json={"inputs": pixels.tolist()},
                               timeout=120)
        malformed = requests.post(f"{url}/invocations", json={"inputs": [[1, 2, 3]]},
                                  timeout=120)

    assert answer.status_code == 200, answer.text[:2000]
    predictions = answer.json()["predictions"]
    assert len(predictions) == 100
    digits = [p["digit"] for p in predictions]
    assert digits == evaluated["digit"].tolist()[:100]
    assert all(isinstance(d, int) for d in digits)
    probabilities = np.array([p["probabilities"] for p in predictions])
    assert probabilities.shape == (100, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    assert (probabilities.argmax(axis=1) == digits).all()

    assert malformed.status_code == 400
    message = json.loads(malformed.text)["message"]
    assert "Failed to enforce schema" in message and "(-1, 784)" in message

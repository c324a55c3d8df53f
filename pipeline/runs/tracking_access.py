"""Reaching a tracking server: bounded HTTP waits, and one line for a refused login or an
unreachable server instead of a traceback.

MLflow's own defaults retry a failed request 7 times with backoff, each try waiting up to
120 s for an answer: a wrong port took minutes to report. Our commands use the shorter limits
below unless the user has set the variables.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import mlflow
import requests
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError

# About 7 s to give up on a refused connection (retries after 0, 2 and 4 s); at most about
# 2 minutes for a server that accepts connections and never answers (4 tries of 30 s).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
LOGIN_VARS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


@contextmanager
def environment_set(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ inside the block (MLflow reads its login and HTTP limits there on
    every request), the earlier environment after it. Variable by variable, not by clearing
    the whole environment: other threads (the metric writer's) keep reading it meanwhile."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def apply_http_defaults() -> None:
    """Bounded retries and timeouts for this process, where the user has not chosen any."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def explain(err: BaseException, experiment: str | None = None) -> PipelineError | None:
    """A one-line PipelineError when `err` is the server refusing a login or a permission,
    or not answering; None for anything else. `experiment`: the name the user gave, if any."""
    uri = mlflow.get_tracking_uri()
    status = _http_status(err)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        if user:
            return PipelineError(
                f"the tracking server {uri} refused the login of user {user!r} (wrong password "
                f"or no such user): check {LOGIN_VARS}")
        return PipelineError(f"the tracking server {uri} requires a login: set {LOGIN_VARS}")
    if status == 403:
        where = _experiment(experiment)
        return PipelineError(
            f"the tracking server {uri} denied user {user!r} a write (permission denied): a "
            f"stage needs EDIT on {where} (and on the registered model for compare); ask the "
            f"server's admin for it, or log in as another user with {LOGIN_VARS}")
    reason = _unreachable(err)
    if reason:
        return PipelineError(
            f"cannot reach the tracking server {uri} ({reason}; MLFLOW_TRACKING_URI): start it "
            f"(make server) or point MLFLOW_TRACKING_URI at a running one; "
            f"MLFLOW_HTTP_REQUEST_TIMEOUT and MLFLOW_HTTP_REQUEST_MAX_RETRIES set how long to wait")
    return None


def _experiment(given: str | None) -> str:
    """The experiment the write was for, named as the user knows it."""
    if given:
        return f"experiment {given!r}"
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")  # set by mlflow.set_experiment too
    if experiment_id:
        try:
            return f"experiment {mlflow.get_experiment(experiment_id).name!r}"
        except Exception:  # noqa: BLE001 - a name is a courtesy; the id still says which
            return f"the experiment with id {experiment_id}"
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    return f"experiment {name!r}" if name else "the experiment"


def _http_status(err: BaseException) -> int | None:
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status if status in (401, 403) else None
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return err.response.status_code
    return None


def _unreachable(err: BaseException) -> str | None:
    """Why the server did not answer, if that is what `err` (or what it came from) says."""
    chain = []
    seen = err
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    # A server that accepts and never answers shows as requests' ConnectionError wrapping
    # urllib3's retries wrapping a read timeout: the timeout, further down, is the news.
    if any(isinstance(link, (requests.exceptions.Timeout, TimeoutError)) for link in chain):
        return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '120')} s"
    for link in chain:
        if isinstance(link, requests.exceptions.ConnectionError):
            return "connection refused" if "refused" in str(link).lower() else "no connection"
    # MLflow's REST client wraps the requests error in a message of its own.
    text = str(err)
    if isinstance(err, MlflowException) and "API request to" in text:
        if "timeout" in text.lower():
            return "no answer in time"
        if "Max retries exceeded" in text or "Connection" in text:
            return "connection refused" if "refused" in text.lower() else "no connection"
    return None

"""A stage's MLflow run from start to end: the experiment, parameters, system metrics, the run
that a Ray task nests under the study, how it ends (FINISHED, FAILED, KILLED), and finding
earlier runs by their cache key (the keys themselves: pipeline.cache)."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError
from pipeline.interrupts import Interrupted
from pipeline.runs import tracking_access

DEFAULT_EXPERIMENT = "mnist-mlp"
STAGE_TAG = "pipeline.stage"
CACHE_KEY_TAG = "pipeline.cache_key"
# Where a train run's model is (MLflow 3 keeps it as a LoggedModel, models:/m-...).
MODEL_URI_TAG = "pipeline.model_uri"
# On a main run: the train runs of the study, in order.
TRAIN_RUNS_TAG = "pipeline.train_run_ids"
ERROR_TAG = "pipeline.error"
# On a run a Ray task started: the task's id, the same on every retry of the task, so a retry
# finds the run an earlier attempt left behind and goes on with it.
TASK_TAG = "pipeline.task_id"
INTERRUPTED_TAG = "pipeline.interrupted"
# System metrics every 10 s: a one-minute training gets 6 points, an hour 360. A sampling cycle
# costs 20-50 ms of CPU, most of it MLflow reading the run back to see that it still runs
# (bench/system_metrics_cost.py): every 5 s that came to 1% of a core, every 10 s it is half.
SYSTEM_METRICS_INTERVAL_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
SYSTEM_METRICS_INTERVAL_S = 10.0
# Without this tag MLflow 3's UI opens the experiment in GenAI mode instead of runs and charts.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


# Set by `nested_under` in a Ray worker, where no parent run is active in the process.
_task_parent = threading.local()


@contextmanager
def nested_under(parent_run_id: str, tags: dict[str, str]) -> Iterator[None]:
    """Runs that stages start inside the block are nested under `parent_run_id` and carry
    `tags`: how a task on a Ray worker puts its run under the study's main run."""
    _task_parent.parent, _task_parent.tags = parent_run_id, dict(tags)
    try:
        yield
    finally:
        _task_parent.parent, _task_parent.tags = None, {}


def use_experiment(name: str | None = None) -> None:
    """Select the experiment for runs this process starts.

    Under `mlflow run` the experiment is already chosen (MLFLOW_EXPERIMENT_ID), so leave it.
    """
    if os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_RUN_ID"):
        return
    mlflow.set_experiment(name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)


def format_param(value: object) -> str:
    """One spelling per value, so runs started either way show identical params."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def log_params_once(params: dict) -> None:
    """Log params the run does not hold yet.

    `mlflow run` logs every entry-point parameter before our code starts (as the user typed
    it, e.g. `1e-2`); logging the same key again with another spelling would fail.
    """
    run = mlflow.active_run()
    present = mlflow.get_run(run.info.run_id).data.params
    missing = {k: format_param(v) for k, v in params.items() if k not in present}
    if missing:
        mlflow.log_params(missing)


def sample_system_metrics() -> None:
    """Every SYSTEM_METRICS_INTERVAL_S, unless the user set MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL."""
    if not os.environ.get(SYSTEM_METRICS_INTERVAL_ENV):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    # Its start and stop lines would sit between the epoch lines of every training.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def _monitor_system(run_id: str, resumed: bool):
    """MLflow's system-metrics sampler for this run, held here rather than by start_run, so
    that a failing or interrupted run need not wait for it (see _stop_monitor)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class EndsSampledMonitor(SystemMetricsMonitor):
        """Also one sample as the run starts and one as it ends: MLflow's own loop logs only
        after a full interval, so a run shorter than that would record none at all."""

        def start(self):
            self._sample_now()
            super().start()

        def finish(self, sample_end: bool = True):
            if self._process is None:
                return
            self._shutdown_event.set()
            self._process.join()
            if sample_end:
                self._sample_now()
            super().finish()  # flushes what was recorded

        def _sample_now(self):
            try:
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
            except Exception as err:  # noqa: BLE001 - system metrics never stop a run
                logging.getLogger(__name__).warning(
                    f"system metrics not sampled: {str(err).splitlines()[0][:200]}")

    sample_system_metrics()
    monitor = EndsSampledMonitor(run_id, resume_logging=resumed)
    monitor.start()
    return monitor


class _QuietThreads(logging.Filter):
    """Drops the records of the threads in `idents`."""

    def __init__(self):
        super().__init__()
        self.idents: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.idents


_abandoned_samplers = _QuietThreads()
logging.getLogger("mlflow.system_metrics.system_metrics_monitor").addFilter(_abandoned_samplers)


def _stop_monitor(monitor, wait: bool) -> None:
    """Stop sampling. A run that failed or was stopped does not wait, nor take an end sample:
    the sampler may be inside a tracking call retrying against a server that is gone, for
    minutes, and the process is on its way out. What that sampler says then (its requests
    failing) would come after the line that tells the user how to go on: it is dropped."""
    if wait:
        monitor.finish()
        return
    if monitor._process is not None:
        _abandoned_samplers.idents.add(monitor._process.ident)
    stopping = threading.Thread(target=monitor.finish, kwargs={"sample_end": False},
                                daemon=True, name="system-metrics-stop")
    stopping.start()
    _abandoned_samplers.idents.add(stopping.ident)


# On the way out after a stop signal each request to the tracking server gets this long, once:
# against a hung server MLflow's defaults (120 s a try, 7 retries) would hold the exit for
# many minutes.
STOPPING_REQUEST_TIMEOUT_S = 2
_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(STOPPING_REQUEST_TIMEOUT_S),
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


@contextmanager
def hurried() -> Iterator[None]:
    """Tracking requests made inside the block give up after STOPPING_REQUEST_TIMEOUT_S, with
    no retry (MLflow reads these variables on every request). For what a stopped stage still
    writes: a server that does not answer at once gets nothing, the process exits in seconds."""
    with tracking_access.environment_set(_HTTP_LIMITS):
        yield


@contextmanager
def stage_run(stage: str, run_name: str, params: dict, tags: dict | None = None,
              resume_run_id: str = "", system_metrics: bool = False) -> Iterator:
    """A run for one stage: nested under the active run if there is one (or the run that
    `nested_under` names, in a Ray task); with
    `resume_run_id`, that existing run again (its status goes back to RUNNING). With
    `system_metrics`, MLflow samples CPU, memory, disk, network (and GPU) into `system/*`.

    The run ends FINISHED, or FAILED with the error in the `pipeline.error` tag (the user's
    fixable problem as it is, anything else, a bug, with its type), or KILLED when a stop
    signal arrives (`interrupts.Interrupted`). It is ended explicitly rather than by
    `with mlflow.start_run()`, which can only say FINISHED or FAILED.
    """
    parent = None if mlflow.active_run() else getattr(_task_parent, "parent", None)
    nested = mlflow.active_run() is not None
    if resume_run_id and not nested:
        # The run goes on in its own experiment, whichever one this process selected.
        mlflow.set_experiment(experiment_id=mlflow.get_run(resume_run_id).info.experiment_id)
        _point_launcher_run_to(resume_run_id)
    run = mlflow.start_run(run_id=resume_run_id or None,
                           run_name=None if resume_run_id else run_name, nested=nested,
                           parent_run_id=None if resume_run_id else parent)
    tags = {**(getattr(_task_parent, "tags", None) or {}), **(tags or {})}
    monitor = None
    status = "FINISHED"
    stopped: Interrupted | None = None
    try:
        if system_metrics:
            monitor = _monitor_system(run.info.run_id, bool(resume_run_id))
        _tag_experiment(run)
        if resume_run_id:
            _forget_last_ending(run)
        mlflow.set_tags({STAGE_TAG: stage, **tags})
        log_params_once(params)
        yield run
    except Interrupted as stop:
        status, stopped = "KILLED", stop
        stop.record(stage, run.info.run_id)
        with hurried():
            _best_effort(mlflow.set_tag, INTERRUPTED_TAG,
                         f"{stop} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        raise
    except Exception as err:
        status = "FAILED"
        # A refused login or an unreachable server is the user's to fix: one line, no traceback.
        explained = None if isinstance(err, PipelineError) else tracking_access.explain(err)
        _best_effort(mlflow.set_tag, ERROR_TAG, error_message(explained or err)[:5000])
        if explained is not None:
            raise explained from err
        raise
    finally:
        if monitor is not None:
            _stop_monitor(monitor, wait=status == "FINISHED")
        if status == "FINISHED":
            mlflow.end_run(status)
        elif status == "KILLED":
            with hurried():
                if not _best_effort(mlflow.end_run, status):
                    stopped.unmarked.add(run.info.run_id)
        else:  # an unreachable store must not hide why the run stopped
            _best_effort(mlflow.end_run, status)


def _point_launcher_run_to(resumed_run_id: str) -> None:
    """`mlflow run` creates a run for the command before it starts; when the command resumes
    another run, say so on the one it created, which holds only the parameters."""
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher and launcher != resumed_run_id:
        mlflow.MlflowClient().set_tag(launcher, "mlflow.note.content",
                                      f"Resumed train run {resumed_run_id}; its metrics and "
                                      f"artifacts are there.")
        mlflow.MlflowClient().set_tag(launcher, "pipeline.resumed_run_id", resumed_run_id)


def _forget_last_ending(run) -> None:
    """A resumed run is no longer failed or interrupted: drop the tags that said so."""
    client = mlflow.MlflowClient()
    for tag in (ERROR_TAG, INTERRUPTED_TAG):
        if tag in run.data.tags:
            client.delete_tag(run.info.run_id, tag)


def _best_effort(call, *args) -> bool:
    """Recording why a run ended must not hide the reason itself (e.g. a server gone away).
    False when the call failed."""
    try:
        call(*args)
    except Exception:  # noqa: BLE001 - the original exception is what the user needs
        return False
    return True


def error_message(err: BaseException) -> str:
    if isinstance(err, PipelineError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _tag_experiment(run) -> None:
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(run.info.experiment_id)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(run.info.experiment_id, key, value)


def find_cached_run(key: str) -> Run | None:
    """The newest FINISHED run in the current experiment with this cache key, if any."""
    runs = mlflow.search_runs(
        filter_string=f"tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def find_runs_tagged(tag: str, value: str) -> list[Run]:
    """Runs in the current experiment whose `tag` is `value`, newest first."""
    return mlflow.search_runs(filter_string=f"tags.`{tag}` = '{value}'",
                              order_by=["attributes.start_time DESC"], output_format="list")


def find_unfinished_runs(key: str) -> list[Run]:
    """KILLED or FAILED runs in the current experiment with this cache key, newest first."""
    runs = mlflow.search_runs(
        filter_string=f"tags.`{CACHE_KEY_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return [run for run in runs if run.info.status in ("KILLED", "FAILED")]


def get_run(run_id: str, purpose: str) -> Run:
    """The run, or a PipelineError saying that `run_id` (given as `purpose`) does not exist."""
    try:
        return mlflow.get_run(run_id)
    except MlflowException as err:
        raise PipelineError(
            f"{purpose}: run {run_id!r} does not exist in the tracking store "
            f"{mlflow.get_tracking_uri()}; check the id in the MLflow UI"
        ) from err


def get_stage_run(run_id: str, stage: str, purpose: str) -> Run:
    """A FINISHED run of `stage`, or a PipelineError saying what is wrong with `run_id`."""
    run = get_run(run_id, purpose)
    actual = run.data.tags.get(STAGE_TAG)
    if actual != stage:
        raise PipelineError(
            f"{purpose}: run {run_id} is a {actual or 'non-pipeline'} run, not a {stage} run"
        )
    if run.info.status != "FINISHED":
        raise PipelineError(
            f"{purpose}: run {run_id} is {run.info.status}, not FINISHED; wait for it to finish "
            f"or pass a finished run"
        )
    return run

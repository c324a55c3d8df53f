"""Joining Ray: a local instance sized to this machine, or an existing cluster.

Workers log to the study's tracking store, so they must be able to reach it: a local SQLite
file or `mlruns/` folder works for workers on this machine only. A cluster with other machines
needs a tracking server (`make server`) in MLFLOW_TRACKING_URI, and that is checked before any
task is sent.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import mlflow

from pipeline import interrupts
from pipeline.errors import PipelineError
from pipeline.runs import tracking, tracking_access

LOCAL = ""
# Tracking stores only a process on this machine can write to.
LOCAL_STORE_SCHEMES = ("", "file", "sqlite")
# What a worker needs of the driver's environment to log where the driver logs: a task
# argument (study_env), set in the worker's environment only while the task runs. Not in the
# task's runtime_env: Ray starts a new pool of workers for each distinct runtime_env, so a
# per-study value there would make every study pay fresh workers' start-up (seconds of
# imports each). Nor PIPELINE_CACHE_DIR: it names a folder on the driver's machine, and each
# node keeps its own cache (its raylet's environment, which its workers get).
FORWARDED_ENV = (
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_DISABLE_TELEMETRY",
    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "PIPELINE_CHECKPOINT_UPLOAD_S",
    "PIPELINE_TRACKING_RETRY_S",
)
# The tracking server's login: handed to each task as an argument (held in memory, never
# written to a file or a command line) and put in the worker's environment only while the
# task runs (credentials_set).
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "MLFLOW_TRACKING_TOKEN")
# A head whose GCS has not answered for this long is taken for lost. Ray's own driver waits
# gcs_rpc_server_reconnect_timeout_s (60 s by default) and then ends the process outright
# (exit code 1, no cleanup), which would leave every run RUNNING: the study must end its runs
# well before that. A cluster whose GCS restarts (Ray's GCS fault tolerance) needs longer, up
# to that timeout (raise Ray's too); HEAD_LOST_ENV sets it.
HEAD_LOST_AFTER_S = 10.0
HEAD_LOST_ENV = "PIPELINE_RAY_HEAD_LOST_AFTER_S"
# EX_TEMPFAIL (sysexits.h): nothing the user did wrong; the same command again picks it up.
HEAD_LOST_EXIT_CODE = 75
HEAD_RESOURCE = "node:__internal_head__"


class HeadLost(interrupts.Interrupted):
    """The cluster's head node (its GCS) stopped answering mid-study. Like a stop signal, it
    ends the study's open runs KILLED on the way out (tracking.stage_run); the executor lists,
    in `endings`, what became of each of its tasks' runs, for the message."""

    def __init__(self, head: str):
        super().__init__(reason=f"the loss of the Ray head node {head}")
        self.endings: list[str] = []

    @property
    def exit_code(self) -> int:
        return HEAD_LOST_EXIT_CODE

    def __str__(self) -> str:
        lost = super().__str__()
        return f"{lost} [{'; '.join(self.endings)}]" if self.endings else lost


def head_lost_after_s() -> float:
    """How long the head's GCS may stay silent before the head is taken for lost."""
    text = os.environ.get(HEAD_LOST_ENV, "").strip()
    if not text:
        return HEAD_LOST_AFTER_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise PipelineError(f"{HEAD_LOST_ENV}={text!r}: give the seconds the Ray head's GCS may "
                            f"stay silent before the study ends its runs (default "
                            f"{HEAD_LOST_AFTER_S:g})")
    return seconds


@dataclass
class HeadWatch:
    """Whether the head of the cluster this driver joined still answers: a TCP connection to
    its GCS port, which needs no GCS client (Ray's own blocks while it retries for a minute)."""

    node_id: str
    gcs_address: str  # host:port
    lost_after_s: float = field(default_factory=head_lost_after_s)
    _silent_since: float | None = None

    @classmethod
    def of_joined_cluster(cls) -> "HeadWatch | None":
        """The watch of the cluster Ray joined; None for a Ray Client driver, whose ray.wait
        fails by itself when the client server on the head goes."""
        import ray

        if ray.util.client.ray.is_connected():
            return None
        heads = [node["NodeID"] for node in ray.nodes()
                 if node.get("Alive") and HEAD_RESOURCE in node["Resources"]]
        return cls(heads[0] if heads else "", ray.get_runtime_context().gcs_address)

    def check(self) -> None:
        """HeadLost once the GCS has refused or ignored every connection for `lost_after_s`;
        a head that answers again meanwhile was only slow."""
        host, port = self.gcs_address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
        except OSError:
            now = time.monotonic()
            self._silent_since = self._silent_since or now
            if now - self._silent_since >= self.lost_after_s:
                silent = (f"(its GCS at {self.gcs_address} has not answered for "
                          f"{self.lost_after_s:g} s)")
                raise HeadLost(f"{self.node_id[:12]} {silent}".lstrip()) from None
        else:
            self._silent_since = None


def check_resources(cpus: int, gpus: float) -> None:
    """What each task (a training or a trial) asks of the cluster, checked before Ray starts."""
    if cpus < 1:
        raise PipelineError(f"cpus_per_trial={cpus}: give each task at least 1 CPU")
    if not gpus >= 0:
        raise PipelineError(f"gpus_per_trial={gpus}: use 0 (CPU only) or a positive share of a "
                            f"GPU, e.g. 0.25 to put four tasks on one GPU")


def refuse_unsatisfiable(cpus: int, gpus: float) -> None:
    """A task that no live node can hold waits in Ray's queue forever: refuse the request
    before any task is sent. (A task runs on one node, so the cluster's total is no answer.)"""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    most_cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    most_gpus = max((r.get("GPU", 0) for r in nodes), default=0)
    hint = "pass gpus_per_trial=0" if gpus > 0 and not most_gpus else \
        "lower cpus_per_trial or gpus_per_trial to what one node has"
    raise PipelineError(f"cpus_per_trial={cpus}, gpus_per_trial={gpus:g}: no node of the Ray "
                        f"cluster has that much (the largest has {most_cpus:g} CPUs and "
                        f"{most_gpus:g} GPUs); {hint}")


def credentials() -> dict[str, str]:
    """The driver's tracking login, for a task's arguments."""
    return {name: os.environ[name] for name in CREDENTIAL_ENV if name in os.environ}


@contextmanager
def credentials_set(values: dict[str, str]) -> Iterator[None]:
    """In a worker: the driver's tracking login in os.environ (where MLflow reads it on every
    request) while the task runs; afterwards the worker's own environment again, since the
    worker goes on to serve other tasks."""
    with tracking_access.environment_set(values):
        yield


def end_orphaned_runs(run_ids, status: str, why: str) -> list[str]:
    """End the runs, of those given, that are still RUNNING although nothing runs them any more
    (a worker killed, a task cancelled or given up by Ray, a trial ASHA stopped or a sweep cut
    short): `status` (KILLED or FAILED), with `why` in pipeline.interrupted or pipeline.error.
    Returns the ids it ended."""
    client = mlflow.MlflowClient()
    tag = tracking.INTERRUPTED_TAG if status == "KILLED" else tracking.ERROR_TAG
    ended = []
    for run_id in dict.fromkeys(run_ids):
        if client.get_run(run_id).info.status != "RUNNING":
            continue  # it ended itself meanwhile, with its own reason
        client.set_tag(run_id, tag, why)
        client.set_terminated(run_id, status)
        ended.append(run_id)
    return ended


def worker_tracking_uri() -> str:
    """The tracking URI as a worker in another folder must spell it: relative paths made
    absolute (a worker does not start in the driver's working directory)."""
    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and path != ":memory:":
            return f"sqlite:///{Path(path).resolve()}"
        return uri
    if parsed.scheme in ("", "file"):
        return Path(parsed.path or uri).resolve().as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    return urlparse(uri).scheme in LOCAL_STORE_SCHEMES


def refuse_local_store(address: str, uri: str) -> None:
    """Workers on other machines cannot write to a file on this one: say what to do instead."""
    if is_local_store(uri):
        raise PipelineError(
            f"ray_address={address}: workers on other machines cannot write to the local "
            f"tracking store {uri}; start a tracking server (make server) and set "
            f"MLFLOW_TRACKING_URI=http://<host>:<port> to it before sending the study to a cluster"
        )


def study_env(experiment_id: str) -> dict[str, str]:
    """Where a task logs (the study's tracking URI and experiment) and the driver's tracking
    settings: a task argument, in the worker's environment only while the task runs."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    env.update({"MLFLOW_TRACKING_URI": worker_tracking_uri(),
                "MLFLOW_EXPERIMENT_ID": experiment_id})
    return env


def pool_env(threads: int) -> dict[str, str]:
    """A worker's environment from its start: what must hold before it imports torch, and is
    the same for every study, so that one pool of workers serves them all (runtime_env)."""
    return {"OMP_NUM_THREADS": str(threads),
            # Download bars from every worker would bury the epoch lines.
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def worker_env(experiment_id: str, threads: int) -> dict[str, str]:
    """Everything a task's worker needs of the driver: `study_env` and `pool_env` together."""
    return {**study_env(experiment_id), **pool_env(threads)}


def task_options(cpus: int, gpus: float) -> dict:
    """Ray options of a study's task: its resources, and the pool of workers it runs in."""
    return {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": {"env_vars": pool_env(cpus)}}


def warm_workers(cpus: int, gpus: float) -> None:
    """Start, without waiting, one worker per task the cluster can run at once, each importing
    what a training imports (ray_tasks.warm_up): their start-up overlaps with what the driver
    does first (sample_data), and the study's tasks then find workers ready in their pool."""
    import ray

    from pipeline.scale import ray_tasks

    slots = sum(int(min(r.get("CPU", 0) // cpus, r.get("GPU", 0) // gpus if gpus else
                        float("inf")))
                for r in (node["Resources"] for node in ray.nodes() if node.get("Alive")))
    task = ray.remote(ray_tasks.warm_up).options(name="warm_up", **task_options(cpus, gpus))
    for _ in range(slots):
        task.remote()


def _this_machine_addresses() -> set[str]:
    names = {"127.0.0.1", "localhost", socket.gethostname()}
    try:
        names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    try:
        import ray.util

        names.add(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - only a hint for deciding whether nodes are elsewhere
        pass
    return names


def other_machines() -> list[str]:
    """Addresses of the connected cluster's live nodes that are not this machine."""
    import ray

    here = _this_machine_addresses()
    return sorted({node["NodeManagerAddress"] for node in ray.nodes()
                   if node.get("Alive") and node["NodeManagerAddress"] not in here})


@contextmanager
def connected(address: str = LOCAL, cpus: int = 1, gpus: float = 0.0,
              warm: bool = False) -> Iterator[None]:
    """Ray for the length of the block, with a node that can run a task of `cpus` CPUs and
    `gpus` GPUs (else a PipelineError before any task is sent); with `warm`, workers for
    such tasks already starting (warm_workers).

    `address` empty: start a local Ray sized to this machine (all its cores) and shut it down
    afterwards. `auto` or `ray://host:port` (or `host:port`): join that cluster, which is left
    running. A Ray this process already started (tests, notebooks) is used as it is.
    """
    uri = worker_tracking_uri()
    if address.startswith("ray://"):
        # A Ray Client driver is always on another machine than the workers.
        refuse_local_store(address, uri)
    # Two seeds print the same "training mlp3 ..." line; Ray would fold them into one.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stdout.isatty():  # a log file or a pipe gets no colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    import ray

    started = not ray.is_initialized()
    if started:
        # ray.init puts its own SIGTERM handler (which aborts the process) in place of ours;
        # the study must still end its runs KILLED on SIGTERM.
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
        _start(address)
        for signum, handler in handlers.items():
            if callable(handler):
                signal.signal(signum, handler)
    try:
        if address != LOCAL and other_machines():
            refuse_local_store(address, uri)
        refuse_unsatisfiable(cpus, gpus)
        if warm:
            warm_workers(cpus, gpus)
        yield
    finally:
        if started:
            ray.shutdown()


def _start(address: str) -> None:
    import ray

    try:
        if address == LOCAL:
            # "local": a new instance even when another one runs on this machine.
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     log_to_driver=True, logging_level="WARNING")
        else:
            ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise PipelineError(
            f"ray_address={address!r}: could not join a Ray cluster ({err}); start one with "
            f"`ray start --head` and pass ray_address=auto, or leave ray_address empty to start "
            f"a local Ray"
        ) from err

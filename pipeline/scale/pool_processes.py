"""The local pool's processes: how many workers a study gets, the fork server they are forked
from, and the worker process itself. Light on purpose (no torch, no MLflow): `main` starts the
fork server from here before it imports MLflow, so that the seconds the server spends loading
torch and MLflow overlap main's own start instead of following it.

Started that early, main cannot yet know whether the study's stages are all cached (that takes
the tracking store); a fully cached study then pays for a server it never uses (0.2 s of its
4.8 s on a 2-core machine, whose cores slow each other). So a study that finished here before,
with the same store, experiment, parameters and stage code, is taken to be cached and starts
no server early; if it was not (its runs deleted, say), the pool starts when its first job
comes, as it would have without this.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import multiprocessing
import os
import signal
from multiprocessing import forkserver
from pathlib import Path

import psutil

from pipeline.cache.code_digest import code_version
from pipeline.cache.file_digests import cache_root
from pipeline.core.config import load_study
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.process_exit import exit_promptly

# What the fork server loads once before forking the pool's workers.
WARM_UP = "pipeline.scale.worker_warmup"
# The stages whose code decides whether a study's pooled jobs are cached.
POOLED_STAGES = ("pipeline.stages.sample_data", "pipeline.stages.train", "pipeline.stages.evaluate")

_study: dict = {}  # the pooled study start_for_study saw last: its params and fingerprint


def local_workers(workers: str, threads: int, trainings: int | None = None) -> int:
    """`auto`: as many trainings as the physical cores hold at `threads` each, and no more than
    the study has (`trainings`, when known); else the number."""
    text = str(workers).strip()
    if text == "auto":
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        return max(1, min(cores // threads, trainings or cores))
    if not text.isdigit() or int(text) < 1:
        raise PipelineError(f"workers={workers!r}: use auto (physical cores // threads), 1 (one "
                            f"after another in this process) or another positive number")
    return int(text)


class PromptlyExitingProcess(multiprocessing.context.ForkServerProcess):
    """A pool worker that, told by the pool to stop, exits without tearing down torch and
    MLflow (pipeline.process_exit): 3-5 s the study's end would otherwise wait for.

    Forked from multiprocessing's fork server: a process that loaded torch, MLflow and the
    stages once (worker_warmup) and did nothing else. A fork is unsafe once torch has run its
    thread pool or MLflow has opened a store; the server has done neither, and main, which
    has, is never forked. A worker then starts in milliseconds instead of importing it all
    itself (about 5 s of CPU, which competed with sample_data for the cores), and its first
    run, epoch and logged model wait on no import."""

    def run(self) -> None:
        super().run()
        exit_promptly(0)


class ForkServerContext(multiprocessing.context.ForkServerContext):
    Process = PromptlyExitingProcess

    def __init__(self):
        super().__init__()
        self.set_forkserver_preload([WARM_UP])


def start_for_study(args: dict, experiment: str | None) -> None:
    """Start the fork server now if `main` with these arguments, logging into `experiment`
    (None: MLflow's from the environment), will train in a pool of more than one worker and
    did not finish here before. Arguments that main will refuse start nothing: main says what
    is wrong."""
    _study.clear()
    try:
        params = stage_params("main", args)
        if params["executor"] != "local" or int(params["threads"]) < 1:
            return
        # As main reads it (a module of its own would change no training's code version;
        # pipeline.core.config, which train imports, would).
        study = load_study(params["study"], params["epochs"], params["seeds"], params["configs"],
                           params["registered_model_name"], params["half_width_pp"],
                           params["max_seeds"], params["equivalence_margin_pp"])
        if local_workers(params["workers"], int(params["threads"]),
                         len(study.configs) * len(study.seeds)) <= 1:
            return
        _study.update(params=params, fingerprint=_fingerprint(params, experiment))
        if params["force"] or not (_finished_studies() / _study["fingerprint"]).exists():
            start_fork_server()
    except (PipelineError, ValueError, KeyError):
        return


def remember_finished(params: dict) -> None:
    """main's study with `params` finished: the same study again, unchanged, will reuse every
    pooled stage. Best effort: without the note, a rerun only starts a server it may not need."""
    fingerprint = _study.get("fingerprint") if _study.get("params") == params else None
    _study.clear()
    if fingerprint:
        try:
            _finished_studies().mkdir(parents=True, exist_ok=True)
            (_finished_studies() / fingerprint).touch()
        except OSError:
            pass


def _finished_studies() -> Path:
    return cache_root() / "finished_studies"


def _fingerprint(params: dict, experiment: str | None) -> str:
    """What decides whether a pooled study's jobs are cached: the store and experiment it
    logs to, its parameters, and the code of the stages the pool runs."""
    identity = {
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", ""), "folder": os.getcwd(),
        "experiment": experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        or os.environ.get("MLFLOW_EXPERIMENT_ID", ""),
        "params": params, "code": [code_version(stage) for stage in POOLED_STAGES],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def start_fork_server() -> None:
    """Start the fork server (its loading takes seconds of one core) unless it runs already;
    it is stopped when this process exits."""
    ForkServerContext()  # sets what the server preloads
    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:  # private, 3.4+
        atexit.register(_stop_fork_server)
    forkserver.ensure_running()


def let_the_fork_server_end_with_main() -> None:
    """Drop this worker's copy of the fork server's "alive" pipe. The server ends once every
    holder has closed it; main is then the last, so main killed outright ends the server,
    and the server's end ends this worker (stop_with_parent: the server is its parent)."""
    alive = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)  # private, 3.8+
    if alive is not None:
        try:
            os.close(alive)
        except OSError:
            pass  # not inherited: nothing holds the server up


def _stop_fork_server() -> None:
    """At exit: the server would otherwise finish loading before it sees main gone (seconds
    in which it holds main's output open, and a pipe reading it, such as `| tee`, waits)."""
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

"""The local pool's processes: how many workers a study gets, the fork server they are forked
from, and the worker process itself. Light on purpose (no torch, no MLflow): `main` starts the
fork server from here before it imports MLflow, so that the seconds the server spends loading
torch and MLflow overlap main's own start instead of following it."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from multiprocessing import forkserver

import psutil

from pipeline.core.config import study_of
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.process_exit import exit_promptly

# What the fork server loads once before forking the pool's workers.
WARM_UP = "pipeline.scale.worker_warmup"


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


def start_for_study(args: dict) -> None:
    """Start the fork server now if `main` with these arguments will train in a pool of more
    than one worker. Arguments that main will refuse start nothing: main says what is wrong."""
    try:
        params = stage_params("main", args)
        if params["executor"] != "local" or int(params["threads"]) < 1:
            return
        study = study_of(params)
        if local_workers(params["workers"], int(params["threads"]),
                         len(study.configs) * len(study.seeds)) > 1:
            start_fork_server()
    except (PipelineError, ValueError, KeyError):
        return


def start_fork_server() -> None:
    """Start the fork server (its loading takes seconds of one core) unless it runs already;
    it is stopped when this process exits."""
    ForkServerContext()  # sets what the server preloads
    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:  # private, 3.4+
        atexit.register(_stop_fork_server)
    forkserver.ensure_running()


def _stop_fork_server() -> None:
    """At exit: the server would otherwise finish loading before it sees main gone (seconds
    in which it holds main's output open, and a pipe reading it, such as `| tee`, waits)."""
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

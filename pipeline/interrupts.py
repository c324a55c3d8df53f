"""SIGTERM and SIGINT as an exception that ends every open stage run KILLED.

`kill`, Kubernetes, Slurm and Ray stop work with SIGTERM; a person with Ctrl-C (SIGINT). Both
become `Interrupted`, raised in the main thread, so `tracking.stage_run` can end its run KILLED
on the way out and the CLI can exit with 128 + the signal number. A write that must not be
cut in half (a metric batch, a checkpoint) runs inside `deferred()`: a signal that arrives
meanwhile is raised as soon as the write is done.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

HANDLED = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Interrupted(BaseException):
    """A stop signal arrived, or (`reason`, from a subclass) what the work ran on went away.
    A BaseException, so `except Exception` cannot swallow it."""

    def __init__(self, signum: int = 0, reason: str = ""):
        super().__init__(reason or signal.Signals(signum).name)
        self.signum = signum
        self.run_id: str | None = None  # the innermost stage run it ended, set on the way out
        self.stage: str | None = None
        self.unmarked: set[str] = set()  # runs the tracking server could not be told ended

    def record(self, stage: str, run_id: str) -> None:
        """Remember the innermost run the signal ended (the first one to see it)."""
        if self.run_id is None:
            self.stage, self.run_id = stage, run_id

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = threading.local()
_pending: list[int] = []
_stopping = False


def _handle(signum: int, frame) -> None:
    global _stopping
    if _stopping:
        return  # already on the way out (e.g. `mlflow run` forwarding the same Ctrl-C)
    if getattr(_state, "deferring", 0):
        _pending.append(signum)
        return
    _stopping = True
    raise Interrupted(signum)


@contextmanager
def installed() -> Iterator[None]:
    """Route SIGTERM and SIGINT to `Interrupted` inside the block (main thread only, as
    Python requires); the previous handlers are back afterwards."""
    global _stopping
    previous = {signum: signal.signal(signum, _handle) for signum in HANDLED}
    _stopping = False
    if os.environ.get("MLFLOW_RUN_ID") and _under_mlflow_run():
        stop_with_parent()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _under_mlflow_run() -> bool:
    """`mlflow run` starts the entry point as its child and sets MLFLOW_RUN_ID for it."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as cmdline:
            return b"mlflow" in cmdline.read()
    except OSError:
        return False


def stop_with_parent() -> None:
    """SIGTERM to `mlflow run` kills it outright (no handler), leaving its child training on
    with nobody waiting. Ask Linux to send us SIGTERM when our parent dies, so the stage ends
    its runs KILLED instead."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: nothing to ask for


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop signal until the block is done, then raise it."""
    _state.deferring = getattr(_state, "deferring", 0) + 1
    try:
        yield
    finally:
        _state.deferring -= 1
        if not _state.deferring and _pending:
            global _stopping
            signum = _pending.pop(0)
            _pending.clear()
            _stopping = True
            raise Interrupted(signum)

"""Ending a stage process, or a pool worker, once its work is done and recorded.

A process that imported torch, MLflow and pandas spends 1-2 s, up to 5 s on a busy 2-core
machine, tearing them down after its last line of work: module by module, the garbage collector
over every object, C++ destructors. Nothing is written then. `exit_promptly` runs what an exit
must run (the atexit handlers: Ray's shutdown, MLflow ending a run left active, temporary
folders removed, logging flushed), flushes stdout and stderr, and ends the process there.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_promptly(code: int) -> NoReturn:
    """Exit with `code` now, after the atexit handlers; as sys.exit(code) would have, minus
    the interpreter's teardown. With a non-daemon thread still running, exit the usual way,
    which waits for it."""
    busy = [thread for thread in threading.enumerate()
            if thread is not threading.current_thread() and not thread.daemon and thread.is_alive()]
    if busy:
        sys.exit(code)
    # Private but stable (CPython since 3.0): the same handlers the interpreter would run.
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code)

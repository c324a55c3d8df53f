"""A stage process ends promptly, without losing its exit code, output or exit handlers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO_ROOT


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_exit_keeps_the_code_the_unflushed_output_and_the_atexit_handlers(tmp_path):
    marker = tmp_path / "atexit-ran"
    done = run_python(f"""
        import atexit, sys
        from pipeline.process_exit import exit_promptly
        atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
        sys.stdout.write("last words, no newline")
        sys.stderr.write("and a warning")
        exit_promptly(3)
        print("never printed")
    """)
    assert done.returncode == 3
    assert done.stdout == "last words, no newline"
    assert done.stderr == "and a warning"
    assert marker.read_text() == "ran"


def test_a_thread_still_working_is_waited_for(tmp_path):
    marker = tmp_path / "thread-finished"
    done = run_python(f"""
        import threading, time
        from pipeline.process_exit import exit_promptly
        def work():
            time.sleep(0.5)
            open({str(marker)!r}, "w").write("done")
        threading.Thread(target=work).start()
        exit_promptly(0)
    """)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "done"



def test_an_idle_thread_pool_is_stopped_not_waited_on_with_a_teardown(tmp_path):
    """MLflow's artifact repository keeps a pool of threads; idle, they must not make the
    process tear everything down (no finalizer runs) nor lose the pool's finished work."""
    marker = tmp_path / "pool-job-finished"
    done = run_python(f"""
        import time
        from concurrent.futures import ThreadPoolExecutor
        from pipeline.process_exit import exit_promptly

        class TornDown:
            def __del__(self):
                print("torn down", flush=True)

        kept = TornDown()
        pool = ThreadPoolExecutor(2)
        pool.submit(lambda: (time.sleep(0.5), open({str(marker)!r}, "w").write("done")))
        exit_promptly(4)
    """)
    assert done.returncode == 4, done.stderr
    assert marker.read_text() == "done"
    assert "torn down" not in done.stdout

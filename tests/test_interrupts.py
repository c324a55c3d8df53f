"""Stop signals end runs KILLED: real subprocesses, killed mid-training. SIGTERM to a train
process and SIGINT to main, with the resumes that follow, are in test_resume.py; SIGTERM to a
stage whose tracking server hangs is in test_tracking_outage.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, create_experiment, runs_in, subprocess_env

from pipeline import interrupts
from pipeline.errors import PipelineError

MLFLOW = Path(sys.executable).parent / "mlflow"
LONG = "1000"  # epochs: far more than a test waits for; the signal comes first


class Stage:
    """A stage running in its own process, its stderr collected line by line."""

    def __init__(self, command: list[str], env: dict):
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"never printed {text!r}:\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.05)

    def signal(self, signum: int, timeout: float = 30) -> tuple[int, float]:
        """Send `signum`; the exit code and the seconds until the process ended."""
        sent = time.monotonic()
        self.process.send_signal(signum)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code, time.monotonic() - sent

    def stop(self) -> None:
        """Whatever happens in a test, no process of it outlives it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


@pytest.fixture
def started(tracking_store):
    stages: list[Stage] = []

    def start(*command: str) -> Stage:
        stage = Stage(list(command), subprocess_env(tracking_store))
        stages.append(stage)
        return stage

    yield start
    for stage in stages:
        stage.stop()


@pytest.mark.integration
def test_sigterm_to_mlflow_run_leaves_no_stage_process_behind(
    tracking_store, started, shared_tiny_mnist
):
    """`mlflow run` has no SIGTERM handler: it dies at once. Its child must not train on."""
    experiment = create_experiment(tracking_store, "sigterm-mlflow-run")
    stage = started(str(MLFLOW), "run", ".", "-e", "train", "--env-manager", "local",
                    "--experiment-name", experiment.name, "-P", f"epochs={LONG}",
                    "-P", "batch_size=16", "-P", "device=cpu", "-P", "log_model=false",
                    "-P", "samples_per_class=12", "-P", f"data_dir={shared_tiny_mnist.root}")
    stage.wait_for("epoch   2/")
    # The stage's process, not a short-lived helper of MLflow's (a `git` it runs, say).
    [child] = [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(stage.process.pid), "-f", "pipeline"],
        capture_output=True, text=True).stdout.split()]
    code, _ = stage.signal(signal.SIGTERM)
    assert code == -signal.SIGTERM  # MLflow's CLI itself just dies

    deadline = time.monotonic() + 15
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the stage process kept training after mlflow run died"
    [run] = runs_in(experiment, "train")
    assert run.info.status == "KILLED"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has finished
    except FileNotFoundError:
        return False


def test_a_signal_during_a_deferred_write_is_raised_when_the_write_is_done(monkeypatch):
    monkeypatch.setattr(interrupts, "_stopping", False)
    previous = signal.signal(signal.SIGTERM, interrupts._handle)
    written = []
    try:
        with pytest.raises(interrupts.Interrupted) as info:
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here and must not raise yet
                written.append("done")
        assert written == ["done"]
        assert info.value.exit_code == 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_ray_head_is_lost_only_after_its_gcs_stayed_silent_for_head_lost_after_s(monkeypatch):
    """A GCS that refuses connections for less than HEAD_LOST_AFTER_S, or answers again in
    between, is only slow; silent that long, its head is lost: a stop with its own exit code."""
    from pipeline.scale import ray_cluster

    now = [1000.0]
    monkeypatch.setattr(ray_cluster.time, "monotonic", lambda: now[0])
    with socket.create_server(("127.0.0.1", 0)) as answering:
        with socket.create_server(("127.0.0.1", 0)) as closing:
            silent = "127.0.0.1:%d" % closing.getsockname()[1]
        watch = ray_cluster.HeadWatch("f" * 56, silent)
        watch.check()
        now[0] += ray_cluster.HEAD_LOST_AFTER_S - 1
        watch.check()
        watch.gcs_address = "127.0.0.1:%d" % answering.getsockname()[1]
        watch.check()  # it answered: the silence starts over
        watch.gcs_address = silent
        now[0] += 1
        watch.check()
        now[0] += ray_cluster.HEAD_LOST_AFTER_S - 1
        watch.check()
        now[0] += 1
        with pytest.raises(interrupts.Interrupted) as info:
            watch.check()
    assert isinstance(info.value, ray_cluster.HeadLost)
    assert info.value.exit_code == ray_cluster.HEAD_LOST_EXIT_CODE
    assert str(info.value) == (f"the loss of the Ray head node {'f' * 12} (its GCS at {silent} "
                               f"has not answered for {ray_cluster.HEAD_LOST_AFTER_S:g} s)")


def test_how_long_a_silent_head_is_waited_for_is_a_setting_and_a_bad_one_is_refused(
        monkeypatch):
    """PIPELINE_RAY_HEAD_LOST_AFTER_S: longer for a head that restarts (GCS fault tolerance);
    a value that is not a positive number of seconds is refused before Ray is joined."""
    from pipeline.scale import executors, ray_cluster

    monkeypatch.setenv(ray_cluster.HEAD_LOST_ENV, "45")
    assert ray_cluster.HeadWatch("f" * 56, "127.0.0.1:1").lost_after_s == 45.0
    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv(ray_cluster.HEAD_LOST_ENV, bad)
        with pytest.raises(PipelineError, match=f"PIPELINE_RAY_HEAD_LOST_AFTER_S='{bad}': give"):
            executors.RayExecutor("0")
    monkeypatch.delenv(ray_cluster.HEAD_LOST_ENV)
    assert ray_cluster.HeadWatch("f" * 56, "127.0.0.1:1").lost_after_s == 10.0


def test_the_message_of_a_lost_head_names_each_trainings_fate_and_what_to_do():
    from pipeline.cli import interrupted_message
    from pipeline.scale.ray_cluster import HeadLost

    lost = HeadLost("0123456789ab (its GCS at 10.0.0.1:6379 has not answered for 10 s)")
    lost.endings = ["train-mlp4-seed0 (run r0): KILLED, resumable from its checkpoint",
                    "train-mlp4-seed1: never started"]
    lost.record("main", "m1")
    assert interrupted_message("main", lost) == (
        "interrupted by the loss of the Ray head node 0123456789ab (its GCS at 10.0.0.1:6379 has "
        "not answered for 10 s) [train-mlp4-seed0 (run r0): KILLED, resumable from its "
        "checkpoint; train-mlp4-seed1: never started]: main run m1 ended KILLED; run the same "
        "command again: finished stages are reused and an interrupted training resumes from its "
        "last checkpoint")

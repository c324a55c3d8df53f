"""Stop signals end runs KILLED: real subprocesses, killed with SIGTERM/SIGINT mid-training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import REPO_ROOT, create_experiment, runs_in, subprocess_env
from mlflow import MlflowClient

from pipeline import interrupts

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


def pipeline_command(stage: str, experiment, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", stage, "--experiment", experiment.name, *args]


def epochs_printed(lines: list[str]) -> int:
    return sum(line.startswith("epoch ") for line in lines)


def test_sigterm_during_train_ends_the_run_killed_with_every_finished_epoch_logged(
    tracking_store, started, shared_tiny_mnist
):
    experiment = create_experiment(tracking_store, "sigterm-train")
    stage = started(*pipeline_command(
        "train", experiment, "--epochs", LONG, "--batch_size", "16", "--device", "cpu",
        "--log_model", "false", "--samples_per_class", "12",
        "--data_dir", str(shared_tiny_mnist.root)))
    stage.wait_for("epoch   3/")
    code, seconds = stage.signal(signal.SIGTERM)

    assert code == 143
    assert seconds < 15, "the process took too long to stop"
    [run] = runs_in(experiment, "train")
    assert run.info.status == "KILLED"
    assert run.info.end_time is not None
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "test_accuracy")]
    assert steps == list(range(1, epochs_printed(stage.lines) + 1))
    assert run.data.tags["pipeline.interrupted"].startswith("SIGTERM at ")
    assert "pipeline.error" not in run.data.tags
    last = stage.lines[-1]
    assert last.startswith(f"interrupted by SIGTERM: train run {run.info.run_id} ended KILLED; ")
    assert f"--resume_run_id {run.info.run_id}" in last


def test_sigint_during_main_ends_the_training_and_the_parent_killed(
    tracking_store, started, shared_tiny_mnist, tmp_path
):
    experiment = create_experiment(tracking_store, "sigint-main")
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: long\nconfigs: [mlp3]\nseeds: [0]\n"
        "sample: {samples_per_class: 12, download: false}\n"
        f"train: {{epochs: {LONG}, batch_size: 16, device: cpu, log_model: false}}\n"
    )
    stage = started(*pipeline_command("main", experiment, "--study", str(study),
                                      "--data_dir", str(shared_tiny_mnist.root)))
    stage.wait_for("epoch   2/")
    code, _ = stage.signal(signal.SIGINT)

    assert code == 130
    statuses = {r.data.tags["pipeline.stage"]: r.info.status for r in runs_in(experiment)}
    assert statuses == {"main": "KILLED", "sample_data": "FINISHED", "train": "KILLED"}
    assert stage.lines[-1].startswith("interrupted by SIGINT: train run ")
    assert "run the same command again" in stage.lines[-1]


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
    [child] = [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(stage.process.pid)], capture_output=True, text=True).stdout.split()]
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

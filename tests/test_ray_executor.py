"""main with executor=ray: the same runs as the local executor, trainings side by side as Ray
tasks; a killed worker's training resumes, a failed training is named, a stopped study leaves
every run KILLED."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
from conftest import create_experiment, runs_in, subprocess_env, use_new_experiment
from mlflow import MlflowClient
from test_interrupts import Stage

from pipeline.core.training import METRIC_NAMES
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.runs import checkpoint_store, tracking
from pipeline.stages import main, train

# Real processes (Ray, a process pool) started, signalled and killed: make test, not test-fast.
pytestmark = pytest.mark.integration

# Values a rerun reproduces bit for bit (times are not).
REPRODUCIBLE = [m for m in METRIC_NAMES if m != "epoch_time_s"]
# Params and tags that name the run's own sample, parent or worker rather than its content.
RUN_SPECIFIC = {"sample_run_id", "data_run_id", "model_uri", "resume_run_id"}


def write_study(folder: Path, name: str, configs: list[str], seeds: list[int], **train) -> str:
    settings = {"epochs": 3, "batch_size": 16, "device": "cpu", **train}
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nconfigs: [{', '.join(configs)}]\nseeds: [{', '.join(map(str, seeds))}]\n"
        f"sample: {{samples_per_class: 12, download: false}}\n"
        f"train: {{{', '.join(f'{k}: {v}' for k, v in settings.items())}}}\n"
        f"registered_model_name: {name}-{os.getpid()}\n"
    )
    return str(path)


def study_params(study: str, data_dir: Path, **overrides) -> dict:
    return stage_params("main", {"study": study, "data_dir": str(data_dir), **overrides})


def train_runs(experiment, parent_id: str) -> dict[str, object]:
    return {r.info.run_name: r for r in runs_in(experiment, "train")
            if r.data.tags.get("mlflow.parentRunId") == parent_id}


def history(run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient()
    return {m: sorted((p.step, p.value) for p in client.get_metric_history(run_id, m))
            for m in METRIC_NAMES}


def stages_table(parent_id: str) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent_id,
                                                           artifact_path="stages.csv"))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for this module's in-process studies; shut down afterwards."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
             logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def test_a_remote_cluster_with_a_local_tracking_store_is_refused_before_any_stage(
        experiment, shared_tiny_mnist, tmp_path):
    study = write_study(tmp_path, "remote", ["mlp3"], [0])
    with pytest.raises(PipelineError, match="MLFLOW_TRACKING_URI") as refused:
        main.run(study_params(study, shared_tiny_mnist.root, executor="ray",
                              ray_address="ray://127.0.0.1:10001"))
    assert "\n" not in str(refused.value) and "make server" in str(refused.value)
    [parent] = runs_in(experiment)  # no sample drawn, no task sent
    assert parent.info.status == "FAILED"


@pytest.mark.parametrize("overrides, message", [
    ({"executor": "dask"}, "use local"),
    ({"executor": "ray", "cpus_per_trial": 0}, "at least 1 CPU"),
    ({"executor": "ray", "gpus_per_trial": -1}, "share of a GPU"),
])
def test_bad_executor_settings_fail_before_any_stage(experiment, shared_tiny_mnist, tmp_path,
                                                     overrides, message):
    study = write_study(tmp_path, "bad", ["mlp3"], [0])
    with pytest.raises(PipelineError, match=message):
        main.run(study_params(study, shared_tiny_mnist.root, **overrides))
    assert [r.info.status for r in runs_in(experiment)] == ["FAILED"]


def test_sigterm_on_main_cancels_the_tasks_and_leaves_every_run_killed(
        tracking_store, shared_tiny_mnist, tmp_path):
    """Each training's epochs show up prefixed by its run name; SIGTERM ends them all KILLED
    and leaves no Ray process behind."""
    experiment = create_experiment(tracking_store, "ray-sigterm")
    # Batches of two: epochs long enough on the tiny sample to be stopped mid-training.
    study = write_study(tmp_path, "stopped", ["mlp4"], [0, 1], epochs=200, batch_size=2)
    stage = Stage([sys.executable, "-m", "pipeline", "main", "--experiment", experiment.name,
                   "--study", study, "--data_dir", str(shared_tiny_mnist.root),
                   "--executor", "ray"], subprocess_env(tracking_store))
    try:
        for seed in (0, 1):
            # Each training's epoch lines come prefixed by its run name.
            _wait_for_line(stage, f"(train-mlp4-seed{seed} pid=", "epoch   1/200")
        family = psutil.Process(stage.process.pid).children(recursive=True)
        code, _ = stage.signal(signal.SIGTERM, timeout=90)
    finally:
        stage.stop()
    assert code == 143, "\n".join(stage.lines[-30:])
    statuses = {r.info.run_name: r.info.status for r in runs_in(experiment)}
    assert statuses == {"main-stopped": "KILLED", "sample_data-first12": "FINISHED",
                        "train-mlp4-seed0": "KILLED", "train-mlp4-seed1": "KILLED"}
    for run in runs_in(experiment, "train"):
        assert tracking.INTERRUPTED_TAG in run.data.tags
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"Ray processes outlived the study: {left}"


def _wait_for_line(stage: Stage, start: str, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(line.startswith(start) and text in line for line in stage.lines):
        if stage.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"never printed {start}...{text}:\n" + "\n".join(stage.lines[-30:]))
        time.sleep(0.1)


def test_the_next_study_on_ray_gives_the_runs_and_cache_keys_of_the_local_executor(
        local_ray, tracking_store, shared_tiny_mnist, tmp_path, monkeypatch, capfd):
    """One worker pool for every study (nothing per study in a task's runtime_env, where Ray
    would start new workers for it): after a first study, the next one's runs, cache keys and
    values are the local executor's, and each study's runs land in its own experiment. The
    tracking password and token travel to the tasks without reaching a file (Ray's
    runtime-env agent logs a task's runtime_env on every node), a command line, the output or
    a run."""
    password, token = f"password-{uuid.uuid4().hex}", f"token-{uuid.uuid4().hex}"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    first_experiment = use_new_experiment(tracking_store, "first study")
    first = write_study(tmp_path, "first", ["mlp4"], [1], epochs=2)
    main.run(study_params(first, shared_tiny_mnist.root, executor="ray"))
    printed = [capfd.readouterr()]

    experiment = use_new_experiment(tracking_store, "next study")
    study = write_study(tmp_path, "same", ["mlp3"], [0, 1])
    ray_parent = main.run(study_params(study, shared_tiny_mnist.root, executor="ray"))
    printed.append(capfd.readouterr())
    assert "sent to Ray" in printed[-1].out
    # Whether it ran on a worker of the first study is not asserted: Ray retires idle workers
    # above its soft limit, and the next study's task lands on a new one about half the time.

    # The local executor finds every stage already done: the cache keys are the same.
    local_reuse = main.run(study_params(study, shared_tiny_mnist.root, workers="1"))
    assert stages_table(local_reuse).reused.all()
    # And a second Ray study sends nothing to Ray.
    main.run(study_params(study, shared_tiny_mnist.root, executor="ray"))
    printed.append(capfd.readouterr())
    assert "sent to Ray" not in printed[-1].out

    local_parent = main.run(study_params(study, shared_tiny_mnist.root, force=True, workers="1"))
    on_ray, local = train_runs(experiment, ray_parent), train_runs(experiment, local_parent)
    assert sorted(on_ray) == sorted(local) == ["train-mlp3-seed0", "train-mlp3-seed1"]
    for name, run in on_ray.items():
        twin = local[name]
        assert run.info.status == twin.info.status == "FINISHED"
        assert run.data.tags[tracking.CACHE_KEY_TAG] != ""
        assert ({k: v for k, v in run.data.params.items() if k not in RUN_SPECIFIC}
                == {k: v for k, v in twin.data.params.items() if k not in RUN_SPECIFIC})
        assert run.data.params["torch_threads"] == "1"
        got, want = history(run.info.run_id), history(twin.info.run_id)
        for metric in REPRODUCIBLE:
            assert got[metric] == want[metric], f"{name}: {metric}"
        artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
        assert artifacts == {a.path for a in MlflowClient().list_artifacts(twin.info.run_id)}
    evaluations = [r for r in runs_in(experiment, "evaluate")
                   if r.data.tags.get("mlflow.parentRunId") == ray_parent]
    assert sorted(r.info.run_name for r in evaluations) == ["evaluate-mlp3-seed0",
                                                            "evaluate-mlp3-seed1"]
    statuses = {r.info.status for r in runs_in(experiment)}
    assert statuses == {"FINISHED"}

    def stage_runs(experiment) -> set[str]:
        return {r.info.run_name for r in runs_in(experiment)
                if r.data.tags[tracking.STAGE_TAG] in ("main", "train", "evaluate")}

    assert stage_runs(first_experiment) == {"main-first", "train-mlp4-seed1",
                                            "evaluate-mlp4-seed1"}
    assert stage_runs(experiment) == {"main-same", "train-mlp3-seed0", "train-mlp3-seed1",
                                      "evaluate-mlp3-seed0", "evaluate-mlp3-seed1"}

    printed.append(capfd.readouterr())
    assert_secrets_nowhere((password, token), [ray_session_folder(local_ray)],
                           "".join(o.out + o.err for o in printed),
                           runs_in(first_experiment) + runs_in(experiment))


def test_a_failed_training_is_named_and_the_others_finish(local_ray, experiment,
                                                          shared_tiny_mnist, tmp_path):
    assert_a_failed_training_is_named_and_the_others_finish(
        experiment, shared_tiny_mnist.root, tmp_path, executor="ray")


def assert_a_failed_training_is_named_and_the_others_finish(experiment, data_root, tmp_path,
                                                           **executor):
    """A study with one diverging training, on `executor`: every job ends, then the failure
    names its run in one line; shared by the Ray and the local pool tests."""
    # At lr 1e4 the deep plain MLP's activations overflow to NaN in its first epoch; the
    # linear model's loss grows but stays finite.
    (tmp_path / "linear.yaml").write_text("name: linear\nmodel: {type: mlp, hidden: []}\n")
    (tmp_path / "deep.yaml").write_text(
        "name: deep\nmodel: {type: mlp, hidden: [{units: 64}, {units: 64}, {units: 64}, "
        "{units: 64}, {units: 64}, {units: 64}]}\n")
    study = write_study(tmp_path, "diverging",
                        [str(tmp_path / "linear.yaml"), str(tmp_path / "deep.yaml")], [0],
                        lr=1e4)
    with pytest.raises(PipelineError) as failed:
        main.run(study_params(study, data_root, **executor))
    trains = {r.info.run_name: r for r in runs_in(experiment, "train")}
    deep, linear = trains["train-deep-seed0"], trains["train-linear-seed0"]
    message = str(failed.value)
    assert message.startswith("1 of 2 train run(s) failed: train-deep-seed0 "
                              f"(run {deep.info.run_id}): the training loss became nan")
    assert "\n" not in message
    assert deep.info.status == "FAILED" and "nan" in deep.data.tags[tracking.ERROR_TAG]
    assert linear.info.status == "FINISHED"
    assert len(history(linear.info.run_id)["train_loss"]) == 3
    statuses = {r.data.tags[tracking.STAGE_TAG]: r.info.status for r in runs_in(experiment)
                if r.data.tags[tracking.STAGE_TAG] != "train"}
    assert statuses == {"main": "FAILED", "sample_data": "FINISHED"}


def test_a_killed_worker_is_retried_and_its_run_resumes_to_the_undisturbed_result(
        local_ray, experiment, shared_tiny_mnist, tmp_path):
    epochs = 8
    study = write_study(tmp_path, "killed", ["mlp4"], [0], epochs=epochs, batch_size=2)
    outcome: dict = {}

    def study_on_ray():
        try:
            outcome["parent"] = main.run(study_params(study, shared_tiny_mnist.root,
                                                      executor="ray"))
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            outcome["error"] = err

    thread = threading.Thread(target=study_on_ray, daemon=True)
    thread.start()
    victim = _worker_after_first_checkpoint(experiment, "train-mlp4-seed0", thread)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")

    assert stages_table(outcome["parent"]).set_index("label").loc["train-mlp4-seed0", "resumed"]
    assert {r.info.status for r in runs_in(experiment)} == {"FINISHED"}
    [resumed] = train_runs(experiment, outcome["parent"]).values()
    assert f"pid {victim}" not in resumed.data.tags["pipeline.ray_worker"]

    # The same training in this process, undisturbed.
    mlflow.set_experiment(experiment_id=experiment.id)
    assert_as_an_undisturbed_training(resumed, epochs)


def assert_as_an_undisturbed_training(resumed, epochs: int) -> None:
    """One point per epoch, each reproducible value == the same training run in this process
    (in the current experiment) without interruption."""
    accepted = stage_params("train")
    undisturbed = train.run(stage_params("train", {
        k: v for k, v in resumed.data.params.items() if k in accepted and k != "resume_run_id"}))
    got, want = history(resumed.info.run_id), history(undisturbed)
    for metric in METRIC_NAMES:
        assert [step for step, _ in got[metric]] == list(range(1, epochs + 1)), metric
    for metric in REPRODUCIBLE:
        assert got[metric] == want[metric], metric


def _worker_after_first_checkpoint(experiment, run_name: str, thread: threading.Thread) -> int:
    """The PID of the Ray worker training `run_name`, once its first checkpoint is on disk."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        for run in runs_in(experiment, "train"):
            worker = run.data.tags.get("pipeline.ray_worker")
            if (run.info.run_name == run_name and run.info.status == "RUNNING" and worker
                    and (checkpoint_store.local_dir(run.info.run_id)
                         / checkpoint_store.FILE_NAME).is_file()):
                return int(worker.rsplit(" ", 1)[1])
        time.sleep(0.1)
    pytest.fail(f"{run_name} never wrote a checkpoint on a Ray worker")



# --------------------------------------------------------------------------------------------
# Secrets, devices and failure paths (issue 17: findings 1, 13, 15, 16, 17)
# --------------------------------------------------------------------------------------------


def ray_session_folder(ray) -> Path:
    folder = Path(ray._private.worker._global_node.get_session_dir_path())
    assert any(p.name.startswith("runtime_env_agent") for p in (folder / "logs").iterdir())
    return folder


def assert_secrets_nowhere(secrets: tuple[str, ...], folders: list[Path], output: str,
                           runs: list) -> None:
    """No secret in any file under `folders`, any process's command line, `output` (what the
    study printed, its workers' lines included) or any run's params and tags."""
    encoded = [s.encode() for s in secrets]
    files = [p for folder in folders for p in folder.rglob("*")
             if p.is_file() and not p.is_symlink()]
    leaked = [str(p) for p in files if any(s in _read_bytes(p) for s in encoded)]
    assert not leaked, f"a secret is in {leaked}"
    for process in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        assert not any(s in line for s in secrets), f"a secret on pid {process.info['pid']}'s argv"
    assert not any(s in output for s in secrets), "a secret was printed"
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(s in v for s in secrets for v in values), run.info.run_name


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a socket or a file Ray removed meanwhile
        return b""


def test_a_task_sees_the_credentials_only_while_it_runs(local_ray, monkeypatch):
    """The credentials reach the task (as an argument, in memory) and leave the worker's
    environment with it: the worker serves other tasks afterwards."""
    from pipeline.scale import ray_cluster

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "during-the-task")

    @local_ray.remote(num_cpus=1)
    def inside(credentials):
        with ray_cluster.credentials_set(credentials):
            during = os.environ.get("MLFLOW_TRACKING_PASSWORD")
        return during, os.environ.get("MLFLOW_TRACKING_PASSWORD")

    during, after = local_ray.get(inside.remote(ray_cluster.credentials()))
    assert during == "during-the-task" and after is None


def test_the_probe_reports_the_workers_device_and_the_key_uses_it(local_ray, experiment,
                                                                  sample_run):
    """main's train key under Ray is the one the worker's run carries: the worker's device,
    not the driver's `auto`."""
    from pipeline.cache import train_keys
    from pipeline.scale import executors

    probe = executors.RayExecutor(experiment.id).machine("auto")
    assert probe["device"] == "cpu" and probe["numerics"]["torch_threads"] == 1
    fit = stage_params("train", {"config": "mlp3", "data_run_id": sample_run.run_id})
    # A GPU worker under a CPU-only driver reports its GPU: the driver resolves nothing itself.
    gpu_worker = {"device": "cuda", "numerics": {**probe["numerics"], "gpu": "NVIDIA H200"}}
    on_gpu = train_keys.train_key({**fit, "device": "auto"}, sample_run.run_id, gpu_worker)
    assert on_gpu == train_keys.train_key({**fit, "device": "cuda"}, sample_run.run_id,
                                          gpu_worker)
    assert on_gpu != train_keys.train_key({**fit, "device": "auto"}, sample_run.run_id, probe)
    assert train_keys.train_key({**fit, "device": "auto"}, sample_run.run_id, probe) == \
        train_keys.train_key({**fit, "device": "cpu"}, sample_run.run_id, probe)


@pytest.mark.parametrize("overrides, named", [
    ({"gpus_per_trial": 1}, "gpus_per_trial=1"),
    ({"cpus_per_trial": 3}, "cpus_per_trial=3"),
])
def test_a_request_no_node_can_hold_is_refused_before_any_task(
        local_ray, experiment, shared_tiny_mnist, tmp_path, overrides, named):
    study = write_study(tmp_path, "unsatisfiable", ["mlp3"], [0])
    outcome: dict = {}

    def study_on_ray():
        try:
            main.run(study_params(study, shared_tiny_mnist.root, executor="ray", **overrides))
        except BaseException as err:  # noqa: BLE001 - checked below
            outcome["error"] = err

    thread = threading.Thread(target=study_on_ray, daemon=True)
    thread.start()
    thread.join(timeout=120)  # a pending task would wait forever
    assert not thread.is_alive(), "main waits for resources the cluster does not have"
    error = outcome.get("error")
    assert isinstance(error, PipelineError), error
    assert named in str(error) and "\n" not in str(error)
    assert [r.info.status for r in runs_in(experiment)] == ["FAILED"]  # no sample drawn


def test_a_task_ray_gives_up_on_ends_failed_and_is_named(
        local_ray, experiment, shared_tiny_mnist, tmp_path, monkeypatch):
    """A worker SIGKILLed on every attempt (as by the OOM killer): Ray stops retrying, the
    other training still finishes, the study names the failed run, and no run stays RUNNING."""
    from pipeline.scale import executors

    monkeypatch.setattr(executors, "TASK_RETRIES", 1, raising=False)
    study = write_study(tmp_path, "oom", ["mlp4"], [0, 1], epochs=8, batch_size=2)
    outcome: dict = {}

    def study_on_ray():
        try:
            main.run(study_params(study, shared_tiny_mnist.root, executor="ray"))
        except BaseException as err:  # noqa: BLE001 - checked below
            outcome["error"] = err

    thread = threading.Thread(target=study_on_ray, daemon=True)
    thread.start()
    killed: set[int] = set()
    while thread.is_alive():
        for run in runs_in(experiment, "train"):
            worker = run.data.tags.get("pipeline.ray_worker")
            if run.info.run_name == "train-mlp4-seed0" and run.info.status == "RUNNING" \
                    and worker and int(worker.rsplit(" ", 1)[1]) not in killed:
                pid = int(worker.rsplit(" ", 1)[1])
                killed.add(pid)
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    thread.join()
    error = outcome.get("error")
    assert isinstance(error, PipelineError), error
    trains = runs_in(experiment, "train")
    failed = [r for r in trains if r.info.run_name == "train-mlp4-seed0"][-1]
    message = str(error)
    assert message.startswith(f"1 of 2 train run(s) failed: train-mlp4-seed0 "
                              f"(run {failed.info.run_id}): Ray gave up"), message
    assert "\n" not in message
    assert failed.info.status == "FAILED"
    assert "Ray gave up" in failed.data.tags[tracking.ERROR_TAG]
    [finished] = [r for r in trains if r.info.run_name == "train-mlp4-seed1"]
    assert finished.info.status == "FINISHED"
    assert "RUNNING" not in {r.info.status for r in runs_in(experiment)}


def test_a_stopped_study_ends_the_run_it_resumed_although_another_main_started_it(
        local_ray, experiment, sample_run, monkeypatch):
    """The cancel sweep ends every run this study's tasks own, a resumed one included (it
    keeps its first parent). The worker is stopped (SIGSTOP) so that it cannot end its run
    itself: the sweep must."""
    from pipeline import interrupts
    from pipeline.scale import executors

    monkeypatch.setattr(executors, "CANCEL_GRACE_S", 3.0)
    params = stage_params("train", {"config": "mlp4", "epochs": 200, "batch_size": 2,
                                    "device": "cpu", "log_model": False,
                                    "data_run_id": sample_run.run_id})
    first = _interrupted_in_this_process(experiment, params)
    assert mlflow.get_run(first).info.status == "KILLED"

    parent = MlflowClient().create_run(experiment.id, run_name="main-stopped").info.run_id
    executor = executors.RayExecutor(experiment.id)
    job = executors.Job("train", "train-mlp4-seed0", {**params, "resume_run_id": first})
    stopped: list[int] = []

    def stop_the_worker_then_the_study():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            run = mlflow.get_run(first)
            worker = run.data.tags.get("pipeline.ray_worker")
            if run.info.status == "RUNNING" and worker:
                stopped.append(int(worker.rsplit(" ", 1)[1]))
                time.sleep(2)  # into its epochs
                _stop_between_store_writes(stopped[0])
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=stop_the_worker_then_the_study, daemon=True).start()
    try:
        with pytest.raises(interrupts.Interrupted), interrupts.installed():
            executor.run([job], parent)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert stopped, "the resumed run never ran on a worker"
    run = mlflow.get_run(first)
    assert run.info.status == "KILLED" and tracking.INTERRUPTED_TAG in run.data.tags
    assert run.data.tags.get("mlflow.parentRunId") != parent  # not found by its parent


def _stop_between_store_writes(pid: int) -> None:
    """SIGSTOP `pid` at a moment it holds no lock on the SQLite store: stopped inside one of
    its writes (a metric point, a checkpoint's tag), it would lock every other writer out of
    the file for good, which a tracking server's store never does (seen once in the suite:
    "database is locked" in the sweep's own write)."""
    store = mlflow.get_tracking_uri().removeprefix("sqlite:///")
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        try:
            with closing(sqlite3.connect(store, timeout=0.5)) as connection:
                connection.execute("BEGIN EXCLUSIVE")  # no other process holds any lock
                connection.rollback()
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
    pytest.fail(f"worker {pid} held a lock on {store} every time it was stopped")


def _interrupted_in_this_process(experiment, params: dict) -> str:
    """A train run stopped by a real SIGINT once its first checkpoint is on disk."""
    from pipeline import interrupts

    def interrupt_after_the_first_checkpoint():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for run in runs_in(experiment, "train"):
                if (checkpoint_store.local_dir(run.info.run_id)
                        / checkpoint_store.FILE_NAME).is_file():
                    os.kill(os.getpid(), signal.SIGINT)
                    return
            time.sleep(0.05)

    threading.Thread(target=interrupt_after_the_first_checkpoint, daemon=True).start()
    with pytest.raises(interrupts.Interrupted) as stop, interrupts.installed():
        train.run(params)
    return stop.value.run_id

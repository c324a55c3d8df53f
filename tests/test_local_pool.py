"""main with executor=local: trainings and evaluations side by side in a pool of worker
processes (workers), each with a fixed number of torch threads (threads). The same runs, values
and cache keys as one after another in this process; failures, stop signals and a dead worker
end every run as the sequential and Ray executors do; results independent of scheduling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import mlflow
import psutil
import pytest
from conftest import (REPO_ROOT, Experiment, create_experiment, runs_in, subprocess_env,
                      use_new_experiment)
from mlflow import MlflowClient
from test_interrupts import Stage
from test_ray_executor import (REPRODUCIBLE, RUN_SPECIFIC,
                               assert_a_failed_training_is_named_and_the_others_finish, history,
                               stages_table, study_params, train_runs, write_study)

from pipeline.cache import train_keys
from pipeline.cli import main as cli_main
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.runs import checkpoint_store, tracking
from pipeline.scale import executors, pool_processes, ray_tasks
from pipeline.stages import main, train

# Real processes (Ray, a process pool) started, signalled and killed: make test, not test-fast.
pytestmark = pytest.mark.integration

# The tag a pool worker puts on its run (its pid), not part of a run's content.
WORKER_TAG = "pipeline.local_worker"


@dataclass(frozen=True)
class GrownStudy:
    """A study grown in one experiment: `first` (mlp3, seed 0) one after another in this
    process, `standalone` (a train run of mlp4 seed 0 on its own), then `pooled`, the same
    study with both configs and seeds 0 and 1 in a pool of two workers; `twin`, the pool's
    new trainings (seed 1) one after another in an experiment of its own."""

    experiment: Experiment
    twin_experiment: Experiment
    study: str
    first: str  # main runs (parents)
    standalone: str  # a train run
    pooled: str
    twin: str
    # The stages each main loaded ahead while its trainings ran, by main run.
    loaded_ahead: dict[str, list[str]]


@pytest.fixture(scope="module")
def grown_study(tracking_store, shared_tiny_mnist, tmp_path_factory) -> GrownStudy:
    folder = tmp_path_factory.mktemp("grown")
    data = shared_tiny_mnist.root
    experiment = use_new_experiment(tracking_store, "pool-grown")
    ahead: list[str] = []
    load_ahead = main._import_in_idle_time

    def studied(study: str, **overrides) -> str:
        ahead.clear()
        return main.run(study_params(study, data, **overrides))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(main, "_import_in_idle_time",
                      lambda stage: (ahead.append(stage), load_ahead(stage)))
        first = studied(write_study(folder, "one", ["mlp3"], [0]), workers="1")
        loaded_ahead = {first: list(ahead)}
        standalone = train.run(stage_params("train", {
            "config": "mlp4", "seed": 0, "data_dir": str(data), "samples_per_class": 12,
            "epochs": 3, "batch_size": 16, "device": "cpu"}))
        study = write_study(folder, "two", ["mlp3", "mlp4"], [0, 1])
        pooled = studied(study, workers="2")
        loaded_ahead[pooled] = list(ahead)
        twin_experiment = use_new_experiment(tracking_store, "pool-twin")
        twin = studied(write_study(folder, "seed1", ["mlp3", "mlp4"], [1]), workers="1")
        loaded_ahead[twin] = list(ahead)
    return GrownStudy(experiment, twin_experiment, study, first, standalone, pooled, twin,
                      loaded_ahead)


@pytest.fixture
def grown(grown_study) -> GrownStudy:
    """The grown study, its experiment the active one (a test in between may have set its own)."""
    mlflow.set_experiment(grown_study.experiment.name)
    return grown_study


def test_the_pool_gives_the_runs_values_and_keys_of_one_after_another(grown, shared_tiny_mnist):
    """The pool's new trainings (seed 1) against their twins, trained one after another in
    this process in an experiment of their own."""
    # One after another in this process finds every stage done: the cache keys are the same.
    assert stages_table(main.run(study_params(grown.study, shared_tiny_mnist.root,
                                              workers="1"))).reused.all()

    in_pool = train_runs(grown.experiment, grown.pooled)
    one = train_runs(grown.twin_experiment, grown.twin)
    assert sorted(in_pool) == sorted(one) == ["train-mlp3-seed1", "train-mlp4-seed1"]
    for name, run in in_pool.items():
        twin = one[name]
        assert run.info.status == twin.info.status == "FINISHED"
        assert WORKER_TAG in run.data.tags and WORKER_TAG not in twin.data.tags
        assert ({k: v for k, v in run.data.params.items() if k not in RUN_SPECIFIC}
                == {k: v for k, v in twin.data.params.items() if k not in RUN_SPECIFIC})
        assert run.data.params["torch_threads"] == "1"
        got, want = history(run.info.run_id), history(twin.info.run_id)
        for metric in REPRODUCIBLE:
            assert got[metric] == want[metric], f"{name}: {metric}"
        artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
        assert artifacts == {a.path for a in MlflowClient().list_artifacts(twin.info.run_id)}
    # Every stage the pooled study ran (not reused) is nested under its main run.
    ran = stages_table(grown.pooled).query("not reused").label
    assert sorted(children_names(grown.experiment, grown.pooled)) == sorted(ran) == [
        "compare", "evaluate-mlp3-seed1", "evaluate-mlp4-seed0", "evaluate-mlp4-seed1",
        "train-mlp3-seed1", "train-mlp4-seed1"]
    assert sorted(children_names(grown.twin_experiment, grown.twin)) == [
        "compare", "evaluate-mlp3-seed1", "evaluate-mlp4-seed1", "sample_data-first12",
        "train-mlp3-seed1", "train-mlp4-seed1"]
    for experiment in (grown.experiment, grown.twin_experiment):
        assert {r.info.status for r in runs_in(experiment)} == {"FINISHED"}


def children_names(experiment, parent_id: str) -> list[str]:
    """The names of a main run's nested runs, compare's without its hash."""
    return [r.info.run_name.split("-")[0] if r.info.run_name.startswith("compare")
            else r.info.run_name for r in runs_in(experiment)
            if r.data.tags.get("mlflow.parentRunId") == parent_id]


def test_compare_loads_ahead_only_while_the_trainings_run_elsewhere(grown):
    """With a pool, main's own thread only waits while the trainings run, so compare's module
    loads meanwhile at the lowest priority; trainings in main's own process (workers=1) are
    not shared with such a thread (waiting for a core while holding the interpreter's lock,
    it would hold up the training's Python)."""
    assert grown.loaded_ahead == {grown.first: [], grown.pooled: ["compare"], grown.twin: []}


def test_workers_auto_starts_no_more_workers_than_the_study_has_trainings(experiment,
                                                                         monkeypatch):
    """A one-training study trains in main's process: a worker would only import."""
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)
    auto = stage_params("main", {"workers": "auto"})
    assert pool_processes.local_workers("auto", 1, trainings=3) == 3
    assert pool_processes.local_workers("auto", 2, trainings=6) == 4
    assert isinstance(executors.make_executor(auto, experiment.id, trainings=1),
                      executors.LocalExecutor)
    pool = executors.make_executor(auto, experiment.id, trainings=2)
    assert isinstance(pool, executors.PoolExecutor) and pool.workers == 2


def test_a_trainings_key_names_its_threads_not_the_jobs_or_the_cores(
        experiment, sample_run, monkeypatch):
    """Adding a seed, more workers or a machine with more cores leaves each training's key as
    it was; only `threads` changes it. The pool's key is a Ray task's with one CPU."""
    fit = stage_params("train", {"config": "mlp3", "seed": 0, "device": "cpu",
                                 "data_run_id": sample_run.run_id})

    def key(params: dict, **main_overrides) -> str:
        chosen = executors.make_executor(stage_params("main", main_overrides), experiment.id)
        return train_keys.train_key(params, sample_run.run_id, chosen.machine("cpu"))

    alone = key(fit, workers="2")
    assert key(fit, workers="1") == key(fit, workers="3") == alone
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 64)
    assert pool_processes.local_workers("auto", 1) == 64
    assert key(fit, workers="auto") == alone
    assert key(fit, workers="auto", threads=2) != alone
    # A Ray task with cpus_per_trial=1 gets OMP_NUM_THREADS=1 (ray_cluster.worker_env) and
    # reports the numerics the key holds (ray_tasks.machine_numerics).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train_keys.train_key(fit, sample_run.run_id,
                                ray_tasks.machine_numerics("cpu")) == alone


def test_adding_a_seed_reuses_the_other_trainings(grown, shared_tiny_mnist, monkeypatch):
    """Grown from one config and seed (one job) to two of each (four): the training both
    studies share is reused, the new ones are trained."""
    before, after = train_runs(grown.experiment, grown.first), stages_table(grown.pooled)
    after = after.set_index("label")
    assert after.loc["train-mlp3-seed0", "reused"]
    assert after.loc["train-mlp3-seed0", "run_id"] == before["train-mlp3-seed0"].info.run_id
    assert not after.loc["train-mlp3-seed1", "reused"]
    assert not after.loc["train-mlp4-seed1", "reused"]

    # A study with nothing left to run starts no worker process at all.
    def no_pool(*args, **kwargs):
        raise AssertionError("a fully cached study started the pool")

    monkeypatch.setattr(executors, "ProcessPoolExecutor", no_pool)
    assert stages_table(main.run(study_params(grown.study, shared_tiny_mnist.root,
                                              workers="2"))).reused.all()


def test_main_reuses_a_standalone_train_run_with_the_same_numerics(grown):
    """`python -m pipeline train` with OMP_NUM_THREADS=1 (the tests' setting) has the key of
    the same training in main with threads=1."""
    table = stages_table(grown.pooled).set_index("label")
    assert table.loc["train-mlp4-seed0", "reused"]
    assert table.loc["train-mlp4-seed0", "run_id"] == grown.standalone


def test_a_failed_job_is_named_after_every_job_has_ended(experiment, shared_tiny_mnist,
                                                         tmp_path):
    assert_a_failed_training_is_named_and_the_others_finish(
        experiment, shared_tiny_mnist.root, tmp_path, workers="2")


def _pooled_main(tracking_store, shared_tiny_mnist, tmp_path, label: str):
    experiment = create_experiment(tracking_store, label)
    # Batches of two: epochs long enough on the tiny sample to be stopped mid-training.
    study = write_study(tmp_path, label, ["mlp4"], [0, 1], epochs=200, batch_size=2)
    stage = Stage([sys.executable, "-m", "pipeline", "main", "--experiment", experiment.name,
                   "--study", study, "--data_dir", str(shared_tiny_mnist.root),
                   "--workers", "2"], subprocess_env(tracking_store))
    return experiment, stage


def _wait_for_checkpoints(experiment, names: set[str], study_running: Callable[[], bool],
                          output: Callable[[], list[str]]) -> dict[str, object]:
    """The RUNNING train runs `names`, once each has its first checkpoint on disk."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and study_running():
        runs = {r.info.run_name: r for r in runs_in(experiment, "train")
                if r.info.status == "RUNNING"}
        if set(runs) >= names and all(
                (checkpoint_store.local_dir(runs[n].info.run_id)
                 / checkpoint_store.FILE_NAME).is_file() for n in names):
            return runs
        time.sleep(0.2)
    pytest.fail("the trainings never checkpointed:\n" + "\n".join(output()[-30:]))


def test_sigterm_on_main_ends_every_pooled_training_killed_and_resumable(
        tracking_store, shared_tiny_mnist, tmp_path):
    experiment, stage = _pooled_main(tracking_store, shared_tiny_mnist, tmp_path, "pool-stop")
    names = {"train-mlp4-seed0", "train-mlp4-seed1"}
    try:
        _wait_for_checkpoints(experiment, names, lambda: stage.process.poll() is None,
                              lambda: stage.lines)
        family = psutil.Process(stage.process.pid).children(recursive=True)
        code, _ = stage.signal(signal.SIGTERM, timeout=90)
    finally:
        stage.stop()
    assert code == 143, "\n".join(stage.lines[-30:])
    # Each job's lines come prefixed by its run's name.
    for name in names:
        assert any(f"({name}) epoch   1/200" in line for line in stage.lines), name
    statuses = {r.info.run_name: r.info.status for r in runs_in(experiment)}
    assert statuses == {"main-pool-stop": "KILLED", "sample_data-first12": "FINISHED",
                        "train-mlp4-seed0": "KILLED", "train-mlp4-seed1": "KILLED"}
    for run in runs_in(experiment, "train"):
        assert tracking.INTERRUPTED_TAG in run.data.tags
        assert checkpoint_store.has_checkpoint(run.info.run_id)
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"pool workers outlived the study: {left}"


def test_main_killed_outright_ends_every_pooled_training_killed_and_its_workers(
        tracking_store, shared_tiny_mnist, tmp_path):
    """SIGKILL to main alone (no handler runs in it): each worker, its parent gone, ends its
    run KILLED and resumable, then exits rather than wait on the pool's queues forever."""
    experiment, stage = _pooled_main(tracking_store, shared_tiny_mnist, tmp_path, "pool-kill")
    names = {"train-mlp4-seed0", "train-mlp4-seed1"}
    try:
        runs = _wait_for_checkpoints(experiment, names, lambda: stage.process.poll() is None,
                                     lambda: stage.lines)
        workers = [psutil.Process(int(run.data.tags[WORKER_TAG].split()[-1]))
                   for run in runs.values()]
        os.kill(stage.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (
                {r.info.status for r in runs_in(experiment, "train")} != {"KILLED"}
                or any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)):
            time.sleep(0.5)
    finally:
        stage.stop()
    for run in runs_in(experiment, "train"):
        assert run.info.status == "KILLED", run.info.run_name
        assert tracking.INTERRUPTED_TAG in run.data.tags
        assert checkpoint_store.has_checkpoint(run.info.run_id)
    left = [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"pool workers outlived their killed main: {left}"


def test_a_killed_worker_fails_its_run_and_the_study_names_it(
        experiment, shared_tiny_mnist, tmp_path, capsys):
    """main in this process, as the command line runs it; the process killed is a worker."""
    study = write_study(tmp_path, "pool-oom", ["mlp4"], [0, 1], epochs=200, batch_size=2)
    names = {"train-mlp4-seed0", "train-mlp4-seed1"}
    study_ended = threading.Event()
    seen: dict[str, object] = {}

    def kill_a_worker_once_both_checkpointed() -> None:
        try:
            seen["runs"] = runs = _wait_for_checkpoints(
                experiment, names, lambda: not study_ended.is_set(), lambda: [])
            worker = int(runs["train-mlp4-seed0"].data.tags[WORKER_TAG].split()[-1])
            os.kill(worker, signal.SIGKILL)
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            seen["error"] = err

    killer = threading.Thread(target=kill_a_worker_once_both_checkpointed, daemon=True)
    killer.start()
    try:
        code = cli_main(["main", "--experiment", experiment.name, "--study", study,
                         "--data_dir", str(shared_tiny_mnist.root), "--workers", "2"])
    finally:
        study_ended.set()
        killer.join(timeout=30)
    if "error" in seen:
        raise seen["error"]
    output = capsys.readouterr()
    assert code == 2, output.err[-3000:]
    runs = seen["runs"]
    victim = runs["train-mlp4-seed0"]
    [error] = [line for line in output.err.splitlines() if line.startswith("error: ")]
    assert f"train-mlp4-seed0 (run {victim.info.run_id}): its worker process died" in error
    assert "train-mlp4-seed1" in error  # stopped with the pool, and said so
    killed = mlflow.get_run(victim.info.run_id)
    assert killed.info.status == "FAILED"
    assert "worker process died" in killed.data.tags[tracking.ERROR_TAG]
    other = mlflow.get_run(runs["train-mlp4-seed1"].info.run_id)
    assert other.info.status in ("KILLED", "FAILED")
    assert mlflow.get_run(stage_parent(experiment)).info.status == "FAILED"


def stage_parent(experiment) -> str:
    [parent] = runs_in(experiment, "main")
    return parent.info.run_id


def test_bad_pool_settings_fail_before_any_stage(experiment, shared_tiny_mnist, tmp_path):
    study = write_study(tmp_path, "bad", ["mlp3"], [0])
    for overrides, message in (({"workers": "many"}, "workers='many'"),
                               ({"workers": "0"}, "workers='0'"),
                               ({"threads": 0}, "at least 1 torch thread")):
        with pytest.raises(PipelineError, match=message):
            main.run(study_params(study, shared_tiny_mnist.root, **overrides))
    assert [r.info.status for r in runs_in(experiment)] == ["FAILED"] * 3


def test_a_pooled_main_that_ends_early_stops_its_fork_server_with_it(tmp_path):
    """main starts the pool's fork server before anything else (its loading overlaps main's
    own); a main that ends before the server has loaded, here on a tracking server that does
    not answer, stops it on exit rather than leave it loading for seconds with main's output
    open (`mlflow run . | tee log` would wait for it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
               MLFLOW_DISABLE_TELEMETRY="true")
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "main", "--workers", "2",
                                "--data_dir", str(tmp_path)], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        server = None
        deadline = time.monotonic() + 60
        while server is None and process.poll() is None and time.monotonic() < deadline:
            try:
                server = next((child for child in psutil.Process(process.pid).children()
                               if "forkserver" in " ".join(child.cmdline())), None)
            except psutil.Error:
                pass  # main, or a child, ended meanwhile
            time.sleep(0.02)
        code = process.wait(timeout=60)
        _, alive = psutil.wait_procs([server] if server else [], timeout=2)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert server is not None, f"main with workers=2 started no fork server:\n{output}"
    assert code == 2 and "error: " in output, output
    assert not alive, "the fork server outlived the main that started it"


def test_a_study_that_finished_here_starts_its_fork_server_only_when_its_jobs_run(
        monkeypatch, tmp_path, shared_tiny_mnist):
    """The fork server starts before main can ask the store what is cached: a pooled study that
    finished here before, unchanged, is taken to be cached and starts none then (a fully
    cached study would pay for a server it never uses); forced, in another experiment or with
    other parameters, it starts one."""
    started = []
    monkeypatch.setattr(pool_processes, "start_fork_server", lambda: started.append(1))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    args = {"study": str(write_study(tmp_path, "early", ["mlp3", "mlp4"], [0])),
            "data_dir": str(shared_tiny_mnist.root), "workers": "2"}

    def starts(experiment: str = "early", **overrides) -> bool:
        count = len(started)
        pool_processes.start_for_study({**args, **overrides}, experiment)
        return len(started) > count

    assert not starts(workers="1") and not starts(executor="ray"), "no pool, no server"
    assert starts(), "a study never finished here starts its server early"
    pool_processes.remember_finished(stage_params("main", args))  # what main does at its end
    assert not starts(), "the same study, finished here, starts none"
    assert starts(force="true") and starts("another") and starts(epochs="2")
    # main.run called without the command line (a test, a notebook) marks nothing of another.
    pool_processes.remember_finished(stage_params("main", {**args, "epochs": "3"}))
    assert starts(epochs="2"), "a study's end marks only its own parameters finished"

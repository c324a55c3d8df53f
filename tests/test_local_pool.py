"""main with executor=local: trainings and evaluations side by side in a pool of worker
processes (workers), each with a fixed number of torch threads (threads). The same runs, values
and cache keys as one after another in this process; failures, stop signals and a dead worker
end every run as the sequential and Ray executors do; results independent of scheduling."""

from __future__ import annotations

import os
import signal
import sys
import time

import mlflow
import psutil
import pytest
from conftest import create_experiment, runs_in, subprocess_env
from mlflow import MlflowClient
from test_interrupts import Stage
from test_ray_executor import (REPRODUCIBLE, RUN_SPECIFIC,
                               assert_a_failed_training_is_named_and_the_others_finish, history,
                               stages_table, study_params, train_runs, write_study)

from pipeline.cache import train_keys
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.runs import checkpoint_store, tracking
from pipeline.scale import executors, ray_tasks
from pipeline.stages import main, train

# Real processes (Ray, a process pool) started, signalled and killed: make test, not test-fast.
pytestmark = pytest.mark.integration

# The tag a pool worker puts on its run (its pid), not part of a run's content.
WORKER_TAG = "pipeline.local_worker"


def test_the_pool_gives_the_runs_values_and_keys_of_one_after_another(
        experiment, shared_tiny_mnist, tmp_path, capfd):
    study = write_study(tmp_path, "pooled", ["mlp3", "mlp4"], [0])
    pool_parent = main.run(study_params(study, shared_tiny_mnist.root, workers="2"))
    output = capfd.readouterr()
    # Each job's lines come prefixed by its run's name.
    assert "(train-mlp3-seed0) epoch   1/3" in output.err
    assert "(train-mlp4-seed0) epoch   1/3" in output.err

    # One after another in this process finds every stage done: the cache keys are the same.
    assert stages_table(main.run(study_params(study, shared_tiny_mnist.root,
                                              workers="1"))).reused.all()
    # Trained again (force draws a new sample run too, so the keys now differ by its id).
    one_parent = main.run(study_params(study, shared_tiny_mnist.root, workers="1", force=True))

    in_pool, one = train_runs(experiment, pool_parent), train_runs(experiment, one_parent)
    assert sorted(in_pool) == sorted(one) == ["train-mlp3-seed0", "train-mlp4-seed0"]
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
    for parent in (pool_parent, one_parent):
        children = [r for r in runs_in(experiment)
                    if r.data.tags.get("mlflow.parentRunId") == parent]
        assert sorted(r.info.run_name.split("-")[0] if r.info.run_name.startswith("compare")
                      else r.info.run_name for r in children) == [
            "compare", "evaluate-mlp3-seed0", "evaluate-mlp4-seed0", "sample_data-first12",
            "train-mlp3-seed0", "train-mlp4-seed0"]
    assert {r.info.status for r in runs_in(experiment)} == {"FINISHED"}


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
    assert executors.local_workers("auto", 1) == 64
    assert key(fit, workers="auto") == alone
    assert key(fit, workers="auto", threads=2) != alone
    # A Ray task with cpus_per_trial=1 gets OMP_NUM_THREADS=1 (ray_cluster.worker_env) and
    # reports the numerics the key holds (ray_tasks.machine_numerics).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train_keys.train_key(fit, sample_run.run_id,
                                ray_tasks.machine_numerics("cpu")) == alone


def test_adding_a_seed_reuses_the_other_trainings(experiment, shared_tiny_mnist, tmp_path,
                                                  monkeypatch):
    first = main.run(study_params(write_study(tmp_path, "one", ["mlp3"], [0]),
                                  shared_tiny_mnist.root, workers="2"))
    two = write_study(tmp_path, "two", ["mlp3"], [0, 1])
    more = main.run(study_params(two, shared_tiny_mnist.root, workers="2"))
    before, after = train_runs(experiment, first), stages_table(more).set_index("label")
    assert after.loc["train-mlp3-seed0", "reused"]
    assert after.loc["train-mlp3-seed0", "run_id"] == before["train-mlp3-seed0"].info.run_id
    assert not after.loc["train-mlp3-seed1", "reused"]

    # A study with nothing left to run starts no worker process at all.
    def no_pool(*args, **kwargs):
        raise AssertionError("a fully cached study started the pool")

    monkeypatch.setattr(executors, "ProcessPoolExecutor", no_pool)
    assert stages_table(main.run(study_params(two, shared_tiny_mnist.root,
                                              workers="2"))).reused.all()


def test_main_reuses_a_standalone_train_run_with_the_same_numerics(
        experiment, shared_tiny_mnist, tmp_path):
    """`python -m pipeline train` with OMP_NUM_THREADS=1 (the tests' setting) has the key of
    the same training in main with threads=1."""
    study = write_study(tmp_path, "standalone", ["mlp3"], [0])
    settings = {"epochs": 3, "batch_size": 16, "device": "cpu"}
    standalone = train.run(stage_params("train", {
        "config": "mlp3", "seed": 0, "data_dir": str(shared_tiny_mnist.root),
        "samples_per_class": 12, **settings}))
    parent = main.run(study_params(study, shared_tiny_mnist.root, workers="2"))
    table = stages_table(parent).set_index("label")
    assert table.loc["train-mlp3-seed0", "reused"]
    assert table.loc["train-mlp3-seed0", "run_id"] == standalone


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


def _wait_for_checkpoints(experiment, stage: Stage, names: set[str]) -> dict[str, object]:
    """The RUNNING train runs `names`, once each has its first checkpoint on disk."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and stage.process.poll() is None:
        runs = {r.info.run_name: r for r in runs_in(experiment, "train")
                if r.info.status == "RUNNING"}
        if set(runs) >= names and all(
                (checkpoint_store.local_dir(runs[n].info.run_id)
                 / checkpoint_store.FILE_NAME).is_file() for n in names):
            return runs
        time.sleep(0.2)
    pytest.fail("the trainings never checkpointed:\n" + "\n".join(stage.lines[-30:]))


def test_sigterm_on_main_ends_every_pooled_training_killed_and_resumable(
        tracking_store, shared_tiny_mnist, tmp_path):
    experiment, stage = _pooled_main(tracking_store, shared_tiny_mnist, tmp_path, "pool-stop")
    names = {"train-mlp4-seed0", "train-mlp4-seed1"}
    try:
        _wait_for_checkpoints(experiment, stage, names)
        family = psutil.Process(stage.process.pid).children(recursive=True)
        code, _ = stage.signal(signal.SIGTERM, timeout=90)
    finally:
        stage.stop()
    assert code == 143, "\n".join(stage.lines[-30:])
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


def test_a_killed_worker_fails_its_run_and_the_study_names_it(
        tracking_store, shared_tiny_mnist, tmp_path):
    experiment, stage = _pooled_main(tracking_store, shared_tiny_mnist, tmp_path, "pool-oom")
    try:
        runs = _wait_for_checkpoints(experiment, stage, {"train-mlp4-seed0",
                                                         "train-mlp4-seed1"})
        victim = runs["train-mlp4-seed0"]
        os.kill(int(victim.data.tags[WORKER_TAG].split()[-1]), signal.SIGKILL)
        code = stage.process.wait(timeout=120)
        stage._reader.join(timeout=5)
    finally:
        stage.stop()
    assert code == 2, "\n".join(stage.lines[-30:])
    [error] = [line for line in stage.lines if line.startswith("error: ")]
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

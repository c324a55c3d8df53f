"""Checkpoints and resume through the train stage: a run killed mid-training (a real process,
SIGTERM or SIGKILL) and resumed ends with exactly the metrics of an uninterrupted run."""

from __future__ import annotations

import signal
import sys
import tempfile

import mlflow
import pandas as pd
import pytest
from conftest import (
    SampleRun,
    create_experiment,
    runs_in,
    subprocess_env,
    use_new_experiment,
)
from mlflow import MlflowClient
from test_interrupts import Stage

from pipeline.cli import main as cli_main
from pipeline.core.training import METRIC_NAMES
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.runs import checkpoint_store
from pipeline.stages import main, train

# Batches of two (BatchNorm needs two) make an epoch on the tiny sample long enough to be
# interrupted mid-training.
EPOCHS = 12
SETTINGS = {"config": "mlp4", "epochs": EPOCHS, "batch_size": 2, "device": "cpu",
            "log_model": False}
SUMMARY = ("final_test_accuracy", "best_test_accuracy", "best_epoch")
VALUES = [m for m in METRIC_NAMES if m != "epoch_time_s"]  # time is not reproducible


def one_thread_env(store) -> dict:
    # The tests run torch with one thread (conftest); so must the processes they compare with.
    return {**subprocess_env(store), "OMP_NUM_THREADS": "1"}


def train_args(sample: SampleRun, experiment, **overrides) -> list[str]:
    values = {**SETTINGS, "data_run_id": sample.run_id, **overrides}
    args = [sys.executable, "-m", "pipeline", "train", "--experiment", experiment.name]
    for key, value in values.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def points(run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient()
    return {m: sorted((p.step, p.value) for p in client.get_metric_history(run_id, m))
            for m in METRIC_NAMES}


def assert_same_training(run_id: str, reference_id: str) -> None:
    got, want = points(run_id), points(reference_id)
    for metric in METRIC_NAMES:
        assert [s for s, _ in got[metric]] == list(range(1, EPOCHS + 1)), metric
    for metric in VALUES:
        assert got[metric] == want[metric], f"{metric} differs from the uninterrupted run"
    metrics, reference = (mlflow.get_run(i).data.metrics for i in (run_id, reference_id))
    assert {k: metrics[k] for k in SUMMARY} == {k: reference[k] for k in SUMMARY}


@pytest.fixture(scope="module")
def reference(tracking_store, sample_run: SampleRun) -> str:
    """The same training, never interrupted."""
    use_new_experiment(tracking_store, "resume-reference")
    return train.run(stage_params("train", {**SETTINGS, "data_run_id": sample_run.run_id}))


@pytest.fixture
def killed(tracking_store, sample_run, request):
    """start(signal, at_epoch) -> the run id of a train process stopped by that signal."""
    stages: list[Stage] = []
    experiment = create_experiment(tracking_store, request.node.name)

    def start(signum: int, at_epoch: int = 3, **overrides) -> tuple[str, Stage, int]:
        stage = Stage(train_args(sample_run, experiment, **overrides), one_thread_env(tracking_store))
        stages.append(stage)
        stage.wait_for(f"epoch {at_epoch:>3}/")
        code, _ = stage.signal(signum)
        [run] = runs_in(experiment, "train")
        return run.info.run_id, stage, code

    mlflow.set_experiment(experiment.name)
    yield start
    for stage in stages:
        stage.stop()


def resume(run_id: str, sample: SampleRun, **overrides) -> str:
    return train.run(stage_params("train", {**SETTINGS, "data_run_id": sample.run_id,
                                            "resume_run_id": run_id, **overrides}))


@pytest.mark.integration
def test_a_run_killed_with_sigterm_resumes_to_the_uninterrupted_result(
    killed, sample_run, reference, capsys, tmp_path, monkeypatch
):
    run_id, stage, code = killed(signal.SIGTERM)
    assert code == 143
    before = mlflow.get_run(run_id)
    assert before.info.status == "KILLED"
    assert before.data.tags["pipeline.interrupted"].startswith("SIGTERM at ")
    assert "pipeline.error" not in before.data.tags
    # Every epoch the process finished (and printed) was logged before it stopped.
    done = len(MlflowClient().get_metric_history(run_id, "test_accuracy"))
    assert done == sum(line.startswith("epoch ") for line in stage.lines)
    assert 3 <= done < EPOCHS
    last = stage.lines[-1]
    assert last.startswith(f"interrupted by SIGTERM: train run {run_id} ended KILLED; ")
    assert f"--resume_run_id {run_id}" in last
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id, "checkpoints")}
    assert artifacts == {"checkpoints/checkpoint.pt"}, "the checkpoint was not uploaded"

    # The upload finished before the process exited, so no local copy was kept: this machine
    # is in the same position as one that never ran the training.
    assert not checkpoint_store.local_dir(run_id).exists()

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert resume(run_id, sample_run) == run_id
    monkeypatch.undo()
    assert f"(checkpoints/checkpoint.pt of run {run_id})" in capsys.readouterr().out
    # The downloaded checkpoint and sample went with the resume: nothing piles up in /tmp.
    assert list(scratch.iterdir()) == []
    after = mlflow.get_run(run_id)
    assert after.info.status == "FINISHED"
    assert "pipeline.interrupted" not in after.data.tags
    assert_same_training(run_id, reference)
    history = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                              artifact_path="history.csv"))
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))


@pytest.mark.integration
def test_a_run_killed_with_sigkill_stays_running_and_resumes_explicitly(
    killed, sample_run, reference
):
    run_id, _, code = killed(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert mlflow.get_run(run_id).info.status == "RUNNING"
    resume(run_id, sample_run)
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    assert_same_training(run_id, reference)


def test_a_checkpoint_that_was_not_uploaded_is_resumed_from_the_local_copy(
    tracking_store, sample_run, tmp_path, capsys
):
    """The artifact store refuses every upload (its folder cannot be made: a file sits where
    it should be): the checkpoint upload fails, then the run fails on its artifacts; the local
    checkpoint remains. Once the store takes uploads again, the resume goes on from it."""
    blocked = tmp_path / "artifact-store"
    blocked.write_text("a file where the artifact store's folder should be")
    experiment_id = mlflow.create_experiment("refused-uploads",
                                             artifact_location=str(blocked / "artifacts"))
    mlflow.set_experiment(experiment_id=experiment_id)
    params = stage_params("train", {**SETTINGS, "epochs": 3, "batch_size": 16,
                                    "data_run_id": sample_run.run_id})
    with pytest.raises(NotADirectoryError, match=str(blocked)):
        train.run(params)
    [run] = mlflow.search_runs([experiment_id], output_format="list")
    assert run.info.status == "FAILED"
    assert "NotADirectoryError" in run.data.tags["pipeline.error"]
    local = checkpoint_store.local_dir(run.info.run_id) / checkpoint_store.FILE_NAME
    assert local.is_file()
    refused = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("checkpoint of epoch 3 not uploaded: ")]
    assert len(refused) == 1 and str(blocked) in refused[0] and f"kept at {local}" in refused[0]

    blocked.unlink()  # the store takes uploads again
    resume(run.info.run_id, sample_run, epochs=3, batch_size=16)
    assert f"({local})" in capsys.readouterr().out
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    assert not local.exists()


@pytest.mark.integration
def test_main_stopped_by_a_signal_resumes_its_training_unless_forced(
        tracking_store, sample_run, tmp_path, reference, capsys):
    """Real `main` processes (workers=1: the training in main's own process; the pool's stop
    is test_local_pool's) stopped mid-training: one with SIGINT, then `main force=true` with
    SIGTERM, which must start over rather than go on with the KILLED run. Then a plain main
    resumes the newest KILLED run from its checkpoint to the uninterrupted result."""
    experiment = create_experiment(tracking_store, "main-resume-or-force")
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: resumable\nconfigs: [mlp4]\nseeds: [0]\n"
        "sample: {samples_per_class: 12, download: false}\n"
        f"train: {{epochs: {EPOCHS}, batch_size: 2, device: cpu}}\n"
    )
    data_dir = str(sample_run.data.root)
    command = [sys.executable, "-m", "pipeline", "main", "--experiment", experiment.name,
               "--study", str(study), "--data_dir", data_dir]

    def main_stopped_at_epoch_3(signum: int, *extra: str) -> Stage:
        stage = Stage([*command, "--workers", "1", *extra], one_thread_env(tracking_store))
        try:
            stage.wait_for("epoch   3/")
            assert stage.signal(signum)[0] == 128 + signum, "\n".join(stage.lines[-30:])
        finally:
            stage.stop()
        return stage

    mlflow.set_experiment(experiment.name)
    stopped = main_stopped_at_epoch_3(signal.SIGINT)
    statuses = {r.data.tags["pipeline.stage"]: r.info.status for r in runs_in(experiment)}
    assert statuses == {"main": "KILLED", "sample_data": "FINISHED", "train": "KILLED"}
    assert stopped.lines[-1].startswith("interrupted by SIGINT: train run ")
    assert "run the same command again" in stopped.lines[-1]
    [first] = [r.info.run_id for r in runs_in(experiment, "train")]
    first_before = snapshot(first)

    forced_stage = main_stopped_at_epoch_3(signal.SIGTERM, "--force", "true")
    forced = forced_stage.lines[-1].split("train run ")[1].split()[0]
    assert forced != first, "force=true went on with the KILLED run"
    assert mlflow.get_run(forced).info.status == "KILLED"
    assert snapshot(first) == first_before

    # Default workers (a pool): the resumed training runs in a worker process.
    parent = main.run(stage_params("main", {"study": str(study), "data_dir": data_dir}))
    assert f"resuming KILLED run {forced} from its last checkpoint" in capsys.readouterr().out
    stages = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent,
                                                             artifact_path="stages.csv"))
    row = stages.set_index("stage").loc["train"]
    assert row.run_id == forced and row.resumed and not row.reused
    assert mlflow.get_run(parent).data.tags["pipeline.resumed_stages"] == "train-mlp4-seed0"
    assert mlflow.get_run(forced).info.status == "FINISHED"
    assert_same_training(forced, reference)
    assert snapshot(first) == first_before
    assert {r.info.run_id for r in runs_in(experiment, "train")} == {first, forced}


def test_checkpoint_every_0_writes_no_checkpoint(experiment, sample_run):
    run_id = train.run(stage_params("train", {**SETTINGS, "epochs": 2, "batch_size": 16,
                                              "data_run_id": sample_run.run_id,
                                              "checkpoint_every": 0}))
    assert MlflowClient().list_artifacts(run_id, "checkpoints") == []


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, and the run to resume left exactly as it was
# ---------------------------------------------------------------------------------------------


def snapshot(run_id: str):
    run = mlflow.get_run(run_id)
    return (run.info.status, run.info.end_time, dict(run.data.tags), points(run_id))


def cli_resume(capsys, run_id: str, sample: SampleRun, experiment, **overrides) -> str:
    args = train_args(sample, experiment, resume_run_id=run_id, **overrides)[3:]
    assert cli_main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    return errors[0]


@pytest.fixture(scope="module")
def interrupted_run(tracking_store, sample_run) -> str:
    """A KILLED run with a checkpoint after 2 epochs, made in process: its checkpoint is what
    the bad-input tests tamper with."""
    use_new_experiment(tracking_store, "resume-bad-input")
    client = MlflowClient()
    run_id = train.run(stage_params("train", {**SETTINGS, "epochs": 2, "batch_size": 16,
                                              "data_run_id": sample_run.run_id}))
    client.set_terminated(run_id, "KILLED")
    return run_id


def test_resuming_a_finished_run(capsys, experiment, sample_run, reference):
    before = snapshot(reference)
    error = cli_resume(capsys, reference, sample_run, experiment)
    assert f"run {reference} already FINISHED; nothing to resume" in error
    assert snapshot(reference) == before


def test_resuming_a_run_of_another_stage(capsys, experiment, sample_run):
    error = cli_resume(capsys, sample_run.run_id, sample_run, experiment)
    assert "is a sample_data run; only a train run can be resumed" in error


def test_resuming_a_run_without_a_checkpoint(capsys, experiment, sample_run):
    run_id = train.run(stage_params("train", {**SETTINGS, "epochs": 1, "batch_size": 16,
                                              "data_run_id": sample_run.run_id,
                                              "checkpoint_every": 0}))
    MlflowClient().set_terminated(run_id, "KILLED")
    before = snapshot(run_id)
    error = cli_resume(capsys, run_id, sample_run, experiment, epochs=1, batch_size=16)
    assert f"run {run_id} has no checkpoint" in error
    assert snapshot(run_id) == before


def test_resuming_with_other_hyperparameters_names_them(capsys, experiment, sample_run,
                                                        interrupted_run):
    before = snapshot(interrupted_run)
    error = cli_resume(capsys, interrupted_run, sample_run, experiment, epochs=2, batch_size=16,
                       lr=0.02)
    assert "checkpoint was made with other parameters (checkpoint vs given): lr 0.01 vs 0.02" \
        in error
    assert snapshot(interrupted_run) == before


def test_resuming_from_a_corrupt_checkpoint(capsys, experiment, sample_run, interrupted_run,
                                            tmp_path):
    local = checkpoint_store.local_dir(interrupted_run) / checkpoint_store.FILE_NAME
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(b"not a checkpoint at all")
    try:
        before = snapshot(interrupted_run)
        error = cli_resume(capsys, interrupted_run, sample_run, experiment, epochs=2,
                           batch_size=16)
        assert "is corrupt or not a training checkpoint" in error
        assert snapshot(interrupted_run) == before
    finally:
        checkpoint_store.shutil.rmtree(local.parent)


def test_resuming_from_a_corrupt_uploaded_checkpoint_names_the_artifact_and_leaves_no_copy(
    capsys, experiment, sample_run, tmp_path, monkeypatch
):
    run_id = train.run(stage_params("train", {**SETTINGS, "epochs": 1, "batch_size": 16,
                                              "data_run_id": sample_run.run_id}))
    MlflowClient().set_terminated(run_id, "KILLED")
    garbage = tmp_path / "upload" / checkpoint_store.FILE_NAME
    garbage.parent.mkdir()
    garbage.write_bytes(b"half an upload")
    MlflowClient().log_artifact(run_id, str(garbage), checkpoint_store.ARTIFACT_DIR)
    assert not checkpoint_store.local_dir(run_id).exists()
    before = snapshot(run_id)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    error = cli_resume(capsys, run_id, sample_run, experiment, epochs=1, batch_size=16)
    # The downloaded copy is gone, so the message names what the user can find: the artifact.
    assert (f"run {run_id}'s uploaded checkpoint (checkpoints/checkpoint.pt) is corrupt or not "
            f"a training checkpoint") in error
    assert "leave resume_run_id empty" in error
    assert str(scratch) not in error
    assert list(scratch.iterdir()) == []
    assert snapshot(run_id) == before


def test_resuming_a_run_that_does_not_exist(capsys, experiment, sample_run):
    error = cli_resume(capsys, "0" * 32, sample_run, experiment)
    assert "does not exist" in error


def test_resuming_with_other_torch_threads_is_refused(capsys, experiment, sample_run,
                                                      interrupted_run, monkeypatch):
    """Two threads sum in another order than one: the rest of the run would not match its
    first epochs bit for bit, and its params (torch_threads 1) would no longer say how it was
    trained. Refused with one line naming both; the run is left as it was."""
    before = snapshot(interrupted_run)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    error = cli_resume(capsys, interrupted_run, sample_run, experiment, epochs=2, batch_size=16)
    assert (f"run {interrupted_run} was trained with other numerics than this machine's "
            f"(run vs here): torch_threads 1 vs 2") in error
    assert "OMP_NUM_THREADS" in error and "leave resume_run_id empty" in error
    assert snapshot(interrupted_run) == before


def test_main_finds_a_run_to_resume_only_under_the_same_numerics(sample_run, interrupted_run,
                                                                 monkeypatch):
    """main looks for runs to resume by cache key, which holds the numerics: on two threads
    it finds nothing to resume (and trains a new run), so it never meets the refusal above."""
    from pipeline.cache import train_keys

    run = mlflow.get_run(interrupted_run)
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    params = stage_params("train", {**SETTINGS, "epochs": 2, "batch_size": 16,
                                    "data_run_id": sample_run.run_id})
    key = train_keys.train_key(params, sample_run.run_id)
    assert run.data.tags["pipeline.cache_key"] == key
    assert main.Ledger(force=False).decide(key, resumable=True)[1].info.run_id == interrupted_run
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert main.Ledger(force=False).decide(train_keys.train_key(params, sample_run.run_id),
                                           resumable=True) == (None, None)


def test_a_ray_retry_resumes_only_where_the_numerics_match(interrupted_run, monkeypatch):
    """A Ray retry may land on another node: it goes on with the dead attempt's run only where
    train would accept the resume, else it ends that run FAILED and trains a new one."""
    from pipeline.scale import ray_tasks

    run = mlflow.get_run(interrupted_run)
    params = stage_params("train", {**SETTINGS, "epochs": 2, "batch_size": 16})
    assert ray_tasks._other_numerics(run, params) == ""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert ray_tasks._other_numerics(run, params) == "torch_threads 1 vs 2"


def test_a_resumed_interrupted_run_finishes(experiment, sample_run, interrupted_run):
    # Its checkpoint covers both epochs: resuming only logs the summary and finishes.
    resume(interrupted_run, sample_run, epochs=2, batch_size=16)
    assert mlflow.get_run(interrupted_run).info.status == "FINISHED"
    with pytest.raises(PipelineError, match="already FINISHED"):
        resume(interrupted_run, sample_run, epochs=2, batch_size=16)

"""The tune stage: its search space file, the validation split, and a tiny sweep on local Ray."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from conftest import download, runs_in

from pipeline.core.config import load_model_config
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.core.search_space import (
    Choice, Range, load_search_space, model_config, point, train_overrides,
)
from pipeline.core.validation_split import split_indices

# Real processes (Ray, a process pool) started, signalled and killed: make test, not test-fast.
pytestmark = pytest.mark.integration

GOOD_SPACE = {
    "name": "tiny_sweep",
    "trials": 2,
    "epochs": 2,
    "val_size": 0.25,
    # TPE's first points are drawn from this seed alone: with seed 3 the second trial (lr
    # 0.0009) is behind the first (lr 0.13) after an epoch, so ASHA stops it.
    "seed": 3,
    "normalize": True,
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "space": {
        "layers": {"low": 1, "high": 3},
        "width": {"choices": [8, 32]},
        "batch_norm": {"choices": [False, True]},
        "lr": {"low": 1e-4, "high": 0.3, "log": True},
        "momentum": 0.9,
        "batch_size": {"choices": [16, 32]},
    },
}


def write_space(tmp_path, content: dict, name: str = "space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return path


def with_space(**changes) -> dict:
    content = yaml.safe_load(yaml.safe_dump(GOOD_SPACE))
    space = changes.pop("space", {})
    content.update(changes)
    content["space"].update(space)
    return content


# --------------------------------------------------------------------------------------------
# The search space file (no Ray, no MLflow)
# --------------------------------------------------------------------------------------------


def test_the_shipped_sweep_is_valid():
    space = load_search_space("mlp_sweep")
    assert space.parameters["layers"] == Range(1, 6)
    assert space.parameters["lr"].log
    assert isinstance(space.parameters["batch_norm"], Choice)
    assert space.trials > 0 and space.epochs > 0 and 0 < space.val_size < 1


def test_command_line_values_override_the_file_and_empty_keeps_it(tmp_path):
    path = write_space(tmp_path, GOOD_SPACE)
    space = load_search_space(str(path), trials="7", epochs="", seed="3", val_size="0.5")
    assert (space.trials, space.epochs, space.seed, space.val_size) == (7, 2, 3, 0.5)
    # The number of trials is not part of what makes a trial: a larger sweep reuses trials.
    assert space.digest == load_search_space(str(path), trials="9", seed="3",
                                             val_size="0.5").digest
    assert space.digest != load_search_space(str(path), trials="7", epochs="3", seed="3",
                                             val_size="0.5").digest


@pytest.mark.parametrize("content, fragments", [
    (with_space(widths=[1]), ["unknown key(s) widths"]),
    (with_space(space={"depth": {"low": 1, "high": 2}}), ["space: unknown key(s) depth"]),
    (with_space(space={"layers": {"low": 4, "high": 2}}), ["space.layers", "low 4 > high 2"]),
    (with_space(space={"width": {"choices": []}}), ["space.width.choices", "non-empty list"]),
    (with_space(trials=0), ["trials must be a positive whole number, got 0"]),
    (with_space(trials=-3), ["trials", "-3"]),
    (with_space(space={"lr": {"low": 0, "high": 0.1, "log": True}}), ["space.lr.low", "> 0"]),
    (with_space(space={"momentum": {"low": 0.5, "high": 1.5}}), ["space.momentum.high"]),
    (with_space(space={"width": {"choices": [64], "low": 1}}), ["space.width"]),
    (with_space(space={"layers": {"low": 1, "hi": 3}}), ["space.layers", "unknown key(s) hi"]),
    (with_space(val_size=1.5), ["val_size", "(0, 1)"]),
])
def test_bad_space_files_are_one_line_naming_the_key(tmp_path, content, fragments):
    path = write_space(tmp_path, content)
    with pytest.raises(PipelineError) as caught:
        load_search_space(str(path))
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_bad_command_line_trial_count_is_refused(tmp_path):
    path = write_space(tmp_path, GOOD_SPACE)
    for value in ("0", "-1", "many"):
        with pytest.raises(PipelineError, match="trials must be a positive whole number"):
            load_search_space(str(path), trials=value)


def test_a_point_becomes_a_config_that_train_accepts(tmp_path):
    space = load_search_space(str(write_space(tmp_path, GOOD_SPACE)))
    values = point(space, {"layers": 2, "width": 32, "batch_norm": True, "lr": 0.01,
                           "batch_size": 16})
    assert values["momentum"] == 0.9  # the fixed value
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(model_config(space, values)))
    config = load_model_config(str(path))
    assert config.model == {"type": "mlp", "hidden": [{"units": 32, "batch_norm": True}] * 2}
    assert train_overrides(values) == {"lr": 0.01, "momentum": 0.9, "batch_size": 16}


def test_the_validation_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(10), 20)
    fit, val = split_indices(labels, 0.25, seed=0)
    assert len(val) == 50 and len(fit) == 150
    assert not set(fit) & set(val)
    assert np.bincount(labels[val], minlength=10).tolist() == [5] * 10
    again = split_indices(labels, 0.25, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((fit, val), again))
    assert not np.array_equal(val, split_indices(labels, 0.25, seed=1)[1])


def test_tune_refuses_bad_input_before_ray_or_any_trial(experiment, tmp_path, sample_run):
    import ray

    from pipeline.stages import tune

    path = write_space(tmp_path, with_space(space={"layers": {"low": 5, "high": 2}}))
    params = stage_params("tune", {"space": str(path), "data_run_id": sample_run.run_id})
    with pytest.raises(PipelineError, match="low 5 > high 2"):
        tune.run(params)
    assert not ray.is_initialized()
    runs = runs_in(experiment)
    assert [r.data.tags.get("pipeline.stage") for r in runs] == ["tune"]
    assert runs[0].info.status == "FAILED"
    with pytest.raises(PipelineError, match="cpus_per_trial"):
        tune.run({**stage_params("tune", {"space": str(write_space(tmp_path, GOOD_SPACE)),
                                          "data_run_id": sample_run.run_id}),
                  "cpus_per_trial": 0})
    assert not ray.is_initialized()


def test_cli_exits_2_with_one_line(experiment, tmp_path, capsys):
    from pipeline.cli import main

    path = write_space(tmp_path, with_space(space={"width": {"choices": []}}))
    assert main(["tune", "--space", str(path), "--experiment", experiment.name]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert "space.width.choices" in errors[0]


# --------------------------------------------------------------------------------------------
# A tiny sweep on a local Ray
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # address="local": a Ray of its own, never one found running on this machine (another
    # module's on the other xdist worker, or a user's), which would refuse num_cpus.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def trial_runs(experiment) -> list:
    return runs_in(experiment, "tune_trial")


def test_tiny_sweep_then_reruns_reuse_trials(local_ray, experiment, tmp_path, sample_run,
                                             monkeypatch):
    from pipeline.stages import tune

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    name = f"tune-test-{uuid.uuid4().hex[:8]}"
    path = write_space(tmp_path, GOOD_SPACE)
    # Two CPUs per trial on a two-CPU Ray: one trial at a time, so ASHA's decisions are the
    # same on every run (and a trial can be compared with those before it).
    params = stage_params("tune", {"space": str(path), "data_run_id": sample_run.run_id,
                                   "registered_model_name": name, "cpus_per_trial": 2})
    run_id = tune.run(params)

    parent = mlflow.get_run(run_id)
    assert parent.info.status == "FINISHED"
    trials = trial_runs(experiment)
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert trial.data.tags["mlflow.parentRunId"] == run_id
        epochs_run = int(trial.data.tags["pipeline.epochs_run"])
        history = mlflow.MlflowClient().get_metric_history(trial.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, epochs_run + 1))
        for metric in ("train_loss", "train_accuracy", "val_accuracy", "epoch_time_s"):
            assert metric in trial.data.metrics
        for param in ("layers", "width", "batch_norm", "lr", "momentum", "batch_size"):
            assert param in trial.data.params
        # Early stopping: exactly the trials that ran fewer epochs say so, and why.
        stopped = trial.data.tags.get("pipeline.early_stopped")
        assert (stopped is not None) == (epochs_run < 2)
        if stopped:
            assert f"after epoch {epochs_run} of 2" in stopped and "ASHA" in stopped
    assert any("pipeline.early_stopped" in t.data.tags for t in trials), \
        "the seeded sweep has a trial ASHA stops"

    # The validation split is an input of the tune run; the test split is not (that no trial
    # reads it is test_no_trial_reads_a_test_image).
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
                for i in parent.inputs.dataset_inputs}
    assert sorted(contexts.values()) == ["training", "validation"]

    table = (download(run_id, "trials.csv")).read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("trial,config,val_accuracy")
    accuracies = [float(line.split(",")[2]) for line in table[1:]]
    assert accuracies == sorted(accuracies, reverse=True)
    for artifact in ("trials.md", "trials.html", "optimization_history.png",
                     "param_importances.png", "best_config.yaml", "conclusion.md"):
        assert download(run_id, artifact).stat().st_size > 0
    assert "won the tiny_sweep sweep" in parent.data.tags["mlflow.note.content"]

    # The winner, retrained by the train stage from the config file, nested and registered.
    train = [r for r in runs_in(experiment, "train")]
    assert len(train) == 1 and train[0].data.tags["mlflow.parentRunId"] == run_id
    best_config = download(run_id, "best_config.yaml")
    assert load_model_config(str(best_config)).model["type"] == "mlp"
    assert parent.data.metrics["best_test_accuracy"] == \
        train[0].data.metrics["final_test_accuracy"]
    champion = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    assert champion.run_id == train[0].info.run_id

    # The same sweep again: every trial and the retraining reused, no new trial run.
    again = tune.run(params)
    assert len(trial_runs(experiment)) == 2
    assert len(runs_in(experiment, "train")) == 1
    rerun = mlflow.get_run(again)
    assert rerun.data.metrics["trials_reused"] == 2 and rerun.data.metrics["trials_run"] == 0

    # One more trial: only it runs.
    more = tune.run({**params, "trials": "3"})
    assert len(trial_runs(experiment)) == 3
    new = [t for t in trial_runs(experiment) if t.data.tags["mlflow.parentRunId"] == more]
    assert len(new) == 1
    # Optuna is told the reused trials and proposes a point none of them had.
    points = [t.data.tags["pipeline.trial_point"] for t in trial_runs(experiment)]
    assert len(set(points)) == 3
    assert mlflow.get_run(more).data.metrics["trials_reused"] == 2


def test_no_trial_reads_a_test_image_or_leaks_the_password(
        local_ray, experiment, tmp_path, shared_tiny_mnist, monkeypatch, capfd):
    """The sample's test labels are poisoned (200: no class), so any training or scoring that
    reads a test image fails. Every trial finishes; the first reader of the test split is the
    winner's retraining, which the poison stops. Meanwhile the tracking password reaches no
    file of the Ray session or of Ray Tune's results, no command line, no output line."""
    from urllib.parse import urlparse

    import ray
    from test_ray_executor import assert_secrets_nowhere, ray_session_folder

    from pipeline.core.data import load_sample, save_sample
    from pipeline.runs import samples
    from pipeline.stages import sample_data, tune

    password = f"password-{uuid.uuid4().hex}"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    data_run = sample_data.run(stage_params("sample_data", {
        "data_dir": str(shared_tiny_mnist.root), "samples_per_class": 12, "download": False}))
    stored = (Path(urlparse(mlflow.get_run(data_run).info.artifact_uri).path)
              / samples.SAMPLE_ARTIFACT)
    sample = load_sample(stored)
    sample.test.labels[:] = 200
    save_sample(sample, stored.with_suffix(".tmp.npz"))
    stored.with_suffix(".tmp.npz").replace(stored)

    path = write_space(tmp_path, with_space(trials=1, epochs=1))
    params = stage_params("tune", {"space": str(path), "data_run_id": data_run,
                                   "registered_model_name": f"poisoned-{uuid.uuid4().hex[:8]}",
                                   "cpus_per_trial": 2})
    with pytest.raises(Exception, match="out of bounds"):
        tune.run(params)
    trials = runs_in(experiment, "tune_trial")
    assert [t.info.status for t in trials] == ["FINISHED"]
    [retrain] = runs_in(experiment, "train")
    assert retrain.info.status == "FAILED"
    assert "out of bounds" in retrain.data.tags["pipeline.error"]

    out, err = capfd.readouterr()
    assert_secrets_nowhere((password,), [ray_session_folder(ray), tmp_path / "cache"],
                           out + err, runs_in(experiment))


def test_a_trial_no_node_can_hold_is_refused_before_any_trial(
        local_ray, experiment, tmp_path, sample_run, monkeypatch):
    import threading

    from pipeline.stages import tune

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    params = stage_params("tune", {"space": str(write_space(tmp_path, GOOD_SPACE)),
                                   "data_run_id": sample_run.run_id, "cpus_per_trial": 3})
    outcome: dict = {}

    def sweep():
        try:
            tune.run(params)
        except BaseException as err:  # noqa: BLE001 - checked below
            outcome["error"] = err

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    thread.join(timeout=120)  # trials waiting for resources would wait forever
    assert not thread.is_alive(), "the sweep waits for resources the cluster does not have"
    error = outcome.get("error")
    assert isinstance(error, PipelineError) and "cpus_per_trial=3" in str(error), error
    assert "\n" not in str(error)
    assert [r.data.tags["pipeline.stage"] for r in runs_in(experiment)] == ["tune"]

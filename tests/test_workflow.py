"""evaluate, compare, the model registry and the main workflow, in-process on tiny IDX data.

Every stage runs for real (`pipeline.stages.<stage>.run(stage_params(stage, overrides))`)
against the session's temporary tracking store, on tiny MNIST files written by the tests.

The tiny data here has label noise in its test split: one test image of each digit carries the
next digit's label. A model that learns the digits therefore always misclassifies some test
images, which keeps the scores below 100% and the misclassified-digit grid non-empty. (A model
that is perfect on its test sample is covered separately: see
test_evaluate_a_model_without_mistakes.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    REPO_ROOT,
    download,
    assert_failed,
    Experiment,
    SampleRun,
    TinyMnist,
    only_run,
    runs_in,
    subprocess_env,
    train_overrides,
    use_new_experiment,
    write_idx_labels,
    write_tiny_mnist,
)
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.runs import registry, samples, tracking
from pipeline.stages import compare, evaluate, main, sample_data, train

STAGE_TAG = "pipeline.stage"
ERROR_TAG = "pipeline.error"
PARENT_TAG = "mlflow.parentRunId"
SOURCE_TAG = "pipeline.source_run_id"
TRAIN_RUNS_TAG = "pipeline.train_run_ids"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIGITS = range(10)
PER_EPOCH = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s")
TRAIN_SUMMARY = ("final_test_accuracy", "best_test_accuracy", "best_epoch", "train_time_s",
                 "num_params")
COMPARE_ARTIFACTS = {
    "accuracy.png", "loss.png", "epoch_time.png", "comparison.csv", "comparison.md",
    "comparison.html", "runs.csv", "pairwise.csv", "conclusion.md",
}
SAMPLES_PER_CLASS = 12
# Slow enough that the tiny models stay below 100% and differ from seed to seed.
TRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.0003, "device": "cpu"}
MISSING_RUN = "0123456789abcdef0123456789abcdef"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def history_of(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def artifact_paths(run_id: str) -> set[str]:
    return {a.path for a in MlflowClient().list_artifacts(run_id)}




def read_csv(run_id: str, path: str, **kwargs) -> pd.DataFrame:
    return pd.read_csv(download(run_id, path), **kwargs)


def read_text(run_id: str, path: str) -> str:
    return download(run_id, path).read_text()


def assert_png(run_id: str, path: str) -> None:
    data = download(run_id, path).read_bytes()
    assert data.startswith(PNG_MAGIC), f"{path} is not a PNG"
    assert len(data) > 2000, f"{path} is suspiciously small ({len(data)} bytes)"




def unique_model_name(label: str) -> str:
    return f"test-{label}-{uuid.uuid4().hex[:8]}"


def final_accuracy(run_id: str) -> float:
    return mlflow.get_run(run_id).data.metrics["final_test_accuracy"]


def run_compare(**overrides) -> str:
    return compare.run(stage_params("compare", overrides))


def versions_of(name: str) -> dict[str, object]:
    """Registered versions of `name`, by version number."""
    return {str(v.version): v for v in MlflowClient().search_model_versions(f"name = '{name}'")}


def champion(name: str):
    return MlflowClient().get_model_version_by_alias(name, "champion")


def children_of(experiment: Experiment, parent_id: str) -> list:
    return [r for r in runs_in(experiment) if r.data.tags.get(PARENT_TAG) == parent_id]


def by_stage(runs) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for run in runs:
        grouped.setdefault(run.data.tags.get(STAGE_TAG), []).append(run)
    return grouped


def fake_train_run(experiment_id: str, config: str, test_accuracy: list[float], *, seed: int = 0,
                   status: str = "FINISHED", missing: tuple[str, ...] = ()) -> str:
    """A run that looks like a train run to compare (tags, params, per-epoch histories) but
    logged no model; `missing` metrics are left out, `status` RUNNING leaves it running."""
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=f"train-{config}-seed{seed}",
                            tags={STAGE_TAG: "train", "pipeline.model": config})
    now = int(time.time() * 1000)
    metrics = []
    for step, accuracy in enumerate(test_accuracy, start=1):
        values = {"train_loss": 1 / step, "train_accuracy": accuracy, "test_loss": 1.1 / step,
                  "test_accuracy": accuracy, "epoch_time_s": 0.25}
        metrics += [Metric(k, v, now, step) for k, v in values.items() if k not in missing]
    summary = {"num_params": 1000, "final_test_accuracy": test_accuracy[-1],
               "best_test_accuracy": max(test_accuracy), "train_time_s": 0.25 * len(test_accuracy)}
    metrics += [Metric(k, v, now, 0) for k, v in summary.items() if k not in missing]
    params = {"config": config, "model_config": config, "seed": seed, "epochs": len(test_accuracy),
              "lr": 0.01, "batch_size": 64, "momentum": 0.9}
    client.log_batch(run.info.run_id, metrics=metrics,
                     params=[Param(k, str(v)) for k, v in params.items()])
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


# ---------------------------------------------------------------------------------------------
# Data and shared runs
# ---------------------------------------------------------------------------------------------


def write_noisy_tiny_mnist(root: Path) -> TinyMnist:
    """Tiny MNIST whose first test image of each digit d is labelled (d + 1) % 10.

    Every label still has TINY_TEST_PER_CLASS test images, so a sample of up to that many per
    class works, and at least 10 of the sample's test images cannot be classified correctly.
    """
    data = write_tiny_mnist(root)
    labels = data.test_labels.copy()
    for digit in DIGITS:
        labels[np.flatnonzero(data.test_labels == digit)[0]] = (digit + 1) % 10
    write_idx_labels(data.raw / "t10k-labels-idx1-ubyte", labels)
    return TinyMnist(root=data.root, train_images=data.train_images,
                     train_labels=data.train_labels, test_images=data.test_images,
                     test_labels=labels)


@pytest.fixture(scope="module")
def noisy_mnist(tmp_path_factory) -> TinyMnist:
    return write_noisy_tiny_mnist(tmp_path_factory.mktemp("noisy_mnist"))


@dataclass(frozen=True)
class Shared:
    """A sample and three trained models (with logged models) in an experiment of their own."""

    experiment: Experiment
    sample_id: str
    runs: dict[str, str]  # "mlp3-seed0" -> run id

    @property
    def best(self) -> str:
        return max(self.runs.values(), key=final_accuracy)


@pytest.fixture(scope="module")
def shared(tracking_store, noisy_mnist) -> Shared:
    while mlflow.active_run():
        mlflow.end_run()
    experiment = use_new_experiment(tracking_store, "workflow-shared")
    sample_id = sample_data.run(stage_params("sample_data", {
        "data_dir": str(noisy_mnist.root), "samples_per_class": SAMPLES_PER_CLASS,
        "download": False,
    }))
    runs = {}
    for config, seed in (("mlp3", 0), ("mlp3", 1), ("mlp4", 0)):
        runs[f"{config}-seed{seed}"] = train.run(stage_params("train", {
            **TRAIN, "config": config, "seed": seed, "data_run_id": sample_id,
        }))
    return Shared(experiment=experiment, sample_id=sample_id, runs=runs)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluated:
    run_id: str
    source_id: str
    shared: Shared
    left_in_temp: list[str]


@pytest.fixture(scope="module")
def evaluated(tracking_store, shared, tmp_path_factory) -> Evaluated:
    use_new_experiment(tracking_store, "workflow-evaluate")
    source = shared.runs["mlp4-seed0"]
    scratch = tmp_path_factory.mktemp("evaluate-temp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(scratch))
        run_id = evaluate.run(stage_params("evaluate", {"model_uri": f"runs:/{source}/model"}))
    return Evaluated(run_id=run_id, source_id=source, shared=shared,
                     left_in_temp=sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*")))


def test_evaluate_leaves_no_copy_of_the_model_or_sample_in_the_temporary_folder(
    evaluated: Evaluated,
):
    # MLflow downloads into a new temporary folder that it never removes: a model and a sample
    # per evaluation piled up in /tmp.
    assert evaluated.left_in_temp == []


def test_evaluate_scores_the_model_exactly_as_its_train_run_did(evaluated: Evaluated):
    run = mlflow.get_run(evaluated.run_id)
    trained = mlflow.get_run(evaluated.source_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[STAGE_TAG] == "evaluate"
    assert run.data.tags[SOURCE_TAG] == evaluated.source_id
    assert run.data.tags["pipeline.model"] == "mlp4"
    # Without a data_run_id it scores the sample the model was trained on.
    assert run.data.params["sample_run_id"] == evaluated.shared.sample_id
    assert run.data.metrics["test_accuracy"] == trained.data.metrics["final_test_accuracy"]
    assert run.data.metrics["test_loss"] == pytest.approx(
        history_of(evaluated.source_id, "test_loss")[-1][1], rel=1e-4)
    assert run.data.metrics["test_accuracy"] < 1, "the noisy test labels should cost accuracy"


def test_evaluate_logs_per_class_metrics_consistent_with_the_confusion_matrix(
    evaluated: Evaluated,
):
    metrics = mlflow.get_run(evaluated.run_id).data.metrics
    for name in ("precision", "recall", "f1"):
        assert {f"{name}_{d}" for d in DIGITS} <= set(metrics), name

    # The confusion matrix is the model's own predictions on the sample's test split.
    sample = samples.fetch_sample(evaluated.shared.sample_id)
    model = mlflow.pyfunc.load_model(f"runs:/{evaluated.source_id}/model")
    predicted = model.predict(sample.test.features().numpy())["digit"].to_numpy()
    labels = sample.test.labels.numpy()
    expected = np.zeros((10, 10), dtype=int)
    np.add.at(expected, (labels, predicted), 1)
    confusion = read_csv(evaluated.run_id, "confusion_matrix.csv", index_col=0)
    assert confusion.shape == (10, 10)
    np.testing.assert_array_equal(confusion.to_numpy(), expected)
    assert confusion.to_numpy().sum(axis=1).tolist() == [SAMPLES_PER_CLASS] * 10
    assert np.trace(expected) / expected.sum() == metrics["test_accuracy"]

    per_class = read_csv(evaluated.run_id, "per_class.csv", index_col=0)
    assert per_class.index.tolist() == list(DIGITS)
    assert per_class["support"].tolist() == [SAMPLES_PER_CLASS] * 10
    for d in DIGITS:
        recall = expected[d, d] / expected[d].sum()
        column = expected[:, d].sum()
        precision = expected[d, d] / column if column else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert metrics[f"recall_{d}"] == pytest.approx(recall)
        assert metrics[f"precision_{d}"] == pytest.approx(precision)
        assert metrics[f"f1_{d}"] == pytest.approx(f1)
        assert per_class.loc[d, "recall"] == pytest.approx(recall)
        assert per_class.loc[d, "precision"] == pytest.approx(precision)
        assert per_class.loc[d, "f1"] == pytest.approx(f1)


def test_evaluate_logs_the_confusion_matrix_and_misclassified_figures(evaluated: Evaluated):
    paths = artifact_paths(evaluated.run_id)
    assert {"confusion_matrix.png", "confusion_matrix.csv", "misclassified.png",
            "per_class.csv"} <= paths
    assert_png(evaluated.run_id, "confusion_matrix.png")
    assert_png(evaluated.run_id, "misclassified.png")


def test_evaluate_a_model_without_mistakes(experiment, sample_run: SampleRun):
    """The clean tiny data is easy: at the default lr, mlp3 gets every test digit right."""
    source = train.run(stage_params("train", train_overrides(sample_run, log_model=True)))
    assert final_accuracy(source) == 1.0, "precondition: a perfect model"
    run_id = evaluate.run(stage_params("evaluate", {"model_uri": f"runs:/{source}/model"}))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == 1.0
    assert "misclassified.png" in artifact_paths(run_id)


@pytest.mark.parametrize("uri", [
    f"runs:/{MISSING_RUN}/model",
    "runs:/{sample}/model",  # a run that exists but logged no model
    "models:/no-such-model-{unique}@champion",
    "models:/no-such-model-{unique}/1",
])
def test_evaluate_with_a_model_uri_that_does_not_exist(experiment, shared, uri):
    uri = uri.format(sample=shared.sample_id, unique=uuid.uuid4().hex[:8])
    with pytest.raises(PipelineError, match="cannot find a model"):
        evaluate.run(stage_params("evaluate", {"model_uri": uri}))
    assert_failed(only_run(experiment, "evaluate"), uri, "runs:/<train run id>/model")


def test_evaluate_without_a_model_uri(experiment):
    with pytest.raises(PipelineError, match="model_uri is required"):
        evaluate.run(stage_params("evaluate"))
    assert_failed(only_run(experiment, "evaluate"), "model_uri is required")


# ---------------------------------------------------------------------------------------------
# compare: selecting runs, artifacts, conclusion
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compared:
    run_id: str
    model_name: str
    shared: Shared


@pytest.fixture(scope="module")
def compared(tracking_store, shared) -> Compared:
    use_new_experiment(tracking_store, "workflow-compare")
    name = unique_model_name("compare")
    run_id = run_compare(run_ids=",".join(shared.runs.values()), registered_model_name=name)
    return Compared(run_id=run_id, model_name=name, shared=shared)


def test_compare_by_run_ids_logs_every_artifact(compared: Compared):
    run = mlflow.get_run(compared.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[STAGE_TAG] == "compare"
    assert COMPARE_ARTIFACTS <= artifact_paths(compared.run_id)
    for figure in ("accuracy.png", "loss.png", "epoch_time.png"):
        assert_png(compared.run_id, figure)


def test_compare_tables_name_both_configs_and_hold_their_numbers(compared: Compared):
    runs = compared.shared.runs
    table = read_csv(compared.run_id, "comparison.csv", index_col="config")
    assert set(table.index) == {"mlp3", "mlp4"}
    assert table.loc["mlp3", "runs"] == 2 and table.loc["mlp4", "runs"] == 1
    assert table.loc["mlp3", "num_params"] == 670_730
    assert table.loc["mlp4", "num_params"] == 934_410
    mlp3 = [final_accuracy(runs["mlp3-seed0"]), final_accuracy(runs["mlp3-seed1"])]
    assert table.loc["mlp3", "final_test_accuracy"] == pytest.approx(np.mean(mlp3))
    assert table.loc["mlp4", "final_test_accuracy"] == pytest.approx(
        final_accuracy(runs["mlp4-seed0"]))
    for column in ("best_test_accuracy", "best_epoch", "epochs_to_converge",
                   "median_epoch_time_s", "train_time_s"):
        assert column in table.columns

    for document in ("comparison.md", "comparison.html"):
        text = read_text(compared.run_id, document)
        assert "mlp3" in text and "mlp4" in text, document

    per_run = read_csv(compared.run_id, "runs.csv")
    assert sorted(per_run["run_id"]) == sorted(runs.values())
    for row in per_run.itertuples():
        assert row.final_test_accuracy == final_accuracy(row.run_id)
        assert row.epochs == TRAIN["epochs"]

    pairs = read_csv(compared.run_id, "pairwise.csv")
    assert len(pairs) == 1 and {pairs.a[0], pairs.b[0]} == {"mlp3", "mlp4"}
    assert {"difference", "ci_low", "ci_high", "p_value"} <= set(pairs.columns)


def test_compare_conclusion_is_the_run_description_and_follows_the_numbers(compared: Compared):
    run = mlflow.get_run(compared.run_id)
    text = read_text(compared.run_id, "conclusion.md").strip()
    assert run.data.tags["mlflow.note.content"].strip() == text
    runs = compared.shared.runs
    means = {"mlp3": np.mean([final_accuracy(runs["mlp3-seed0"]),
                              final_accuracy(runs["mlp3-seed1"])]),
             "mlp4": final_accuracy(runs["mlp4-seed0"])}
    best, other = sorted(means, key=means.get, reverse=True)
    assert means[best] > means[other], "precondition: the two configs differ in accuracy"
    # mlp4 has a single run: no winner is named and no significance claimed.
    counts = {"mlp3": "2 runs of mlp3", "mlp4": "1 run of mlp4"}
    first_line, convergence_line = text.splitlines()[:2]
    assert first_line.startswith(f"No winner between {best} and {other} on final test accuracy: "
                                 f"{means[best]:.2%} vs {means[other]:.2%} "
                                 f"({(means[best] - means[other]) * 100:+.2f} pp, "
                                 f"{counts[best]} vs {counts[other]}).")
    assert "no significance can be claimed" in first_line
    table = read_csv(compared.run_id, "comparison.csv", index_col="config")
    if (table["converged_runs"] == 0).all():
        assert convergence_line == (f"Convergence: neither {best} nor {other} converged by its "
                                    f"last epoch in any run: train longer.")
    else:
        assert convergence_line.startswith("Convergence: ")
        assert convergence_line.endswith(": a single run cannot tell which converges sooner.")


def test_compare_registers_the_most_accurate_run_as_champion(compared: Compared):
    name = compared.model_name
    versions = versions_of(name)
    assert list(versions) == ["1"]
    version = versions["1"]
    best = compared.shared.best
    assert version.run_id == best
    assert version.tags["source_run_id"] == best
    assert version.tags["config"] == mlflow.get_run(best).data.params["model_config"]
    assert float(version.tags["test_accuracy"]) == pytest.approx(final_accuracy(best), abs=1e-6)
    assert str(champion(name).version) == "1"
    tags = mlflow.get_run(compared.run_id).data.tags
    assert tags["pipeline.registered_version"] == "1"
    assert tags["pipeline.champion_version"] == "1"
    assert MlflowClient().get_registered_model(name).tags.get("pipeline.project")


def test_the_champion_loads_and_predicts_like_its_train_run(compared: Compared):
    sample = samples.fetch_sample(compared.shared.sample_id)
    x = sample.test.features().numpy()
    loaded = mlflow.pytorch.load_model(f"models:/{compared.model_name}@champion")
    original = mlflow.pytorch.load_model(f"runs:/{compared.shared.best}/model")
    with torch.no_grad():
        predictions, expected = loaded(torch.from_numpy(x)), original(torch.from_numpy(x))
    assert predictions.shape == (len(x), 10)
    np.testing.assert_allclose(predictions.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("suffix", ["@champion", "/1"])
def test_evaluate_accepts_a_registered_model_uri(experiment, compared: Compared, suffix):
    uri = f"models:/{compared.model_name}{suffix}"
    run = mlflow.get_run(evaluate.run(stage_params("evaluate", {"model_uri": uri})))
    assert run.info.status == "FINISHED"
    assert run.data.tags[SOURCE_TAG] == compared.shared.best
    assert run.data.params["sample_run_id"] == compared.shared.sample_id
    assert run.data.metrics["test_accuracy"] == final_accuracy(compared.shared.best)


def test_compare_by_experiment_name_and_filter(experiment, shared: Shared):
    everything = run_compare(experiment_name=shared.experiment.name, register=False)
    assert sorted(read_csv(everything, "runs.csv")["run_id"]) == sorted(shared.runs.values())

    only_mlp3 = run_compare(experiment_name=shared.experiment.name,
                            filter="params.model_config = 'mlp3'", register=False)
    runs = read_csv(only_mlp3, "runs.csv")
    assert sorted(runs["run_id"]) == sorted([shared.runs["mlp3-seed0"], shared.runs["mlp3-seed1"]])
    table = read_csv(only_mlp3, "comparison.csv", index_col="config")
    assert table.index.tolist() == ["mlp3"] and table.loc["mlp3", "runs"] == 2
    assert "Only mlp3 was compared" in mlflow.get_run(only_mlp3).data.tags["mlflow.note.content"]
    assert "pipeline.registered_version" not in mlflow.get_run(only_mlp3).data.tags


def test_compare_leaves_out_runs_still_running_and_says_so(experiment):
    done = fake_train_run(experiment.id, "mlp3", [0.8, 0.85, 0.86])
    running = fake_train_run(experiment.id, "mlp4", [0.9], status="RUNNING")
    run_id = run_compare(experiment_name=experiment.name, register=False)
    assert read_csv(run_id, "runs.csv")["run_id"].tolist() == [done]
    note = mlflow.get_run(run_id).data.tags["mlflow.note.content"]
    assert running in note and "RUNNING" in note


def test_compare_runs_of_different_lengths_notes_it(experiment, shared: Shared):
    short = train.run(stage_params("train", {
        **TRAIN, "config": "mlp4", "epochs": 1, "log_model": False,
        "data_run_id": shared.sample_id,
    }))
    run_id = run_compare(run_ids=f"{shared.runs['mlp3-seed0']},{short}", register=False)
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    runs = read_csv(run_id, "runs.csv").set_index("run_id")
    assert runs.loc[short, "epochs"] == 1 and runs.loc[shared.runs["mlp3-seed0"], "epochs"] == 2
    text = read_text(run_id, "conclusion.md")
    assert "different lengths (1, 2 epochs)" in text
    assert "different lengths" in mlflow.get_run(run_id).data.tags["mlflow.note.content"]


# ---------------------------------------------------------------------------------------------
# compare: bad input
# ---------------------------------------------------------------------------------------------


def assert_compare_fails(experiment: Experiment, *fragments: str, **params) -> None:
    with pytest.raises(PipelineError) as raised:
        run_compare(**params)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {str(raised.value)!r}"
    assert_failed(only_run(experiment, "compare"), *fragments)


def test_compare_an_unknown_run_id(experiment, shared: Shared):
    assert_compare_fails(experiment, MISSING_RUN, "does not exist",
                         run_ids=f"{shared.runs['mlp3-seed0']},{MISSING_RUN}", register=False)


def test_compare_a_run_of_the_wrong_stage(experiment, shared: Shared):
    assert_compare_fails(experiment, shared.sample_id, "is a sample_data run, not a train run",
                         run_ids=f"{shared.runs['mlp3-seed0']},{shared.sample_id}",
                         register=False)


def test_compare_a_train_run_still_running(experiment, shared: Shared):
    running = fake_train_run(experiment.id, "mlp4", [0.5, 0.6], status="RUNNING")
    assert mlflow.get_run(running).info.status == "RUNNING"
    assert_compare_fails(experiment, running, "RUNNING, not FINISHED",
                         run_ids=f"{shared.runs['mlp3-seed0']},{running}", register=False)


def test_compare_a_train_run_lacking_a_metric(experiment, shared: Shared):
    partial = fake_train_run(experiment.id, "mlp4", [0.5, 0.6], missing=("epoch_time_s",))
    assert_compare_fails(experiment, partial, "no epoch_time_s history",
                         run_ids=f"{shared.runs['mlp3-seed0']},{partial}", register=False)


def test_compare_a_train_run_whose_metrics_cover_different_epochs(experiment):
    ragged = fake_train_run(experiment.id, "mlp4", [0.5, 0.6])
    MlflowClient().log_metric(ragged, "test_accuracy", 0.7, step=3)
    assert_compare_fails(experiment, ragged, "different epochs", run_ids=ragged, register=False)


def test_compare_registering_a_run_without_a_model(experiment):
    no_model = fake_train_run(experiment.id, "mlp4", [0.5, 0.6])
    assert_compare_fails(experiment, no_model, "logged no model", run_ids=no_model,
                         registered_model_name=unique_model_name("nomodel"))


def test_compare_will_not_touch_a_registered_model_it_did_not_create(experiment, shared):
    name = unique_model_name("foreign")
    MlflowClient().create_registered_model(name, tags={"owner": "someone else"})
    assert_compare_fails(experiment, name, "already exists and was not created by this pipeline",
                         run_ids=",".join(shared.runs.values()), registered_model_name=name)
    assert versions_of(name) == {}
    assert MlflowClient().get_registered_model(name).aliases == {}


@pytest.mark.parametrize("params, fragments", [
    ({"experiment_name": "no-such-experiment-{unique}"}, ("no-such-experiment-", "does not exist")),
    ({"filter": "params.epochs === '2'"}, ("not a valid MLflow search filter",)),
    ({"filter": "params.epochs = '999'"}, ("no finished train runs to compare",)),
])
def test_compare_selections_that_select_nothing_usable(experiment, params, fragments):
    params = {k: v.format(unique=uuid.uuid4().hex[:8]) for k, v in params.items()}
    assert_compare_fails(experiment, *fragments, register=False, **params)


# ---------------------------------------------------------------------------------------------
# The registry: the champion alias moves only for a more accurate model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weak_run(tracking_store, shared: Shared) -> str:
    """A model that has barely trained (chance-level accuracy); the tests only register it."""
    use_new_experiment(tracking_store, "workflow-weak")
    run_id = train.run(stage_params("train", {
        **TRAIN, "config": "mlp3", "lr": 1e-7, "data_run_id": shared.sample_id,
    }))
    assert final_accuracy(run_id) < final_accuracy(shared.best) - 0.3, "precondition"
    return run_id


def test_a_less_accurate_run_is_registered_but_does_not_take_the_alias(
    experiment, shared: Shared, weak_run: str
):
    name = unique_model_name("keep")
    run_compare(run_ids=shared.best, registered_model_name=name)
    assert champion(name).run_id == shared.best

    second = run_compare(run_ids=weak_run, registered_model_name=name)
    versions = versions_of(name)
    assert sorted(versions) == ["1", "2"]
    assert versions["2"].run_id == weak_run
    assert versions["2"].tags["source_run_id"] == weak_run
    assert str(champion(name).version) == "1", "a less accurate model took the champion alias"
    assert mlflow.get_run(second).data.tags["pipeline.champion_version"] == "1"

    # Comparing the same runs again registers nothing new and leaves the alias alone.
    run_compare(run_ids=shared.best, registered_model_name=name)
    run_compare(run_ids=f"{weak_run},{shared.best}", registered_model_name=name)
    run_compare(run_ids=weak_run, registered_model_name=name)
    assert sorted(versions_of(name)) == ["1", "2"]
    assert str(champion(name).version) == "1"


def test_a_more_accurate_run_takes_the_alias(experiment, shared: Shared, weak_run: str):
    name = unique_model_name("move")
    run_compare(run_ids=weak_run, registered_model_name=name)
    assert champion(name).run_id == weak_run
    run_compare(run_ids=shared.best, registered_model_name=name)
    assert str(champion(name).version) == "2"
    assert champion(name).run_id == shared.best
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert loaded.metadata.run_id == shared.best


def test_the_champion_is_only_challenged_on_the_same_test_sample(experiment, shared: Shared,
                                                                 weak_run: str):
    """An accuracy on a smaller or other test sample is not comparable: the alias stays."""
    name = unique_model_name("sample")
    uri = mlflow.get_run(weak_run).data.tags[tracking.MODEL_URI_TAG]
    best_uri = mlflow.get_run(shared.best).data.tags[tracking.MODEL_URI_TAG]
    first = registry.register_best(name, weak_run, uri, "mlp3", 0.50, "sample-a")
    assert first.alias_moved

    other = registry.register_best(name, shared.best, best_uri, "mlp4", 0.99, "sample-b")
    assert not other.alias_moved
    assert str(champion(name).version) == first.version
    assert "another test sample" in other.note and "sample-a" in other.note
    assert versions_of(name)[other.version].tags["test_sample_digest"] == "sample-b"


def test_compare_records_the_test_sample_of_the_champion(experiment, shared: Shared):
    name = unique_model_name("digest")
    run_compare(run_ids=shared.best, registered_model_name=name)
    trained = mlflow.get_run(shared.best)
    [testing] = [i.dataset.digest for i in trained.inputs.dataset_inputs
                 if {t.key: t.value for t in i.tags}["mlflow.data.context"] == "testing"]
    assert champion(name).tags["test_sample_digest"] == testing


# ---------------------------------------------------------------------------------------------
# main: the whole study, nested runs, caching
# ---------------------------------------------------------------------------------------------


def write_study(path: Path, *, configs, seeds=(0,), registered_model_name: str,
                train_settings: dict | None = None, name: str = "tiny") -> Path:
    path.write_text(yaml.safe_dump({
        "name": name,
        "configs": list(configs),
        "seeds": list(seeds),
        "sample": {"samples_per_class": SAMPLES_PER_CLASS, "sampling": "first",
                   "download": False},
        "train": dict(train_settings or TRAIN),
        "registered_model_name": registered_model_name,
    }))
    return path


def run_main(study: Path, data: TinyMnist, **overrides) -> str:
    """main in this process, its stages one after another (workers=1): a pool's workers would
    each import torch and MLflow first; the pool is test_local_pool's subject."""
    return main.run(stage_params("main", {"study": str(study), "data_dir": str(data.root),
                                          "workers": "1", **overrides}))


def stages_table(parent_id: str) -> pd.DataFrame:
    return read_csv(parent_id, "stages.csv")


@dataclass(frozen=True)
class Study:
    experiment: Experiment
    path: Path
    data: TinyMnist
    model_name: str
    parent_id: str

    def activate(self) -> None:
        mlflow.set_experiment(self.experiment.name)

    def children(self, parent_id: str | None = None) -> dict[str, list]:
        return by_stage(children_of(self.experiment, parent_id or self.parent_id))


@pytest.fixture(scope="module")
def study(tracking_store, noisy_mnist, tmp_path_factory) -> Study:
    experiment = use_new_experiment(tracking_store, "workflow-main")
    name = unique_model_name("main")
    path = write_study(tmp_path_factory.mktemp("study") / "tiny.yaml", configs=["mlp3", "mlp4"],
                       registered_model_name=name)
    parent_id = run_main(path, noisy_mnist)
    return Study(experiment, path, noisy_mnist, name, parent_id)


@pytest.mark.integration
def test_main_nests_every_stage_under_one_parent_run(study: Study):
    parent = mlflow.get_run(study.parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[STAGE_TAG] == "main"
    assert parent.info.run_name == "main-tiny"

    children = study.children()
    assert {stage: len(runs) for stage, runs in children.items()} == {
        "sample_data": 1, "train": 2, "evaluate": 2, "compare": 1}
    assert all(run.info.status == "FINISHED" for runs in children.values() for run in runs)
    [sample] = children["sample_data"]
    trains = {run.data.params["model_config"]: run for run in children["train"]}
    assert set(trains) == {"mlp3", "mlp4"}
    train_ids = [trains["mlp3"].info.run_id, trains["mlp4"].info.run_id]
    assert parent.data.tags[TRAIN_RUNS_TAG] == ",".join(train_ids)
    for run in trains.values():
        assert run.data.params["sample_run_id"] == sample.info.run_id
        assert run.data.params["epochs"] == "2"
        assert [step for step, _ in history_of(run.info.run_id, "test_accuracy")] == [1, 2]

    scored = {run.data.tags[SOURCE_TAG]: run for run in children["evaluate"]}
    assert set(scored) == set(train_ids)
    for train_id, run in scored.items():
        assert run.data.metrics["test_accuracy"] == final_accuracy(train_id)

    [comparison] = children["compare"]
    assert sorted(read_csv(comparison.info.run_id, "runs.csv")["run_id"]) == sorted(train_ids)
    assert COMPARE_ARTIFACTS <= artifact_paths(comparison.info.run_id)

    # The parent's ledger: every stage ran, none reused.
    table = stages_table(study.parent_id)
    assert table["stage"].tolist() == ["sample_data", "train", "train", "evaluate", "evaluate",
                                       "compare"]
    assert set(table["run_id"]) == {r.info.run_id for runs in children.values() for r in runs}
    assert not table["reused"].any()
    assert parent.data.metrics["stages_run"] == 6
    assert parent.data.metrics["stages_reused"] == 0
    assert parent.data.tags["pipeline.reused_stages"] == "none"


def test_main_registers_its_most_accurate_model_as_champion(study: Study):
    trains = [run.info.run_id for run in study.children()["train"]]
    best = champion(study.model_name)
    assert best.run_id in trains
    assert final_accuracy(best.run_id) == max(final_accuracy(t) for t in trains)


def test_main_children_carry_the_params_of_their_stage(study: Study):
    children = study.children()
    for run in children["train"]:
        assert set(run.data.params) == set(stage_params("train")) | {
            "model_config", "sample_run_id", "torch_device", "torch_version", "torch_threads",
            "cpu"}
        assert run.data.params["lr"] == "0.0003"
        assert run.data.params["samples_per_class"] == str(SAMPLES_PER_CLASS)
        assert run.data.tags["pipeline.model"] == run.data.params["model_config"]
        assert run.info.run_name == f"train-{run.data.params['model_config']}-seed0"
    [sample] = children["sample_data"]
    assert sample.data.params["samples_per_class"] == str(SAMPLES_PER_CLASS)
    assert set(sample.data.params) == set(stage_params("sample_data"))
    for run in children["evaluate"]:
        assert set(run.data.params) == set(stage_params("evaluate")) | {"sample_run_id"}
        assert run.data.params["sample_run_id"] == sample.info.run_id


def test_main_evaluate_children_log_the_studys_sampling_params(study: Study):
    for run in study.children()["evaluate"]:
        assert run.data.params["samples_per_class"] == str(SAMPLES_PER_CLASS)


# After `import mlflow`, `python -m pipeline <args>` in the same process (what -m does).
IMPORTS_AFTER_MLFLOW = """
import atexit, json, runpy, sys
import mlflow
before = set(sys.modules)
atexit.register(lambda: print("{marker}", json.dumps(sorted(set(sys.modules) - before)),
                              file=sys.stderr, flush=True))
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


def run_listing_imports_beyond_mlflow(args: list[str], tracking_store) -> tuple[
        subprocess.CompletedProcess, set[str]]:
    """`python -m pipeline <args>` in a process of its own, and every module that process
    imported that `import mlflow` alone does not (MLflow itself imports a little of scipy,
    scipy.sparse): its own, not those of a process it starts (the pool's fork server, which
    a study of several trainings starts before it knows whether they are cached)."""
    marker = f"imported beyond mlflow {uuid.uuid4().hex}"
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_AFTER_MLFLOW.format(marker=marker), *args],
        cwd=REPO_ROOT, env=subprocess_env(tracking_store), capture_output=True, text=True,
        timeout=300)
    [listed] = [line for line in result.stderr.splitlines() if line.startswith(marker)]
    return result, set(json.loads(listed.removeprefix(marker)))


def test_main_second_invocation_reuses_every_stage_and_imports_nothing_heavy(
        study: Study, tracking_store):
    study.activate()
    before = {r.info.run_id for r in runs_in(study.experiment)}
    trains_before = {r.info.run_id for r in runs_in(study.experiment, "train")}

    # A process of its own, so that what it imports can be seen.
    result, imported = run_listing_imports_beyond_mlflow(
        ["main", "--study", str(study.path), "--data_dir", str(study.data.root),
         "--experiment", study.experiment.name], tracking_store)
    assert result.returncode == 0, result.stderr[-3000:]
    heavy = {name for name in imported
             if name.split(".")[0] in ("torch", "torchvision", "matplotlib", "sklearn", "scipy")}
    assert not heavy, f"a fully cached main imported {sorted(heavy)[:5]}"
    assert "pipeline.scale.executors" in imported, "precondition: main's imports are listed"
    again = result.stdout.strip().splitlines()[-1].removeprefix("main finished: run ")

    after = {r.info.run_id for r in runs_in(study.experiment)}
    assert after - before == {again}, "the second invocation started stage runs"
    assert {r.info.run_id for r in runs_in(study.experiment, "train")} == trains_before
    parent = mlflow.get_run(again)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["stages_run"] == 0
    assert parent.data.metrics["stages_reused"] == 6
    table = stages_table(again)
    assert table["reused"].all()
    assert set(table["run_id"]) <= before
    assert set(parent.data.tags[TRAIN_RUNS_TAG].split(",")) <= trains_before
    assert parent.data.tags["pipeline.reused_stages"].split(",") == table["label"].tolist()


@pytest.mark.integration
def test_main_with_other_epochs_reruns_train_evaluate_and_compare_only(study: Study):
    study.activate()
    samples_before = {r.info.run_id for r in runs_in(study.experiment, "sample_data")}
    trains_before = {r.info.run_id for r in runs_in(study.experiment, "train")}
    [first_sample] = study.children()["sample_data"]

    parent_id = run_main(study.path, study.data, epochs="1")

    table = stages_table(parent_id).set_index("stage")
    assert table.loc["sample_data", "reused"]
    assert table.loc["sample_data", "run_id"] == first_sample.info.run_id
    assert not table.loc[["train", "evaluate", "compare"], "reused"].any()
    metrics = mlflow.get_run(parent_id).data.metrics
    assert (metrics["stages_run"], metrics["stages_reused"]) == (5, 1)
    assert {r.info.run_id for r in runs_in(study.experiment, "sample_data")} == samples_before
    new_trains = study.children(parent_id)["train"]
    assert len(new_trains) == 2
    assert not {r.info.run_id for r in new_trains} & trains_before
    for run in new_trains:
        assert run.data.params["epochs"] == "1"
        assert run.data.params["sample_run_id"] == first_sample.info.run_id
        assert [step for step, _ in history_of(run.info.run_id, "test_accuracy")] == [1]


def test_main_with_another_registered_model_name_reruns_only_compare(study: Study):
    study.activate()
    other = unique_model_name("main-other")
    parent_id = run_main(study.path, study.data, registered_model_name=other)
    table = stages_table(parent_id).set_index("stage")
    assert table.drop(index="compare")["reused"].all()
    assert not table.loc["compare", "reused"]
    trains = mlflow.get_run(parent_id).data.tags[TRAIN_RUNS_TAG].split(",")
    assert champion(other).run_id in trains


def test_main_reused_compare_restores_a_deleted_alias_and_model(study: Study):
    """The registry is not in compare's cache key; a reused compare puts back what is gone."""
    study.activate()
    client = MlflowClient()
    client.delete_registered_model_alias(study.model_name, "champion")
    parent_id = run_main(study.path, study.data)
    table = stages_table(parent_id).set_index("stage")
    assert table.loc["compare", "reused"]
    best = mlflow.get_run(table.loc["compare", "run_id"]).data.tags[registry.BEST_RUN_TAG]
    assert champion(study.model_name).run_id == best

    client.delete_registered_model(study.model_name)
    run_main(study.path, study.data)
    assert champion(study.model_name).run_id == best
    assert client.get_registered_model(study.model_name).tags["pipeline.project"] == \
        "mnist-mlp-pipeline"


@pytest.mark.integration
def test_main_with_force_reruns_every_stage(study: Study):
    study.activate()
    before = {r.info.run_id for r in runs_in(study.experiment)}
    parent_id = run_main(study.path, study.data, force=True)
    table = stages_table(parent_id)
    assert not table["reused"].any()
    assert not set(table["run_id"]) & before
    metrics = mlflow.get_run(parent_id).data.metrics
    assert (metrics["stages_run"], metrics["stages_reused"]) == (6, 0)
    assert {stage: len(runs) for stage, runs in study.children(parent_id).items()} == {
        "sample_data": 1, "train": 2, "evaluate": 2, "compare": 1}


def test_compare_by_parent_run_id_of_a_main_run(experiment, study: Study):
    run_id = run_compare(parent_run_id=study.parent_id, register=False)
    recorded = mlflow.get_run(study.parent_id).data.tags[TRAIN_RUNS_TAG].split(",")
    assert sorted(read_csv(run_id, "runs.csv")["run_id"]) == sorted(recorded)
    assert set(read_csv(run_id, "comparison.csv")["config"]) == {"mlp3", "mlp4"}


def test_compare_by_parent_run_id_without_a_recorded_list(experiment, shared: Shared):
    """A parent that is not a main run: its FINISHED train children are compared."""
    client = MlflowClient()
    parent = client.create_run(experiment.id).info.run_id
    kids = [fake_train_run(experiment.id, c, [0.8, 0.9], seed=s)
            for c, s in (("mlp3", 0), ("mlp4", 0))]
    stray = fake_train_run(experiment.id, "mlp4", [0.7, 0.9], seed=1, status="FAILED")
    for kid in (*kids, stray):
        client.set_tag(kid, PARENT_TAG, parent)
    fake_train_run(experiment.id, "mlp3", [0.8, 0.9], seed=5)  # not a child
    run_id = run_compare(parent_run_id=parent, register=False)
    assert sorted(read_csv(run_id, "runs.csv")["run_id"]) == sorted(kids)
    assert stray in mlflow.get_run(run_id).data.tags["mlflow.note.content"]


def _edit(path: Path, old: str, new: str) -> None:
    source = path.read_text()
    assert old in source, f"{old!r} is no longer in {path.name}: update this test"
    path.write_text(source.replace(old, new, 1))


def test_main_after_a_code_edit_reruns_the_stages_it_can_change(study: Study, tmp_path,
                                                                package_copy):
    """The keys read package_copy: each edit there is what a developer's edit is to them.
    The module study's mlp3 alone: its stages, run before with the package itself, are reused
    until an edit changes their keys."""
    study.activate()
    study_path = write_study(tmp_path / "study.yaml", configs=["mlp3"],
                             registered_model_name=unique_model_name("code-edit"))
    stages = ["sample_data", "train", "evaluate", "compare"]

    def rerun() -> list[str]:
        # In this process: the stage computes its run's key with the patched package too.
        table = stages_table(run_main(study_path, study.data))
        assert table["stage"].tolist() == stages
        return table.loc[~table["reused"], "stage"].tolist()

    assert rerun() == ["compare"], "the unedited copy keys the stages as the package does"
    _edit(package_copy / "core" / "comparison.py",
          '"Only {best} was compared: final test accuracy "',
          '"Only {best} took part: final test accuracy "')
    assert rerun() == ["compare"], "compare's wording retrains nothing"
    training = package_copy / "core" / "training.py"
    _edit(training, '"""The training loop:', '"""The training loop, reworded:')
    assert rerun() == [], "a docstring reruns nothing"
    _edit(training, "loss = F.cross_entropy(logits.float(), yb)",
          "loss = F.cross_entropy(logits.float(), yb, label_smoothing=0.1)")
    assert rerun() == ["train", "evaluate", "compare"], "the loop's code retrains"


@pytest.mark.integration
def test_main_edited_config_reruns_only_that_configs_stages(study: Study, tmp_path):
    """The module study's mlp3 with a config file of its own: the study's sample and mlp3
    stages are reused from the start, and an edit of the file reruns only its stages."""
    study.activate()
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: deep\nmodel: {type: mlp, hidden: [{units: 64}, "
                    "{units: 64, batch_norm: true}]}\n")
    study_path = write_study(tmp_path / "study.yaml", configs=["mlp3", str(deep)],
                             registered_model_name=unique_model_name("edit"))
    first = read_csv(run_main(study_path, study.data), "stages.csv")
    assert first["label"].tolist() == [
        f"sample_data-first{SAMPLES_PER_CLASS}", "train-mlp3-seed0", "train-deep-seed0",
        "evaluate-mlp3-seed0", "evaluate-deep-seed0", "compare"]
    assert first["reused"].tolist() == [True, True, False, True, False, False]

    deep.write_text("name: deep\nmodel: {type: mlp, hidden: [{units: 32}, "
                    "{units: 32, batch_norm: true}]}\n")
    second = run_main(study_path, study.data)
    reused = read_csv(second, "stages.csv").set_index("label")["reused"].to_dict()
    assert reused == {
        f"sample_data-first{SAMPLES_PER_CLASS}": True, "train-mlp3-seed0": True,
        "evaluate-mlp3-seed0": True, "train-deep-seed0": False, "evaluate-deep-seed0": False,
        "compare": False,
    }
    [retrained] = study.children(second)["train"]
    # Linear(784, 32); Linear(32, 32) + BatchNorm(32); Linear(32, 10)
    assert retrained.data.metrics["num_params"] == (784 * 32 + 32) + (32 * 32 + 32 + 2 * 32) + (
        32 * 10 + 10)


@pytest.mark.integration
def test_main_with_two_seeds_per_config_reports_statistics(study: Study):
    """The study with a second seed: its seed-0 stages are reused, the seed-1 ones run."""
    study.activate()
    parent_id = run_main(study.path, study.data, seeds="0,1",
                         registered_model_name=unique_model_name("seeds"))
    ledger = stages_table(parent_id)
    assert ledger["stage"].value_counts().to_dict() == {
        "sample_data": 1, "train": 4, "evaluate": 4, "compare": 1}
    children = {stage: [mlflow.get_run(run_id) for run_id in rows["run_id"]]
                for stage, rows in ledger.groupby("stage")}
    pairs = {(r.data.params["model_config"], r.data.params["seed"]) for r in children["train"]}
    assert pairs == {("mlp3", "0"), ("mlp3", "1"), ("mlp4", "0"), ("mlp4", "1")}

    [comparison] = children["compare"]
    table = read_csv(comparison.info.run_id, "comparison.csv", index_col="config")
    assert table["runs"].to_dict() == {"mlp3": 2, "mlp4": 2}
    for column in ("final_test_accuracy", "best_test_accuracy", "epochs_to_converge",
                   "median_epoch_time_s"):
        assert f"{column}_std" in table.columns, column
    for config in ("mlp3", "mlp4"):
        accuracies = [r.data.metrics["final_test_accuracy"] for r in children["train"]
                      if r.data.params["model_config"] == config]
        assert table.loc[config, "final_test_accuracy"] == pytest.approx(np.mean(accuracies))
        assert table.loc[config, "final_test_accuracy_std"] == pytest.approx(
            np.std(accuracies, ddof=1))
    assert (table["final_test_accuracy_std"] > 0).any(), "precondition: the seeds differ"

    pairs = read_csv(comparison.info.run_id, "pairwise.csv")
    assert "p_value" in pairs.columns and len(pairs) == 1
    row = pairs.iloc[0]
    assert 0 <= row.p_value <= 1
    assert row.ci_low <= row.difference <= row.ci_high
    assert row.p_holm == pytest.approx(row.p_value)  # one pair: Holm changes nothing
    assert row.significant == (row.p_holm < 0.05)
    text = comparison.data.tags["mlflow.note.content"]
    assert "95% CI" in text and "Welch's t-test p =" in text
    best, other = table.sort_values("final_test_accuracy", ascending=False).index
    assert text.splitlines()[0].startswith(
        f"{best} is more accurate than {other}: " if row.significant
        else f"The data cannot tell {best} and {other} apart on final test accuracy: ")
    assert "±" in read_text(comparison.info.run_id, "comparison.md")


def test_main_with_an_empty_study(experiment, noisy_mnist, tmp_path):
    study_path = write_study(tmp_path / "empty.yaml", configs=[],
                             registered_model_name=unique_model_name("empty"))
    with pytest.raises(PipelineError, match="lists no configs"):
        run_main(study_path, noisy_mnist)
    assert_failed(only_run(experiment, "main"), "lists no configs", str(study_path))
    assert len(runs_in(experiment)) == 1, "a child run started for an empty study"


@pytest.mark.parametrize("where", ["study file", "configs parameter"])
def test_main_with_an_unknown_config_fails_before_any_child_runs(
    experiment, noisy_mnist, tmp_path, where
):
    configs = ["mlp3", "mlp99"] if where == "study file" else ["mlp3"]
    study_path = write_study(tmp_path / "unknown.yaml", configs=configs,
                             registered_model_name=unique_model_name("unknown"))
    overrides = {"configs": "mlp3,mlp99"} if where == "configs parameter" else {}
    with pytest.raises(PipelineError, match="mlp99"):
        run_main(study_path, noisy_mnist, **overrides)
    assert_failed(only_run(experiment, "main"), "'mlp99' not found")
    assert len(runs_in(experiment)) == 1, "child runs started before the config was checked"


def test_main_stops_when_a_train_child_fails(experiment, noisy_mnist, tmp_path):
    study_path = write_study(tmp_path / "diverge.yaml", configs=["mlp3", "mlp4"],
                             registered_model_name=unique_model_name("diverge"),
                             train_settings={**TRAIN, "lr": 1e10})
    with pytest.raises(PipelineError, match="nan"):  # one after another (the pool: test_local_pool)
        run_main(study_path, noisy_mnist)
    parent = only_run(experiment, "main")
    assert_failed(parent, "nan")
    children = by_stage(children_of(experiment, parent.info.run_id))
    assert set(children) == {"sample_data", "train"}
    [failed] = children["train"]
    assert_failed(failed, "nan")
    assert math.isnan(history_of(failed.info.run_id, "train_loss")[0][1])


# ---------------------------------------------------------------------------------------------
# VGG11 through the same train stage
# ---------------------------------------------------------------------------------------------


def test_vgg11_trains_through_the_train_stage(experiment, noisy_mnist, shared: Shared):
    run_id = train.run(stage_params("train", {
        "config": "vgg11", "epochs": 1, "batch_size": 16, "device": "cpu", "log_model": False,
        "data_dir": str(noisy_mnist.root), "samples_per_class": 3,
    }))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train-vgg11-seed0"
    assert run.data.params["model_config"] == "vgg11"
    assert run.data.tags["pipeline.model"] == "vgg11"
    assert run.data.metrics["num_params"] == 28_148_362
    mlp = mlflow.get_run(shared.runs["mlp3-seed0"])
    def model_metrics(metrics: dict) -> set[str]:  # system/* depend on how long a run lasted
        return {key for key in metrics if not key.startswith("system/")}

    assert model_metrics(run.data.metrics) == model_metrics(mlp.data.metrics) == (
        set(PER_EPOCH) | set(TRAIN_SUMMARY))
    for key in PER_EPOCH:
        history = history_of(run_id, key)
        assert [step for step, _ in history] == [1], key
        assert all(math.isfinite(v) for _, v in history), key
    assert {"accuracy.png", "loss.png", "history.csv"} <= artifact_paths(run_id)
    [sample] = runs_in(experiment, "sample_data")
    assert sample.data.metrics["train_examples"] == 30
    assert run.data.params["sample_run_id"] == sample.info.run_id


def test_seeds_that_are_not_numbers_are_rejected_before_any_run(experiment):
    from pipeline.core.config import load_study

    with pytest.raises(PipelineError, match="seeds must be whole numbers"):
        load_study("depth_study", seeds="0,one")


PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def test_a_stage_logged_to_a_file_prints_no_download_bars(study: Study, capfd, monkeypatch,
                                                          cli_environment):
    """`make run > log`: the log is epoch lines and tables, not one bar per artifact fetched.
    In this process: pytest's captured stderr is no terminal either, as a log file is not."""
    [sample] = study.children()["sample_data"]
    [train, *_] = study.children()["train"]
    args = ["evaluate", "--experiment", study.experiment.name,
            "--model_uri", train.data.tags[tracking.MODEL_URI_TAG],
            "--data_run_id", sample.info.run_id]
    monkeypatch.delenv(PROGRESS_BAR_ENV, raising=False)
    assert cli.main(args) == 0
    out, err = capfd.readouterr()
    assert "Downloading artifacts" not in out + err, (out + err)[-2000:]
    assert out.strip().splitlines()[-1].startswith("evaluate finished: run ")

    # The user's own setting wins, and shows that this evaluation does fetch artifacts.
    monkeypatch.setenv(PROGRESS_BAR_ENV, "true")
    assert cli.main(args) == 0
    assert "Downloading artifacts" in "".join(capfd.readouterr())

"""samples_per_class=all: both MNIST splits whole, referenced by the raw files' sha256 instead of
copied into the run, through sample_data, train and evaluate."""

from __future__ import annotations

import shutil

import mlflow
import pytest
import torch
from conftest import (
    REAL_DATA_ROOT, TINY_TEST_PER_CLASS, TINY_TRAIN_PER_CLASS, assert_failed, only_run,
    requires_real_mnist, write_tiny_mnist,
)
from mlflow import MlflowClient

from pipeline.core.data import draw_sample, per_class_indices
from pipeline.core.sampling import parse_samples_per_class
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.runs import samples
from pipeline.stages import evaluate, sample_data, train


@pytest.mark.parametrize("text, expected", [("all", None), ("ALL", None), (" 600 ", 600),
                                            (600, 600), ("1", 1)])
def test_samples_per_class_is_a_count_or_all(text, expected):
    assert parse_samples_per_class(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "1.5", "everything", ""])
def test_a_samples_per_class_that_is_neither_says_what_it_takes(text):
    with pytest.raises(PipelineError, match="positive whole number or 'all'"):
        parse_samples_per_class(text)


def test_too_many_per_class_names_the_digit_that_limits_it():
    counts = {0: 9, 1: 8, 2: 7, 3: 9, 4: 9, 5: 4, 6: 9, 7: 9, 8: 9, 9: 6}
    targets = torch.cat([torch.full((n,), digit) for digit, n in counts.items()])
    with pytest.raises(PipelineError) as info:
        per_class_indices(targets, 7)
    message = str(info.value)
    assert message.startswith("digit 5 has only 4 images"), message
    assert "use at most 4" in message and "samples_per_class=all" in message


def test_all_takes_every_image_in_file_order(tiny_mnist):
    sample = draw_sample(tiny_mnist.root, None, download=False)
    assert sample.train.class_counts() == [TINY_TRAIN_PER_CLASS] * 10
    assert sample.test.class_counts() == [TINY_TEST_PER_CLASS] * 10
    assert torch.equal(sample.test.indices, torch.arange(10 * TINY_TEST_PER_CLASS))


@pytest.fixture
def whole(experiment, tmp_path):
    data = write_tiny_mnist(tmp_path / "mnist")
    params = stage_params("sample_data", {"data_dir": str(data.root), "samples_per_class": "all",
                                          "download": False})
    return data, sample_data.run(params)


def test_sample_data_all_logs_the_raw_files_digests_not_a_copy(whole):
    data, run_id = whole
    run = mlflow.get_run(run_id)
    assert run.info.run_name == "sample_data-all"
    assert run.data.metrics["train_examples"] == 10 * TINY_TRAIN_PER_CLASS
    logged = {a.path for a in MlflowClient().list_artifacts(run_id, "sample")}
    assert logged == {samples.RAW_DIGESTS_ARTIFACT}, "no copy of MNIST in the run"
    digests = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{samples.RAW_DIGESTS_ARTIFACT}")
    assert set(digests) == {p.name for p in data.raw.iterdir()}
    assert all(len(d) == 64 for d in digests.values())


def test_train_and_evaluate_on_all_read_the_raw_files_and_log_their_digest(whole):
    data, sample_run = whole
    train_run = train.run(stage_params("train", {
        "config": "mlp3", "epochs": 1, "batch_size": 32, "device": "cpu",
        "data_run_id": sample_run, "data_dir": str(data.root)}))
    run = mlflow.get_run(train_run)
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in run.inputs.dataset_inputs}
    assert inputs["training"].name == "mnist-train-full"
    assert inputs["training"].digest != inputs["testing"].digest
    assert run.data.params["samples_per_class"] == "600", "the default, not used: data_run_id is"

    scored = evaluate.run(stage_params("evaluate", {
        "model_uri": f"runs:/{train_run}/model", "data_dir": str(data.root)}))
    result = mlflow.get_run(scored)
    assert result.data.params["sample_run_id"] == sample_run
    assert result.data.metrics["test_accuracy"] == pytest.approx(
        run.data.metrics["final_test_accuracy"], abs=1e-6)


def test_all_finds_moved_files_by_content_and_refuses_changed_ones(whole, experiment, tmp_path):
    data, sample_run = whole
    moved = tmp_path / "elsewhere"
    shutil.move(data.root, moved)
    assert len(samples.fetch_sample(sample_run, str(moved)).test.labels) == 10 * TINY_TEST_PER_CLASS

    labels = moved / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    content = bytearray(labels.read_bytes())
    content[-1] = (content[-1] + 1) % 10
    labels.write_bytes(bytes(content))
    with pytest.raises(PipelineError, match="none of .* holds the same files"):
        train.run(stage_params("train", {"config": "mlp3", "epochs": 1, "device": "cpu",
                                         "data_run_id": sample_run, "data_dir": str(moved)}))
    assert_failed(only_run(experiment, "train"), "point data_dir at that MNIST")


@requires_real_mnist
def test_real_mnist_all_is_60000_and_10000_unbalanced():
    sample = draw_sample(REAL_DATA_ROOT, None, download=False)
    assert (len(sample.train.labels), len(sample.test.labels)) == (60000, 10000)
    assert sample.test.class_counts()[5] == 892 and sample.train.class_counts()[1] == 6742


@requires_real_mnist
def test_real_mnist_too_many_per_class_names_digit_5_of_the_test_split():
    with pytest.raises(PipelineError, match="test split: digit 5 has only 892 images"):
        draw_sample(REAL_DATA_ROOT, 900, download=False)

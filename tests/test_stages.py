"""The sample_data and train stages in-process, against the temporary tracking store."""

from __future__ import annotations

import math
import platform
import tempfile
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    download,
    assert_failed,
    SHARED_SAMPLES_PER_CLASS,
    TINY_TEST_PER_CLASS,
    Experiment,
    SampleRun,
    only_run,
    runs_in,
    train_overrides,
    use_new_experiment,
)
from mlflow import MlflowClient
from scipy.special import softmax

from pipeline.cache import machine
from pipeline.core.config import load_model_config
from pipeline.core.data import draw_sample, load_sample
from pipeline.core.models import build_model
from pipeline.core.training import METRIC_NAMES, TrainSettings
from pipeline.core.training import train as train_loop
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.runs import samples
from pipeline.stages import sample_data, train

ERROR_TAG = "pipeline.error"
STAGE_TAG = "pipeline.stage"
PER_EPOCH = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s")
SUMMARY = ("final_test_accuracy", "best_test_accuracy", "best_epoch", "train_time_s", "num_params")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def history_of(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def artifact_paths(run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in MlflowClient().list_artifacts(run_id, path)}






# ---------------------------------------------------------------------------------------------
# sample_data
# ---------------------------------------------------------------------------------------------


def test_sample_data_run_is_finished_and_tagged(sample_run: SampleRun):
    run = mlflow.get_run(sample_run.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"sample_data-first{SHARED_SAMPLES_PER_CLASS}"
    assert run.data.tags[STAGE_TAG] == "sample_data"
    assert run.data.params == {
        "data_dir": str(sample_run.data.root),
        "samples_per_class": str(SHARED_SAMPLES_PER_CLASS),
        "sampling": "first",
        "seed": "0",
        "download": "false",
    }
    experiment = MlflowClient().get_experiment(sample_run.experiment.id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"


def test_sample_data_logs_class_counts(sample_run: SampleRun):
    n = SHARED_SAMPLES_PER_CLASS
    run = mlflow.get_run(sample_run.run_id)
    assert run.data.metrics["train_examples"] == 10 * n
    assert run.data.metrics["test_examples"] == 10 * n
    mlflow.set_experiment(experiment_id=sample_run.experiment.id)  # load_table searches it
    counts = mlflow.load_table("class_counts.json", run_ids=[sample_run.run_id])
    counts = counts.drop(columns=["run_id"], errors="ignore").sort_values("digit")
    assert counts["digit"].tolist() == list(range(10))
    assert counts["train"].tolist() == [n] * 10
    assert counts["test"].tolist() == [n] * 10


def test_sample_data_logs_the_sample_as_compact_uint8_that_roundtrips(sample_run: SampleRun):
    assert {"sample_digits.png", "sample"} <= artifact_paths(sample_run.run_id)
    assert download(sample_run.run_id, "sample_digits.png").read_bytes().startswith(PNG_MAGIC)
    path = download(sample_run.run_id, samples.SAMPLE_ARTIFACT)
    with np.load(path) as arrays:
        assert arrays["train_images"].dtype == np.uint8
        assert arrays["test_images"].dtype == np.uint8
        assert arrays["train_images"].shape == (10 * SHARED_SAMPLES_PER_CLASS, 28, 28)
    # Nowhere near what float32 pixels of both splits would take.
    float32_bytes = 2 * 10 * SHARED_SAMPLES_PER_CLASS * 784 * 4
    assert path.stat().st_size < float32_bytes / 2
    logged = load_sample(path)
    fetched = samples.fetch_sample(sample_run.run_id)
    expected = draw_sample(sample_run.data.root, SHARED_SAMPLES_PER_CLASS, "first",
                           download=False)
    for split in ("train", "test"):
        for sample in (logged, fetched):
            assert torch.equal(sample.split(split).images, expected.split(split).images)
            assert torch.equal(sample.split(split).labels, expected.split(split).labels)
            assert torch.equal(sample.split(split).indices, expected.split(split).indices)
        # ... and it is the first 12 of each digit in file order.
        _, labels = sample_run.data.split(split)
        first = np.concatenate(
            [np.flatnonzero(labels == c)[:SHARED_SAMPLES_PER_CLASS] for c in range(10)]
        )
        assert logged.split(split).indices.tolist() == first.tolist()


def test_a_corrupt_sample_artifact_is_named_and_leaves_no_copy(experiment, sample_run,
                                                               tmp_path, monkeypatch):
    client = MlflowClient()
    source = mlflow.get_run(sample_run.run_id)
    run = client.create_run(experiment.id, tags={STAGE_TAG: "sample_data"})
    for key, value in source.data.params.items():
        client.log_param(run.info.run_id, key, value)
    garbage = tmp_path / "upload" / "sample.npz"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not an npz archive")
    client.log_artifact(run.info.run_id, str(garbage), "sample")
    client.set_terminated(run.info.run_id)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(PipelineError) as raised:
        samples.fetch_sample(run.info.run_id)
    message = str(raised.value)
    # The downloaded copy is gone, so the message names what the user can find: the artifact.
    assert message == (f"sample/sample.npz of sample_data run {run.info.run_id} is corrupt: it is "
                       f"not a sample written by sample_data; draw a new one (main: force=true)")
    assert str(scratch) not in message
    assert list(scratch.iterdir()) == []


def test_sample_data_logs_both_splits_as_dataset_inputs(sample_run: SampleRun):
    inputs = mlflow.get_run(sample_run.run_id).inputs.dataset_inputs
    by_context = {
        {t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in inputs
    }
    assert set(by_context) == {"training", "testing"}
    assert by_context["training"].name == "mnist-train-sample"
    assert by_context["testing"].name == "mnist-test-sample"
    assert by_context["training"].digest != by_context["testing"].digest
    assert all(d.digest for d in by_context.values())


# ---------------------------------------------------------------------------------------------
# train: one full run (3 epochs, model logged) that several tests read
# ---------------------------------------------------------------------------------------------

TRAIN_EPOCHS = 3


@dataclass(frozen=True)
class TrainedRun:
    run_id: str
    experiment: Experiment
    params: dict
    sample: SampleRun


@pytest.fixture(scope="module")
def trained(tracking_store, sample_run) -> TrainedRun:
    experiment = use_new_experiment(tracking_store, "trained")
    params = stage_params(
        "train", train_overrides(sample_run, epochs=TRAIN_EPOCHS, log_model=True)
    )
    run_id = train.run(params)
    return TrainedRun(run_id=run_id, experiment=experiment, params=params, sample=sample_run)


def test_train_run_is_finished_with_its_parameters_and_tags(trained: TrainedRun):
    run = mlflow.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == trained.experiment.id
    assert run.info.run_name == "train-mlp3-seed0"
    assert run.data.tags[STAGE_TAG] == "train"
    assert run.data.tags["pipeline.model"] == "mlp3"
    expected = {
        "config": "mlp3", "epochs": str(TRAIN_EPOCHS), "lr": "0.01", "batch_size": "16",
        "momentum": "0.9", "seed": "0", "normalize": "false", "precision": "fp32",
        "model_config": "mlp3", "sample_run_id": trained.sample.run_id,
        "data_run_id": trained.sample.run_id, "torch_device": "cpu",
        # What changes the bits, so a figure can be reproduced "on this machine".
        "torch_version": torch.__version__, "torch_threads": str(torch.get_num_threads()),
        "cpu": f"{platform.machine()} {machine.cpu_model()}",
    }
    assert {k: run.data.params.get(k) for k in expected} == expected
    experiment = MlflowClient().get_experiment(trained.experiment.id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"


def test_train_logs_per_epoch_metrics_with_steps(trained: TrainedRun):
    for key in PER_EPOCH:
        history = history_of(trained.run_id, key)
        assert [step for step, _ in history] == list(range(1, TRAIN_EPOCHS + 1)), key
        assert all(math.isfinite(v) for _, v in history), key
    for key in ("train_accuracy", "test_accuracy"):
        assert all(0 <= v <= 1 for _, v in history_of(trained.run_id, key))
    assert all(v > 0 for _, v in history_of(trained.run_id, "epoch_time_s"))
    losses = [v for _, v in history_of(trained.run_id, "train_loss")]
    assert losses[-1] < losses[0] or losses[-1] < 1e-3, "training did not lower the loss"


def test_train_logs_summary_metrics_consistent_with_the_history(trained: TrainedRun):
    metrics = mlflow.get_run(trained.run_id).data.metrics
    assert set(SUMMARY) <= set(metrics)
    test_acc = [v for _, v in history_of(trained.run_id, "test_accuracy")]
    assert metrics["final_test_accuracy"] == test_acc[-1]
    assert metrics["best_test_accuracy"] == max(test_acc)
    assert metrics["best_epoch"] == test_acc.index(max(test_acc)) + 1
    assert metrics["num_params"] == 670_730
    epoch_times = [v for _, v in history_of(trained.run_id, "epoch_time_s")]
    assert metrics["train_time_s"] >= sum(epoch_times) > 0


def test_train_logs_figures_and_history_csv(trained: TrainedRun):
    assert {"accuracy.png", "loss.png", "history.csv"} <= artifact_paths(trained.run_id)
    for figure in ("accuracy.png", "loss.png"):
        assert download(trained.run_id, figure).read_bytes().startswith(PNG_MAGIC)
    frame = pd.read_csv(download(trained.run_id, "history.csv"))
    assert list(frame.columns) == ["epoch", *METRIC_NAMES]
    assert frame["epoch"].tolist() == list(range(1, TRAIN_EPOCHS + 1))
    for key in PER_EPOCH:
        np.testing.assert_allclose(
            frame[key].to_numpy(), [v for _, v in history_of(trained.run_id, key)], rtol=1e-6
        )


def test_train_logs_the_same_dataset_digests_as_the_sample_run(trained: TrainedRun):
    def digests(run_id):
        return {
            ({t.key: t.value for t in i.tags}["mlflow.data.context"], i.dataset.name,
             i.dataset.digest)
            for i in mlflow.get_run(run_id).inputs.dataset_inputs
        }

    train_inputs = digests(trained.run_id)
    assert {context for context, _, _ in train_inputs} == {"training", "testing"}
    assert train_inputs == digests(trained.sample.run_id)


def test_logged_model_loads_and_predicts_like_the_in_process_model(trained: TrainedRun):
    sample = samples.fetch_sample(trained.sample.run_id)
    x_test = sample.test.features()
    network = mlflow.pytorch.load_model(f"runs:/{trained.run_id}/model")
    with torch.no_grad():
        predictions = network(x_test).numpy()
    assert predictions.shape == (len(x_test), 10)

    # Same seed, same data, same process: retraining in-process gives the same network.
    settings = TrainSettings(
        epochs=TRAIN_EPOCHS, batch_size=16, lr=0.01, momentum=0.9, seed=0, device="cpu"
    )
    torch.manual_seed(settings.seed)
    model = build_model(load_model_config("mlp3").model)
    train_loop(model, (sample.train.features(), sample.train.labels),
               (x_test, sample.test.labels), settings)
    model.eval()
    with torch.no_grad():
        expected = model(x_test).numpy()
    np.testing.assert_allclose(predictions, expected, rtol=1e-5, atol=1e-5)
    assert (predictions.argmax(1) == expected.argmax(1)).all()

    accuracy = float((predictions.argmax(1) == sample.test.labels.numpy()).mean())
    final = mlflow.get_run(trained.run_id).data.metrics["final_test_accuracy"]
    assert accuracy == pytest.approx(final, abs=1e-9)


def test_the_logged_pyfunc_answers_digits_and_probabilities(trained: TrainedRun):
    """What `mlflow models serve` serves: per image the digit and 10 probabilities, from raw
    0-255 pixels, in agreement with the network's logits."""
    sample = samples.fetch_sample(trained.sample.run_id)
    pixels = sample.test.features().numpy()
    loaded = mlflow.pyfunc.load_model(f"runs:/{trained.run_id}/model")
    assert loaded.metadata.signature is not None
    answer = loaded.predict(pixels)
    assert list(answer.columns) == ["digit", "probabilities"]
    network = mlflow.pytorch.load_model(f"runs:/{trained.run_id}/model")
    with torch.no_grad():
        logits = network(torch.from_numpy(pixels)).numpy()
    np.testing.assert_array_equal(answer["digit"].to_numpy(), logits.argmax(1))
    probabilities = np.array(answer["probabilities"].tolist())
    assert probabilities.shape == (len(pixels), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probabilities, softmax(logits.astype(np.float64), axis=1),
                               rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# train: determinism and which sample it uses
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_metrics(experiment, sample_run):
    def metrics(seed):
        run_id = train.run(stage_params("train", train_overrides(sample_run, seed=seed)))
        per_epoch = {k: history_of(run_id, k) for k in PER_EPOCH if k != "epoch_time_s"}
        summary = mlflow.get_run(run_id).data.metrics
        return per_epoch, {k: summary[k] for k in SUMMARY if k != "train_time_s"}

    first, again, other = metrics(0), metrics(0), metrics(1)
    assert first == again
    assert first[0] != other[0], "the seed has no effect"


def test_train_reuses_a_finished_sample_run_with_the_same_sampling(sample_run: SampleRun):
    mlflow.set_experiment(sample_run.experiment.name)
    before = [r.info.run_id for r in runs_in(sample_run.experiment, "sample_data")]
    assert before == [sample_run.run_id]
    run_id = train.run(stage_params("train", train_overrides(
        sample_run, data_run_id="", data_dir=str(sample_run.data.root),
        samples_per_class=SHARED_SAMPLES_PER_CLASS, sampling="first",
    )))
    after = [r.info.run_id for r in runs_in(sample_run.experiment, "sample_data")]
    assert after == before, "a second sample_data run was drawn"
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["sample_run_id"] == sample_run.run_id


def test_train_draws_a_sample_when_none_matches_and_reuses_it(
    experiment, shared_tiny_mnist
):
    def train_on(samples_per_class):
        return train.run(stage_params("train", {
            "config": "mlp3", "epochs": 1, "batch_size": 32, "device": "cpu",
            "log_model": False, "data_dir": str(shared_tiny_mnist.root),
            "samples_per_class": samples_per_class,
        }))

    first = train_on(10)
    samples = runs_in(experiment, "sample_data")
    assert len(samples) == 1, "no sample_data run was created"
    created = samples[0]
    assert created.info.status == "FINISHED"
    assert created.data.params["samples_per_class"] == "10"
    assert mlflow.get_run(first).data.params["sample_run_id"] == created.info.run_id

    second = train_on(10)
    assert [r.info.run_id for r in runs_in(experiment, "sample_data")] == [created.info.run_id]
    assert mlflow.get_run(second).data.params["sample_run_id"] == created.info.run_id

    third = train_on(8)  # other sampling parameters: another sample
    samples = runs_in(experiment, "sample_data")
    assert len(samples) == 2
    assert mlflow.get_run(third).data.params["sample_run_id"] == samples[-1].info.run_id
    assert samples[-1].data.params["samples_per_class"] == "8"


# ---------------------------------------------------------------------------------------------
# Bad input: a PipelineError with a helpful message, and a FAILED run that says why
# ---------------------------------------------------------------------------------------------


def sample_params(root, **overrides) -> dict:
    return stage_params(
        "sample_data", {"data_dir": str(root), "samples_per_class": 5, "download": False,
                        **overrides}
    )


def test_sample_data_without_mnist_and_download_false(experiment, tmp_path):
    root = tmp_path / "no-mnist-here"
    with pytest.raises(PipelineError, match="data_dir"):
        sample_data.run(sample_params(root))
    assert_failed(only_run(experiment, "sample_data"), "data_dir", str(root), "MNIST/raw")


def test_sample_data_with_a_truncated_idx_file(experiment, tiny_mnist):
    path = tiny_mnist.raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(PipelineError, match="truncated or corrupt"):
        sample_data.run(sample_params(tiny_mnist.root))
    assert_failed(only_run(experiment, "sample_data"), "truncated or corrupt",
                  str(tiny_mnist.raw))


def test_sample_data_with_more_samples_per_class_than_a_class_has(experiment, tiny_mnist):
    n = TINY_TEST_PER_CLASS + 1
    with pytest.raises(PipelineError, match=f"samples_per_class={n}"):
        sample_data.run(sample_params(tiny_mnist.root, samples_per_class=n))
    assert_failed(only_run(experiment, "sample_data"), "test split", f"at most {n - 1}")


def test_train_without_data_run_fails_with_its_sample(experiment, tiny_mnist):
    """The sample train draws for itself fails: both runs say why."""
    n = TINY_TEST_PER_CLASS + 1
    with pytest.raises(PipelineError, match="samples_per_class"):
        train.run(stage_params("train", {
            "config": "mlp3", "epochs": 1, "device": "cpu", "data_dir": str(tiny_mnist.root),
            "samples_per_class": n,
        }))
    assert_failed(only_run(experiment, "sample_data"), f"samples_per_class={n}")
    assert_failed(only_run(experiment, "train"), f"samples_per_class={n}")


@pytest.mark.parametrize(
    "name, value",
    [("epochs", 0), ("epochs", -1), ("batch_size", 0), ("batch_size", -8),
     ("lr", 0.0), ("lr", -0.01)],
)
def test_train_rejects_non_positive_hyperparameters(experiment, shared_tiny_mnist, name, value):
    params = stage_params("train", {
        "config": "mlp3", "device": "cpu", "data_dir": str(shared_tiny_mnist.root),
        "samples_per_class": 5, name: value,
    })
    with pytest.raises(PipelineError, match=name):
        train.run(params)
    assert_failed(only_run(experiment, "train"), name, str(value))
    assert runs_in(experiment, "sample_data") == [], "work was done before validating"


def test_train_with_an_unknown_config_name(experiment, sample_run):
    with pytest.raises(PipelineError, match="mlp99"):
        train.run(stage_params("train", train_overrides(sample_run, config="mlp99")))
    assert_failed(only_run(experiment, "train"), "'mlp99' not found", "mlp3", "mlp4")


def test_train_with_an_unknown_model_type(experiment, sample_run, tmp_path):
    config = tmp_path / "transformer.yaml"
    config.write_text("name: transformer\nmodel: {type: transformer, layers: 2}\n")
    with pytest.raises(PipelineError, match="unknown model type"):
        train.run(stage_params("train", train_overrides(sample_run, config=str(config))))
    assert_failed(only_run(experiment, "train"), "unknown model type 'transformer'", "mlp")


def test_train_with_a_data_run_id_that_does_not_exist(experiment):
    missing = "0123456789abcdef0123456789abcdef"
    with pytest.raises(PipelineError, match="does not exist"):
        train.run(stage_params("train", {"config": "mlp3", "epochs": 1, "device": "cpu",
                                         "data_run_id": missing}))
    assert_failed(only_run(experiment, "train"), missing, "does not exist")


def test_train_with_a_data_run_id_that_is_not_a_finished_sample_run(experiment, tmp_path):
    with mlflow.start_run() as other:
        pass
    with pytest.raises(PipelineError, match="not a sample_data run"):
        train.run(stage_params("train", {"config": "mlp3", "epochs": 1, "device": "cpu",
                                         "data_run_id": other.info.run_id}))
    with pytest.raises(PipelineError):
        sample_data.run(sample_params(tmp_path / "none"))
    failed_sample = only_run(experiment, "sample_data").info.run_id
    with pytest.raises(PipelineError, match="FAILED, not FINISHED"):
        train.run(stage_params("train", {"config": "mlp3", "epochs": 1, "device": "cpu",
                                         "data_run_id": failed_sample}))
    trains = runs_in(experiment, "train")
    assert len(trains) == 2
    assert_failed(trains[0], other.info.run_id, "not a sample_data run")
    assert_failed(trains[1], failed_sample, "FAILED, not FINISHED")


def test_train_stops_when_the_loss_becomes_nan(experiment, sample_run):
    with pytest.raises(PipelineError, match="nan"):
        train.run(stage_params("train", train_overrides(sample_run, lr=1e10, epochs=5)))
    run = only_run(experiment, "train")
    assert_failed(run, "nan", "epoch 1", "lr")
    # The epochs it did are kept: the metric history, history.csv and the figures.
    history = history_of(run.info.run_id, "train_loss")
    assert [step for step, _ in history] == [1]
    assert math.isnan(history[0][1])
    for key in PER_EPOCH:
        assert [step for step, _ in history_of(run.info.run_id, key)] == [1], key
    assert {"history.csv", "accuracy.png", "loss.png"} <= artifact_paths(run.info.run_id)
    frame = pd.read_csv(download(run.info.run_id, "history.csv"))
    assert frame["epoch"].tolist() == [1]
    assert "final_test_accuracy" not in run.data.metrics


def test_an_unexpected_error_fails_the_run_and_names_itself(experiment, sample_run, monkeypatch):
    """Not only the user's fixable problems: a bug, too, leaves the run FAILED with its message."""
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(train, "build_model", broken)
    with pytest.raises(RuntimeError):
        train.run(stage_params("train", train_overrides(sample_run)))
    assert_failed(only_run(experiment, "train"), "RuntimeError: simulated bug")


def test_train_logs_system_metrics_for_the_ui(experiment, sample_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # a 1 s training
    run_id = train.run(stage_params("train", train_overrides(sample_run, epochs=3)))
    metrics = mlflow.get_run(run_id).data.metrics
    for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert name in metrics, sorted(metrics)
        assert len(history_of(run_id, name)) >= 1

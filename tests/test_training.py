"""The training loop (pipeline.core.training), on the tiny IDX sample, without MLflow."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache.machine import resolve_device
from pipeline.core.config import load_model_config
from pipeline.core.data import draw_sample
from pipeline.core.mlp_step import MlpStep
from pipeline.core.models import build_model
from pipeline.errors import PipelineError
from pipeline.core.training import (
    METRIC_NAMES,
    TrainingDiverged,
    TrainSettings,
    per_example_results,
    train,
)

FAST = dict(epochs=2, batch_size=16, device="cpu")


@pytest.fixture
def tiny_data(tiny_mnist):
    sample = draw_sample(tiny_mnist.root, 12, download=False)
    return (
        (sample.train.features(), sample.train.labels),
        (sample.test.features(), sample.test.labels),
    )


def fresh_model(name: str = "mlp3", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(load_model_config(name).model)


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "epoch_time_s"} for record in history]


def test_defaults_are_the_seeds():
    settings = TrainSettings()
    assert (settings.epochs, settings.batch_size, settings.lr, settings.momentum) == (
        20, 64, 0.01, 0.9
    )
    assert settings.precision == "fp32"


@pytest.mark.parametrize("name", ["mlp3", "mlp4"])
def test_short_training_lowers_the_loss(tiny_data, name):
    model = fresh_model(name)
    settings = TrainSettings(**FAST)
    (x_train, y_train), (x_test, y_test) = tiny_data
    before, _ = per_example_results(model, x_train, y_train, settings)
    history = train(model, *tiny_data, settings)
    assert history[-1]["train_loss"] < 0.5 * before.mean().item()
    assert history[-1]["train_accuracy"] >= 0.9
    assert history[-1]["test_accuracy"] >= 0.8  # chance is 0.1


def test_one_record_per_epoch_with_every_metric(tiny_data):
    seen = []
    history = train(fresh_model(), *tiny_data, TrainSettings(epochs=3, batch_size=32,
                                                             device="cpu"), on_epoch=seen.append)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert seen == history
    for record in history:
        assert set(record) == {"epoch", *METRIC_NAMES}
        for key in ("train_accuracy", "test_accuracy"):
            assert 0.0 <= record[key] <= 1.0
        for key in ("train_loss", "test_loss"):
            assert math.isfinite(record[key]) and record[key] >= 0
        assert record["epoch_time_s"] > 0


def test_metrics_are_eval_mode_results_on_the_whole_splits(tiny_data):
    model = fresh_model()
    history = train(model, *tiny_data, TrainSettings(**FAST))
    model.eval()
    with torch.no_grad():
        for split, (x, y) in zip(("train", "test"), tiny_data):
            logits = model(x)
            loss = F.cross_entropy(logits, y).item()
            accuracy = (logits.argmax(1) == y).double().mean().item()
            assert history[-1][f"{split}_loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
            assert history[-1][f"{split}_accuracy"] == accuracy


def test_same_seed_gives_identical_metrics(tiny_data):
    a = train(fresh_model(seed=0), *tiny_data, TrainSettings(**FAST, seed=0))
    b = train(fresh_model(seed=0), *tiny_data, TrainSettings(**FAST, seed=0))
    c = train(fresh_model(seed=1), *tiny_data, TrainSettings(**FAST, seed=1))
    assert without_time(a) == without_time(b)
    assert without_time(a) != without_time(c)


class Recorder(nn.Module):
    """Wraps a model and keeps the labels' order of every training batch."""

    def __init__(self, model: nn.Module, lookup: dict):
        super().__init__()
        self.model, self.lookup, self.batches = model, lookup, []

    def forward(self, x):
        if self.training:
            self.batches.append([self.lookup[row[:8].tolist().__repr__()] for row in x])
        return self.model(x)


def test_a_fresh_shuffle_every_epoch_in_batches_of_batch_size(tiny_data):
    (x_train, _), _ = tiny_data
    lookup = {row[:8].tolist().__repr__(): i for i, row in enumerate(x_train)}
    assert len(lookup) == len(x_train)  # rows are distinguishable by their first pixels
    recorder = Recorder(fresh_model(), lookup)
    train(recorder, *tiny_data, TrainSettings(epochs=2, batch_size=32, device="cpu"))
    sizes = [len(b) for b in recorder.batches]
    assert sizes == [32, 32, 32, 24] * 2  # 120 examples, the last batch short
    epoch1 = sum(recorder.batches[:4], [])
    epoch2 = sum(recorder.batches[4:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(120)), "every example once an epoch"
    assert epoch1 != list(range(120)), "not shuffled"
    assert epoch1 != epoch2, "the same order in both epochs"


class Tap(nn.Module):
    """Passes through to `model`, keeping a copy of every training-mode input batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x):
        if self.training:
            self.batches.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("name", ["mlp3", "mlp4"])
def test_updates_are_the_seeds_sgd_with_momentum(tiny_data, name):
    """Replaying the batches train() used through torch.optim.SGD(lr, momentum), as the seed
    does, gives the same weights and BatchNorm statistics."""
    (x_train, y_train), _ = tiny_data
    label_of = {row.numpy().tobytes(): int(label) for row, label in zip(x_train, y_train)}
    model = fresh_model(name)
    reference = copy.deepcopy(model)
    tap = Tap(model)
    settings = TrainSettings(epochs=2, batch_size=16, lr=0.01, momentum=0.9, device="cpu")
    train(tap, *tiny_data, settings)
    assert len(tap.batches) == 2 * 8

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9)
    reference.train()
    for xb in tap.batches:
        yb = torch.tensor([label_of[row.numpy().tobytes()] for row in xb])
        loss = F.cross_entropy(reference(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained, expected = model.state_dict(), reference.state_dict()
    assert list(trained) == list(expected)
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")


class PoisonAfterFirstEpoch(nn.Module):
    """Produces NaN logits once `poisoned` is set (by the on_epoch callback)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.poisoned = model, False

    def forward(self, x):
        out = self.model(x)
        return out * float("nan") if self.poisoned else out


def test_nan_loss_stops_training_after_reporting_the_epoch(tiny_data):
    model = PoisonAfterFirstEpoch(fresh_model())
    seen = []

    def on_epoch(record):
        seen.append(record)
        model.poisoned = True

    with pytest.raises(TrainingDiverged) as info:
        train(model, *tiny_data, TrainSettings(epochs=5, batch_size=16, lr=0.02, device="cpu"),
              on_epoch=on_epoch)
    assert isinstance(info.value, PipelineError)
    assert [r["epoch"] for r in seen] == [1, 2], "epoch 2 is reported, and nothing after it"
    assert math.isfinite(seen[0]["train_loss"])
    assert math.isnan(seen[1]["train_loss"])
    message = str(info.value)
    assert "nan" in message and "epoch 2" in message and "lr" in message


def test_huge_learning_rate_is_reported_as_divergence(tiny_data):
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        train(fresh_model(), *tiny_data, TrainSettings(epochs=3, batch_size=16, lr=1e10,
                                                       device="cpu"))


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("epochs", -2), ("batch_size", 0), ("batch_size", -64),
     ("lr", 0.0), ("lr", -0.01), ("lr", float("nan")), ("lr", float("inf")),
     ("momentum", -0.1), ("momentum", 1.0), ("precision", "fp8")],
)
def test_invalid_settings_are_rejected_naming_the_parameter(tiny_data, field, value):
    settings = TrainSettings(**{**FAST, field: value})
    with pytest.raises(PipelineError, match=field):
        settings.validate()
    model = fresh_model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(PipelineError, match=field):
        train(model, *tiny_data, settings)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "model changed"


def test_resolve_device_agrees_with_torch_without_importing_it(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PipelineError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden, as torch would see them
    assert resolve_device("auto") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(PipelineError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize("every", [-1, 1.5, True, "2"])
def test_invalid_checkpoint_every_is_rejected(tiny_data, every):
    with pytest.raises(PipelineError, match="checkpoint_every must be 0"):
        train(fresh_model(), *tiny_data, TrainSettings(**FAST), on_checkpoint=print,
              checkpoint_every=every)


MIXED_MLP = {"type": "mlp", "hidden": [{"units": 24, "batch_norm": True}, {"units": 16},
                                       {"units": 12, "batch_norm": True}]}


@pytest.mark.parametrize("spec, normalize", [
    ("mlp3", False), ("mlp4", False), ("mlp4", True), (MIXED_MLP, True), (MIXED_MLP, False),
], ids=["mlp3", "mlp4", "mlp4-normalized", "mixed-normalized", "mixed"])
def test_the_loop_is_bit_for_bit_the_plain_loop(tiny_data, spec, normalize):
    """What makes the loop fast (one gather per epoch into reused buffers, fused SGD, one eval
    pass over both splits, an MLP's backward written out: pipeline.core.mlp_step) changes no
    bit: the weights, BatchNorm statistics and accuracies are exactly those of the loop
    written out plainly with autograd, with the same shuffle generator."""
    (x_train, y_train), (x_test, y_test) = tiny_data
    settings = TrainSettings(epochs=3, batch_size=16, device="cpu")
    torch.manual_seed(0)
    model = build_model(load_model_config(spec).model if isinstance(spec, str) else spec,
                        normalize=normalize)
    probe = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                            fused=True)
    assert MlpStep.for_model(model, probe, torch.device("cpu"), "fp32") is not None, \
        "this model must take the written-out step, or the test proves nothing about it"
    reference = copy.deepcopy(model)
    history = train(model, *tiny_data, settings)

    optimizer = torch.optim.SGD(reference.parameters(), lr=settings.lr,
                                momentum=settings.momentum, fused=True)
    shuffle = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.epochs):
        reference.train()
        order = torch.randperm(len(y_train), generator=shuffle)
        for batch in order.split(settings.batch_size):
            loss = F.cross_entropy(reference(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trained, expected = model.state_dict(), reference.state_dict()
    assert list(trained) == list(expected)
    for key in expected:
        assert torch.equal(trained[key], expected[key]), f"{key} differs"
    reference.eval()
    with torch.no_grad():
        for split, (x, y) in zip(("train", "test"), tiny_data):
            accuracy = (reference(x).argmax(1) == y).double().mean().item()
            assert history[-1][f"{split}_accuracy"] == accuracy


def test_only_a_plain_fp32_cpu_mlp_with_fused_momentum_sgd_skips_autograd():
    """Where the written-out step is not known to equal autograd's, training uses autograd."""
    cpu = torch.device("cpu")
    model = fresh_model("mlp3")

    def sgd(params, **options):
        return torch.optim.SGD(params, **{"lr": 0.01, "momentum": 0.9, "fused": True, **options})

    assert MlpStep.for_model(model, sgd(model.parameters()), cpu, "fp32") is not None
    assert MlpStep.for_model(model, sgd(model.parameters()), cpu, "bf16") is None
    assert MlpStep.for_model(model, sgd(model.parameters(), fused=False), cpu, "fp32") is None
    assert MlpStep.for_model(model, sgd(model.parameters(), momentum=0.0), cpu, "fp32") is None
    assert MlpStep.for_model(model, sgd(list(model.parameters())[:2]), cpu, "fp32") is None
    assert MlpStep.for_model(model, torch.optim.Adam(model.parameters()), cpu, "fp32") is None
    dropout = nn.Sequential(nn.Linear(784, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 10))
    assert MlpStep.for_model(dropout, sgd(dropout.parameters()), cpu, "fp32") is None
    double = fresh_model("mlp3").double()
    assert MlpStep.for_model(double, sgd(double.parameters()), cpu, "fp32") is None
    vgg = build_model(load_model_config("vgg11").model)
    assert MlpStep.for_model(vgg, sgd(vgg.parameters()), cpu, "fp32") is None

"""Checkpoints (pipeline.core.checkpoint) and resuming train() from them, without MLflow."""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from pipeline.core import checkpoint as checkpoint_module
from pipeline.runs import checkpoint_store
from pipeline.runs.checkpoint_store import CheckpointStore
from pipeline.core.checkpoint import (
    KEYS,
    TRAINING_KEYS,
    clone_state,
    load_checkpoint,
    meta_differences,
    save_checkpoint,
)
from pipeline.core.config import load_model_config
from pipeline.core.data import draw_sample
from pipeline.core.models import build_model
from pipeline.core.training import TrainingDiverged, TrainSettings, train
from pipeline.errors import PipelineError

SEED = 3
EPOCHS = 3
# A VGG small enough to train in milliseconds that still has BatchNorm2d and dropout, so only
# a restored global RNG gives the same dropout masks after a resume.
TINY_VGG = {"type": "vgg", "input_size": 28, "conv": [4, "M"], "classifier": [16],
            "dropout": 0.5}
# For tests of when and what, not of the numbers: as small as a network gets.
TINY_MLP = {"type": "mlp", "hidden": [{"units": 8, "batch_norm": True}]}
SPECS = {"tiny_vgg": TINY_VGG, "tiny_mlp": TINY_MLP}
META = {"config_digest": "0123456789abcdef", "lr": 0.01, "epochs": 4, "sample_run_id": "r1"}


@pytest.fixture
def folder(tmp_path) -> Path:
    """An empty folder for checkpoints (tmp_path itself holds the tiny MNIST files)."""
    path = tmp_path / "checkpoints"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def tiny_data(shared_tiny_mnist):
    """4 images of each digit per split: 3 batches of 16/16/8 an epoch, milliseconds each."""
    sample = draw_sample(shared_tiny_mnist.root, 4, download=False)
    return (
        (sample.train.features(), sample.train.labels),
        (sample.test.features(), sample.test.labels),
    )


def fresh_model(name: str, seed: int = SEED) -> nn.Module:
    """As the train stage builds it: seed the global RNG, then build."""
    torch.manual_seed(seed)
    return build_model(SPECS[name] if name in SPECS else load_model_config(name).model)


def settings(epochs: int = EPOCHS, **overrides) -> TrainSettings:
    return TrainSettings(**{"epochs": epochs, "batch_size": 16, "seed": SEED, "device": "cpu",
                            **overrides})


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "epoch_time_s"} for record in history]


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"not bit-identical: {different}"


class Killed(Exception):
    """Stands in for the process being killed in the middle of an epoch."""


def train_until_killed(name, data, path: Path, kill_in_epoch: int, total: int = EPOCHS,
                       resume: dict | None = None) -> None:
    """Run `total` epochs saving checkpoints to `path`; die once epoch `kill_in_epoch` trained."""

    def on_epoch(record):
        if record["epoch"] == kill_in_epoch:
            raise Killed  # after its updates, before its checkpoint

    with pytest.raises(Killed):
        train(fresh_model(name), *data, settings(total), on_epoch, resume=resume,
              on_checkpoint=lambda state: save_checkpoint(path, state, META))


@dataclass
class Reference:
    """An uninterrupted run, and the checkpoint a run killed in epoch 2 left on disk."""

    history: list[dict]
    final_state: dict
    checkpoint_path: Path  # after epoch 1; tests must not overwrite it


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """Per model, computed once for the module: training is most of these tests' time."""
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            model = fresh_model(name)
            history = train(model, *tiny_data, settings())
            path = tmp_path_factory.mktemp(name) / "checkpoint.pt"
            train_until_killed(name, tiny_data, path, kill_in_epoch=2)
            cache[name] = Reference(history, model.state_dict(), path)
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------
# Resuming is bit-exact
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp4", "tiny_vgg"])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny_data, reference, name):
    """mlp4: BatchNorm and momentum; tiny_vgg: dropout too, so the global RNG matters."""
    expected = reference(name)
    saved = load_checkpoint(expected.checkpoint_path)
    assert saved["epochs_done"] == 1

    model = fresh_model(name)
    seen = []
    resumed = train(model, *tiny_data, settings(), seen.append, resume=saved)

    assert [r["epoch"] for r in seen] == [2, 3], "only new epochs are reported"
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert resumed[:1] == saved["history"], "the old records come back as they were"
    assert without_time(resumed) == without_time(expected.history)  # ==: bit for bit
    assert_same_state(model.state_dict(), expected.final_state)


def test_resuming_across_two_kills_is_bit_identical(tiny_data, reference, folder):
    """Killed in epoch 2 (checkpoint 1), resumed and killed in epoch 3 (checkpoint 2)."""
    expected = reference("tiny_vgg")
    path = folder / "checkpoint.pt"
    shutil.copy(expected.checkpoint_path, path)
    train_until_killed("tiny_vgg", tiny_data, path, kill_in_epoch=3,
                       resume=load_checkpoint(path))
    saved = load_checkpoint(path)
    assert saved["epochs_done"] == 2
    model = fresh_model("tiny_vgg")
    resumed = train(model, *tiny_data, settings(), resume=saved)
    assert without_time(resumed) == without_time(expected.history)
    assert_same_state(model.state_dict(), expected.final_state)


# Each part of the state, left out of the resume, changes the result: the bit-exact test
# above is sensitive to all of them (and would fail if train() did not restore one).
def _seeded_state(state: dict, key: str) -> dict:
    """`state` with `key` replaced by what a fresh run would start from."""
    state = dict(state)
    if key == "shuffle_rng":
        state[key] = torch.Generator().manual_seed(SEED).get_state()
    elif key == "cpu_rng":
        state[key] = torch.manual_seed(SEED).get_state()
    elif key == "momentum":
        state["optimizer"] = {**state["optimizer"], "state": {}}
    elif key == "batch_norm_stats":
        state["model"] = {k: (torch.zeros_like(v) if "running_mean" in k else v)
                          for k, v in state["model"].items()}
    return state


@pytest.mark.parametrize("name, left_out", [
    ("mlp4", "shuffle_rng"), ("mlp4", "momentum"), ("mlp4", "batch_norm_stats"),
    ("tiny_vgg", "cpu_rng"),
])
def test_every_part_of_the_state_matters(tiny_data, reference, name, left_out):
    expected = reference(name)
    broken = _seeded_state(load_checkpoint(expected.checkpoint_path), left_out)
    resumed = train(fresh_model(name), *tiny_data, settings(), resume=broken)
    assert without_time(resumed) != without_time(expected.history)


def test_resuming_twice_from_one_loaded_checkpoint_gives_the_same_run(tiny_data, reference):
    """Training must not write into the checkpoint it resumed from (e.g. its momentum)."""
    saved = load_checkpoint(reference("tiny_vgg").checkpoint_path)
    before = clone_state(saved)
    first, second = fresh_model("tiny_vgg"), fresh_model("tiny_vgg")
    a = train(first, *tiny_data, settings(), resume=saved)
    b = train(second, *tiny_data, settings(), resume=saved)
    assert without_time(a) == without_time(b)
    assert_same_state(first.state_dict(), second.state_dict())
    for part in ("model", "optimizer", "shuffle_rng", "cpu_rng"):
        found, kept = _flat_tensors(saved[part]), _flat_tensors(before[part])
        assert found and all(torch.equal(x, y) for x, y in zip(found, kept)), \
            f"the checkpoint's {part} changed"


def _flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _flat_tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flat_tensors(item)]
    return []


def test_a_finished_checkpoint_resumes_to_its_history_without_training(tiny_data):
    states = []
    trained = fresh_model("tiny_mlp")
    history = train(trained, *tiny_data, settings(2), on_checkpoint=states.append)
    seen = []
    model = fresh_model("tiny_mlp")
    assert train(model, *tiny_data, settings(2), seen.append, resume=states[-1]) == history
    assert seen == []
    assert_same_state(model.state_dict(), trained.state_dict())


def test_more_epochs_continue_a_finished_run(tiny_data, reference):
    """No schedule depends on the total, so 1 epoch resumed to 3 is the 3-epoch run."""
    states = []
    train(fresh_model("tiny_vgg"), *tiny_data, settings(1), on_checkpoint=states.append)
    resumed = train(fresh_model("tiny_vgg"), *tiny_data, settings(),
                    resume=clone_state(states[-1]))
    assert without_time(resumed) == without_time(reference("tiny_vgg").history)


# --------------------------------------------------------------------------------------------
# When checkpoints are taken, and what they reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every, expected", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]),
                                             (5, [5]), (7, [5]), (0, [])])
def test_checkpoints_every_nth_epoch_and_the_last(tiny_data, every, expected):
    events = []
    train(fresh_model("tiny_mlp"), *tiny_data, settings(5),
          lambda record: events.append(("epoch", record["epoch"])),
          on_checkpoint=lambda state: events.append(("checkpoint", state["epochs_done"])),
          checkpoint_every=every)
    assert [n for kind, n in events if kind == "checkpoint"] == expected
    for n in expected:  # each after its own epoch's record, before the next epoch's
        at = events.index(("checkpoint", n))
        assert events[at - 1] == ("epoch", n)


def test_the_state_holds_the_training_keys_and_the_history_so_far(tiny_data):
    states = []
    history = train(fresh_model("tiny_mlp"), *tiny_data, settings(2), on_checkpoint=states.append)
    assert [s["epochs_done"] for s in states] == [1, 2]
    for state in states:
        assert set(state) == set(TRAINING_KEYS)
        assert state["history"] == history[:state["epochs_done"]]
        assert state["cuda_rng"] is None  # trained on the CPU
        assert state["shuffle_rng"].dtype == state["cpu_rng"].dtype == torch.uint8
        momentum = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
        assert len(momentum) == len(list(fresh_model("tiny_mlp").parameters()))


def test_the_state_references_live_tensors_and_clone_state_copies_them(tiny_data):
    kept = []
    model = fresh_model("tiny_mlp")
    train(model, *tiny_data, settings(2),
          on_checkpoint=lambda state: kept.append((state, clone_state(state))))
    live, cloned = kept[0]  # taken after epoch 1
    final = model.state_dict()
    weight = next(iter(final))
    assert torch.equal(live["model"][weight], final[weight]), "live: epoch 2 overwrote it"
    assert not torch.equal(cloned["model"][weight], final[weight]), "a clone keeps epoch 1"
    momentum = lambda s: s["optimizer"]["state"][0]["momentum_buffer"]  # noqa: E731
    assert not torch.equal(momentum(cloned), momentum(live))


def test_a_diverged_epoch_is_not_checkpointed(tiny_data):
    class PoisonAfterFirstEpoch(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.poisoned = model, False

        def forward(self, x):
            out = self.model(x)
            return out * float("nan") if self.poisoned else out

    model = PoisonAfterFirstEpoch(fresh_model("tiny_mlp"))
    states = []

    def poison(record):
        model.poisoned = True

    with pytest.raises(TrainingDiverged, match="epoch 2"):
        train(model, *tiny_data, settings(3), poison, on_checkpoint=states.append)
    assert [s["epochs_done"] for s in states] == [1]
    assert all(math.isfinite(r["train_loss"]) for r in states[0]["history"])


# --------------------------------------------------------------------------------------------
# Resuming what cannot be resumed
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_epoch_state(tiny_data) -> dict:
    """A training state after 2 epochs of the tiny MLP; tests must not modify it."""
    states = []
    train(fresh_model("tiny_mlp"), *tiny_data, settings(2), on_checkpoint=states.append)
    return clone_state(states[-1])


def test_resume_refuses_a_checkpoint_past_the_last_epoch(tiny_data, two_epoch_state):
    with pytest.raises(PipelineError, match="2 finished epochs, more than epochs=1"):
        train(fresh_model("tiny_mlp"), *tiny_data, settings(1), resume=two_epoch_state)


@pytest.mark.parametrize("field, value", [("lr", 0.02), ("momentum", 0.5)])
def test_resume_refuses_other_optimizer_hyperparameters(tiny_data, two_epoch_state, field,
                                                        value):
    """Loading the optimizer state would otherwise replace them with the checkpoint's."""
    model = fresh_model("tiny_mlp")
    before = clone_state({"model": model.state_dict()})
    with pytest.raises(PipelineError, match=f"{field} .* this run has {field} {value}"):
        train(model, *tiny_data, settings(3, **{field: value}), resume=two_epoch_state)
    assert_unchanged(model, before["model"])


def test_resume_refuses_weights_of_another_model(tiny_data, two_epoch_state):
    model = fresh_model("mlp3")
    before = clone_state({"model": model.state_dict()})
    with pytest.raises(PipelineError, match="do not fit this model.*(missing|shapes differ)"):
        train(model, *tiny_data, settings(3), resume=two_epoch_state)
    assert_unchanged(model, before["model"])


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[key], before[key]) for key in before), "model changed"


# --------------------------------------------------------------------------------------------
# Saving atomically, loading safely
# --------------------------------------------------------------------------------------------


def test_a_saved_checkpoint_loads_with_every_key_and_the_meta(two_epoch_state, folder):
    path = folder / "checkpoint.pt"
    save_checkpoint(path, two_epoch_state, META)
    loaded = load_checkpoint(path)
    assert set(loaded) == set(KEYS)
    assert loaded["meta"] == META
    assert loaded["history"] == two_epoch_state["history"]
    assert loaded["epochs_done"] == 2
    for key in ("shuffle_rng", "cpu_rng"):
        assert torch.equal(loaded[key], two_epoch_state[key])
    assert _flat_tensors(loaded["model"]) and all(
        torch.equal(a, b) for a, b in zip(_flat_tensors(loaded["model"]),
                                          _flat_tensors(two_epoch_state["model"])))
    assert os.listdir(folder) == ["checkpoint.pt"], "no temporary file is left behind"


class PartialWrite(OSError):
    pass


def write_half_then_fail(error: BaseException):
    """A torch.save that dies halfway: some bytes reach the file, then `error`."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise error

    return save


@pytest.mark.parametrize("error, raised", [(PartialWrite(28, "No space left on device"),
                                            PipelineError),
                                           (KeyboardInterrupt(), KeyboardInterrupt)])
def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary_file(
        two_epoch_state, folder, monkeypatch, error, raised):
    path = folder / "checkpoint.pt"
    save_checkpoint(path, two_epoch_state, META)
    previous = path.read_bytes()
    monkeypatch.setattr(torch, "save", write_half_then_fail(error))
    with pytest.raises(raised) as info:
        save_checkpoint(path, two_epoch_state, {**META, "lr": 0.5})
    if raised is PipelineError:
        assert "No space left" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == previous
    assert os.listdir(folder) == ["checkpoint.pt"]
    assert load_checkpoint(path)["meta"] == META


def test_a_failed_first_save_leaves_nothing(two_epoch_state, folder, monkeypatch):
    monkeypatch.setattr(torch, "save", write_half_then_fail(PartialWrite(5, "I/O error")))
    with pytest.raises(PipelineError):
        save_checkpoint(folder / "checkpoint.pt", two_epoch_state, META)
    assert os.listdir(folder) == []


def test_an_unwritable_folder_is_a_pipeline_error(two_epoch_state, folder):
    with pytest.raises(PipelineError, match="could not write the checkpoint"):
        save_checkpoint(folder / "missing" / "checkpoint.pt", two_epoch_state, META)


def test_the_bytes_are_on_disk_before_the_rename(two_epoch_state, folder, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint_module.os, "fsync",
                        lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(checkpoint_module.os, "replace",
                        lambda a, b: (events.append(("replace", Path(a).parent, Path(b))),
                                      real_replace(a, b))[1])
    path = folder / "checkpoint.pt"
    save_checkpoint(path, two_epoch_state, META)
    assert events[0] == "fsync", "the file is fsynced before it replaces the old one"
    assert events[1] == ("replace", folder, path), "the temporary file sits beside the target"
    assert events[2] == "fsync", "then the folder, so that the rename itself is durable"


def test_meta_must_be_plain_data(two_epoch_state, folder):
    with pytest.raises(TypeError, match=r"meta\['config'\] is a "):
        save_checkpoint(folder / "checkpoint.pt", two_epoch_state, {"config": Path("x")})
    assert os.listdir(folder) == []


def corrupt_files(folder: Path, state: dict) -> dict[str, Path]:
    good = folder / "good.pt"
    save_checkpoint(good, state, META)
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "garbage": bytes(range(256)) * 64,
        "empty": b"",
    }
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    for name, obj in {
        "a_state_dict": state["model"],
        "a_tensor": torch.zeros(3),
        "no_format": {k: v for k, v in torch.load(good, weights_only=True).items()
                      if k != "format"},
        "history_mismatch": {**torch.load(good, weights_only=True), "epochs_done": 5},
        "rng_not_uint8": {**torch.load(good, weights_only=True), "cpu_rng": torch.zeros(3)},
        "future_version": {**torch.load(good, weights_only=True), "version": 99},
        "an_object": {"format": "mnist-pipeline-checkpoint", "x": PartialWrite()},
    }.items():
        paths[name] = folder / f"{name}.pt"
        torch.save(obj, paths[name])
    return paths


def test_corrupt_or_foreign_files_raise_a_one_line_pipeline_error(two_epoch_state, folder):
    for name, path in corrupt_files(folder, two_epoch_state).items():
        with pytest.raises(PipelineError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert "\n" not in message, f"{name}: {message}"
        assert f"{path} is corrupt or not a training checkpoint" in message, name
        assert "delete it" in message, name


def test_a_missing_checkpoint_is_a_pipeline_error(folder):
    with pytest.raises(PipelineError, match="no checkpoint at"):
        load_checkpoint(folder / "nothing.pt")


# --------------------------------------------------------------------------------------------
# Writing in the background
# --------------------------------------------------------------------------------------------


def slow_saves(monkeypatch, copies: Path, seconds: float = 0.2):
    """save_checkpoint, but slow, keeping a copy of each state named after its epochs_done."""
    real_save = checkpoint_module.save_checkpoint

    def save(path, state, meta):
        time.sleep(seconds)  # training goes on meanwhile, overwriting the live tensors
        real_save(copies / f"after-{state['epochs_done']}.pt", state, meta)
        real_save(path, state, meta)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save)


def test_the_checkpoint_store_writes_each_state_as_it_was_handed_over(tiny_data, folder,
                                                                      experiment, monkeypatch):
    slow_saves(monkeypatch, folder)
    kept = {}
    model = fresh_model("tiny_mlp")
    run_id = mlflow.MlflowClient().create_run(experiment.id).info.run_id
    store = CheckpointStore(run_id)

    def checkpoint(state):
        kept[state["epochs_done"]] = clone_state(state)
        store.save(state, META)

    train(model, *tiny_data, settings(3), on_checkpoint=checkpoint)
    store.close()
    written = sorted(folder.glob("after-*.pt"))
    assert folder / "after-3.pt" in written, "the newest state is always written"
    for path in written:
        saved = load_checkpoint(path)
        assert saved["meta"] == META
        assert saved["history"] == kept[saved["epochs_done"]]["history"]
        assert_same_state(saved["model"], kept[saved["epochs_done"]]["model"])
    assert_same_state(load_checkpoint(folder / "after-3.pt")["model"], model.state_dict())
    uploaded = mlflow.artifacts.download_artifacts(run_id=run_id,
                                                   artifact_path=checkpoint_store.ARTIFACT_PATH)
    assert load_checkpoint(uploaded)["epochs_done"] == 3


# --------------------------------------------------------------------------------------------
# Comparing meta
# --------------------------------------------------------------------------------------------


def test_meta_differences_name_each_changed_value():
    assert meta_differences(META, dict(META)) == []
    assert meta_differences(META, {**META, "lr": 0.02}) == ["lr 0.01 vs 0.02"]
    changed = {**META, "config_digest": "fedcba9876543210", "epochs": 20}
    assert meta_differences(META, changed) == [
        "config_digest 0123456789abcdef vs fedcba9876543210", "epochs 4 vs 20",
    ]


def test_meta_differences_show_keys_only_one_side_has():
    found = {"lr": 0.01, "normalize": False}
    expected = {"lr": 0.01, "precision": "bf16"}
    assert meta_differences(found, expected) == [
        "normalize False vs <absent>", "precision <absent> vs bf16",
    ]


# --------------------------------------------------------------------------------------------
# What the store keeps and deletes
# --------------------------------------------------------------------------------------------


def unreachable_client(monkeypatch) -> mlflow.MlflowClient:
    """A client of a tracking server that is down: nothing listens on the port."""
    from pipeline.server.tracking_server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return mlflow.MlflowClient(f"http://127.0.0.1:{free_port()}")


def left_by_an_earlier_attempt(run_id: str, state: dict) -> Path:
    """The local checkpoint an attempt killed before uploading it leaves behind."""
    local = checkpoint_store.local_dir(run_id) / checkpoint_store.FILE_NAME
    local.parent.mkdir(parents=True)
    save_checkpoint(local, state, META)
    return local


def test_a_resumed_attempt_stopped_at_once_keeps_the_earlier_local_checkpoint(
    two_epoch_state, experiment, monkeypatch
):
    run_id = mlflow.MlflowClient().create_run(experiment.id).info.run_id
    local = left_by_an_earlier_attempt(run_id, two_epoch_state)
    # The resumed attempt is stopped before its first checkpoint, the server still down.
    store = CheckpointStore(run_id, unreachable_client(monkeypatch))
    assert store.close(timeout=10) is False
    assert load_checkpoint(local)["epochs_done"] == 2


def test_a_resumed_attempt_uploads_the_earlier_checkpoint_before_deleting_it(
    two_epoch_state, experiment
):
    run_id = mlflow.MlflowClient().create_run(experiment.id).info.run_id
    left_by_an_earlier_attempt(run_id, two_epoch_state)
    assert CheckpointStore(run_id).close(timeout=30) is True
    assert not checkpoint_store.local_dir(run_id).exists()
    checkpoint, source = checkpoint_store.fetch_checkpoint(run_id)
    assert checkpoint["epochs_done"] == 2 and checkpoint_store.ARTIFACT_PATH in source


def test_a_failed_write_is_not_forgotten_when_an_older_checkpoint_uploads(
    two_epoch_state, experiment, monkeypatch, capsys
):
    monkeypatch.setenv(checkpoint_store.UPLOAD_INTERVAL_ENV, "0")
    real_save = checkpoint_module.save_checkpoint

    def save(path, state, meta):
        if state["epochs_done"] == 2:
            raise PipelineError(f"cannot write the checkpoint {path}: No space left on device")
        time.sleep(0.5)  # epoch 2's state arrives meanwhile
        real_save(path, state, meta)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save)
    run_id = mlflow.MlflowClient().create_run(experiment.id).info.run_id
    store = CheckpointStore(run_id)
    first = {**two_epoch_state, "epochs_done": 1, "history": two_epoch_state["history"][:1]}
    store.save(first, META)
    time.sleep(0.2)
    store.save(two_epoch_state, META)
    # Epoch 1 is written and uploaded after epoch 2's write failed: epoch 2 is still lost.
    assert store.close(timeout=30) is False
    assert "No space left on device" in capsys.readouterr().err
    assert load_checkpoint(store.path)["epochs_done"] == 1


# --------------------------------------------------------------------------------------------
# Asking whether a run has a checkpoint
# --------------------------------------------------------------------------------------------


@pytest.fixture
def unreachable_artifacts(tracking_store, monkeypatch):
    """An experiment whose artifacts are on a server that does not answer (its runs and tags,
    in the tracking store, still do)."""
    from pipeline.server.tracking_server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = mlflow.MlflowClient()
    location = f"http://127.0.0.1:{free_port()}/api/2.0/mlflow-artifacts/artifacts/x"
    experiment_id = client.create_experiment(f"unreachable-{time.time_ns()}",
                                             artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def test_has_checkpoint_tells_none_from_a_server_that_does_not_answer(
    experiment, unreachable_artifacts
):
    client = mlflow.MlflowClient()
    without = client.create_run(experiment.id).info.run_id
    assert checkpoint_store.has_checkpoint(without) is False
    unknown = client.create_run(unreachable_artifacts).info.run_id
    with pytest.raises(PipelineError) as refused:
        checkpoint_store.has_checkpoint(unknown)
    assert unknown in str(refused.value) and "\n" not in str(refused.value)


def test_main_does_not_start_over_when_it_cannot_ask_for_a_checkpoint(unreachable_artifacts):
    from pipeline.stages import main

    client = mlflow.MlflowClient()
    killed = client.create_run(unreachable_artifacts,
                               tags={"pipeline.cache_key": "key-1"}).info.run_id
    client.set_terminated(killed, "KILLED")
    with pytest.raises(PipelineError, match=killed):
        main.Ledger(force=False).decide("key-1", resumable=True)

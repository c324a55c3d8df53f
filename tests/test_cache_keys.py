"""Cache keys: derived from the code a stage imports, raw files by content, the machine's
numerics in `train`'s key. A key that misses an input reuses a run it should not."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, write_tiny_mnist

from pipeline import file_digests, machine, stage_keys, tracking
from pipeline.cli import stage_params
from pipeline.errors import PipelineError


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the pipeline package that the key functions read instead of the real one."""
    root = tmp_path / "pipeline"
    shutil.copytree(REPO_ROOT / "pipeline", root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(tracking, "PACKAGE_ROOT", root)
    for cached in (tracking._pipeline_imports, tracking._source_path):
        cached.cache_clear()
    yield root
    for cached in (tracking._pipeline_imports, tracking._source_path):
        cached.cache_clear()


def test_train_key_covers_every_module_train_runs_through():
    imported = tracking._pipeline_imports("pipeline.stages.train")
    # The ones the hand-written list used to miss: summary metrics and config parsing.
    assert {"pipeline.comparison", "pipeline.config", "pipeline.model_spec", "pipeline.models",
            "pipeline.training", "pipeline.machine", "pipeline.stages"} <= imported
    assert "pipeline.stages.compare" not in imported
    assert "pipeline.evaluation" not in imported


def test_editing_a_module_a_stage_imports_indirectly_changes_its_code_version(package_copy):
    before = {stage: tracking.code_version(f"pipeline.stages.{stage}")
              for stage in ("train", "compare", "sample_data")}
    with open(package_copy / "comparison.py", "a") as source:
        source.write("\nAN_EDIT = True\n")
    after = {stage: tracking.code_version(f"pipeline.stages.{stage}")
             for stage in ("train", "compare", "sample_data")}
    assert after["train"] != before["train"]  # train imports comparison for its summary
    assert after["compare"] != before["compare"]
    assert after["sample_data"] == before["sample_data"]  # does not import it


def test_editing_a_module_no_stage_imports_changes_no_key(package_copy):
    before = tracking.code_version("pipeline.stages.train")
    with open(package_copy / "stages" / "compare.py", "a") as source:
        source.write("\nAN_EDIT = True\n")
    assert tracking.code_version("pipeline.stages.train") == before


def sample_key(root) -> str:
    return stage_keys.sample_data_key(stage_params("sample_data", {"data_dir": str(root)}))


def test_raw_files_enter_the_sample_key_by_content(tmp_path):
    data = write_tiny_mnist(tmp_path / "a")
    key = sample_key(data.root)

    copy = tmp_path / "b"
    shutil.copytree(data.root, copy)
    assert sample_key(copy) == key, "the same files elsewhere are the same input"

    labels = data.raw / "t10k-labels-idx1-ubyte"
    stat = labels.stat()
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert sample_key(data.root) == key, "a touched file with the same content"

    content = bytearray(labels.read_bytes())
    content[-1] = (content[-1] + 1) % 10
    labels.write_bytes(bytes(content))
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert sample_key(data.root) != key


def test_a_rewrite_with_the_same_size_and_mtime_is_hashed_again(tmp_path):
    """What `cp -p`, `rsync -t` or an editor that restores the mtime leave behind."""
    path = tmp_path / "file"
    path.write_bytes(b"a" * 1000)
    stat = path.stat()
    old = stat.st_mtime_ns - 60 * 10**9
    os.utime(path, ns=(old, old))
    time.sleep(file_digests.RACY_WINDOW_S + 0.1)  # an entry the memo trusts
    first = file_digests.file_digest(path)
    assert str(path.resolve()) in json.loads(file_digests.memo_path().read_text())
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(old, old))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == old
    assert file_digests.file_digest(path) != first


def test_a_file_digest_is_hashed_once_while_the_file_is_untouched(tmp_path, monkeypatch):
    path = tmp_path / "file"
    path.write_bytes(b"x" * 1000)
    time.sleep(file_digests.RACY_WINDOW_S + 0.1)
    calls = []
    real = file_digests.hashlib.file_digest
    monkeypatch.setattr(file_digests.hashlib, "file_digest",
                        lambda *args: calls.append(1) or real(*args))
    first = file_digests.file_digest(path)
    assert file_digests.file_digest(path) == first
    assert len(calls) == 1
    path.write_bytes(b"y" * 1001)
    assert file_digests.file_digest(path) != first
    assert len(calls) == 2
    assert file_digests.file_digest(tmp_path / "absent") is None


def train_key(**overrides) -> str:
    return stage_keys.train_key(stage_params("train", {"device": "cpu", **overrides}), "sample-run")


def test_train_key_changes_with_what_changes_the_bits(monkeypatch):
    key = train_key()
    monkeypatch.setenv("OMP_NUM_THREADS", str(machine.torch_threads() + 1))
    assert train_key() != key, "the thread count changes the sums' order"
    monkeypatch.undo()
    assert train_key() == key
    monkeypatch.setattr(machine, "torch_build", lambda: {"version": "0.0.0-other", "cuda": None})
    assert train_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(machine, "cpu_model", lambda: "another processor")
    assert train_key() != key


def test_the_torch_build_is_read_without_importing_torch():
    assert machine.torch_build()["version"] == torch.__version__
    assert machine.torch_build()["cuda"] == torch.version.cuda


def test_the_thread_count_comes_from_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert machine.numerics("cpu")["torch_threads"] == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(PipelineError, match="OMP_NUM_THREADS='many'"):
        machine.numerics("cpu")


def test_train_key_changes_with_the_configs_content_not_its_name(tmp_path):
    copy = tmp_path / "mlp3.yaml"
    shutil.copy(REPO_ROOT / "experiments" / "mlp3.yaml", copy)
    assert train_key(config=str(copy)) == train_key(config="mlp3")
    copy.write_text(copy.read_text().replace("units: 512}", "units: 256}", 1))
    assert train_key(config=str(copy)) != train_key(config="mlp3")


def test_a_sample_drawn_into_an_empty_data_dir_is_reused_by_the_next_run(
        tmp_path, experiment, monkeypatch):
    """The first `make run` on a new machine downloads MNIST; the second must not draw (and
    train on) a new sample because the first one's key was taken before the files existed."""
    from torchvision.datasets import MNIST

    from pipeline.stages import sample_data

    mirror = write_tiny_mnist(tmp_path / "mirror")

    def download_from_the_mirror(self):  # stands in for the network only
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)
        for raw_file in mirror.raw.iterdir():
            shutil.copy(raw_file, self.raw_folder)

    monkeypatch.setattr(MNIST, "download", download_from_the_mirror)
    params = stage_params("sample_data", {"data_dir": str(tmp_path / "data"), "download": True,
                                          "samples_per_class": 5})
    first = sample_data.run(params)
    cached = tracking.find_cached_run(stage_keys.sample_data_key(params))
    assert cached is not None and cached.info.run_id == first


def _edit(path: Path, old: str, new: str) -> None:
    source = path.read_text()
    assert old in source, f"{old!r} is no longer in {path.name}: update this test"
    path.write_text(source.replace(old, new, 1))


def _train_code(package_copy) -> dict[str, str]:
    return {stage: tracking.code_version(f"pipeline.stages.{stage}")
            for stage in ("sample_data", "train", "evaluate", "compare")}


def test_docstrings_comments_and_formatting_retrain_nothing(package_copy):
    before = _train_code(package_copy)
    training = package_copy / "training.py"
    _edit(training, '"""The training loop:', '"""The training loop, reworded:')
    _edit(training, "\ndef train(", "\n# why the loop is written as it is\n\n\ndef   train(")
    assert _train_code(package_copy) == before


def test_a_change_to_the_loss_computation_retrains(package_copy):
    before = _train_code(package_copy)
    _edit(package_copy / "training.py", "loss = F.cross_entropy(logits.float(), yb)",
          "loss = F.cross_entropy(logits.float(), yb, label_smoothing=0.1)")
    after = _train_code(package_copy)
    assert after["train"] != before["train"]
    assert after["sample_data"] == before["sample_data"]

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

from pipeline.cache import (code_digest, compare_keys, evaluate_keys, file_digests, machine,
                            sample_keys, train_keys)
from pipeline import parameters
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.runs import tracking


# The stages main runs; main itself has no key but is listed so that no edit reaches it unseen.
KEYED = ("sample_data", "train", "evaluate", "compare", "main")


def _codes() -> dict[str, str]:
    return {stage: code_digest.code_version(f"pipeline.stages.{stage}") for stage in KEYED}


def _edit(path: Path, old: str, new: str) -> None:
    source = path.read_text()
    assert old in source, f"{old!r} is no longer in {path.name}: update this test"
    path.write_text(source.replace(old, new, 1))


def test_train_key_covers_every_module_train_runs_through():
    imported = code_digest._pipeline_imports("pipeline.stages.train")
    # The ones a hand-written list would miss: summary metrics, config parsing, the machine.
    assert {"pipeline.core.summary", "pipeline.core.config", "pipeline.core.model_spec",
            "pipeline.core.models", "pipeline.core.training", "pipeline.cache.machine"} <= imported
    # What does not compute a model: compare's statistics and wording, the command line, tune.
    assert not {"pipeline.core.comparison", "pipeline.cli", "pipeline.stages.compare",
                "pipeline.core.evaluation", "pipeline.stages.tuning.trial",
                "pipeline.stages.sample_data"} & imported


def test_editing_a_module_a_stage_imports_indirectly_changes_its_code_version(package_copy):
    before = _codes()
    with open(package_copy / "core" / "summary.py", "a") as source:
        source.write("\nAN_EDIT = True\n")
    after = _codes()
    assert after["train"] != before["train"]  # train logs the summary
    assert after["compare"] != before["compare"]  # compare tabulates it
    assert after["sample_data"] == before["sample_data"]  # does not import it


def test_editing_a_module_no_stage_imports_changes_no_key(package_copy):
    before = _codes()
    with open(package_copy / "server" / "backend.py", "a") as source:
        source.write("\nAN_EDIT = True\n")
    assert _codes() == before


def test_editing_one_stage_changes_no_other_stages_key(package_copy):
    before = _codes()
    with open(package_copy / "stages" / "compare.py", "a") as source:
        source.write("\nAN_EDIT = True\n")
    after = _codes()
    assert after["compare"] != before["compare"]
    assert {s: after[s] for s in KEYED if s != "compare"} == \
        {s: before[s] for s in KEYED if s != "compare"}


def test_rewording_compares_conclusion_reruns_compare_only(package_copy):
    before = _codes()
    _edit(package_copy / "core" / "comparison.py",
          '"Only {best} was compared: final test accuracy "',
          '"Only {best} took part: final test accuracy "')
    after = _codes()
    assert after["compare"] != before["compare"]
    assert {s: after[s] for s in KEYED if s != "compare"} == \
        {s: before[s] for s in KEYED if s != "compare"}


def test_editing_tune_changes_no_key_of_mains_stages(package_copy):
    before = _codes()
    _edit(package_copy / "stages" / "tuning" / "trial.py", '"space": space.digest,',
          '"space": space.digest, "v": 2,')
    for module in ("tune.py", "tuning/search.py", "tuning/report.py"):
        with open(package_copy / "stages" / module, "a") as source:
            source.write("\nAN_EDIT = True\n")
    assert _codes() == before


def test_a_command_line_help_text_retrains_nothing(package_copy):
    before = _codes()
    _edit(package_copy / "cli.py", "MLflow experiment to log into", "MLflow experiment to write to")
    assert _codes() == before


def test_a_help_text_in_mlproject_changes_no_key(tmp_path, monkeypatch):
    """MLproject is read when a stage runs, never digested: its help texts are no input."""
    data = write_tiny_mnist(tmp_path / "mnist")
    keys = lambda: (sample_key(data.root), train_keys.train_key(
        stage_params("train", {"data_dir": str(data.root)}), "a-sample-run"))
    before = keys()
    project = tmp_path / "MLproject"
    text = parameters.MLPROJECT.read_text()
    old = 'help: "passes over the training sample"'
    assert old in text, "update this test"
    project.write_text(text.replace(old, 'help: "How many passes over the sample"', 1))
    monkeypatch.setattr(parameters, "MLPROJECT", project)
    parameters.entry_points.cache_clear()
    try:
        assert parameters.entry_points()["train"]["parameters"]["epochs"]["help"].startswith("How")
        assert keys() == before
    finally:
        parameters.entry_points.cache_clear()


def _assert_evaluate_and_compare_follow_the_train_runs() -> None:
    """evaluate and compare are keyed on the train runs they take: a retrained model is a new
    run id, so a new key for both."""
    evaluate = {"model_uri": ""}
    assert evaluate_keys.evaluate_key(evaluate, "old-train-run", "sample") != \
        evaluate_keys.evaluate_key(evaluate, "new-train-run", "sample")
    compare = stage_params("compare")
    assert compare_keys.compare_key(compare, ["old-train-run"]) != \
        compare_keys.compare_key(compare, ["new-train-run"])


def test_the_vgg_validator_is_not_in_the_sample_key(package_copy):
    before = _codes()
    _edit(package_copy / "core" / "model_spec.py", 'check_keys("model", spec, VGG_KEYS, {"conv"})',
          'check_keys("model", spec, VGG_KEYS, {"conv", "classifier"})')
    after = _codes()
    assert after["train"] != before["train"]
    assert after["sample_data"] == before["sample_data"]
    _assert_evaluate_and_compare_follow_the_train_runs()


def sample_key(root) -> str:
    return sample_keys.sample_data_key(stage_params("sample_data", {"data_dir": str(root)}))


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


def _forget_in_process(code_digest) -> None:
    """What a new process starts with: nothing of the package read yet."""
    for cached in (code_digest._pipeline_imports, code_digest._source_path, code_digest._code_of):
        cached.cache_clear()


def test_a_code_version_is_parsed_once_while_the_package_is_untouched(package_copy, monkeypatch):
    """A cached rerun looks up a key per stage in a new process: it must not parse the
    package's modules again, only see that none of them changed."""
    time.sleep(file_digests.RACY_WINDOW_S + 0.1)  # files the memo may trust
    first = _codes()
    _forget_in_process(code_digest)
    parsed = []
    real_parse = code_digest.ast.parse
    monkeypatch.setattr(code_digest.ast, "parse", lambda *a, **k: parsed.append(1) or
                        real_parse(*a, **k))
    assert _codes() == first
    assert not parsed, "an untouched package was parsed again"

    _edit(package_copy / "core" / "training.py", "loss = F.cross_entropy(logits.float(), yb)",
          "loss = F.cross_entropy(logits.float(), yb, label_smoothing=0.1)")
    _forget_in_process(code_digest)
    after = _codes()
    assert after["train"] != first["train"] and parsed
    assert after["sample_data"] == first["sample_data"]


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
    return train_keys.train_key(stage_params("train", {"device": "cpu", **overrides}), "sample-run")


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
    cached = tracking.find_cached_run(sample_keys.sample_data_key(params))
    assert cached is not None and cached.info.run_id == first


def test_docstrings_comments_and_formatting_retrain_nothing(package_copy):
    before = _codes()
    training = package_copy / "core" / "training.py"
    _edit(training, '"""The training loop:', '"""The training loop, reworded:')
    _edit(training, "\ndef train(", "\n# why the loop is written as it is\n\n\ndef   train(")
    assert _codes() == before


def test_a_change_to_the_loss_computation_retrains(package_copy):
    before = _codes()
    _edit(package_copy / "core" / "training.py", "loss = F.cross_entropy(logits.float(), yb)",
          "loss = F.cross_entropy(logits.float(), yb, label_smoothing=0.1)")
    after = _codes()
    assert after["train"] != before["train"]
    assert after["sample_data"] == before["sample_data"]
    _assert_evaluate_and_compare_follow_the_train_runs()

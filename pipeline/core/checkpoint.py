"""Training checkpoints on disk: written atomically, read back safely, checked for fit.

A checkpoint is a plain dict, so that torch.load(weights_only=True) can read it back without
unpickling arbitrary objects:

    format        FORMAT, marks the file as ours
    version       VERSION, of this layout
    model         the model's state_dict (BatchNorm running stats and counters included)
    optimizer     the optimizer's state_dict (SGD momentum buffers, lr, momentum)
    shuffle_rng   the mini-batch shuffle generator's state (uint8 tensor)
    cpu_rng       torch's global CPU RNG state (uint8 tensor): dropout draws from it
    cuda_rng      the training GPU's RNG state (uint8 tensor), None when training on CPU
    history       one record dict per finished epoch (plain floats and ints)
    epochs_done   how many epochs the state has finished; len(history)
    meta          whatever the caller passes to save_checkpoint (config digest, hyperparameters,
                  data run id...): opaque here, compared with meta_differences()

training.train() builds everything but `format`, `version` and `meta` (TRAINING_KEYS) and
resumes from a loaded checkpoint. The state it hands to on_checkpoint references live tensors:
either save it before the callback returns (`lambda state: save_checkpoint(path, state, meta)`)
or let a BackgroundCheckpointWriter copy it and write it while training goes on.
This module knows nothing about MLflow.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError

FORMAT = "mnist-pipeline-checkpoint"
VERSION = 1
TRAINING_KEYS = (
    "model", "optimizer", "shuffle_rng", "cpu_rng", "cuda_rng", "history", "epochs_done",
)
KEYS = ("format", "version", *TRAINING_KEYS, "meta")
# What torch.load(weights_only=True) can rebuild besides tensors; meta must stay inside it.
PLAIN_SCALARS = (str, int, float, bool, type(None))


def save_checkpoint(path: str | Path, state: dict, meta: dict) -> None:
    """Write `state` (as train() hands it to on_checkpoint) and `meta` to `path`, atomically.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, and only then
    renamed over `path`: an error or a kill mid-write leaves the previous checkpoint as it was.
    An error (Ctrl-C included) removes the temporary file; a killed process can leave a
    `.NAME.*.tmp` beside it, which nothing reads. Raises PipelineError when the file cannot be
    written (disk full, no permission); TypeError when `meta` holds anything but plain data.
    """
    path = Path(path)
    missing = [key for key in TRAINING_KEYS if key not in state]
    if missing:
        raise TypeError(f"not a training state: missing {', '.join(missing)}")
    _check_plain(meta, "meta")
    checkpoint = {"format": FORMAT, "version": VERSION,
                  **{key: state[key] for key in TRAINING_KEYS}, "meta": meta}
    # Same folder as the target: os.replace is only atomic within one filesystem. A unique
    # name, so that two processes writing the same checkpoint cannot interleave their bytes.
    try:
        handle = tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        )
    except OSError as err:
        raise PipelineError(_unwritable(path, err)) from err
    try:
        with handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException as err:  # KeyboardInterrupt too: never leave a stray temporary file
        Path(handle.name).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise PipelineError(_unwritable(path, err)) from err
        raise
    _fsync_folder(path.parent)


def _unwritable(path: Path, err: OSError) -> str:
    return (f"could not write the checkpoint {path}: {err}; the previous checkpoint, if any, "
            f"is unchanged. Free disk space or choose another folder.")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable: without it a power cut can undo os.replace."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at `path`, with all tensors on the CPU (train() moves them).

    Raises PipelineError, with a one-line message, when the file is missing, truncated, not a
    torch file, or a torch file that is not one of our checkpoints.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no checkpoint at {path}")
    try:
        # weights_only: a checkpoint is data, and loading one must not run pickled code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, random bytes, unsafe pickle: all mean unusable
        raise UnusableCheckpoint(path, _first_line(err)) from err
    problem = _layout_problem(checkpoint)
    if problem:
        raise UnusableCheckpoint(path, problem)
    return checkpoint


class UnusableCheckpoint(PipelineError):
    """A checkpoint file that is there but cannot be resumed from; `reason` says why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is corrupt or not a training checkpoint ({reason}); delete it "
                         f"to train from the first epoch")
        self.reason = reason


def _first_line(err: Exception) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _layout_problem(checkpoint: Any) -> str | None:
    """What is wrong with a loaded object's layout, or None when it is a checkpoint."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        return f"a {type(checkpoint).__name__} without format={FORMAT!r}"
    if checkpoint.get("version") != VERSION:
        return f"layout version {checkpoint.get('version')!r}, this code reads {VERSION}"
    missing = [key for key in KEYS if key not in checkpoint]
    if missing:
        return f"missing {', '.join(missing)}"
    model, optimizer = checkpoint["model"], checkpoint["optimizer"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        return "model is not a state_dict of tensors"
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        return "optimizer is not an optimizer state_dict"
    for key in ("shuffle_rng", "cpu_rng", "cuda_rng"):
        value = checkpoint[key]
        if key == "cuda_rng" and value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            return f"{key} is not a uint8 RNG state"
    history, done = checkpoint["history"], checkpoint["epochs_done"]
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        return "history is not a list of epoch records"
    if not isinstance(done, int) or done != len(history):
        return f"epochs_done {done!r} does not match {len(history)} history records"
    if not isinstance(checkpoint["meta"], dict):
        return "meta is not a mapping"
    return None


def _check_plain(value: Any, where: str) -> None:
    """Anything but plain data would make the file unreadable with weights_only=True."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN_SCALARS):
        raise TypeError(f"{where} is a {type(value).__name__}: checkpoint meta may only hold "
                        f"str, int, float, bool, None, lists and dicts")


def meta_differences(found: dict, expected: dict) -> list[str]:
    """One 'key found vs expected' line per key whose value differs, sorted by key.

    `found` is the checkpoint's meta, `expected` what the resuming run would write, e.g.
    ["lr 0.01 vs 0.02"]; a key only one side has shows as <absent> on the other.
    """
    absent = "<absent>"
    return [
        f"{key} {found.get(key, absent)} vs {expected.get(key, absent)}"
        for key in sorted(set(found) | set(expected), key=str)
        if key not in found or key not in expected or found[key] != expected[key]
    ]


def clone_state(state: dict) -> dict:
    """A copy of a training state that owns its tensors.

    train() hands on_checkpoint a state whose tensors are the live parameters, buffers and
    momentum: saving it later (e.g. in a background thread) needs this copy first.
    """
    return _clone(state)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        copy = type(value)((key, _clone(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):  # a module state_dict's per-layer versions
            copy._metadata = value._metadata
        return copy
    if isinstance(value, list):
        return [_clone(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_clone(item) for item in value)
    return value

"""Where a train run's checkpoint lives: a local file, written after each epoch, and a copy in
the run's artifacts (`checkpoints/checkpoint.pt`) so that a resume works from another machine.

Both the atomic local write (pipeline.core.checkpoint) and the upload, at most every
UPLOAD_INTERVAL_ENV seconds, run in a background thread, so training waits neither on the disk
nor on the tracking server's artifact store. Only the newest checkpoint matters: older ones not
yet written or uploaded are skipped, not queued. The local file stays until the run
finishes and is uploaded, so a run whose server went away can still be resumed here.

pipeline.core.checkpoint (and with it torch) is imported where a checkpoint is read or written, not
here: `main` asks has_checkpoint() on its torch-free path (see pipeline.cache).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow

from pipeline import interrupts
from pipeline.cache.file_digests import cache_root
from pipeline.errors import PipelineError

ARTIFACT_DIR = "checkpoints"
FILE_NAME = "checkpoint.pt"
ARTIFACT_PATH = f"{ARTIFACT_DIR}/{FILE_NAME}"
# Uploading mlp4's 7.5 MB after each 0.4 s epoch to a server on the same 2-core machine made
# the epochs several times slower; the local write stays per epoch, the upload is at most this
# often (and always at the end, on a stop signal, or on failure).
UPLOAD_INTERVAL_ENV = "PIPELINE_CHECKPOINT_UPLOAD_S"
DEFAULT_UPLOAD_INTERVAL_S = 30.0


def upload_interval_s() -> float:
    return float(os.environ.get(UPLOAD_INTERVAL_ENV) or DEFAULT_UPLOAD_INTERVAL_S)


def local_dir(run_id: str) -> Path:
    return cache_root() / "checkpoints" / run_id


class CheckpointStore:
    """Keeps a run's newest checkpoint on local disk and in its artifacts, off the hot path.

    save() only copies the state (a few ms for mlp4: the live tensors change as soon as it
    returns); one background thread writes the copy to the local file (65 ms for mlp4 with its
    fsync, bench/checkpoint_cost.py) and uploads the newest file now and then. A copy that
    arrives before the previous one is written replaces it: only the newest matters.
    """

    def __init__(self, run_id: str, client: mlflow.MlflowClient | None = None):
        self.run_id = run_id
        self.client = client or mlflow.MlflowClient()
        self.folder = local_dir(run_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / FILE_NAME
        self.saved_epoch = 0  # newest on local disk
        self.uploaded_epoch = 0  # newest this store knows to be in the artifacts
        # The newest state's write failed (cleared only by a newer write), and the newest
        # file's upload failed (cleared by an upload): each its own, so that one cannot hide
        # the other.
        self.write_error: Exception | None = None
        self.upload_error: Exception | None = None
        self.upload_interval_s = upload_interval_s()
        self._pending: tuple[dict, dict] | None = None  # a copied state and its meta, unwritten
        self._wake = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._work, daemon=True,
                                        name=f"checkpoints-{run_id[:8]}")
        self._worker.start()

    def save(self, state: dict, meta: dict) -> None:
        from pipeline.core.checkpoint import clone_state

        with interrupts.deferred():  # a stop signal waits for a complete copy
            copy = clone_state(state)
        with self._wake:
            self._pending = (copy, meta)
            self._wake.notify()

    def _next_job(self, last_upload: float) -> str | None:
        """'write', 'upload', or None when closing with nothing left (lock held)."""
        while True:
            if self._pending is not None:
                return "write"
            unsent = self.uploaded_epoch != self.saved_epoch
            too_soon = self.upload_interval_s - (time.monotonic() - last_upload)
            if unsent and (self._closing or too_soon <= 0):
                return "upload"
            if self._closing:
                return None
            self._wake.wait(timeout=too_soon if unsent else None)

    def _work(self) -> None:
        self._adopt_earlier_checkpoint()
        last_upload = -math.inf
        while True:
            with self._wake:
                job = self._next_job(last_upload)
                pending, self._pending = (self._pending, None) if job == "write" else (None, None)
                epoch, closing = self.saved_epoch, self._closing
            if job is None:
                return
            if job == "write":
                self._write(*pending)
                continue
            last_upload = time.monotonic()
            if not self._upload(epoch) and closing:
                return  # the last try failed: the local copy stays

    def _adopt_earlier_checkpoint(self) -> None:
        """A resumed run's folder can hold the previous attempt's newest checkpoint, which that
        attempt may not have uploaded: it counts as written and not uploaded, so it is uploaded
        (again, at worst) before the folder may go."""
        from pipeline.core import checkpoint

        if not self.path.is_file():
            return
        try:
            epochs_done = checkpoint.load_checkpoint(self.path)["epochs_done"]
        except PipelineError as err:  # unreadable: kept for the user to look at, never deleted
            self.write_error = err
            return
        with self._wake:
            self.saved_epoch = epochs_done

    def _write(self, state: dict, meta: dict) -> None:
        from pipeline.core import checkpoint

        try:
            checkpoint.save_checkpoint(self.path, state, meta)
        except Exception as err:  # noqa: BLE001 - reported by close(); training goes on
            self.write_error = err
            return
        with self._wake:
            self.write_error = None  # the newest state is on disk after all
            self.saved_epoch = state["epochs_done"]

    def _upload(self, epoch: int) -> bool:
        # A snapshot: the next write replaces self.path while this upload reads.
        snapshot = self.folder / "upload" / FILE_NAME
        try:
            snapshot.parent.mkdir(exist_ok=True)
            shutil.copyfile(self.path, snapshot)
            self.client.log_artifact(self.run_id, str(snapshot), ARTIFACT_DIR)
        except Exception as err:  # noqa: BLE001 - kept locally and tried again
            self.upload_error = err
            return False
        with self._wake:
            self.upload_error = None
            self.uploaded_epoch = max(self.uploaded_epoch, epoch)
        return True

    def close(self, timeout: float = 60) -> bool:
        """Write and upload the newest checkpoint; True when it reached the artifacts.

        The local folder is deleted only when the newest state was written and that file is
        uploaded; otherwise it stays, and one line on stderr says why and where.
        """
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._worker.join(timeout)
        finished = not self._worker.is_alive() and self._pending is None
        done = (finished and self.write_error is None
                and self.uploaded_epoch == self.saved_epoch)
        if done:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            kept = f"epoch {self.saved_epoch} kept at {self.path}" if self.saved_epoch else (
                "none written")
            print(f"checkpoint {self._why_kept(finished)}; {kept} for a resume on this machine",
                  file=sys.stderr, flush=True)
        return done

    def _why_kept(self, finished: bool) -> str:
        if self.write_error is not None:
            return f"of the newest epoch not written: {_first_line(self.write_error)}"
        if self.upload_error is not None:
            return f"of epoch {self.saved_epoch} not uploaded: {_first_line(self.upload_error)}"
        return f"of epoch {self.saved_epoch} not uploaded{'' if finished else ' in time'}"

    @property
    def error(self) -> Exception | None:
        """Why the newest checkpoint is not (yet) safe in the artifacts, if a write or an upload
        failed."""
        return self.write_error or self.upload_error


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def fetch_checkpoint(run_id: str) -> tuple[dict, str]:
    """The newest checkpoint of a run and where it came from: the local copy (at least as new
    as the uploaded one) when this machine has it, else the run's artifact."""
    from pipeline.core.checkpoint import UnusableCheckpoint, load_checkpoint

    local = local_dir(run_id) / FILE_NAME
    if local.is_file():
        return load_checkpoint(local), str(local)
    # Into a folder of our own: MLflow's default one is never removed, a copy per resume.
    with tempfile.TemporaryDirectory(prefix="mnist-checkpoint-") as scratch:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT_PATH,
                                                       dst_path=scratch)
        except Exception as err:  # noqa: BLE001 - MLflow raises several types for "not there"
            raise PipelineError(
                f"run {run_id} has no checkpoint (no {ARTIFACT_PATH} artifact, no local copy at "
                f"{local}); it was trained with checkpoint_every=0 or stopped before its first "
                f"epoch ended: start a new run instead"
            ) from err
        try:
            return load_checkpoint(path), f"{ARTIFACT_PATH} of run {run_id}"
        except UnusableCheckpoint as err:
            # The file named in err is a copy that is gone when this returns: name the artifact.
            raise PipelineError(
                f"run {run_id}'s uploaded checkpoint ({ARTIFACT_PATH}) is corrupt or not a "
                f"training checkpoint ({err.reason}); it cannot be resumed: leave resume_run_id "
                f"empty (main: force=true) to start a new run"
            ) from err


def has_checkpoint(run_id: str) -> bool:
    """Whether the run left a checkpoint to resume from, here or in its artifacts.

    PipelineError (one line) when the artifact store cannot be asked: "no checkpoint" would
    make the caller train that run's epochs again from the first, silently.
    """
    if (local_dir(run_id) / FILE_NAME).is_file():
        return True
    try:
        listed = mlflow.MlflowClient().list_artifacts(run_id, ARTIFACT_DIR)
    except Exception as err:  # noqa: BLE001 - whatever it is, the answer is unknown
        from pipeline.runs import tracking_access

        reason = _first_line(tracking_access.explain(err) or err)
        raise PipelineError(
            f"cannot tell whether run {run_id} left a checkpoint to resume from, so it is "
            f"neither resumed nor started over: {reason}"
        ) from err
    return any(artifact.path == ARTIFACT_PATH for artifact in listed)

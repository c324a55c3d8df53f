"""Where a train run's checkpoint lives: a local file, written after each epoch, and a copy in
the run's artifacts (`checkpoints/checkpoint.pt`) so that a resume works from another machine.

The local write is synchronous and atomic (pipeline.checkpoint); the upload runs in a
background thread, at most every UPLOAD_INTERVAL_ENV seconds, so training never waits on the
tracking server's artifact store. Only the newest checkpoint matters: checkpoints written
between two uploads are skipped, not queued. The local file stays until the run
finishes and is uploaded, so a run whose server went away can still be resumed here.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import mlflow

from pipeline import interrupts
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.errors import PipelineError
from pipeline.file_digests import cache_root

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
    """Saves a run's checkpoints locally and uploads the newest one in the background."""

    def __init__(self, run_id: str, client: mlflow.MlflowClient | None = None):
        self.run_id = run_id
        self.client = client or mlflow.MlflowClient()
        self.folder = local_dir(run_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / FILE_NAME
        self.saved_epoch = 0
        self.uploaded_epoch = 0
        self.upload_error: Exception | None = None
        self.upload_interval_s = upload_interval_s()
        self._wake = threading.Condition()
        self._closing = False
        self._uploader = threading.Thread(target=self._upload_loop, daemon=True,
                                          name=f"checkpoint-upload-{run_id[:8]}")
        self._uploader.start()

    def save(self, state: dict, meta: dict) -> None:
        """Write the checkpoint (a stop signal waits for it) and schedule its upload."""
        with interrupts.deferred():
            save_checkpoint(self.path, state, meta)
        with self._wake:
            self.saved_epoch = state["epochs_done"]
            self._wake.notify()

    def _upload_loop(self) -> None:
        last_upload = -math.inf
        while True:
            with self._wake:
                while not self._closing:
                    if self.uploaded_epoch == self.saved_epoch:
                        self._wake.wait()  # for save() or close()
                        continue
                    too_soon = self.upload_interval_s - (time.monotonic() - last_upload)
                    if too_soon <= 0:
                        break
                    self._wake.wait(timeout=too_soon)
                if self.uploaded_epoch == self.saved_epoch:
                    return  # closing, nothing left to send
                epoch, closing = self.saved_epoch, self._closing
            last_upload = time.monotonic()
            if self._upload(epoch):
                continue
            if closing:
                return  # the last try failed: the local copy stays

    def _upload(self, epoch: int) -> bool:
        # A snapshot: the next epoch's save replaces self.path while this upload reads.
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
        """Finish the upload of the newest checkpoint; True when it reached the artifacts.

        The local copy is deleted only once the newest checkpoint is uploaded.
        """
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._uploader.join(timeout)
        done = self.uploaded_epoch == self.saved_epoch and not self._uploader.is_alive()
        if done:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            reason = f": {self.upload_error}" if self.upload_error else ""
            print(f"checkpoint of epoch {self.saved_epoch} not uploaded{reason}; kept at "
                  f"{self.path} for a resume on this machine", file=sys.stderr, flush=True)
        return done


def fetch_checkpoint(run_id: str) -> tuple[dict, str]:
    """The newest checkpoint of a run and where it came from: the local copy (at least as new
    as the uploaded one) when this machine has it, else the run's artifact."""
    local = local_dir(run_id) / FILE_NAME
    if local.is_file():
        return load_checkpoint(local), str(local)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT_PATH)
    except Exception as err:  # noqa: BLE001 - MLflow raises several types for "not there"
        raise PipelineError(
            f"run {run_id} has no checkpoint (no {ARTIFACT_PATH} artifact, no local copy at "
            f"{local}); it was trained with checkpoint_every=0 or stopped before its first "
            f"epoch ended: start a new run instead"
        ) from err
    return load_checkpoint(path), f"{ARTIFACT_PATH} of run {run_id}"


def has_checkpoint(run_id: str) -> bool:
    if (local_dir(run_id) / FILE_NAME).is_file():
        return True
    try:
        return any(a.path == ARTIFACT_PATH
                   for a in mlflow.MlflowClient().list_artifacts(run_id, ARTIFACT_DIR))
    except Exception:  # noqa: BLE001 - an unreadable artifact store means no usable checkpoint
        return False

"""Per-epoch metric points sent to the tracking server from a background thread.

A synchronous write blocks training for as long as the server is away (MLflow's own HTTP
retries took about two minutes for a 60 s outage). Here each epoch's points go into a queue
and training goes on; one thread sends them in order, retrying a failed batch until it goes
through. `flush()`, at the end of training, waits for the queue to empty for up to the retry
window, counted from that call (an outage during training does not shorten it); past it the
points are declared lost with a PipelineError naming the tracking URI (the run's checkpoint, kept
locally until uploaded, still allows a resume that writes them again).
"""

from __future__ import annotations

import os
import queue
import threading
import time

import mlflow
from mlflow.entities import Metric

from pipeline.errors import PipelineError

RETRY_WINDOW_ENV = "PIPELINE_TRACKING_RETRY_S"
DEFAULT_RETRY_WINDOW_S = 300.0
RETRY_PAUSE_S = 1.0


def retry_window_s() -> float:
    return float(os.environ.get(RETRY_WINDOW_ENV) or DEFAULT_RETRY_WINDOW_S)


class MetricWriter:
    """Sends metric batches of one run in order, in the background, retrying failures."""

    def __init__(self, client: mlflow.MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self.window_s = retry_window_s()
        self._batches: queue.Queue[list[Metric] | None] = queue.Queue()
        # Why the newest attempt to write failed; None once a write goes through again, so
        # that it says whether the server refuses writes now, not whether it ever did.
        self.last_error: Exception | None = None
        self._thread = threading.Thread(target=self._send_loop, daemon=True,
                                        name=f"metrics-{run_id[:8]}")
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self._batches.put([Metric(k, float(v), timestamp, step) for k, v in metrics.items()])

    def _send_loop(self) -> None:
        while True:
            batch = self._batches.get()
            if batch is None:
                return
            while not self._send(batch):
                time.sleep(RETRY_PAUSE_S)
            self._batches.task_done()

    def _send(self, batch: list[Metric]) -> bool:
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as err:  # noqa: BLE001 - any failure to write is retried
            self.last_error = err
            return False
        self.last_error = None
        return True

    @property
    def pending(self) -> int:
        return self._batches.unfinished_tasks

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued point is written; PipelineError when they are not, within
        the retry window from now (or `timeout` seconds)."""
        wait_s = self.window_s if timeout is None else timeout
        deadline = time.monotonic() + wait_s
        while self.pending:
            if time.monotonic() > deadline:
                error = self.last_error
                reason = str(error).splitlines()[0].rstrip(".") if error else "no answer"
                raise PipelineError(
                    f"the tracking server {mlflow.get_tracking_uri()} did not take this run's "
                    f"metrics ({self.pending} epoch(s) pending) within {wait_s:.0f} s: "
                    f"{reason}. When it is back, resume the run with resume_run_id="
                    f"{self.run_id}; its checkpoint is kept on this machine"
                )
            time.sleep(0.05)

    def close(self) -> None:
        self._batches.put(None)

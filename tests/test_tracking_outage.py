"""The tracking server goes away mid-training, or stops answering: a real `mlflow server` on
127.0.0.1, started once for the module, reached through a relay of the test's own that can cut
every connection (the server is gone: connections refused) or hold them (it hangs: accepted,
never answered) and put them back at once. Training must not wait for the server, no metric
point may be lost, and a stop signal must not wait for MLflow's HTTP timeouts.

A relay rather than stopping and restarting the server: what the stage sees is the same (a
refused or a silent connection), and each restart cost the module seconds of server start-up."""

from __future__ import annotations

import re
import signal
import socket
import sys
import threading
import time

import mlflow
import pytest
from conftest import subprocess_env
from mlflow import MlflowClient
from test_interrupts import LONG, Stage

from pipeline import cli
from pipeline.runs.tracking_access import HTTP_DEFAULTS
from pipeline.server.tracking_server import TrackingServer, free_port

# The run the server leaves for good: still training when it goes (after epoch 3).
EPOCHS = 8
# MLflow's HTTP retries as the pipeline sets them (tracking_access.HTTP_DEFAULTS), without
# the random jitter MLflow adds: a request to a server that is gone gives up after pauses of
# 0, 2 and 4 s. A tracking call on the training thread would hold an epoch up that long.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
ONE_REQUEST_GIVING_UP_S = 6
# Training's own time between two epochs (writing down the record, handing over the
# checkpoint) is milliseconds; generous, and well below what one tracking call would take.
MAX_WAIT_BETWEEN_EPOCHS_S = 3
EPOCH_LINE = re.compile(r"^epoch +(\d+)/\d+ .* ([0-9.]+)s$")


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """`mlflow server` on SQLite with proxied artifacts, started once for this module (each
    test has an experiment of its own on it, and a relay of its own in front of it)."""
    root = tmp_path_factory.mktemp("outage-server")
    tracking = TrackingServer(root, f"sqlite:///{root / 'mlflow.db'}")
    tracking.start()
    yield tracking
    tracking.stop()


@pytest.fixture(scope="module")
def sample_run_id(module_server, shared_tiny_mnist) -> str:
    """One sample_data run on the module's server that every training here takes its images
    from (drawing one in each stage process cost seconds of it)."""
    from pipeline.parameters import stage_params
    from pipeline.stages import sample_data

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(module_server.uri)
    try:
        mlflow.set_experiment("outage-sample")
        return sample_data.run(stage_params("sample_data", {
            "data_dir": str(shared_tiny_mnist.root), "samples_per_class": 12,
            "download": False}))
    finally:
        mlflow.set_tracking_uri(previous)


class Relay:
    """The stage's way to the server: a TCP relay on a port of its own. `cut()`: the server is
    gone (open connections closed, new ones refused); `hang()`: it stops answering (bytes are
    held, new connections accepted); `restore()`: back, on the same port."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._held = threading.Event()  # set while hung
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._listen()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._sockets = self._sockets, []
        for sock in [listener, *connections]:
            if sock is not None:
                _close(sock)

    def hang(self) -> None:
        self._held.set()

    def restore(self) -> None:
        self._held.clear()
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.cut()
        self._held.clear()  # held pumps go on to find their sockets closed, and end

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)  # the accept loop notices a cut
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _close(client), _close(server)
                    return
                self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self._held.is_set():  # hung: nothing goes through, nothing is lost
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass
        _close(source), _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def server(module_server):
    """The module's server, behind a relay of this test's own (`relay.uri` for the stage,
    `server.uri` for the test's own checks)."""
    relay = Relay(module_server.port)
    yield module_server, relay
    relay.close()


class TimedStage(Stage):
    """A Stage that also notes when each of its lines arrived."""

    def __init__(self, command: list[str], env: dict):
        self.arrived: list[float] = []
        super().__init__(command, env)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.arrived.append(time.monotonic())
            self.lines.append(line.rstrip("\n"))

    def epochs(self) -> list[tuple[int, float, float]]:
        """(epoch, when its line arrived, its own epoch_time_s) for each epoch line so far."""
        found = []
        for line, arrived in zip(list(self.lines), self.arrived):
            match = EPOCH_LINE.match(line)
            if match:
                found.append((int(match[1]), arrived, float(match[2])))
        return found


def train_args(data_run_id: str, experiment: str, epochs: int | str = EPOCHS) -> list[str]:
    return ["train", "--experiment", experiment, "--config", "mlp4", "--epochs", str(epochs),
            "--batch_size", "2", "--device", "cpu", "--log_model", "false",
            "--data_run_id", data_run_id]


def train_command(data_run_id: str, experiment: str, epochs: int | str = EPOCHS) -> list[str]:
    return [sys.executable, "-m", "pipeline", *train_args(data_run_id, experiment, epochs)]


def relay_env(tracking_store, relay: Relay, **extra: str) -> dict:
    # Training on one thread leaves the other core to the server (which on a team sits on
    # another machine): the test is about waiting for the server, not sharing two cores with it.
    return {**subprocess_env(tracking_store), "MLFLOW_TRACKING_URI": relay.uri,
            "OMP_NUM_THREADS": "1", **extra}


def only_train_run(server: TrackingServer, experiment: str):
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("pipeline.stage") == "train"]
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.integration
def test_no_epoch_waits_for_a_server_that_is_down_and_no_point_is_lost(
    tracking_store, sample_run_id, server
):
    server, relay = server
    epochs = 30  # seconds of them go on through the outage
    # Every tracking call of a training meets the outage: metric points, a checkpoint upload
    # each second, system metrics each second.
    env = relay_env(tracking_store, relay, **HTTP_RETRIES, PIPELINE_CHECKPOINT_UPLOAD_S="1",
                    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    stage = TimedStage(train_command(sample_run_id, "outage", epochs), env)
    try:
        stage.wait_for("epoch   5/")
        relay.cut()
        cut, before = time.monotonic(), len(stage.epochs())
        # Down until a tracking call has had the time to give up once, and epochs went on
        # meanwhile: whatever would wait for the server has had its chance to.
        while (time.monotonic() - cut < ONE_REQUEST_GIVING_UP_S + 2
               or len(stage.epochs()) - before < 3):
            assert stage.process.poll() is None, "\n".join(stage.lines[-20:])
            time.sleep(0.1)
        relay.restore()
        assert stage.process.wait(timeout=600) == 0, "\n".join(stage.lines[-20:])
    finally:
        stage.stop()

    # Between two epoch lines: the training thread's own time (the later epoch's epoch_time_s,
    # which a busy machine stretches) and anything else it did, such as waiting for the server.
    timeline = stage.epochs()
    waited = {epoch: round(arrived - prior - epoch_time, 2)
              for (_, prior, _), (epoch, arrived, epoch_time) in zip(timeline, timeline[1:])}
    slowest = sorted(waited.items(), key=lambda item: -item[1])[:3]
    assert slowest[0][1] < MAX_WAIT_BETWEEN_EPOCHS_S, (
        f"the training thread waited between epochs (epoch, s): {slowest}")
    client, run = only_train_run(server, "outage")
    assert run.info.status == "FINISHED"
    for metric in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == list(range(1, epochs + 1)), metric
    assert "checkpoints/checkpoint.pt" in {
        a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}


@pytest.mark.integration
def test_a_server_gone_for_good_fails_the_run_in_one_line_and_resume_finishes_it(
    tracking_store, sample_run_id, server, monkeypatch, capsys
):
    server, relay = server
    env = relay_env(tracking_store, relay, PIPELINE_TRACKING_RETRY_S="1",
                    MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    stage = Stage(train_command(sample_run_id, "gone"), env)
    try:
        stage.wait_for("epoch   3/")
        relay.cut()
        assert stage.process.wait(timeout=300) == 2
    finally:
        stage.stop()
    errors = [line for line in stage.lines if line.startswith("error:")]
    assert len(errors) == 1 and relay.uri in errors[0]
    assert "resume the run with resume_run_id=" in errors[0]
    assert not any("Traceback" in line for line in stage.lines)

    client, run = only_train_run(server, "gone")
    assert run.info.status == "RUNNING"  # the server could not be told otherwise
    # The resume in this process, as the user's shell would run it once the server is back
    # (a stage's own process is proven above and in test_resume.py).
    relay.restore()
    for name, value in HTTP_DEFAULTS.items():  # what cli.main sets stays in this test
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", relay.uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(relay.uri)
    try:
        code = cli.main([*train_args(sample_run_id, "gone"),
                         "--resume_run_id", run.info.run_id])
    finally:
        mlflow.set_tracking_uri(previous)
    assert code == 0, capsys.readouterr().err[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))


@pytest.mark.integration
def test_a_stop_signal_ends_the_stage_within_seconds_against_a_hung_server(
    tracking_store, sample_run_id, server
):
    """The server stops answering (connections are accepted, nothing comes back), then
    SIGTERM: what the stage writes on its way out waits seconds, not MLflow's HTTP timeouts
    and retries (2 minutes a try), and the checkpoint stays here for a resume."""
    server, relay = server
    stage = Stage(train_command(sample_run_id, "hung", LONG), relay_env(
        tracking_store, relay))
    try:
        stage.wait_for("epoch   3/")
        relay.hang()
        code, seconds = stage.signal(signal.SIGTERM, timeout=120)
    finally:
        relay.restore()
        stage.stop()
    assert code == 143, "\n".join(stage.lines[-20:])
    assert seconds < 30, f"{seconds:.0f} s from SIGTERM to exit"
    assert stage.lines[-1].startswith("interrupted by SIGTERM: train run ")
    assert "the tracking server did not answer, so it still shows RUNNING" in stage.lines[-1]
    assert "--resume_run_id" in stage.lines[-1]
    assert any("kept at" in line for line in stage.lines), "\n".join(stage.lines[-20:])

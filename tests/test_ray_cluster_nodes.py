"""The study on a Ray cluster of two nodes (head + worker, one CPU each, built on this machine
with ray.cluster_utils.Cluster the way Ray's own tests build one), tracking through a real
`mlflow server` with proxied artifacts and logins.

Each node has its own PIPELINE_CACHE_DIR, so nothing passes between nodes except through the
tracking server: trainings spread over both nodes and agree with the local executor, a stopped
driver ends every run KILLED, a training whose node is lost resumes on the other node from
the checkpoint in the artifact store, and a lost head ends the study with every run KILLED, the
interrupted training resumable there. The server keeps its runs in SQLite rather than
PostgreSQL (tests/test_team_server.py covers that); the login reaches the workers only as a
task argument (the raylets are started without it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psutil
import pytest
from conftest import Experiment, runs_in, subprocess_env
from mlflow import MlflowClient
from test_interrupts import Stage
from test_ray_executor import (_wait_for_line,
                               assert_as_an_undisturbed_training,
                               assert_secrets_nowhere, stages_table, study_params,
                               train_runs, write_study)

from pipeline.runs import checkpoint_store, tracking
from pipeline.scale import ray_cluster
from pipeline.server.tracking_server import TrackingServer
from pipeline.stages import main

pytestmark = pytest.mark.integration

NODE_TAG = "pipeline.ray_node"
# The server's admin, the one login of these tests; a password to find if it leaks anywhere.
LOGIN = ("admin", f"password-{uuid.uuid4().hex}")
STUDY_TIMEOUT_S = 900  # two fresh nodes start their first workers in 20-45 s each on 2 cores


@dataclass(frozen=True)
class RayNodes:
    cluster: object  # ray.cluster_utils.Cluster
    head: object  # ray._private.node.Node
    worker: object
    caches: dict[str, Path]  # node name -> its PIPELINE_CACHE_DIR

    @property
    def address(self) -> str:
        return self.cluster.address


class StartingServer:
    """The tracking server, started in a thread of its own: its start (database migrations,
    the auth app) takes 10-20 s and overlaps with the Ray nodes' start."""

    def __init__(self, root: Path):
        self.server = TrackingServer(root / "server", f"sqlite:///{root / 'mlflow.db'}",
                                     auth=True, env={"MLFLOW_AUTH_ADMIN_PASSWORD": LOGIN[1]})
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._start, daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self.server.start()
        except BaseException as err:  # noqa: BLE001 - raised by ready() in the test's thread
            self._failure.append(err)

    def ready(self) -> TrackingServer:
        self._thread.join()
        if self._failure:
            raise self._failure[0]
        return self.server

    def stop(self) -> None:
        self._thread.join()
        self.server.stop()


@pytest.fixture(scope="module")
def starting_server(tmp_path_factory):
    starting = StartingServer(tmp_path_factory.mktemp("tracking-server"))
    try:
        yield starting
    finally:
        starting.stop()


@pytest.fixture(scope="module")
def ray_nodes(starting_server, tmp_path_factory):
    """Head and one worker node, one CPU each, each with a cache folder of its own (the
    raylet's environment, which its workers inherit); shut down at the end, on failure too.
    The tracking server starts meanwhile."""
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("ray-nodes")
    caches = {name: root / f"cache-{name}" for name in ("head", "worker")}
    cluster = Cluster()
    try:
        head = cluster.add_node(num_cpus=1, include_dashboard=False,
                                env_vars={"PIPELINE_CACHE_DIR": str(caches["head"])})
        worker = cluster.add_node(num_cpus=1,
                                  env_vars={"PIPELINE_CACHE_DIR": str(caches["worker"])})
        cluster.wait_for_nodes()
        yield RayNodes(cluster, head, worker, caches)
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def server(starting_server):
    return starting_server.ready()


@pytest.fixture
def on_server(server, tracking_store, monkeypatch, request):
    """This process logs to the server, into a new experiment of this test's (artifacts
    proxied by the server); the temporary SQLite store again afterwards."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", LOGIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", LOGIN[1])
    mlflow.set_tracking_uri(server.uri)
    name = f"nodes-{request.node.name[:40]}-{os.getpid()}"
    try:
        yield Experiment(mlflow.set_experiment(name).experiment_id, name)
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(tracking_store.uri)


def driver(tracking_store, server, ray_nodes, experiment, study: str, data: Path,
           cache: Path) -> Stage:
    """`python -m pipeline main --executor ray --ray_address <the cluster>`, as a user on the
    head would send it (ray_address=auto finds the same address there), with a cache of its
    own, a checkpoint upload after every epoch, and a head taken for lost after 3 s of
    silence rather than 10."""
    env = {**subprocess_env(tracking_store), "MLFLOW_TRACKING_URI": server.uri,
           "PIPELINE_CACHE_DIR": str(cache), "PIPELINE_CHECKPOINT_UPLOAD_S": "0",
           ray_cluster.HEAD_LOST_ENV: "3",
           "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_USERNAME": LOGIN[0],
           "MLFLOW_TRACKING_PASSWORD": LOGIN[1]}
    return Stage([sys.executable, "-m", "pipeline", "main", "--experiment", experiment.name,
                  "--study", study, "--data_dir", str(data), "--executor", "ray",
                  "--ray_address", ray_nodes.address], env)


def finished(stage: Stage, timeout: float = STUDY_TIMEOUT_S) -> int:
    try:
        code = stage.process.wait(timeout=timeout)
    finally:
        stage.stop()
    stage._reader.join(timeout=5)
    return code


def node_ids(ray_nodes: RayNodes) -> dict[str, str]:
    return {"head": ray_nodes.head.node_id, "worker": ray_nodes.worker.node_id}


def test_the_task_environment_leaves_each_node_its_own_cache(monkeypatch):
    """PIPELINE_CACHE_DIR names a folder on the driver's machine; a node keeps its own."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", "/only/on/the/driver")
    assert "PIPELINE_CACHE_DIR" not in ray_cluster.worker_env("1", 1)


def test_sigterm_on_the_driver_ends_every_run_on_every_node_killed(
        ray_nodes, server, on_server, tracking_store, shared_tiny_mnist, tmp_path):
    experiment = on_server
    study = write_study(tmp_path, "stopped", ["mlp4"], [0, 1], epochs=200, batch_size=2)
    stage = driver(tracking_store, server, ray_nodes, experiment, study, shared_tiny_mnist.root,
                   tmp_path / "driver-cache")
    try:
        for seed in (0, 1):
            _wait_for_line(stage, f"(train-mlp4-seed{seed} pid=", "epoch   1/200")
        code, _ = stage.signal(signal.SIGTERM, timeout=120)
    finally:
        stage.stop()
    assert code == 143, "\n".join(stage.lines[-30:])
    statuses = {r.info.run_name: r.info.status for r in runs_in(experiment)}
    assert statuses == {"main-stopped": "KILLED", "sample_data-first12": "FINISHED",
                        "train-mlp4-seed0": "KILLED", "train-mlp4-seed1": "KILLED"}
    trains = runs_in(experiment, "train")
    assert {r.data.tags.get(NODE_TAG) for r in trains} == set(node_ids(ray_nodes).values())
    for run in trains:
        assert tracking.INTERRUPTED_TAG in run.data.tags
        # Resumable by the same command from any node: its checkpoint is in the artifacts.
        assert checkpoint_store.ARTIFACT_PATH in {
            a.path for a in MlflowClient().list_artifacts(run.info.run_id,
                                                          checkpoint_store.ARTIFACT_DIR)}
    # The tasks stopped with their runs: no epoch is logged after the stop.
    epochs = {r.info.run_id: len(MlflowClient().get_metric_history(r.info.run_id, "train_loss"))
              for r in trains}
    time.sleep(5)
    assert epochs == {r.info.run_id: len(MlflowClient().get_metric_history(r.info.run_id,
                                                                           "train_loss"))
                      for r in trains}


def test_a_study_spreads_over_the_nodes_resumes_a_lost_nodes_training_and_agrees_with_local(
        ray_nodes, server, on_server, tracking_store, shared_tiny_mnist, tmp_path):
    """The worker node does not come back (the next test has the head alone). One training per
    node; the worker node is lost once its training's checkpoint is in the artifact store, and
    that training resumes on the head from there. The study ends as if nothing had happened:
    the local executor finds every stage done, and each training equals an undisturbed one in
    this process."""
    experiment = on_server
    # Enough epochs that the worker node's training is still running once its first
    # checkpoint is uploaded (an epoch takes 0.3-1 s there).
    epochs = 8
    study = write_study(tmp_path, "lost", ["mlp4"], [0, 1], epochs=epochs, batch_size=2)
    stage = driver(tracking_store, server, ray_nodes, experiment, study, shared_tiny_mnist.root,
                   tmp_path / "driver-cache")
    ids = node_ids(ray_nodes)
    try:
        victim = _training_past_its_first_checkpoint(experiment, ray_nodes, stage, "worker")
        worker_pid = int(victim.data.tags["pipeline.ray_worker"].rsplit(" ", 1)[1])
        logged = len(MlflowClient().get_metric_history(victim.info.run_id, "train_loss"))
        # What the lost node's disk held, before it goes: no login (the raylets never had it).
        assert_secrets_nowhere((LOGIN[1],), [ray_nodes.caches["worker"]], "", [])
        ray_nodes.cluster.remove_node(ray_nodes.worker, allow_graceful=False)
        # A lost machine takes every process on it along, and its disk.
        if psutil.pid_exists(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
        shutil.rmtree(ray_nodes.caches["worker"])
        code = finished(stage)
    finally:
        stage.stop()
    assert code == 0, "\n".join(stage.lines[-40:])

    [parent] = runs_in(experiment, "main")
    label = victim.info.run_name
    assert label in parent.data.tags["pipeline.resumed_stages"].split(",")
    assert stages_table(parent.info.run_id).set_index("label").loc[label, "resumed"]
    assert {r.info.status for r in runs_in(experiment)} == {"FINISHED"}
    on_nodes = train_runs(experiment, parent.info.run_id)
    assert sorted(on_nodes) == ["train-mlp4-seed0", "train-mlp4-seed1"]
    resumed = on_nodes[label]
    assert resumed.info.run_id == victim.info.run_id
    assert resumed.data.tags[NODE_TAG] == ids["head"]
    [other] = [run for name, run in on_nodes.items() if name != label]
    assert {victim.data.tags[NODE_TAG], other.data.tags[NODE_TAG]} == set(ids.values()), \
        "the trainings did not run on both nodes"
    [resuming] = [line for line in stage.lines
                  if f"resuming mlp4 run {victim.info.run_id} after epoch" in line]
    assert f"({checkpoint_store.ARTIFACT_PATH} of run {victim.info.run_id})" in resuming
    print(f"\n{label} (run {victim.info.run_id}) lost with node {ids['worker'][:12]} after "
          f"{logged} epoch(s) logged; retried on node {ids['head'][:12]}: {resuming}")
    sessions = {Path(node.get_session_dir_path()) for node in (ray_nodes.head, ray_nodes.worker)}
    assert all(any((session / "logs").glob("runtime_env_agent*")) for session in sessions)
    assert_secrets_nowhere((LOGIN[1],), [*sessions, ray_nodes.caches["head"]],
                           "\n".join(stage.lines), runs_in(experiment))

    # A later local study finds every stage done: the cache keys are the same, and its
    # trainings are the cluster's runs.
    local_reuse = stages_table(main.run(study_params(study, shared_tiny_mnist.root,
                                                     workers="1")))
    assert local_reuse.reused.all()
    assert set(local_reuse[local_reuse.stage == "train"].run_id) == \
        {run.info.run_id for run in on_nodes.values()}
    # Each training, the resumed one too, as the same training undisturbed in this process.
    for run in on_nodes.values():
        assert_as_an_undisturbed_training(run, epochs)


def _training_past_its_first_checkpoint(experiment, ray_nodes: RayNodes, stage: Stage,
                                        node: str):
    """The train run on `node` (head or worker) once its checkpoint is in the artifact store
    (and, until then, only in that node's own cache)."""
    client = MlflowClient()
    node_id = node_ids(ray_nodes)[node]
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    while time.monotonic() < deadline and stage.process.poll() is None:
        for run in runs_in(experiment, "train"):
            if run.info.status != "RUNNING" or run.data.tags.get(NODE_TAG) != node_id:
                continue
            local = checkpoint_store.local_dir(run.info.run_id).relative_to(
                checkpoint_store.cache_root())
            on_its_node = (ray_nodes.caches[node] / local / checkpoint_store.FILE_NAME)
            uploaded = {a.path for a in client.list_artifacts(run.info.run_id,
                                                               checkpoint_store.ARTIFACT_DIR)}
            if on_its_node.is_file() and checkpoint_store.ARTIFACT_PATH in uploaded:
                return run
        time.sleep(0.2)
    pytest.fail(f"no training on the {node} node had its first checkpoint in its node's cache "
                "and the artifact store while it ran:\n" + "\n".join(stage.lines[-30:]))


def test_a_lost_head_ends_every_run_killed_and_the_same_study_resumes_the_lost_training(
        ray_nodes, server, on_server, tracking_store, shared_tiny_mnist, tmp_path):
    """Runs last: the head goes, and the cluster with it. Two trainings on the head's one CPU:
    the first is lost past its first checkpoint, the second never starts. The driver does not
    wait out Ray's minute of GCS retries: it ends every run, says which training resumes, and
    exits with its own code; the same study then resumes the lost training, here, to the
    values of an undisturbed one."""
    from ray._private import ray_constants

    experiment = on_server
    if ray_nodes.worker in ray_nodes.cluster.worker_nodes:  # this test alone: the head only
        ray_nodes.cluster.remove_node(ray_nodes.worker, allow_graceful=False)
    epochs = 8
    study = write_study(tmp_path, "headless", ["mlp4"], [0, 1], epochs=epochs, batch_size=2)
    stage = driver(tracking_store, server, ray_nodes, experiment, study, shared_tiny_mnist.root,
                   tmp_path / "driver-cache")
    head = ray_nodes.head.node_id
    try:
        victim = _training_past_its_first_checkpoint(experiment, ray_nodes, stage, "head")
        raylet = ray_nodes.head.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
        on_the_head = psutil.Process(raylet.pid).children(recursive=True)
        lost_at = time.monotonic()
        ray_nodes.cluster.remove_node(ray_nodes.head, allow_graceful=False)
        # A lost machine takes its Ray workers along (the training among them).
        for process in on_the_head:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        code = finished(stage)
        exited_after = time.monotonic() - lost_at
    finally:
        stage.stop()
    assert code == ray_cluster.HEAD_LOST_EXIT_CODE, "\n".join(stage.lines[-40:])

    lost, [unstarted] = victim.info.run_name, {"train-mlp4-seed0", "train-mlp4-seed1"} - {
        victim.info.run_name}
    [message] = [line for line in stage.lines
                 if line.startswith(f"interrupted by the loss of the Ray head node {head[:12]}")]
    assert f"{lost} (run {victim.info.run_id}): KILLED, resumable from its checkpoint" in message
    assert f"{unstarted}: never started" in message
    assert message.endswith("run the same command again: finished stages are reused and an "
                            "interrupted training resumes from its last checkpoint")
    assert "has not answered for 3 s)" in message
    print(f"\ndriver exited {code} {exited_after:.1f} s after the head was lost: {message}")
    [parent] = runs_in(experiment, "main")
    assert {r.info.run_name: r.info.status for r in runs_in(experiment)} == {
        "main-headless": "KILLED", "sample_data-first12": "FINISHED", lost: "KILLED"}
    assert head[:12] in parent.data.tags[tracking.INTERRUPTED_TAG]
    [killed] = runs_in(experiment, "train")
    assert "head node was lost" in killed.data.tags[tracking.INTERRUPTED_TAG]
    assert checkpoint_store.ARTIFACT_PATH in {
        a.path for a in MlflowClient().list_artifacts(killed.info.run_id,
                                                      checkpoint_store.ARTIFACT_DIR)}

    # The same study again (here, without the cluster): the lost training resumes from the
    # artifact store, to the values of an undisturbed training; the other trains afresh.
    again = main.run(study_params(study, shared_tiny_mnist.root, workers="1"))
    assert mlflow.get_run(again).data.tags["pipeline.resumed_stages"] == lost
    table = stages_table(again).set_index("label")
    assert table.loc[lost, "run_id"] == victim.info.run_id and table.loc[lost, "resumed"]
    assert not table.loc[unstarted, "resumed"] and not table.loc[unstarted, "reused"]
    assert_as_an_undisturbed_training(MlflowClient().get_run(victim.info.run_id), epochs)

"""What runs on a Ray worker: one stage of the study, as `python -m pipeline <stage>` would run
it, under the study's main run. Imported by the worker, so it imports nothing heavy itself.

A worker serves task after task, of one study and the next (ray_cluster.pool_env): each task
brings its study's tracking URI, experiment and login as arguments, and leaves the worker as
it found it. What a training depends on is set by the training itself (torch's threads and
seed, train.run) and each run is ended by its stage (tracking.stage_run), so a reused worker
trains as a fresh one does.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

# `mlflow run` sets these for the driver; a local Ray's workers inherit them, and a worker
# that kept them would log into the launcher's run instead of starting its own.
DRIVER_ONLY_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")
NODE_TAG = "pipeline.ray_node"  # the Ray node id
NODE_IP_TAG = "pipeline.ray_node_ip"


@contextmanager
def _for_the_study(study: dict, credentials: dict) -> Iterator[None]:
    """The study's environment (ray_cluster.study_env) and login in os.environ for one task,
    and MLflow pointed at its tracking URI and experiment; the worker's own environment again
    afterwards."""
    for name in DRIVER_ONLY_ENV:
        os.environ.pop(name, None)
    import mlflow

    from pipeline.runs import tracking_access

    with tracking_access.environment_set({**study, **credentials}):
        # MLflow keeps, in the process, the URI and the experiment it was last given: a
        # worker that served another study still holds that study's.
        mlflow.set_tracking_uri(study["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment(experiment_id=study["MLFLOW_EXPERIMENT_ID"])
        yield


def machine_numerics(device: str) -> dict:
    """What `device` resolves to on this worker, with this task's resources (`auto` takes a
    GPU only where Ray gave the task one), and machine.numerics as a training there sees it."""
    from pipeline.cache.machine import numerics, resolve_device

    resolved = resolve_device(device)
    return {"device": resolved, "numerics": numerics(resolved)}


def warm_up() -> int:
    """Load what a training and an evaluation wait on at first (worker_warmup: torch, MLflow,
    their stages, the store's modules, torch.export), so that the worker that ran this has paid
    its start-up before the study's first task arrives; its PID."""
    import pipeline.scale.worker_warmup  # noqa: F401

    return os.getpid()


def run_stage(stage: str, params: dict, parent_run_id: str, study: dict,
              credentials: dict) -> dict:
    """Run `stage` with `params` nested under `parent_run_id`, logging where `study` says
    (ray_cluster.study_env) with the driver's tracking `credentials`; the outcome, never an
    exception, so the driver can wait for every task and then report each failed run by name.

    A retry of this task (Ray starts one when a worker dies) finds the run the dead attempt
    left RUNNING by the task id and continues it from its checkpoint.
    """
    with _for_the_study(study, credentials):
        return _run_stage(stage, params, parent_run_id)


def _run_stage(stage: str, params: dict, parent_run_id: str) -> dict:
    import ray

    from pipeline.errors import PipelineError
    from pipeline.runs import tracking
    from pipeline.runs.checkpoint_store import has_checkpoint
    from pipeline.scale import ray_cluster
    from pipeline.scale.nested_stage import run_nested

    started = time.perf_counter()
    context = ray.get_runtime_context()
    task_id = context.get_task_id()
    node_id = context.get_node_id()
    # Which node ran (or, after a retry, resumed) the run: on a cluster, where to look for
    # its worker's log, and which runs a lost node took with it.
    tags = {tracking.TASK_TAG: task_id, NODE_TAG: node_id,
            NODE_IP_TAG: ray.util.get_node_ip_address(),
            "pipeline.ray_worker": f"{node_id[:12]} pid {os.getpid()}"}
    earlier = next((run for run in tracking.find_runs_tagged(tracking.TASK_TAG, task_id)
                    if run.info.status != "FINISHED"), None)
    resumed = ""
    try:
        resumable = earlier is not None and stage == "train" and has_checkpoint(
            earlier.info.run_id)
    except PipelineError as err:  # unknown: neither resumed nor started over; the driver says so
        return {"run_id": earlier.info.run_id, "error": str(err), "interrupted": False,
                "resumed": "", "seconds": round(time.perf_counter() - started, 2)}
    # A retry may land on a node whose numerics differ; train refuses to resume there.
    other = _other_numerics(earlier, params) if resumable else ""
    if resumable and not other:
        resumed = earlier.info.run_id
        params = {**params, "resume_run_id": resumed}
        print(f"worker lost: resuming run {resumed} from its last checkpoint", flush=True)
    elif resumable:
        ray_cluster.end_orphaned_runs([earlier.info.run_id], "FAILED",
                                      f"its Ray worker died; the retry ran where the numerics "
                                      f"differ ({other}), as a new run")
    elif earlier is not None:
        # A worker that died before the first checkpoint: nothing to go on from.
        ray_cluster.end_orphaned_runs([earlier.info.run_id], "FAILED",
                                      "its Ray worker died before the first checkpoint; the "
                                      "task was retried as a new run")
    outcome = {**run_nested(stage, params, parent_run_id, tags), "resumed": resumed}
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    return outcome


def _other_numerics(run, params: dict) -> str:
    """How the machine `run` was trained on differs from this worker's ('' when it does not)."""
    from pipeline.cache.machine import resolve_device
    from pipeline.runs.resume import numerics_differences

    return "; ".join(numerics_differences(run.data.params, resolve_device(params["device"])))


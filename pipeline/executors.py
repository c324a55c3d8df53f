"""Where a study's trainings and evaluations run: one after another in this process (`local`),
or side by side as Ray tasks (`ray`), on this machine or on a cluster.

Either way each job is the same stage code with the same parameters, nested under the study's
main run, so the runs, their names, tags, params, metrics, artifacts and cache keys are the
same; only the torch threads differ (a Ray task gets `cpus_per_trial`, and its cache key says
so, as numerics the worker itself reports).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlflow

from pipeline import interrupts, ray_cluster, tracking
from pipeline.errors import PipelineError
from pipeline.stages import STAGES

EXECUTORS = ("local", "ray")
# After a stop signal, tasks get this long to end their runs KILLED before they are killed.
CANCEL_GRACE_S = 20.0


@dataclass
class Job:
    stage: str
    label: str  # the run's name; on Ray also the task's, which prefixes its output lines
    params: dict


@dataclass
class Outcome:
    job: Job
    run_id: str | None
    seconds: float
    resumed: str = ""
    error: str | None = None


@dataclass
class LocalExecutor:
    """Today's path: each job in this process, in order; the first failure stops the study."""

    name: str = "local"

    def machine(self, device: str) -> dict | None:
        return None  # this process's own (machine.numerics)

    def run(self, jobs: list[Job], parent_run_id: str) -> list[Outcome]:
        outcomes = []
        for job in jobs:
            started = time.perf_counter()
            if not job.params.get("resume_run_id"):
                print(f"[main] {job.label}: running")
            run_id = STAGES[job.stage](job.params)
            outcomes.append(Outcome(job, run_id, round(time.perf_counter() - started, 2),
                                    job.params.get("resume_run_id", "")))
        return outcomes


@dataclass
class RayExecutor:
    """Each job a Ray task with `cpus` CPUs (its torch threads) and `gpus` GPUs (a fraction
    packs several small models on one GPU). Ray retries a task whose worker died; the retry
    continues the same run from its checkpoint (ray_tasks.run_stage)."""

    experiment_id: str
    cpus: int = 1
    gpus: float = 0.0
    name: str = "ray"
    _numerics: dict = field(default_factory=dict)

    def __post_init__(self):
        ray_cluster.check_resources(self.cpus, self.gpus)

    def _options(self) -> dict:
        return {"num_cpus": self.cpus, "num_gpus": self.gpus,
                "runtime_env": {"env_vars": ray_cluster.worker_env(self.experiment_id, self.cpus)}}

    def machine(self, device: str) -> dict:
        """The numerics a training gets on a worker with this allotment: its cache key's."""
        if device not in self._numerics:
            import ray

            from pipeline import ray_tasks

            task = ray.remote(ray_tasks.machine_numerics).options(name="machine", **self._options())
            self._numerics[device] = _wait_all([task.remote(device)])[0]
        return self._numerics[device]

    def run(self, jobs: list[Job], parent_run_id: str) -> list[Outcome]:
        if not jobs:
            return []
        import ray

        from pipeline import ray_tasks

        task = ray.remote(ray_tasks.run_stage)
        refs = []
        for job in jobs:
            print(f"[main] {job.label}: sent to Ray ({self.cpus} CPU, {self.gpus:g} GPU)")
            refs.append(task.options(name=job.label, max_retries=3, retry_exceptions=False,
                                     **self._options())
                        .remote(job.stage, job.params, parent_run_id))
        try:
            results = _wait_all(refs)
        except interrupts.Interrupted:
            _cancel(refs, parent_run_id)
            raise
        return [Outcome(job, r["run_id"], r["seconds"], r["resumed"] or
                        job.params.get("resume_run_id", ""), r["error"])
                for job, r in zip(jobs, results)]


def _wait_all(refs: list) -> list:
    """Every task's result, waiting in short steps so a stop signal is seen within a second."""
    import ray

    pending = list(refs)
    while pending:
        # Not inside Ray's C++ wait: an exception raised there comes out as a SystemError.
        with interrupts.deferred():
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
    return ray.get(refs)


def _cancel(refs: list, parent_run_id: str) -> None:
    """Stop every task: SIGINT first, which ends its run KILLED; then, after the grace time,
    the worker; any run still RUNNING then is ended KILLED here."""
    import ray

    for ref in refs:
        ray.cancel(ref, force=False)
    deadline = time.monotonic() + CANCEL_GRACE_S
    pending = list(refs)
    with interrupts.deferred():
        while pending and time.monotonic() < deadline:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        for ref in pending:
            ray.cancel(ref, force=True)
        client = mlflow.MlflowClient()
        for run in mlflow.search_runs(
                filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                              f"and attributes.status = 'RUNNING'", output_format="list"):
            client.set_tag(run.info.run_id, tracking.INTERRUPTED_TAG,
                           "the study was stopped while its Ray task ran")
            client.set_terminated(run.info.run_id, "KILLED")


def make_executor(params: dict, experiment_id: str):
    kind = params["executor"]
    if kind not in EXECUTORS:
        raise PipelineError(f"executor={kind!r}: use local (one training after another in this "
                            f"process) or ray (side by side on Ray)")
    if kind == "local":
        return LocalExecutor()
    return RayExecutor(experiment_id, params["cpus_per_trial"], params["gpus_per_trial"])


def report_failures(outcomes: list[Outcome]) -> None:
    """After every job has ended: one line naming each failed run, or nothing."""
    failed = [o for o in outcomes if o.error]
    if not failed:
        return
    named = "; ".join(f"{o.job.label} (run {o.run_id or 'never started'}): {o.error}"
                      for o in failed)
    raise PipelineError(f"{len(failed)} of {len(outcomes)} {failed[0].job.stage} run(s) failed: "
                        f"{named}; fix the cause and run the same command again (finished runs "
                        f"are reused)")

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

from pipeline import interrupts
from pipeline.errors import PipelineError
from pipeline.runs import tracking
from pipeline.scale import ray_cluster
from pipeline.stage_index import STAGES

EXECUTORS = ("local", "ray")
# After a stop signal, tasks get this long to end their runs KILLED before they are killed.
CANCEL_GRACE_S = 20.0
# Attempts after the first when a task's worker dies (killed, out of memory, node lost).
TASK_RETRIES = 3


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
    continues the same run from its checkpoint (ray_tasks.run_stage). When Ray gives up on a
    task, its job still ends with an outcome (and its run FAILED), like any failed job."""

    experiment_id: str
    cpus: int = 1
    gpus: float = 0.0
    name: str = "ray"
    _numerics: dict = field(default_factory=dict)

    def __post_init__(self):
        ray_cluster.check_resources(self.cpus, self.gpus)

    def _options(self) -> dict:
        return ray_cluster.task_options(self.cpus, self.gpus)

    def machine(self, device: str) -> dict:
        """The device `device` resolves to on a worker with this allotment, and the numerics a
        training gets there: what its cache key holds (ray_tasks.machine_numerics)."""
        if device not in self._numerics:
            import ray

            from pipeline.scale import ray_tasks

            task = ray.remote(ray_tasks.machine_numerics).options(name="machine", **self._options())
            [answer] = _wait_all([task.remote(device)])
            if isinstance(answer, BaseException):
                raise PipelineError(f"device={device}: the Ray worker could not report its "
                                    f"device and numerics ({_one_line(answer)})")
            self._numerics[device] = answer
        return self._numerics[device]

    def run(self, jobs: list[Job], parent_run_id: str) -> list[Outcome]:
        if not jobs:
            return []
        import ray

        from pipeline.scale import ray_tasks

        task = ray.remote(ray_tasks.run_stage)
        study, credentials = ray_cluster.study_env(self.experiment_id), ray_cluster.credentials()
        refs = []
        started = time.perf_counter()
        for job in jobs:
            print(f"[main] {job.label}: sent to Ray ({self.cpus} CPU, {self.gpus:g} GPU)")
            refs.append(task.options(name=job.label, max_retries=TASK_RETRIES,
                                     retry_exceptions=False, **self._options())
                        .remote(job.stage, job.params, parent_run_id, study, credentials))
        tasks = [_Task(job, ref.task_id().hex()) for job, ref in zip(jobs, refs)]
        try:
            results = _wait_all(refs)
        except interrupts.Interrupted:
            _cancel(refs, tasks)
            raise
        seconds = round(time.perf_counter() - started, 2)
        return [_given_up(t, r, seconds) if isinstance(r, BaseException) else
                Outcome(t.job, r["run_id"], r["seconds"], r["resumed"] or
                        t.job.params.get("resume_run_id", ""), r["error"])
                for t, r in zip(tasks, results)]


@dataclass(frozen=True)
class _Task:
    """A job sent to Ray, and the task id its run carries (tracking.TASK_TAG) on every attempt."""

    job: Job
    task_id: str

    def run_ids(self) -> list[str]:
        """The runs this task's attempts started or resumed, newest first."""
        runs = [r.info.run_id for r in tracking.find_runs_tagged(tracking.TASK_TAG, self.task_id)]
        # A resumed run is ours before the task could tag it (its parent is another main's).
        resumed = self.job.params.get("resume_run_id")
        return runs + ([resumed] if resumed and resumed not in runs else [])


def _given_up(task: _Task, error: BaseException, seconds: float) -> Outcome:
    """The outcome of a task Ray gave up on (retries spent, or it failed before its run
    started): its last attempt's run, left RUNNING by a dead worker, ends FAILED."""
    why = f"Ray gave up on its task: {_one_line(error)}"
    run_ids = task.run_ids()
    ray_cluster.end_orphaned_runs(run_ids, "FAILED", why)
    return Outcome(task.job, run_ids[0] if run_ids else None, seconds,
                   task.job.params.get("resume_run_id", ""), why)


def _one_line(error: BaseException) -> str:
    # An exception raised in the task comes wrapped, its traceback in the message.
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return tracking.error_message(cause).splitlines()[0]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _wait_all(refs: list) -> list:
    """Every task's result, or the Ray error that ended it; waiting in short steps so a stop
    signal is seen within a second."""
    import ray

    pending = list(refs)
    while pending:
        # Not inside Ray's C++ wait: an exception raised there comes out as a SystemError.
        with interrupts.deferred():
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
    results = []
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayError as err:
            results.append(err)
    return results


def _cancel(refs: list, tasks: list[_Task]) -> None:
    """Stop every task: SIGINT first, which ends its run KILLED; then, after the grace time,
    the worker; any run of these tasks still RUNNING then (a new one, or one they resumed)
    is ended KILLED here."""
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
        ray_cluster.end_orphaned_runs([run_id for task in tasks for run_id in task.run_ids()],
                                      "KILLED", "the study was stopped while its Ray task ran")


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

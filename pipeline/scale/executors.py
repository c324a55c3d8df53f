"""Where a study's trainings and evaluations run: on this machine's cores (`local`), side by
side in a pool of worker processes or one after another in this process, or side by side as
Ray tasks (`ray`), on this machine or on a cluster.

Either way each job is the same stage code with the same parameters, nested under the study's
main run, so the runs, their names, tags, params, metrics, artifacts and cache keys are the
same. A training's torch threads come from a setting (`threads` locally, `cpus_per_trial` on
Ray), never from how many jobs run at once or how many cores there are, and its cache key names
them (machine.numerics): adding a seed, or a machine with more cores, changes no result.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import psutil

from pipeline import interrupts
from pipeline.cache.machine import THREADS_ENV, numerics, resolve_device
from pipeline.errors import PipelineError
from pipeline.runs import tracking
from pipeline.runs.tracking_access import environment_set
from pipeline.scale import ray_cluster
from pipeline.scale.pool_processes import (WARM_UP, ForkServerContext,
                                           let_the_fork_server_end_with_main, local_workers)
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


def local_machine(device: str, threads: int) -> dict:
    """The device `device` resolves to here, and the numerics of a training with `threads`
    torch threads: what its cache key holds, whichever local executor runs it."""
    resolved = resolve_device(device)
    return {"device": resolved, "numerics": {**numerics(resolved), "torch_threads": threads}}


@dataclass
class LocalExecutor:
    """workers=1: each job in this process, in order, with `threads` torch threads; the first
    failure stops the study."""

    threads: int = 1
    name: str = "local"
    runs_jobs_here = True

    def machine(self, device: str) -> dict:
        return local_machine(device, self.threads)

    def start(self, jobs: int | None = None) -> None:
        pass  # nothing to start: the jobs run in this process

    def session(self):
        return nullcontext()

    def run(self, jobs: list[Job], parent_run_id: str) -> list[Outcome]:
        outcomes = []
        # train takes its threads from OMP_NUM_THREADS (machine.torch_threads), here main's.
        with environment_set({THREADS_ENV: str(self.threads)}):
            for job in jobs:
                started = time.perf_counter()
                if not job.params.get("resume_run_id"):
                    print(f"[main] {job.label}: running")
                run_id = STAGES[job.stage](job.params)
                outcomes.append(Outcome(job, run_id, round(time.perf_counter() - started, 2),
                                        job.params.get("resume_run_id", "")))
        return outcomes


@dataclass
class PoolExecutor:
    """Jobs side by side in `workers` processes of this machine, each training with `threads`
    torch threads. The workers are forked from multiprocessing's fork server, which imports
    torch and the stages once (pool_processes), never from main (a fork of a process that ran
    torch or opened MLflow's store can deadlock). main starts the server before it imports
    MLflow and the workers before it draws the sample (`start`), so that their start-up
    overlaps main's own.

    Like Ray's tasks: every job ends before a failure is reported; a job that raises ends its
    run FAILED; a stop signal ends every running training KILLED, resumable from its
    checkpoint; a worker that dies (killed, out of memory) leaves its run FAILED with the
    reason, and the pool's other runs, which Python's pool then stops, KILLED."""

    experiment_id: str
    workers: int
    threads: int = 1
    name: str = "local"
    runs_jobs_here = False
    _pool: ProcessPoolExecutor | None = None

    def machine(self, device: str) -> dict:
        return local_machine(device, self.threads)

    def start(self, jobs: int | None = None) -> None:
        """Start the workers now, as many as the `jobs` expected fill (up to `workers`); they
        import torch and the stages while this process goes on. More start when needed."""
        if self._pool is not None:
            return
        env = {"MLFLOW_TRACKING_URI": ray_cluster.worker_tracking_uri(),
               "MLFLOW_EXPERIMENT_ID": self.experiment_id,
               THREADS_ENV: str(self.threads),
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        pool = ProcessPoolExecutor(self.workers, ForkServerContext(), initializer=_start_worker,
                                   initargs=(os.getpid(), dict(os.environ), os.getcwd(), env))
        self._pool = pool
        # A pool starts a worker per submitted call while none is idle: one call each. From a
        # thread, since the first start waits for the fork server's imports.
        warm = self.workers if jobs is None else min(self.workers, jobs)
        threading.Thread(target=_warm, args=(pool, warm), daemon=True).start()

    @contextmanager
    def session(self) -> Iterator[None]:
        """The pool for the length of the block (started by `start` or the first job)."""
        try:
            yield
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def run(self, jobs: list[Job], parent_run_id: str) -> list[Outcome]:
        if not jobs:
            return []
        self.start()
        job_ids = [uuid.uuid4().hex for _ in jobs]
        futures = []
        started = time.perf_counter()
        for job, job_id in zip(jobs, job_ids):
            print(f"[main] {job.label}: sent to a worker ({self.threads} thread"
                  f"{'s' if self.threads > 1 else ''})", flush=True)
            futures.append(self._pool.submit(_run_job, job.stage, job.params, job.label,
                                             parent_run_id, job_id))
        try:
            pending = set(futures)
            while pending:
                # Short waits, with a signal held until each ends, so a stop is seen at once.
                with interrupts.deferred():
                    _, pending = wait_futures(pending, timeout=1.0, return_when=FIRST_COMPLETED)
        except interrupts.Interrupted as stop:
            stopped = self._stop(job_ids)
            if stopped:  # the message names a run it ended, as when it ran in this process
                stop.record(jobs[0].stage, stopped[0])
            raise
        seconds = round(time.perf_counter() - started, 2)
        return [self._outcome(job, job_id, future, seconds)
                for job, job_id, future in zip(jobs, job_ids, futures)]

    @staticmethod
    def _outcome(job: Job, job_id: str, future, seconds: float) -> Outcome:
        resumed = job.params.get("resume_run_id", "")
        error = future.exception()
        if error is None:
            result = future.result()
            return Outcome(job, result["run_id"], result["seconds"], resumed, result["error"])
        if not isinstance(error, BrokenProcessPool):
            raise error  # a bug of ours in the pool's plumbing, not a job's failure
        run_ids = _job_run_ids(job, job_id)
        ended = ray_cluster.end_orphaned_runs(
            run_ids, "FAILED", "its worker process died (killed, or out of memory?)")
        if ended:
            why = ("its worker process died (killed, or out of memory?); the run ends FAILED "
                   "and resumes from its last checkpoint when the study runs again")
        elif run_ids:
            why = ("stopped when another worker of the pool died; it resumes from its last "
                   "checkpoint when the study runs again")
        else:
            why = "never started: a worker of the pool died"
        return Outcome(job, run_ids[0] if run_ids else None, seconds, resumed, why)

    def _stop(self, job_ids: list[str]) -> list[str]:
        """Every worker gets SIGTERM, which ends a running job's run KILLED (an idle worker just
        exits); after the grace time the rest are killed, and any run of these jobs still
        RUNNING then is ended KILLED here. Returns the runs the jobs had started."""
        with interrupts.deferred():
            # No public handle on them; none left when the pool broke and ended them itself.
            processes = list((self._pool._processes or {}).values())
            for process in processes:
                _signal(process.pid, signal.SIGTERM)
            # A busy worker that ended its run goes back to the pool for its next job: shut
            # the pool down now, so that it is told to exit instead (else each waited out the
            # whole grace time and was killed).
            self._pool.shutdown(wait=False, cancel_futures=True)
            deadline = time.monotonic() + CANCEL_GRACE_S
            for process in processes:
                process.join(max(0.0, deadline - time.monotonic()))
            for process in processes:
                if process.is_alive():
                    _signal(process.pid, signal.SIGKILL)
            self._pool = None
            run_ids = [run.info.run_id for job_id in job_ids
                       for run in tracking.find_runs_tagged(tracking.TASK_TAG, job_id)]
            ray_cluster.end_orphaned_runs(run_ids, "KILLED",
                                          "the study was stopped while its worker ran")
        return run_ids


def _warm(pool: ProcessPoolExecutor, workers: int) -> None:
    try:
        for _ in range(workers):
            pool.submit(os.getpid)
    except RuntimeError:  # shut down meanwhile (a stop, or a study with nothing to run)
        pass


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it has exited already


def _job_run_ids(job: Job, job_id: str) -> list[str]:
    """The runs a pool job started or resumed, newest first."""
    runs = [r.info.run_id for r in tracking.find_runs_tagged(tracking.TASK_TAG, job_id)]
    resumed = job.params.get("resume_run_id")
    return runs + ([resumed] if resumed and resumed not in runs else [])


_main_pid = os.getppid()  # a pool worker's main, which is not its parent (the fork server)


def _start_worker(main_pid: int, main_env: dict[str, str], main_cwd: str,
                  env: dict[str, str]) -> None:
    """A pool worker's start: main's environment and folder as they are now (the fork server
    kept those of its own start), the study's tracking store and experiment, its torch
    threads, and the imports of its jobs done before the first one."""
    global _main_pid
    _main_pid = main_pid
    os.environ.clear()
    os.environ.update(main_env)
    os.chdir(main_cwd)
    # `mlflow run` sets these for main; a worker that kept them would log into main's run.
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(name, None)
    os.environ.update(env)
    # Ctrl-C reaches every process of the terminal's group: an idle worker leaves it to main,
    # a busy one ends its run KILLED (nested_stage.run_nested installs the handler).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    let_the_fork_server_end_with_main()
    interrupts.stop_with_parent()  # main killed outright: the running job ends KILLED
    importlib.import_module(WARM_UP)  # a no-op when forked from the server that imported it
    import mlflow
    import torch

    torch.set_num_threads(int(env[THREADS_ENV]))
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])


def _run_job(stage: str, params: dict, label: str, parent_run_id: str, job_id: str) -> dict:
    """One job in a pool worker, its output lines prefixed with its label."""
    from pipeline.scale.nested_stage import run_nested

    started = time.perf_counter()
    tags = {tracking.TASK_TAG: job_id, "pipeline.local_worker": f"pid {os.getpid()}"}
    try:
        with _prefixed_output(f"({label}) "):
            outcome = run_nested(stage, params, parent_run_id, tags)
    finally:
        _exit_if_main_is_gone()
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    return outcome


def _exit_if_main_is_gone() -> None:
    """Main killed outright ended this job KILLED (stop_with_parent); nobody will read its
    outcome, and the pool's queues, whose locks may be held by a dead process, would keep
    this worker waiting forever (as they kept both workers of a killed main once, by hand,
    2026-12-02). It exits at once, since even an orderly exit can wait on them."""
    try:
        # A main killed outright is a zombie until its own parent reaps it: gone all the same.
        gone = psutil.Process(_main_pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        gone = True
    if gone:
        # The job's runs are ended and nobody reads what is left: nothing for atexit
        # handlers or a wait on threads to do, and the pool's half-torn queues to block on.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(1)


class _Prefixed:
    """A text stream that starts each line with `prefix` and writes whole lines at once, so
    the lines of workers side by side do not interleave mid-line."""

    def __init__(self, stream, prefix: str):
        self._stream, self._prefix, self._partial = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            self._stream.write("".join(f"{self._prefix}{line}\n" for line in lines))
            self._stream.flush()
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._stream.write(f"{self._prefix}{self._partial}")
            self._partial = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def _prefixed_output(prefix: str) -> Iterator[None]:
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Prefixed(saved[0], prefix), _Prefixed(saved[1], prefix)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


@dataclass
class RayExecutor:
    """Each job a Ray task with `cpus` CPUs (its torch threads) and `gpus` GPUs (a fraction
    packs several small models on one GPU). Ray retries a task whose worker died; the retry
    continues the same run from its checkpoint (ray_tasks.run_stage). When Ray gives up on a
    task, its job still ends with an outcome (and its run FAILED), like any failed job."""

    experiment_id: str
    cpus: int = 1
    gpus: float = 0.0
    address: str = ray_cluster.LOCAL
    name: str = "ray"
    runs_jobs_here = False
    _numerics: dict = field(default_factory=dict)
    _head: ray_cluster.HeadWatch | None = None

    def __post_init__(self):
        ray_cluster.check_resources(self.cpus, self.gpus)
        ray_cluster.head_lost_after_s()  # a bad setting is refused before Ray is joined

    def start(self, jobs: int | None = None) -> None:
        pass  # Ray is joined by `session`, before any stage runs

    @contextmanager
    def session(self) -> Iterator[None]:
        """Joined before any stage runs: a cluster that cannot reach the tracking store, or has
        no node that can hold a task, is refused before a sample is drawn. Its head is
        watched while tasks run (ray_cluster.HeadWatch)."""
        with ray_cluster.connected(self.address, self.cpus, self.gpus, warm=True):
            self._head = ray_cluster.HeadWatch.of_joined_cluster()
            try:
                yield
            finally:
                self._head = None

    def _options(self) -> dict:
        return ray_cluster.task_options(self.cpus, self.gpus)

    def machine(self, device: str) -> dict:
        """The device `device` resolves to on a worker with this allotment, and the numerics a
        training gets there: what its cache key holds (ray_tasks.machine_numerics)."""
        if device not in self._numerics:
            import ray

            from pipeline.scale import ray_tasks

            task = ray.remote(ray_tasks.machine_numerics).options(name="machine", **self._options())
            [answer] = _wait_all([task.remote(device)], self._head)
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
            results = _wait_all(refs, self._head)
        except ray_cluster.HeadLost as lost:
            # Its tasks are gone with it; those on other nodes are stopped as on a signal.
            _cancel(refs, tasks, "the Ray head node was lost while its task ran",
                    lost_node=self._head.node_id)
            lost.endings = [_ending(task) for task in tasks]
            raise
        except interrupts.Interrupted:
            _cancel(refs, tasks, "the study was stopped while its Ray task ran")
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

    def running_off(self, node_id: str) -> bool:
        """Whether a run of this task is RUNNING on a node other than `node_id`."""
        from pipeline.scale.ray_tasks import NODE_TAG

        return any(run.info.status == "RUNNING" and run.data.tags.get(NODE_TAG) != node_id
                   for run in tracking.find_runs_tagged(tracking.TASK_TAG, self.task_id))


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


def _wait_all(refs: list, head: ray_cluster.HeadWatch | None = None) -> list:
    """Every task's result, or the Ray error that ended it; waiting in short steps so a stop
    signal is seen within a second, and a lost `head` (HeadLost) within seconds of its
    `lost_after_s`."""
    import ray

    pending = list(refs)
    while pending:
        # Not inside Ray's C++ wait: an exception raised there comes out as a SystemError.
        with interrupts.deferred():
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        if pending and head is not None:
            head.check()
    results = []
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayError as err:
            results.append(err)
    return results


def _cancel(refs: list, tasks: list[_Task], why: str, lost_node: str = "") -> None:
    """Stop every task: SIGINT first, which ends its run KILLED; then, after the grace time,
    the worker; any run of these tasks still RUNNING then (a new one, or one they resumed)
    is ended KILLED here, with `why`. Tasks on a `lost_node` cannot answer: only those
    running elsewhere are waited for."""
    import ray

    for ref in refs:
        ray.cancel(ref, force=False)
    deadline = time.monotonic() + CANCEL_GRACE_S
    pending = [ref for ref, task in zip(refs, tasks)
               if not lost_node or task.running_off(lost_node)]
    with interrupts.deferred():
        while pending and time.monotonic() < deadline:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        for ref in pending:
            ray.cancel(ref, force=True)
        ray_cluster.end_orphaned_runs([run_id for task in tasks for run_id in task.run_ids()],
                                      "KILLED", why)


def _ending(task: _Task) -> str:
    """What became of a task's newest run, once every run of it has ended: for the message
    that tells the user what the same command will do again."""
    import mlflow

    from pipeline.runs.checkpoint_store import has_checkpoint

    run_ids = task.run_ids()
    if not run_ids:
        return f"{task.job.label}: never started"
    run_id = run_ids[0]
    status = mlflow.MlflowClient().get_run(run_id).info.status
    if status == "FINISHED":
        return f"{task.job.label} (run {run_id}): FINISHED"
    try:
        resumable = task.job.stage == "train" and has_checkpoint(run_id)
    except PipelineError:  # the artifact store did not answer: the rerun decides
        return f"{task.job.label} (run {run_id}): {status}, checkpoint unknown"
    if resumable:
        return f"{task.job.label} (run {run_id}): {status}, resumable from its checkpoint"
    return f"{task.job.label} (run {run_id}): {status}, no checkpoint: runs anew"


def make_executor(params: dict, experiment_id: str, trainings: int | None = None):
    """The executor `params` ask for; `trainings`, the study's count when known, caps
    `workers=auto` (a one-training study runs in this process: a worker would only import)."""
    kind = params["executor"]
    if kind not in EXECUTORS:
        raise PipelineError(f"executor={kind!r}: use local (this machine's cores: workers side "
                            f"by side, or workers=1 one after another in this process) or ray "
                            f"(side by side on Ray)")
    if kind == "ray":
        return RayExecutor(experiment_id, params["cpus_per_trial"], params["gpus_per_trial"],
                           params["ray_address"])
    threads = params["threads"]
    if threads < 1:
        raise PipelineError(f"threads={threads}: give each training at least 1 torch thread")
    workers = local_workers(params["workers"], threads, trainings)
    if workers == 1:
        return LocalExecutor(threads)
    return PoolExecutor(experiment_id, workers, threads)


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

"""main: the whole study, every stage a nested run, finished stages reused.

sample_data and compare run in this process; the trainings and evaluations run on the chosen
executor (pipeline.scale.executors): side by side in a pool of local worker processes (or one
after another in this process), or as Ray tasks. With
`seeds: auto` a second batch of trainings follows the first, as many per config as Stein's
two-stage procedure asks for (pipeline.runs.auto_seeds).

A stage is reused when a FINISHED run in this experiment has the same cache key: the stage,
its parameters, the run ids it consumes and the code it runs (see
pipeline.cache.code_digest). `force=true` reruns everything. Keys and names come from
pipeline.cache's key modules, so a study whose stages are all reused never imports torch,
matplotlib, scikit-learn or scipy's statistics: a stage's module is imported only to run it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

import mlflow
import pandas as pd
from mlflow.entities import Run

from pipeline.cache import compare_keys, evaluate_keys, sample_keys, train_keys
from pipeline.core.config import load_study
from pipeline.parameters import stage_params
from pipeline.runs import registry, tracking
from pipeline.runs.checkpoint_store import has_checkpoint
from pipeline.scale import pool_processes
from pipeline.scale.executors import Job, make_executor, report_failures
from pipeline.stage_index import STAGES

STAGE = "main"


class Ledger:
    """Which stage runs the study used, and whether each was reused from the cache."""

    def __init__(self, force: bool):
        self.force = force
        self.rows: list[dict] = []

    def decide(self, key: str, resumable: bool) -> tuple[Run | None, Run | None]:
        """A FINISHED run with this key to reuse; else, when the stage can resume, the newest
        KILLED or FAILED one that left a checkpoint; else neither (run afresh)."""
        if self.force:
            return None, None
        cached = tracking.find_cached_run(key)
        if cached or not resumable:
            return cached, None
        return None, next((r for r in tracking.find_unfinished_runs(key)
                           if has_checkpoint(r.info.run_id)), None)

    @staticmethod
    def row(stage: str, label: str, run_id: str, reused: bool, resumed: str,
            seconds: float) -> dict:
        return {"stage": stage, "label": label, "run_id": run_id, "reused": reused,
                "resumed": bool(resumed), "seconds": round(seconds, 2)}

    def step(self, stage: str, label: str, key: str, execute: Callable[[], str],
             on_reuse: Callable[[Run], None] = lambda run: None) -> str:
        """One stage in this process: reuse a FINISHED run with this key, or run it."""
        started = time.perf_counter()
        cached, _ = self.decide(key, resumable=False)
        if cached:
            print(f"[main] {label}: reusing finished run {cached.info.run_id}")
            on_reuse(cached)
            run_id = cached.info.run_id
        else:
            print(f"[main] {label}: running")
            run_id = execute()
        self.rows.append(self.row(stage, label, run_id, bool(cached), "",
                                  time.perf_counter() - started))
        return run_id

    def steps(self, stage: str, planned: list[tuple[str, str, dict]], executor,
              parent_run_id: str, meanwhile: Callable[[], None] | None = None) -> list[str]:
        """Many runs of one stage, (label, key, params) each, on `executor`: cached ones reused
        here (never sent to Ray), interrupted trainings resumed, the rest run, `meanwhile`
        called as they are sent. Every job ends before a failure is reported, naming each
        failed run."""
        rows: dict[int, dict] = {}
        jobs, positions = [], []
        for position, (label, key, params) in enumerate(planned):
            cached, interrupted = self.decide(key, resumable=stage == "train")
            if cached:
                print(f"[main] {label}: reusing finished run {cached.info.run_id}")
                rows[position] = self.row(stage, label, cached.info.run_id, True, "", 0.0)
                continue
            if interrupted:
                print(f"[main] {label}: resuming {interrupted.info.status} run "
                      f"{interrupted.info.run_id} from its last checkpoint")
                params = {**params, "resume_run_id": interrupted.info.run_id}
            jobs.append(Job(stage, label, params))
            positions.append(position)
        if jobs and meanwhile:
            meanwhile()
        outcomes = executor.run(jobs, parent_run_id)
        for position, outcome in zip(positions, outcomes):
            rows[position] = self.row(stage, outcome.job.label, outcome.run_id, False,
                                      outcome.resumed, outcome.seconds)
        self.rows.extend(rows[position] for position in sorted(rows))
        report_failures(outcomes)
        return [rows[position]["run_id"] for position in range(len(planned))]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["stage", "label", "run_id", "reused", "resumed",
                                                "seconds"])


def run(params: dict) -> str:
    with tracking.stage_run(STAGE, "main", params) as parent:
        study = load_study(params["study"], params["epochs"], params["seeds"], params["configs"],
                           params["registered_model_name"], params["half_width_pp"],
                           params["max_seeds"], params["equivalence_margin_pp"])
        executor = make_executor(params, parent.info.experiment_id,
                                 trainings=len(study.configs) * len(study.seeds))
        mlflow.set_tag("mlflow.runName", f"main-{study.name}")
        tracking.log_params_once({
            "study_name": study.name, "study_configs": ",".join(study.configs),
            "study_seeds": ",".join(map(str, study.seeds)),
            "study_epochs": study.train.get("epochs", stage_params("train")["epochs"]),
        })
        # Ray joined, or the local pool closed at the end (executors.py).
        with executor.session():
            table = _run_study(study, params, executor, parent.info.run_id)
        mlflow.log_text(table.to_csv(index=False), "stages.csv")
        reused = table[table.reused]
        mlflow.set_tags({"pipeline.reused_stages": ",".join(reused.label) or "none",
                         "pipeline.resumed_stages": ",".join(table[table.resumed].label) or "none"})
        mlflow.log_metrics({"stages_run": int((~table.reused).sum()),
                            "stages_reused": int(table.reused.sum())})
        print(table.to_markdown(index=False))
        print(f"[main] done: {len(table) - len(reused)} stage(s) ran, {len(reused)} reused; "
              f"parent run {parent.info.run_id}")
    pool_processes.remember_finished(params)
    return parent.info.run_id


def _run_study(study, params: dict, executor, parent_run_id: str) -> pd.DataFrame:
    ledger = Ledger(params["force"])
    data = stage_params("sample_data", {"data_dir": params["data_dir"], **study.sample})

    def draw() -> str:
        # The workers import torch and the stages while the sample is drawn.
        executor.start(len(study.configs) * len(study.seeds))
        return STAGES["sample_data"](data)

    data_run = ledger.step("sample_data", sample_keys.sample_data_run_name(data),
                           sample_keys.sample_data_key(data), draw)

    # Consumers log the sampling that made their sample, as they would when run alone.
    sampling = {"data_dir": data["data_dir"], "samples_per_class": data["samples_per_class"],
                "sampling": data["sampling"], "sampling_seed": data["seed"]}

    def train(pairs: list[tuple[str, int]]) -> tuple[list[dict], list[str]]:
        fits = [stage_params("train", {**study.train, "config": config, "seed": seed,
                                       "data_run_id": data_run, **sampling})
                for config, seed in pairs]
        return fits, ledger.steps("train", [
            (train_keys.train_run_name(fit),
             train_keys.train_key(fit, data_run, executor.machine(fit["device"])), fit)
            for fit in fits], executor, parent_run_id,
            # Not beside trainings in this process: a thread that waits for a core while it
            # holds the interpreter's lock would hold up the training's Python between ops.
            meanwhile=None if executor.runs_jobs_here else lambda: _import_in_idle_time("compare"))

    fits, train_runs = train([(config, seed) for config in study.configs for seed in study.seeds])
    analysis = {"equivalence_margin_pp": study.equivalence_margin_pp}
    if study.auto:
        # Here, not at the top: its statistics import scipy, which a study with its seeds
        # given, reused or not, never needs.
        from pipeline.runs import auto_seeds

        train_runs += train(auto_seeds.second_stage(study, fits, train_runs))[1]
        analysis.update(first_stage_seeds=",".join(map(str, study.seeds)),
                        target_half_width_pp=study.auto.half_width_pp)
    mlflow.set_tag(tracking.TRAIN_RUNS_TAG, ",".join(train_runs))

    scorings = [stage_params("evaluate", {"model_uri": f"runs:/{train_run}/model",
                                          "data_run_id": data_run, **sampling})
                for train_run in train_runs]
    ledger.steps("evaluate", [
        (evaluate_keys.evaluate_run_name(train_run),
         evaluate_keys.evaluate_key(scoring, train_run, data_run), scoring)
        for train_run, scoring in zip(train_runs, scorings)], executor, parent_run_id)

    comparing = stage_params("compare", {
        "run_ids": ",".join(train_runs),
        "registered_model_name": study.registered_model_name, **analysis,
    })
    ledger.step("compare", "compare", compare_keys.compare_key(comparing, train_runs),
                lambda: STAGES["compare"](comparing), on_reuse=registry.restore_registration)
    return ledger.frame()


def _import_in_idle_time(stage: str) -> None:
    """Import `stage`'s module in a thread at the lowest CPU priority: it loads on a core the
    trainings leave idle (one finishes before the other) rather than after them, where
    compare's imports (scipy's statistics) took 0.3 s of the study. A study that trains
    nothing imports nothing."""

    def load() -> None:
        # Linux takes a thread id here and sets that thread's priority; elsewhere it would set
        # the whole process's, so there the thread runs at the usual priority.
        if sys.platform == "linux":
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            STAGES[stage]  # noqa: B018 - looking a stage up imports its module
        except Exception:  # noqa: BLE001 - the stage's own import, when it runs, says why
            pass

    threading.Thread(target=load, name=f"import-{stage}", daemon=True).start()

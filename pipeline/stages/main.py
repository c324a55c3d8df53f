"""main: the whole study in one process, every stage a nested run, finished stages reused.

A stage is reused when a FINISHED run in this experiment has the same cache key: the stage,
its parameters, the run ids it consumes and the source of the code it runs (see
tracking.cache_key). `force=true` reruns everything. Keys and names come from
pipeline.stage_keys, so a study whose stages are all reused never imports torch, matplotlib or
scikit-learn: a stage's module is imported only to run it.
"""

from __future__ import annotations

import time
from typing import Callable

import mlflow
import pandas as pd
from mlflow.entities import Run

from pipeline import registry, stage_keys, tracking
from pipeline.checkpoint_store import has_checkpoint
from pipeline.cli import stage_params
from pipeline.config import load_study
from pipeline.stages import STAGES

STAGE = "main"


class Ledger:
    """Which stage runs the study used, and whether each was reused from the cache."""

    def __init__(self, force: bool):
        self.force = force
        self.rows: list[dict] = []

    def step(self, stage: str, label: str, key: str, execute: Callable[[], str],
             on_reuse: Callable[[Run], None] = lambda run: None,
             resume: Callable[[str], str] | None = None) -> str:
        """Reuse a FINISHED run with this key; else, when `resume` is given, continue the newest
        KILLED or FAILED one that left a checkpoint; else run the stage afresh."""
        started = time.perf_counter()
        cached = None if self.force else tracking.find_cached_run(key)
        interrupted = None if self.force or cached or resume is None else next(
            (r for r in tracking.find_unfinished_runs(key) if has_checkpoint(r.info.run_id)), None)
        resumed = ""
        if cached:
            print(f"[main] {label}: reusing finished run {cached.info.run_id}")
            on_reuse(cached)
            run_id, reused = cached.info.run_id, True
        elif interrupted:
            resumed = interrupted.info.run_id
            print(f"[main] {label}: resuming {interrupted.info.status} run {resumed} from its "
                  f"last checkpoint")
            run_id, reused = resume(resumed), False
        else:
            print(f"[main] {label}: running")
            run_id, reused = execute(), False
        self.rows.append({"stage": stage, "label": label, "run_id": run_id, "reused": reused,
                          "resumed": bool(resumed),
                          "seconds": round(time.perf_counter() - started, 2)})
        return run_id

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["stage", "label", "run_id", "reused", "resumed",
                                                "seconds"])


def run(params: dict) -> str:
    with tracking.stage_run(STAGE, "main", params) as parent:
        study = load_study(params["study"], params["epochs"], params["seeds"], params["configs"],
                           params["registered_model_name"])
        mlflow.set_tag("mlflow.runName", f"main-{study.name}")
        tracking.log_params_once({
            "study_name": study.name, "study_configs": ",".join(study.configs),
            "study_seeds": ",".join(map(str, study.seeds)),
            "study_epochs": study.train.get("epochs", stage_params("train")["epochs"]),
        })
        ledger = Ledger(params["force"])

        data = stage_params("sample_data", {"data_dir": params["data_dir"], **study.sample})
        data_run = ledger.step("sample_data", stage_keys.sample_data_run_name(data),
                               stage_keys.sample_data_key(data),
                               lambda: STAGES["sample_data"](data))

        # Consumers log the sampling that made their sample, as they would when run alone.
        sampling = {"data_dir": data["data_dir"], "samples_per_class": data["samples_per_class"],
                    "sampling": data["sampling"], "sampling_seed": data["seed"]}
        train_runs = []
        for config in study.configs:
            for seed in study.seeds:
                fit = stage_params("train", {
                    **study.train, "config": config, "seed": seed, "data_run_id": data_run,
                    **sampling,
                })
                train_runs.append(ledger.step(
                    "train", stage_keys.train_run_name(fit), stage_keys.train_key(fit, data_run),
                    lambda fit=fit: STAGES["train"](fit),
                    resume=lambda run_id, fit=fit: STAGES["train"]({**fit, "resume_run_id": run_id}),
                ))
        mlflow.set_tag(tracking.TRAIN_RUNS_TAG, ",".join(train_runs))

        for train_run in train_runs:
            scoring = stage_params("evaluate", {
                "model_uri": f"runs:/{train_run}/model", "data_run_id": data_run, **sampling,
            })
            ledger.step("evaluate", stage_keys.evaluate_run_name(train_run),
                        stage_keys.evaluate_key(scoring, train_run, data_run),
                        lambda scoring=scoring: STAGES["evaluate"](scoring))

        comparing = stage_params("compare", {
            "run_ids": ",".join(train_runs),
            "registered_model_name": study.registered_model_name,
        })
        ledger.step("compare", "compare", stage_keys.compare_key(comparing, train_runs),
                    lambda: STAGES["compare"](comparing), on_reuse=registry.restore_registration)

        table = ledger.frame()
        mlflow.log_text(table.to_csv(index=False), "stages.csv")
        reused = table[table.reused]
        mlflow.set_tags({"pipeline.reused_stages": ",".join(reused.label) or "none",
                         "pipeline.resumed_stages": ",".join(table[table.resumed].label) or "none"})
        mlflow.log_metrics({"stages_run": int((~table.reused).sum()),
                            "stages_reused": int(table.reused.sum())})
        print(f"[main] done: {len(table) - len(reused)} stage(s) ran, {len(reused)} reused; "
              f"parent run {parent.info.run_id}")
        return parent.info.run_id

"""compare: tables, overlaid curves, a conclusion in words, and the champion model."""

from __future__ import annotations

import math

import mlflow
import pandas as pd

from pipeline.cache import compare_keys
from pipeline.core import plots
from pipeline.runs import registry, tracking
from pipeline.core.comparison import (
    RunRecord, config_table, conclusion, pairwise_tests, readable_table, run_table,
    two_stage_note,
)
from pipeline.core.training import METRIC_NAMES
from pipeline.errors import PipelineError

STAGE = "compare"
FIGURES = {
    "accuracy.png": ({"test_accuracy": "-", "train_accuracy": "--"}, "Accuracy", "accuracy"),
    "loss.png": ({"test_loss": "-", "train_loss": "--"}, "Loss", "loss"),
    "epoch_time.png": ({"epoch_time_s": "-"}, "Time per epoch (train + eval)", "seconds"),
}


def split_ids(text: str) -> list[str]:
    return [part.strip() for part in text.replace(" ", ",").split(",") if part.strip()]


def select_runs(params: dict) -> tuple[list, list[str]]:
    """The train runs to compare, and notes about runs left out."""
    if params["run_ids"]:
        return [tracking.get_stage_run(i, "train", "run_ids") for i in split_ids(params["run_ids"])], []
    if params["parent_run_id"]:
        parent = tracking.get_run(params["parent_run_id"], "parent_run_id")
        recorded = parent.data.tags.get(tracking.TRAIN_RUNS_TAG)
        if recorded:
            return [tracking.get_stage_run(i, "train", "parent's train run") for i in split_ids(recorded)], []
        candidates = mlflow.search_runs(
            experiment_ids=[parent.info.experiment_id], output_format="list",
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                          f"and tags.`{tracking.STAGE_TAG}` = 'train'",
        )
    else:
        experiment = _experiment_ids(params["experiment_name"])
        condition = f"tags.`{tracking.STAGE_TAG}` = 'train'"
        if params["filter"]:
            condition += f" and {params['filter']}"
        try:
            candidates = mlflow.search_runs(experiment_ids=experiment, filter_string=condition,
                                            output_format="list")
        except mlflow.exceptions.MlflowException as err:
            raise PipelineError(f"filter {params['filter']!r} is not a valid MLflow search "
                                f"filter: {str(err).splitlines()[0]}") from err
    finished = [r for r in candidates if r.info.status == "FINISHED"]
    notes = [f"left out {r.info.run_name} ({r.info.run_id}): it is {r.info.status}"
             for r in candidates if r.info.status != "FINISHED"]
    return finished, notes


def _experiment_ids(name: str) -> list[str] | None:
    if not name:
        return None  # the current experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        raise PipelineError(f"experiment {name!r} does not exist in {mlflow.get_tracking_uri()}")
    return [experiment.experiment_id]


def load_record(run) -> RunRecord:
    client = mlflow.MlflowClient()
    columns = {}
    for metric in METRIC_NAMES:
        history = client.get_metric_history(run.info.run_id, metric)
        if not history:
            raise PipelineError(
                f"train run {run.info.run_name} ({run.info.run_id}) has no {metric} history; "
                f"it was not made by this pipeline's train stage; leave it out of run_ids"
            )
        columns[metric] = pd.Series({m.step: m.value for m in history})
    frame = pd.DataFrame(columns).rename_axis("epoch").reset_index()
    if frame.isna().any().any():
        raise PipelineError(f"train run {run.info.run_id} logged its metrics for different epochs")
    params, metrics = run.data.params, run.data.metrics
    return RunRecord(
        run_id=run.info.run_id,
        config=params.get("model_config") or run.data.tags.get("pipeline.model", run.info.run_id),
        seed=int(params.get("seed", 0)),
        settings={"num_params": int(metrics.get("num_params", 0)),
                  **{k: params.get(k) for k in ("lr", "batch_size", "momentum")}},
        history=frame,
        train_time_s=float(metrics.get("train_time_s", frame["epoch_time_s"].sum())),
    )


def _percentage(params: dict, name: str, minimum: float) -> float:
    value = params[name]
    if not math.isfinite(value) or value < minimum:
        raise PipelineError(f"{name} must be a number of percentage points of at least "
                            f"{minimum:g}, got {value!r}; e.g. {name}=0.2")
    return value


def _first_stage_seeds(params: dict, runs: pd.DataFrame) -> list[int]:
    """The first stage's seeds of a two-stage study; each config must have run them all."""
    try:
        seeds = [int(s) for s in split_ids(params["first_stage_seeds"])]
    except ValueError:
        raise PipelineError(f"first_stage_seeds must be comma-separated whole numbers, got "
                            f"{params['first_stage_seeds']!r}") from None
    for config, group in runs.groupby("config"):
        missing = sorted(set(seeds) - set(group["seed"]))
        if missing:
            raise PipelineError(f"{config} has no run for first-stage seed(s) "
                                f"{', '.join(map(str, missing))}: rerun the study, or compare "
                                f"without first_stage_seeds")
    return seeds


def length_notes(runs: pd.DataFrame) -> list[str]:
    lengths = sorted(runs["epochs"].unique())
    if len(lengths) > 1:
        return [f"the runs have different lengths ({', '.join(map(str, lengths))} epochs): "
                f"final accuracy and convergence compare them at different points"]
    return []


def run(params: dict) -> str:
    with tracking.stage_run(STAGE, "compare", params) as run:
        selected, notes = select_runs(params)
        if not selected:
            raise PipelineError("no finished train runs to compare: pass run_ids, a "
                                "parent_run_id, or an experiment_name/filter that matches some")
        records = [load_record(r) for r in selected]
        runs = run_table(records)
        configs = config_table(runs)
        first_stage = _first_stage_seeds(params, runs)
        pairs = pairwise_tests(runs, _percentage(params, "detectable_difference_pp", 1e-9) / 100,
                               _percentage(params, "equivalence_margin_pp", 0) / 100, first_stage)
        notes += length_notes(runs)
        if first_stage:
            notes.append(two_stage_note(pairs, len(first_stage),
                                        _percentage(params, "target_half_width_pp", 0) / 100))
        text = conclusion(configs, pairs, notes)
        print(text)

        mlflow.set_tags({
            "mlflow.runName": "compare-" + "-vs-".join(configs.index),
            "mlflow.note.content": text,
            tracking.CACHE_KEY_TAG: compare_keys.compare_key(params, list(runs["run_id"])),
        })
        tracking.log_params_once({"compared_runs": len(runs), "compared_configs": ",".join(configs.index)})
        _log_tables(runs, configs, pairs, text)
        _log_figures(records)
        for config, row in configs.iterrows():
            mlflow.log_metrics({f"{config}.final_test_accuracy": row.final_test_accuracy,
                                f"{config}.epochs_to_converge": row.epochs_to_converge})
        if params["register"]:
            best = runs.loc[runs["final_test_accuracy"].idxmax()]
            mlflow.set_tag(registry.BEST_RUN_TAG, best.run_id)
            result = registry.register(params["registered_model_name"], best.run_id)
            mlflow.set_tags({"pipeline.registered_version": result.version,
                             "pipeline.champion_version": result.champion_version})
        return run.info.run_id


def _log_tables(runs: pd.DataFrame, configs: pd.DataFrame, pairs: pd.DataFrame, text: str) -> None:
    mlflow.log_text(configs.to_csv(), "comparison.csv")
    readable = readable_table(configs)
    mlflow.log_text(readable.to_markdown() + "\n", "comparison.md")
    mlflow.log_text(readable.to_html(), "comparison.html")
    mlflow.log_text(runs.to_csv(index=False), "runs.csv")
    mlflow.log_text(pairs.to_csv(index=False), "pairwise.csv")
    mlflow.log_text(text + "\n", "conclusion.md")


def _log_figures(records: list[RunRecord]) -> None:
    groups: dict[str, list[pd.DataFrame]] = {}
    for record in records:
        groups.setdefault(record.config, []).append(record.history)
    for name, (columns, title, ylabel) in FIGURES.items():
        fig = plots.grouped_curves(groups, columns, f"{title} vs. epoch", ylabel)
        mlflow.log_figure(fig, name)
        plots.close(fig)

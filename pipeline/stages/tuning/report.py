"""tune's report: the table of a sweep's trials, the winner, the winner as a config file, the
figures and the conclusion in words."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml

from pipeline.cache.file_digests import cache_root
from pipeline.core import search_space
from pipeline.core.search_space import Choice, Range, SearchSpace
from pipeline.runs import tracking
from pipeline.stages.tuning import search
from pipeline.stages.tuning import trial as tune_trial

TABLE_COLUMNS = ["trial", "config", "val_accuracy", "val_loss", "epochs_run", "early_stopped",
                 "layers", "width", "batch_norm", "lr", "momentum", "batch_size", "num_params",
                 "reused", "run_id"]


def describe_value(value) -> str:
    if isinstance(value, Range):
        return f"{value.low}..{value.high}{' log' if value.log else ''}"
    if isinstance(value, Choice):
        return ",".join(tracking.format_param(c) for c in value.choices)
    return tracking.format_param(value)


def trial_table(runs: list, tune_run_id: str, epochs: int) -> pd.DataFrame:
    """One row per trial, sorted by validation accuracy (best first)."""
    rows = []
    for number, run in enumerate(runs, start=1):
        point = json.loads(run.data.tags[tune_trial.POINT_TAG])
        metrics = run.data.metrics
        epochs_run = int(run.data.tags.get(tune_trial.EPOCHS_RUN_TAG, 0))
        rows.append({
            "trial": number, "config": search_space.config_name_of(point),
            "val_accuracy": metrics.get("val_accuracy", np.nan),
            "val_loss": metrics.get("val_loss", np.nan), "epochs_run": epochs_run,
            "early_stopped": tune_trial.EARLY_STOP_TAG in run.data.tags,
            **{k: point[k] for k in search_space.PARAMETERS},
            "num_params": int(metrics.get("num_params", 0)),
            "reused": run.data.tags.get("mlflow.parentRunId") != tune_run_id,
            "run_id": run.info.run_id, "point": json.dumps(point, sort_keys=True),
        })
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS + ["point"])
    return frame.sort_values(["val_accuracy", "val_loss"], ascending=[False, True],
                             kind="stable").reset_index(drop=True)


def pick_winner(table: pd.DataFrame, epochs: int) -> pd.Series:
    """The most accurate trial on validation among those that ran every epoch (a trial ASHA
    stopped was judged on fewer epochs), lower val_loss breaking ties."""
    full = table[table.epochs_run == epochs]
    return (full if not full.empty else table).iloc[0]


def log_table(table: pd.DataFrame) -> None:
    shown = table.drop(columns=["point"])
    mlflow.log_text(shown.to_csv(index=False), "trials.csv")
    mlflow.log_text(shown.to_markdown(index=False, floatfmt=".4g") + "\n", "trials.md")
    mlflow.log_text(shown.to_html(index=False, float_format="{:.4g}".format), "trials.html")


def log_plots(space: SearchSpace, table: pd.DataFrame) -> None:
    """Optuna's optimization history and parameter importances, from the trials' results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spaces = search.distributions(space)
    study = optuna.create_study(direction="minimize", study_name=space.name)
    for _, row in table.sort_values("trial").iterrows():
        point = json.loads(row["point"])
        study.add_trial(optuna.trial.create_trial(
            params={k: point[k] for k in spaces}, distributions=spaces,
            value=float(row["val_loss"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is "experimental"
        axes = optuna_plots.plot_optimization_history(study, target_name="val_loss")
        mlflow.log_figure(axes.figure, "optimization_history.png")
        plt.close(axes.figure)
        if len(table) < 2 or not spaces:
            print("tune: parameter importances need at least 2 trials and a searched parameter")
            return
        try:
            axes = optuna_plots.plot_param_importances(study, target_name="val_loss")
        except (ValueError, RuntimeError) as err:  # e.g. every trial with the same val_loss
            print(f"tune: no parameter importances: {err}")
            return
        mlflow.log_figure(axes.figure, "param_importances.png")
        plt.close(axes.figure)


def write_config(space: SearchSpace, values: dict) -> Path:
    """The winner as a config file `train --config <file>` accepts, kept on this machine under
    the pipeline's cache folder (named by its content, so a rerun finds the same file and the
    train stage's cache key, which covers the file's content, reuses the retrained model)."""
    content = yaml.safe_dump(search_space.model_config(space, values), sort_keys=False)
    header = "# Written by the tune stage: the sweep's winner, for train --config <this file>.\n"
    text = header + content
    folder = cache_root() / "tune" / hashlib.sha256(text.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{search_space.config_name(space, values)}.yaml"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def describe_result(space: SearchSpace, table: pd.DataFrame, winner: pd.Series, failed: int,
                    test_accuracy: float, train_images: int, registration) -> str:
    others = table[table.run_id != winner.run_id]
    if others.empty:
        margin = "the only trial"
    else:
        second = others.iloc[0]
        margin = (f"{(winner.val_accuracy - second.val_accuracy) * 100:+.2f} points over the "
                  f"runner-up {second.config} (trial {second.trial}, "
                  f"{second.val_accuracy:.4f})")
    stopped = int(table.early_stopped.sum())
    return (
        f"{winner.config} won the {space.name} sweep with validation accuracy "
        f"{winner.val_accuracy:.4f} (val_loss {winner.val_loss:.4f}; lr {winner.lr:.4g}, "
        f"momentum {winner.momentum:.3g}, batch size {winner.batch_size}), {margin}. "
        f"{len(table)} trials of up to {space.epochs} epochs ({int(table.reused.sum())} reused "
        f"from earlier sweeps, {stopped} stopped early by ASHA"
        f"{f', {failed} failed' if failed else ''}). Retrained on the whole training sample "
        f"({train_images} images) for {space.epochs} epochs, it scored {test_accuracy:.4f} on "
        f"the test split, the sweep's only use of it. Registered as "
        f"{registration.name} version {registration.version}; champion is version "
        f"{registration.champion_version}"
        f"{' (alias moved)' if registration.alias_moved else ''}."
    )

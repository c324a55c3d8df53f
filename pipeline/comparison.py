"""Comparing finished training runs: convergence, per-config statistics, tests, conclusion.

Pure pandas/scipy on per-epoch histories; nothing here talks to MLflow.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats

# epochs_to_converge: the first epoch from which test accuracy stays within
# CONVERGENCE_TOLERANCE (0.5 percentage points) of its mean over the last CONVERGENCE_WINDOW
# (5) epochs. A run shorter than the window uses all its epochs; a run whose last epoch is still
# outside the band has not converged (NaN).
CONVERGENCE_WINDOW = 5
CONVERGENCE_TOLERANCE = 0.005
SUMMARY_STATS = (
    "final_test_accuracy", "best_test_accuracy", "best_epoch", "epochs_to_converge",
    "median_epoch_time_s", "train_time_s",
)
SETTINGS = ("num_params", "epochs", "lr", "batch_size", "momentum")


@dataclass(frozen=True)
class RunRecord:
    """One finished train run: identity, settings and per-epoch history."""

    run_id: str
    config: str
    seed: int
    settings: dict
    history: pd.DataFrame  # columns epoch, train_/test_ loss/accuracy, epoch_time_s
    train_time_s: float


def epochs_to_converge(test_accuracy: list[float]) -> float:
    accuracy = pd.Series(test_accuracy, dtype=float)
    plateau = accuracy.tail(CONVERGENCE_WINDOW).mean()
    outside = (accuracy - plateau).abs() > CONVERGENCE_TOLERANCE + 1e-12
    if not outside.any():
        return 1
    last_outside = int(outside[outside].index[-1])  # 0-based
    if last_outside == len(accuracy) - 1:
        return math.nan
    return last_outside + 2  # the 1-based epoch after the last one outside the band


def summarize(history: pd.DataFrame) -> dict:
    """A run's summary: final and best test accuracy and the (first) epoch of the best."""
    best = history.loc[history["test_accuracy"].idxmax()]
    return {
        "final_test_accuracy": float(history["test_accuracy"].iloc[-1]),
        "best_test_accuracy": float(best["test_accuracy"]),
        "best_epoch": int(best["epoch"]),
    }


def run_table(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run."""
    rows = []
    for record in records:
        history = record.history
        rows.append({
            "config": record.config,
            "seed": record.seed,
            "run_id": record.run_id,
            **{k: record.settings.get(k) for k in SETTINGS},
            "epochs": len(history),
            **summarize(history),
            "epochs_to_converge": epochs_to_converge(history["test_accuracy"].tolist()),
            "median_epoch_time_s": float(history["epoch_time_s"].median()),
            "train_time_s": record.train_time_s,
        })
    return pd.DataFrame(rows)


def config_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per config: its settings, the number of seeds, and mean and std of each stat."""
    grouped = runs.groupby("config", sort=False)
    table = grouped[list(SETTINGS)].first()
    table.insert(0, "runs", grouped.size())
    for column in SUMMARY_STATS:
        # A config with an unconverged run has no mean epochs_to_converge.
        table[column] = grouped[column].agg(lambda values: values.mean(skipna=False))
        table[f"{column}_std"] = grouped[column].std()  # NaN for a single run
    return table.sort_values("final_test_accuracy", ascending=False)


def readable_table(configs: pd.DataFrame) -> pd.DataFrame:
    """The config table for people: `mean +- std` in one cell where a config has several runs."""
    table = configs[["runs", *SETTINGS]].copy()
    for column in SUMMARY_STATS:
        digits = 4 if "accuracy" in column else 2
        table[column] = [
            "not converged" if math.isnan(mean)
            else f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
            for mean, std in zip(configs[column], configs[f"{column}_std"])
        ]
    return table


def pairwise_tests(runs: pd.DataFrame) -> pd.DataFrame:
    """For each pair of configs: the difference in mean final test accuracy (b - a), its 95%
    confidence interval and Welch's t-test p-value; NaN where a config has a single run."""
    groups = {c: g["final_test_accuracy"].to_numpy() for c, g in runs.groupby("config", sort=False)}
    rows = []
    for a, b in itertools.combinations(groups, 2):
        xa, xb = groups[a], groups[b]
        row = {"a": a, "b": b, "n_a": len(xa), "n_b": len(xb),
               "difference": float(xb.mean() - xa.mean()),
               "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
        if len(xa) > 1 and len(xb) > 1 and (xa.std() > 0 or xb.std() > 0):
            test = stats.ttest_ind(xb, xa, equal_var=False)
            interval = test.confidence_interval(0.95)
            row.update(ci_low=float(interval.low), ci_high=float(interval.high),
                       p_value=float(test.pvalue))
        rows.append(row)
    return pd.DataFrame(rows, columns=["a", "b", "n_a", "n_b", "difference", "ci_low",
                                       "ci_high", "p_value"])


def _epoch(value: float) -> str:
    return "not converged" if math.isnan(value) else f"epoch {value:g}"


def _pp(fraction: float) -> str:
    return f"{fraction * 100:+.2f} pp"


def conclusion(configs: pd.DataFrame, pairs: pd.DataFrame, warnings: list[str] = ()) -> str:
    """Plain words computed from the tables: who is more accurate, by how much, who converges
    sooner, and whether the difference is statistically supported."""
    lines = []
    ranked = configs.sort_values("final_test_accuracy", ascending=False)
    best = ranked.index[0]
    if len(ranked) == 1:
        row = ranked.iloc[0]
        lines.append(f"Only {best} was compared: final test accuracy "
                     f"{row.final_test_accuracy:.2%}, converged: {_epoch(row.epochs_to_converge)}.")
    for other in ranked.index[1:]:
        b, o = ranked.loc[best], ranked.loc[other]
        gap = b.final_test_accuracy - o.final_test_accuracy
        lines.append(
            f"{best} is more accurate than {other}: final test accuracy "
            f"{b.final_test_accuracy:.2%} vs {o.final_test_accuracy:.2%} ({_pp(gap)}); best "
            f"{b.best_test_accuracy:.2%} vs {o.best_test_accuracy:.2%}."
            if gap > 0 else
            f"{best} and {other} tie on final test accuracy ({b.final_test_accuracy:.2%})."
        )
        lines.append(_convergence(best, b.epochs_to_converge, other, o.epochs_to_converge))
        lines.append(_significance(pairs, best, other))
    lines.append(
        f"(Converged = test accuracy stays within {CONVERGENCE_TOLERANCE * 100:.1f} pp of its "
        f"mean over the last {CONVERGENCE_WINDOW} epochs; values are means over "
        f"{', '.join(f'{n} run(s) of {c}' for c, n in ranked['runs'].items())}.)"
    )
    lines += [f"Note: {w}" for w in warnings]
    return "\n".join(lines)


def _convergence(a: str, epoch_a: float, b: str, epoch_b: float) -> str:
    if math.isnan(epoch_a) and math.isnan(epoch_b):
        return f"Neither {a} nor {b} has converged by its last epoch: train longer."
    if epoch_a == epoch_b:
        return f"Both converge at {_epoch(epoch_a)}."
    if math.isnan(epoch_b) or (not math.isnan(epoch_a) and epoch_a < epoch_b):
        sooner, later, first, second = a, b, epoch_a, epoch_b
    else:
        sooner, later, first, second = b, a, epoch_b, epoch_a
    return f"{sooner} converges sooner: {_epoch(first)} vs {_epoch(second)} for {later}."


def _significance(pairs: pd.DataFrame, best: str, other: str) -> str:
    match = pairs[((pairs.a == best) & (pairs.b == other)) | ((pairs.a == other) & (pairs.b == best))]
    if match.empty:
        return ""
    row = match.iloc[0]
    sign = 1 if row.b == best else -1  # report as best - other
    if math.isnan(row.p_value):
        if min(row.n_a, row.n_b) < 2:
            return ("A single run of a config shows one draw of training noise: no significance "
                    "can be claimed. Add seeds to the study to test the difference.")
        return "Every run of both configs has the same final accuracy: nothing to test."
    low, high = sorted((sign * row.ci_low, sign * row.ci_high))
    verdict = "significant" if row.p_value < 0.05 else "not significant"
    return (
        f"Difference {best} - {other}: {_pp(sign * row.difference)} (95% CI {_pp(low)} to "
        f"{_pp(high)}, Welch's t-test p = {row.p_value:.3g}, {row.n_a:.0f} vs {row.n_b:.0f} runs): "
        f"{verdict} at the 5% level."
    )

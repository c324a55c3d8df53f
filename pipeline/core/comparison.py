"""Comparing finished training runs: convergence, per-config statistics, tests, conclusion.

Pure pandas/scipy on per-epoch histories; nothing here talks to MLflow.

Statistics, in short:
- Differences between two configs are tested with Welch's (unequal-variance) t-test on the
  per-seed values; the 95% confidence interval of the difference is Welch's too.
- Every pair of configs is tested, and the p-values are Holm-adjusted over all pairs with a
  p-value (one family for final accuracy, another for epochs_to_converge): the best config is
  picked from the same data, so every pair is a comparison that could have made a headline.
  A difference is called significant when its Holm-adjusted p is below 5%. The confidence
  intervals are per comparison and not adjusted.
- Power (what the study could have detected, and the runs needed to detect a stated gap) and,
  with a margin, equivalence by two one-sided tests (TOST, Holm-adjusted likewise) give each
  pair one decision: a config better, equivalent, or undecided. A `seeds: auto` study is
  tested with Stein's two-stage procedure instead of Welch's (pipeline.core.two_stage).
  docs/statistics.md has the details and the references.
- A group whose standard deviation is below STD_TOLERANCE has no spread (the rest is floating
  point noise: accuracies are multiples of 1/N test images). If neither group has spread there
  is no noise to test against: no test, no interval.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from pipeline.core import two_stage
from pipeline.core.summary import summarize

# epochs_to_converge: the first epoch from which test accuracy stays within
# CONVERGENCE_TOLERANCE (0.5 percentage points) of its mean over the last CONVERGENCE_WINDOW
# (5) epochs. A run shorter than the window uses all its epochs; a run whose last epoch is still
# outside the band has not converged (NaN).
# Over the seeds of a config: epochs_to_converge is the mean (and std) over the runs that
# converged, converged_runs counts those runs, and a config is "not converged" only when none of
# its runs converged. An unconverged run has no convergence epoch; counting it as its last epoch
# would invent one, so it is left out of the mean and the count says how many were left out.
CONVERGENCE_WINDOW = 5
CONVERGENCE_TOLERANCE = 0.005
SUMMARY_STATS = (
    "final_test_accuracy", "best_test_accuracy", "best_epoch", "epochs_to_converge",
    "median_epoch_time_s", "train_time_s",
)
SETTINGS = ("num_params", "epochs", "lr", "batch_size", "momentum")
CONFIDENCE = 0.95  # of the confidence intervals
SIGNIFICANCE_LEVEL = 0.05  # for the Holm-adjusted p-values
TEST_NAMES = {"welch": "Welch's t-test", "stein two-stage": "Stein's two-stage test"}
STD_TOLERANCE = 1e-12  # a standard deviation below this is floating point noise, i.e. zero
PAIRWISE_COLUMNS = [
    "a", "b", "n_a", "n_b", "mean_a", "mean_b", "difference", "ci_low", "ci_high",
    "p_value", "p_holm", "significant",
    "converged_a", "converged_b", "convergence_mean_a", "convergence_mean_b",
    "convergence_difference", "convergence_ci_low", "convergence_ci_high",
    "convergence_p_value", "convergence_p_holm", "convergence_significant",
    "procedure", "detectable_difference", "target_difference", "runs_to_detect",
    "equivalence_margin", "tost_p_value", "tost_p_holm", "equivalent", "runs_for_equivalence",
    "decision",
]


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
    """One row per config: its settings, the number of seeds and of converged seeds, and mean
    and std of each stat (epochs_to_converge over the converged runs only; see the top)."""
    grouped = runs.groupby("config", sort=False)
    table = grouped[list(SETTINGS)].first()
    table.insert(0, "runs", grouped.size())
    table.insert(1, "converged_runs", grouped["epochs_to_converge"].count())
    for column in SUMMARY_STATS:
        table[column] = grouped[column].mean()  # skips NaN: unconverged runs
        std = grouped[column].std()  # NaN for fewer than 2 values
        table[f"{column}_std"] = std.mask(std < STD_TOLERANCE, 0.0)
    return table.sort_values("final_test_accuracy", ascending=False)


def readable_table(configs: pd.DataFrame) -> pd.DataFrame:
    """The config table for people: `mean ± std` in one cell where a config has several runs,
    and how many runs converged where some did not."""
    table = configs[["runs", *SETTINGS]].copy()
    for column in SUMMARY_STATS:
        digits = 4 if "accuracy" in column else 2
        table[column] = [
            "not converged" if math.isnan(mean)
            else f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
            for mean, std in zip(configs[column], configs[f"{column}_std"])
        ]
    partly = (configs["converged_runs"] > 0) & (configs["converged_runs"] < configs["runs"])
    table.loc[partly, "epochs_to_converge"] += [
        f" ({k}/{n} converged)" for k, n in zip(configs.loc[partly, "converged_runs"],
                                                configs.loc[partly, "runs"])
    ]
    return table


def _variance(values: np.ndarray) -> float:
    """Sample variance (ddof=1), zero where the std is below STD_TOLERANCE."""
    variance = float(np.var(values, ddof=1))
    return 0.0 if math.sqrt(variance) < STD_TOLERANCE else variance


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan


def welch_test(a, b) -> dict:
    """Welch's unequal-variance t-test of mean(b) - mean(a): the difference, its CONFIDENCE
    interval and the two-sided p-value. NaN interval and p where it cannot be computed: a group
    with fewer than 2 values, or no spread in either group (no noise to test against).

    Computed from the formulas rather than with scipy.stats.ttest_ind, which warns about
    precision loss as soon as one group is constant and, when both are, turns floating point
    noise into a p-value (2.5e-30 for [0.90] * 3 vs [0.95] * 3)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    difference = _mean(b) - _mean(a)  # NaN where a group is empty (no run converged)
    result = {"difference": difference, "ci_low": math.nan, "ci_high": math.nan,
              "p_value": math.nan}
    if len(a) < 2 or len(b) < 2:
        return result
    square_se_a, square_se_b = _variance(a) / len(a), _variance(b) / len(b)
    if square_se_a == 0 and square_se_b == 0:
        return result
    standard_error = math.sqrt(square_se_a + square_se_b)
    # Welch–Satterthwaite degrees of freedom
    df = (square_se_a + square_se_b) ** 2 / (
        square_se_a ** 2 / (len(a) - 1) + square_se_b ** 2 / (len(b) - 1))
    # special.stdtr/stdtrit are what stats.t.sf/ppf compute, without their per-call overhead
    # (the simulation tests call this thousands of times)
    half_width = special.stdtrit(df, 0.5 + CONFIDENCE / 2) * standard_error
    result.update(ci_low=difference - half_width, ci_high=difference + half_width,
                  p_value=float(2 * special.stdtr(df, -abs(difference) / standard_error)))
    return result


# --- Power and equivalence (planning figures from the observed spread) ---------------------
# "Detectable" means: Welch's two-sided test at SIGNIFICANCE_LEVEL rejects with probability
# POWER, computed with the noncentral t distribution and the observed standard deviations in
# place of the true ones (the usual plug-in planning figure; docs/statistics.md).
POWER = 0.80
DEFAULT_DETECTABLE_DIFFERENCE = 0.002  # 0.2 percentage points
MAX_PLANNED_RUNS = 10_000  # beyond this "runs needed" is reported as not reachable (NaN)


def _welch_df(square_se_a: float, square_se_b: float, n_a: int, n_b: int) -> float:
    """Welch–Satterthwaite degrees of freedom from the squared standard errors."""
    return (square_se_a + square_se_b) ** 2 / (
        square_se_a ** 2 / (n_a - 1) + square_se_b ** 2 / (n_b - 1))


def welch_power(difference: float, variance_a: float, n_a: int, variance_b: float,
                n_b: int) -> float:
    """Probability that Welch's two-sided test at SIGNIFICANCE_LEVEL rejects when the true
    difference is `difference` and the variances are the given ones."""
    square_se_a, square_se_b = variance_a / n_a, variance_b / n_b
    standard_error = math.sqrt(square_se_a + square_se_b)
    df = _welch_df(square_se_a, square_se_b, n_a, n_b)
    critical = stats.t.ppf(1 - SIGNIFICANCE_LEVEL / 2, df)
    shift = difference / standard_error
    # P(T' < -c) as P(-T' > c): scipy's nct.cdf is NaN far in the lower tail
    return float(stats.nct.sf(critical, df, shift) + stats.nct.sf(critical, df, -shift))


def minimal_detectable_difference(variance_a: float, n_a: int, variance_b: float,
                                  n_b: int) -> float:
    """The smallest true difference Welch's test detects with probability POWER; NaN where it
    cannot be computed (fewer than 2 runs, or no spread at all)."""
    if min(n_a, n_b) < 2 or variance_a + variance_b == 0:
        return math.nan
    standard_error = math.sqrt(variance_a / n_a + variance_b / n_b)
    upper = standard_error
    while welch_power(upper, variance_a, n_a, variance_b, n_b) < POWER:
        upper *= 2  # the noncentral t is NaN far out, so widen the bracket only as needed
    return float(optimize.brentq(
        lambda d: welch_power(d, variance_a, n_a, variance_b, n_b) - POWER,
        0.0, upper, xtol=1e-12 * standard_error))


def _smallest_n(reaches) -> float:
    """The smallest n in 2..MAX_PLANNED_RUNS with reaches(n) true (reaches is monotone), or NaN."""
    if not reaches(MAX_PLANNED_RUNS):
        return math.nan
    low, high = 2, MAX_PLANNED_RUNS
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if reaches(middle) else (middle + 1, high)
    return float(low)


def runs_to_detect(difference: float, variance_a: float, variance_b: float) -> float:
    """Runs per config for Welch's test to detect `difference` with probability POWER, at the
    given variances; NaN where no spread was observed or more than MAX_PLANNED_RUNS."""
    if variance_a + variance_b == 0 or not difference:
        return math.nan
    return _smallest_n(lambda n: welch_power(difference, variance_a, n, variance_b, n) >= POWER)


def tost_power(margin: float, variance_a: float, n_a: int, variance_b: float, n_b: int) -> float:
    """A lower bound on the probability that TOST at SIGNIFICANCE_LEVEL shows equivalence within
    ±margin when the true difference is 0: 1 - P(lower test fails) - P(upper test fails)."""
    square_se_a, square_se_b = variance_a / n_a, variance_b / n_b
    df = _welch_df(square_se_a, square_se_b, n_a, n_b)
    critical = stats.t.ppf(1 - SIGNIFICANCE_LEVEL, df)
    shift = margin / math.sqrt(square_se_a + square_se_b)
    return float(max(0.0, 1 - 2 * stats.nct.cdf(critical, df, shift)))


def runs_for_equivalence(margin: float, variance_a: float, variance_b: float) -> float:
    """Runs per config for TOST to show equivalence within ±margin with probability POWER when
    the configs are in fact equal; NaN without a margin or spread, or beyond MAX_PLANNED_RUNS."""
    if not margin or variance_a + variance_b == 0:
        return math.nan
    return _smallest_n(lambda n: tost_power(margin, variance_a, n, variance_b, n) >= POWER)


def welch_tost(a, b, margin: float) -> float:
    """Two one-sided Welch tests (TOST) of |mean(b) - mean(a)| < margin: the larger of the two
    one-sided p-values. NaN where Welch's test cannot be computed or no margin is given."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not margin or len(a) < 2 or len(b) < 2:
        return math.nan
    square_se_a, square_se_b = _variance(a) / len(a), _variance(b) / len(b)
    if square_se_a == 0 and square_se_b == 0:
        return math.nan
    standard_error = math.sqrt(square_se_a + square_se_b)
    df = _welch_df(square_se_a, square_se_b, len(a), len(b))
    difference = b.mean() - a.mean()
    # the larger one-sided p is the one of the bound nearer to the difference
    return float(special.stdtr(df, (abs(difference) - margin) / standard_error))


def holm_adjust(p_values) -> list[float]:
    """Holm's step-down adjustment over the finite p-values (NaN stays NaN and is not counted
    in the family): sort, multiply the i-th smallest (0-based) by m - i, keep the running
    maximum so the order is kept, cap at 1."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running_max = 0.0
    for rank, (p, i) in enumerate(finite):
        running_max = max(running_max, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running_max
    return adjusted


def pairwise_tests(runs: pd.DataFrame,
                   detectable_difference: float = DEFAULT_DETECTABLE_DIFFERENCE,
                   equivalence_margin: float = 0.0, first_stage_seeds=()) -> pd.DataFrame:
    """For each pair of configs (a, b): a test of b - a on final test accuracy and, over the runs
    that converged, Welch's t-test on epochs_to_converge, each with its raw p-value, its
    Holm-adjusted p-value (within its own family of pairs) and `significant` (adjusted p < 5%).

    Accuracy is tested with Welch's t-test, or, when `first_stage_seeds` names the seeds of a
    two-stage study's first stage, with Stein's two-stage test (pipeline.core.two_stage), whose error
    rates hold although the number of runs was chosen from the first stage's spread.
    Per pair also: the smallest difference the study could detect (POWER, 5% two-sided), the
    runs per config needed to detect `detectable_difference`, and, with an equivalence margin,
    the TOST p-value (Holm-adjusted over the pairs), the runs per config needed to show
    equivalence, and the decision: "<config> better", "equivalent" or "undecided"."""
    accuracy, first, convergence = {}, {}, {}
    first_stage_seeds = {int(seed) for seed in first_stage_seeds}
    for config, group in runs.groupby("config", sort=False):
        accuracy[config] = group["final_test_accuracy"].to_numpy(dtype=float)
        first[config] = group.loc[group["seed"].isin(first_stage_seeds),
                                  "final_test_accuracy"].to_numpy(dtype=float)
        convergence[config] = group["epochs_to_converge"].dropna().to_numpy(dtype=float)
    rows = []
    for a, b in itertools.combinations(accuracy, 2):
        converged = welch_test(convergence[a], convergence[b])
        if first_stage_seeds:
            tested = two_stage.test(first[a], first[b], accuracy[a], accuracy[b],
                                    equivalence_margin, CONFIDENCE)
            tost = tested.pop("tost_p_value")
            tested.pop("half_width")
        else:
            tested = welch_test(accuracy[a], accuracy[b])
            tost = welch_tost(accuracy[a], accuracy[b], equivalence_margin)
        n_a, n_b = len(accuracy[a]), len(accuracy[b])
        variance_a = _variance(accuracy[a]) if n_a > 1 else math.nan
        variance_b = _variance(accuracy[b]) if n_b > 1 else math.nan
        planning = min(n_a, n_b) > 1 and variance_a + variance_b > 0
        rows.append({
            "a": a, "b": b, "n_a": n_a, "n_b": n_b,
            "mean_a": float(accuracy[a].mean()), "mean_b": float(accuracy[b].mean()),
            **tested,
            "converged_a": len(convergence[a]), "converged_b": len(convergence[b]),
            "convergence_mean_a": _mean(convergence[a]), "convergence_mean_b": _mean(convergence[b]),
            **{f"convergence_{key}": value for key, value in converged.items()},
            "procedure": "stein two-stage" if first_stage_seeds else "welch",
            "detectable_difference": (minimal_detectable_difference(variance_a, n_a, variance_b, n_b)
                                      if planning else math.nan),
            "target_difference": detectable_difference,
            "runs_to_detect": (runs_to_detect(detectable_difference, variance_a, variance_b)
                               if planning else math.nan),
            "equivalence_margin": equivalence_margin or math.nan,
            "tost_p_value": tost,
            "runs_for_equivalence": (runs_for_equivalence(equivalence_margin, variance_a, variance_b)
                                     if planning else math.nan),
        })
    pairs = pd.DataFrame(rows, columns=PAIRWISE_COLUMNS)
    for prefix in ("", "convergence_"):
        pairs[f"{prefix}p_holm"] = holm_adjust(pairs[f"{prefix}p_value"].tolist())
        pairs[f"{prefix}significant"] = pairs[f"{prefix}p_holm"] < SIGNIFICANCE_LEVEL  # NaN: False
    pairs["tost_p_holm"] = holm_adjust(pairs["tost_p_value"].tolist())
    pairs["equivalent"] = pairs["tost_p_holm"] < SIGNIFICANCE_LEVEL
    pairs["decision"] = [
        f"{pair.b if pair.difference > 0 else pair.a} better" if pair.significant
        else "equivalent" if pair.equivalent else "undecided"
        for pair in pairs.itertuples()]
    return pairs


def _pp(fraction: float) -> str:
    return f"{fraction * 100:+.2f} pp"


def _runs(count: int, config: str) -> str:
    return f"{count} run{'s' if count != 1 else ''} of {config}"


def _p(value: float) -> str:
    return f"{value:.3g}"


def conclusion(configs: pd.DataFrame, pairs: pd.DataFrame, warnings: list[str] = ()) -> str:
    """Plain words computed from the tables: the most accurate config against each other one,
    naming a winner only where the Holm-adjusted test supports it, then convergence likewise."""
    lines = []
    ranked = configs.sort_values("final_test_accuracy", ascending=False)
    best = ranked.index[0]
    if len(ranked) == 1:
        row = ranked.iloc[0]
        converged = (f" ({row.converged_runs} of {row.runs} runs converged)"
                     if row.runs > 1 else "")
        lines.append(f"Only {best} was compared: final test accuracy "
                     f"{row.final_test_accuracy:.2%} ({_runs(row.runs, best)}). Convergence: "
                     f"{_convergence_of(best, row)}{converged}.")
    for other in ranked.index[1:]:
        pair = _oriented(pairs, best, other)
        lines.append(_accuracy_sentence(best, other, ranked.loc[best], ranked.loc[other], pair))
        lines.append(_convergence_sentence(best, other, ranked.loc[best], ranked.loc[other], pair))
    lines.append("Highest test accuracy at any epoch (picked on the test set, so optimistic): "
                 + ", ".join(f"{c} {row.best_test_accuracy:.2%}" for c, row in ranked.iterrows())
                 + ".")
    footnote = (f"(Converged = test accuracy stays within {CONVERGENCE_TOLERANCE * 100:.1f} pp of "
                f"its mean over the last {CONVERGENCE_WINDOW} epochs; a config's convergence "
                f"epoch is the mean over its runs that converged. Accuracies are means over "
                f"{', '.join(_runs(n, c) for c, n in ranked['runs'].items())}.")
    if len(ranked) == 2:
        test = "Welch's" if pairs.procedure.iloc[0] == "welch" else "Stein's two-stage test's"
        footnote += (f" With one pair of configs the Holm-adjusted p-value equals {test}; the "
                     f"{CONFIDENCE:.0%} confidence interval is {test}.")
    elif len(ranked) > 2:
        # The best config is picked from the same data, so every pair could have made a headline.
        footnote += (f" p-values are Holm-adjusted over all {len(pairs)} pairs of configs (for "
                     f"accuracy and for convergence separately); the {CONFIDENCE:.0%} confidence "
                     f"intervals are per pair, not adjusted.")
    lines.append(footnote + ")")
    lines += [f"Note: {w}" for w in warnings]
    return "\n".join(lines)


def two_stage_note(pairs: pd.DataFrame, first_stage: int, target_half_width: float) -> str:
    """How a two-stage (seeds: auto) study chose its runs, and whether it met its target."""
    widest = float(((pairs.ci_high - pairs.ci_low) / 2).max())
    text = (f"the number of runs was chosen by Stein's two-stage procedure (Chapman's two-sample "
            f"form; docs/statistics.md): a first stage of {first_stage} runs per config, then as "
            f"many as each config's first-stage spread needed")
    if not target_half_width:
        return text + f"; the widest {CONFIDENCE:.0%} CI is ±{widest * 100:.2f} pp."
    text += f" for a {CONFIDENCE:.0%} CI of every difference within ±{target_half_width * 100:.2f} pp"
    if widest <= target_half_width * (1 + 1e-9):
        return text + f"; reached (widest ±{widest * 100:.2f} pp)."
    return (text + f"; not reached: the seed cap (max_seeds) stopped the study with a widest "
            f"interval of ±{widest * 100:.2f} pp. Tests and intervals keep their error rates, at "
            f"that wider precision.")


def _oriented(pairs: pd.DataFrame, best: str, other: str) -> pd.Series:
    """The pair's row with every difference and interval as best - other."""
    match = pairs[((pairs.a == best) & (pairs.b == other)) | ((pairs.a == other) & (pairs.b == best))]
    row = match.iloc[0].copy()
    if row.a == best:  # stored as other - best: flip
        for prefix in ("", "convergence_"):
            row[f"{prefix}difference"] = -row[f"{prefix}difference"]
            row[f"{prefix}ci_low"], row[f"{prefix}ci_high"] = (-row[f"{prefix}ci_high"],
                                                               -row[f"{prefix}ci_low"])
        for left, right in (("n_a", "n_b"), ("mean_a", "mean_b"), ("converged_a", "converged_b"),
                            ("convergence_mean_a", "convergence_mean_b")):
            row[left], row[right] = row[right], row[left]
    return row  # now a = other, b = best


def _accuracy_sentence(best: str, other: str, b: pd.Series, o: pd.Series, pair: pd.Series) -> str:
    values = f"{b.final_test_accuracy:.2%} vs {o.final_test_accuracy:.2%}"
    counts = f"{_runs(b.runs, best)} vs {_runs(o.runs, other)}"
    gap = _pp(pair.difference)
    if min(b.runs, o.runs) < 2:
        return (f"No winner between {best} and {other} on final test accuracy: {values} ({gap}, "
                f"{counts}). A single run shows one draw of training noise, so no significance "
                f"can be claimed: add seeds to the study to test the difference.")
    if math.isnan(pair.p_value):
        return (f"No winner between {best} and {other} on final test accuracy: {values} ({gap}, "
                f"{counts}). Every seed gave the same final accuracy for each config, so the gap "
                f"({gap}) is exact for this sample and these seeds, but seed noise cannot be "
                f"estimated and no significance is claimed: try more seeds or another sample.")
    evidence = (f"{gap}, {CONFIDENCE:.0%} CI {_pp(pair.ci_low)} to {_pp(pair.ci_high)}, "
                f"{TEST_NAMES[pair.procedure]} p = {_p(pair.p_value)}, Holm-adjusted p = "
                f"{_p(pair.p_holm)}, {counts}")
    if pair.significant:
        verdict = f"{best} is more accurate than {other}: final test accuracy {values} ({evidence})."
    else:
        verdict = (f"The data cannot tell {best} and {other} apart on final test accuracy: "
                   f"{values} ({evidence}).")
    return " ".join([verdict, _power_sentence(b.runs, o.runs, best, other, pair),
                     _equivalence_sentence(best, other, pair)]).rstrip()


def _about(count: float) -> str:
    return f"more than {MAX_PLANNED_RUNS}" if math.isnan(count) else f"about {count:.0f}"


def _power_sentence(runs_best: int, runs_other: int, best: str, other: str,
                    pair: pd.Series) -> str:
    """What the study could have detected, and what detecting the stated gap would take."""
    if math.isnan(pair.detectable_difference):
        return ""
    counts = (f"{runs_best} runs per config" if runs_best == runs_other
              else f"{_runs(runs_best, best)} and {_runs(runs_other, other)}")
    return (f"With {counts} only a gap of {pair.detectable_difference * 100:.2f} pp or more would "
            f"have been detected ({POWER:.0%} power, {SIGNIFICANCE_LEVEL:.0%} two-sided); "
            f"detecting a gap of {pair.target_difference * 100:.2f} pp would take "
            f"{_about(pair.runs_to_detect)} runs per config.")


def _equivalence_sentence(best: str, other: str, pair: pd.Series) -> str:
    """Equivalence within the stated margin, or what would decide an undecided pair."""
    if math.isnan(pair.equivalence_margin):
        return ("" if pair.significant else "No equivalence margin was given "
                "(equivalence_margin_pp), so equivalence is not tested.")
    margin = f"±{pair.equivalence_margin * 100:.2f} pp"
    tost = f"p = {_p(pair.tost_p_value)}, Holm-adjusted p = {_p(pair.tost_p_holm)}"
    if pair.equivalent:
        also = "The gap is also within " if pair.significant else f"{best} and {other} are equivalent within "
        one_sided = "Welch tests" if pair.procedure == "welch" else "Stein two-stage tests"
        return f"{also}{margin}: two one-sided {one_sided} (TOST) {tost}."
    if pair.significant:
        return f"Equivalence within {margin} is not shown (TOST {tost})."
    return (f"Undecided: neither a difference nor equivalence within {margin} is shown (TOST "
            f"{tost}); {_about(pair.runs_for_equivalence)} runs per config would show "
            f"equivalence within {margin} if the two are equally accurate, "
            f"{_about(pair.runs_to_detect)} would detect a gap of "
            f"{pair.target_difference * 100:.2f} pp.")


def _convergence_of(config: str, row: pd.Series) -> str:
    """`mlp3 at epoch 6.4 ± 1.1`, `mlp3 at epoch 7` or `mlp3 did not converge`."""
    if row.converged_runs == 0:
        return f"{config} did not converge"
    if row.converged_runs == 1:
        return f"{config} at epoch {row.epochs_to_converge:g}"
    return f"{config} at epoch {row.epochs_to_converge:.1f} ± {row.epochs_to_converge_std:.1f}"


def _convergence_sentence(best: str, other: str, b: pd.Series, o: pd.Series,
                          pair: pd.Series) -> str:
    if b.converged_runs == 0 and o.converged_runs == 0:
        return (f"Convergence: neither {best} nor {other} converged by its last epoch in any "
                f"run: train longer.")
    both = f"{_convergence_of(best, b)}, {_convergence_of(other, o)}"
    if min(b.runs, o.runs) < 2:
        return (f"Convergence: {both} ({_runs(b.runs, best)} vs {_runs(o.runs, other)}): a "
                f"single run cannot tell which converges sooner.")
    counts = (f"(mean ± std over converged runs, {b.converged_runs} of {b.runs} and "
              f"{o.converged_runs} of {o.runs} converged)")
    if min(b.converged_runs, o.converged_runs) < 2:
        return f"Convergence: {both} {counts}: too few converged runs to test the difference."
    if math.isnan(pair.convergence_p_value):
        return (f"Convergence: {both} {counts}: every converged run of each config converged "
                f"at the same epoch, so seed noise cannot be estimated and no difference is "
                f"claimed.")
    evidence = (f"Welch's t-test p = {_p(pair.convergence_p_value)}, Holm-adjusted p = "
                f"{_p(pair.convergence_p_holm)}")
    if not pair.convergence_significant:
        return f"Convergence: {both} {counts}: the difference is within seed noise ({evidence})."
    # difference = best - other in epochs; negative: best converges sooner
    sooner, later, sign = (best, other, -1) if pair.convergence_difference < 0 else (other, best, 1)
    low, high = sorted((sign * pair.convergence_ci_low, sign * pair.convergence_ci_high))
    return (f"Convergence: {sooner} converges sooner than {later}: {both} {counts}; "
            f"{sign * pair.convergence_difference:.1f} epochs sooner, {CONFIDENCE:.0%} CI "
            f"{low:.1f} to {high:.1f} epochs, {evidence}.")

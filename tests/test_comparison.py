"""Convergence, per-config tables, statistics and the conclusion, on hand-made histories.

The statistics are pinned to values computed here from the textbook formulas (Welch's t-test,
Welch–Satterthwaite degrees of freedom, Holm's step-down adjustment), not to the module's own
output, and the conclusion's wording is pinned sentence by sentence.
"""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.core.comparison import (
    RunRecord, config_table, conclusion, epochs_to_converge, holm_adjust, pairwise_tests,
    readable_table, run_table,
)


def history(test_accuracy, epoch_time=0.5):
    n = len(test_accuracy)
    return pd.DataFrame({
        "epoch": range(1, n + 1),
        "train_loss": np.linspace(1.0, 0.1, n), "train_accuracy": np.linspace(0.8, 1.0, n),
        "test_loss": np.linspace(1.2, 0.3, n), "test_accuracy": test_accuracy,
        "epoch_time_s": [epoch_time] * n,
    })


def record(config, seed, test_accuracy, epoch_time=0.5):
    return RunRecord(run_id=f"{config}-{seed}", config=config, seed=seed,
                     settings={"num_params": 100, "lr": "0.01", "batch_size": "64",
                               "momentum": "0.9"},
                     history=history(test_accuracy, epoch_time), train_time_s=1.0)


def seeds(config, finals):
    """One run per final accuracy; the histories end on a jump, so none has converged."""
    return [record(config, s, [0.9, 0.92, 0.93, 0.93, final]) for s, final in enumerate(finals)]


def converging(config, epochs, finals=None, length=12):
    """One run per entry of `epochs`: it converges at that epoch (None: never) and ends on the
    matching entry of `finals` (default 0.95, within the band of the plateau)."""
    finals = finals or [0.95] * len(epochs)
    runs = []
    for seed, (epoch, final) in enumerate(zip(epochs, finals)):
        if epoch is None:  # still climbing at the last epoch
            accuracy = [0.5] * (length - 1) + [final]
        else:
            accuracy = [0.5] * (epoch - 1) + [0.95] * (length - epoch) + [final]
        runs.append(record(config, seed, accuracy))
    return runs


def compare(records):
    runs = run_table(records)
    configs, pairs = config_table(runs), pairwise_tests(runs)
    return configs, pairs, conclusion(configs, pairs)


def welch_by_formula(a, b, confidence=0.95):
    """Welch's t-test of mean(b) - mean(a) from the formulas, with ddof=1 variances."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    difference = b.mean() - a.mean()
    square_se_a, square_se_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(square_se_a + square_se_b)
    df = (square_se_a + square_se_b) ** 2 / (
        square_se_a ** 2 / (len(a) - 1) + square_se_b ** 2 / (len(b) - 1))
    half_width = stats.t.ppf(0.5 + confidence / 2, df) * se
    return {"difference": difference, "ci_low": difference - half_width,
            "ci_high": difference + half_width, "p_value": 2 * stats.t.sf(abs(difference) / se, df)}


def assert_matches(row, expected, prefix=""):
    for key, value in expected.items():
        assert row[f"{prefix}{key}"] == pytest.approx(value, rel=1e-12, abs=0), key


# Final accuracies of two configs with different spreads and different numbers of seeds, so
# that Welch's test differs from the pooled-variance one and the counts cannot be swapped unseen.
MLP3_FINALS = [0.940, 0.943, 0.938, 0.945]
MLP4_FINALS = [0.947, 0.951, 0.944, 0.950, 0.949]


class TestEpochsToConverge:
    def test_first_epoch_from_which_accuracy_stays_in_the_band(self):
        # plateau = mean of last 5 = 0.95; epoch 4 (0.93) is the last one outside 0.5 pp
        accuracy = [0.80, 0.90, 0.92, 0.93, 0.948, 0.95, 0.951, 0.952, 0.949]
        assert epochs_to_converge(accuracy) == 5

    def test_a_dip_late_in_training_moves_convergence_after_it(self):
        accuracy = [0.90, 0.95, 0.95, 0.95, 0.94, 0.95, 0.95, 0.95, 0.95, 0.95]
        assert epochs_to_converge(accuracy) == 6

    def test_flat_history_converges_at_epoch_one(self):
        assert epochs_to_converge([0.9] * 6) == 1

    def test_still_climbing_at_the_last_epoch_is_not_converged(self):
        assert math.isnan(epochs_to_converge([0.5, 0.6, 0.7, 0.8, 0.9]))

    def test_exactly_half_a_point_away_counts_as_inside(self):
        assert epochs_to_converge([0.945, 0.95, 0.95, 0.95, 0.955]) == 1


def test_run_table_has_one_row_per_run_with_summary_numbers():
    runs = run_table([record("mlp3", 0, [0.90, 0.93, 0.94, 0.94, 0.94, 0.94], epoch_time=0.4)])
    row = runs.iloc[0]
    assert row.final_test_accuracy == pytest.approx(0.94)
    assert row.best_test_accuracy == pytest.approx(0.94)
    assert row.best_epoch == 3
    assert row.epochs == 6
    assert row.median_epoch_time_s == pytest.approx(0.4)
    assert row.num_params == 100


def test_config_table_means_and_std_over_seeds():
    records = [record("mlp3", s, [0.90] * 4 + [acc]) for s, acc in enumerate([0.91, 0.93])]
    records.append(record("mlp4", 0, [0.90] * 4 + [0.95]))
    table = config_table(run_table(records))
    assert list(table.index) == ["mlp4", "mlp3"]  # most accurate first
    assert table.loc["mlp3", "runs"] == 2
    assert table.loc["mlp3", "final_test_accuracy"] == pytest.approx(0.92)
    assert table.loc["mlp3", "final_test_accuracy_std"] == pytest.approx(np.std([0.91, 0.93], ddof=1))
    assert math.isnan(table.loc["mlp4", "final_test_accuracy_std"])


class TestUnconvergedSeeds:
    def test_convergence_is_averaged_over_the_runs_that_converged_and_they_are_counted(self):
        table = config_table(run_table(converging("mlp3", [6, 8, None, 7])
                                       + converging("mlp4", [None, None])))
        assert table.loc["mlp3", "converged_runs"] == 3
        assert table.loc["mlp3", "epochs_to_converge"] == pytest.approx(7.0)
        assert table.loc["mlp3", "epochs_to_converge_std"] == pytest.approx(1.0)
        assert table.loc["mlp4", "converged_runs"] == 0
        assert math.isnan(table.loc["mlp4", "epochs_to_converge"])

    def test_readable_table_says_how_many_converged_and_not_converged_only_when_none_did(self):
        readable = readable_table(config_table(run_table(
            converging("mlp3", [6, 8, None, 7]) + converging("mlp4", [None, None])
            + converging("mlp2", [3, 5]))))
        assert readable.loc["mlp3", "epochs_to_converge"] == "7.00 ± 1.00 (3/4 converged)"
        assert readable.loc["mlp4", "epochs_to_converge"] == "not converged"
        assert readable.loc["mlp2", "epochs_to_converge"] == "4.00 ± 1.41"


class TestWelch:
    def test_accuracy_difference_interval_and_p_match_the_formulas(self):
        pair = pairwise_tests(run_table(seeds("mlp3", MLP3_FINALS)
                                        + seeds("mlp4", MLP4_FINALS))).iloc[0]
        expected = welch_by_formula(MLP3_FINALS, MLP4_FINALS)
        # The formulas agree with scipy's Welch test on these data (no constant group here).
        scipy_test = stats.ttest_ind(MLP4_FINALS, MLP3_FINALS, equal_var=False)
        assert expected["p_value"] == pytest.approx(scipy_test.pvalue, rel=1e-12)
        assert expected["ci_low"] == pytest.approx(scipy_test.confidence_interval(0.95).low,
                                                   rel=1e-12)

        assert (pair.a, pair.b, pair.n_a, pair.n_b) == ("mlp3", "mlp4", 4, 5)
        assert pair.mean_a == pytest.approx(np.mean(MLP3_FINALS), rel=1e-12)
        assert pair.mean_b == pytest.approx(np.mean(MLP4_FINALS), rel=1e-12)
        assert_matches(pair, expected)
        assert pair.p_holm == pair.p_value  # a single pair: Holm changes nothing
        assert pair.significant == (expected["p_value"] < 0.05)

    def test_convergence_is_tested_over_the_converged_runs_only(self):
        pair = pairwise_tests(run_table(converging("mlp4", [2, 3, 2, 3, 2])
                                        + converging("mlp3", [7, 8, 6, 7, None]))).iloc[0]
        assert (pair.a, pair.b, pair.converged_a, pair.converged_b) == ("mlp4", "mlp3", 5, 4)
        assert pair.convergence_mean_a == pytest.approx(2.4)
        assert pair.convergence_mean_b == pytest.approx(7.0)
        assert_matches(pair, welch_by_formula([2, 3, 2, 3, 2], [7, 8, 6, 7]), "convergence_")
        assert pair.convergence_p_holm == pair.convergence_p_value
        assert pair.convergence_significant

    def test_one_constant_config_is_still_tested_without_warnings(self):
        constant, varied = [0.90] * 3, [0.94, 0.95, 0.96]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pair = pairwise_tests(run_table(seeds("mlp3", constant)
                                            + seeds("mlp4", varied))).iloc[0]
        # With no spread in one group, Welch's test is a one-sample test of the other one:
        # standard error from its variance alone, n - 1 degrees of freedom.
        difference = np.mean(varied) - np.mean(constant)
        se = math.sqrt(np.var(varied, ddof=1) / 3)
        half_width = stats.t.ppf(0.975, 2) * se
        assert_matches(pair, {"difference": difference, "ci_low": difference - half_width,
                              "ci_high": difference + half_width,
                              "p_value": 2 * stats.t.sf(difference / se, 2)})

    def test_no_spread_in_either_config_is_not_tested(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            configs, pairs, text = compare(seeds("mlp3", [0.90] * 3) + seeds("mlp4", [0.95] * 3))
        pair = pairs.iloc[0]
        assert pair.difference == pytest.approx(0.05)
        assert math.isnan(pair.p_value) and math.isnan(pair.p_holm) and not pair.significant
        assert math.isnan(pair.ci_low) and math.isnan(pair.ci_high)
        assert configs["final_test_accuracy_std"].tolist() == [0.0, 0.0]
        assert text.splitlines()[0] == (
            "No winner between mlp4 and mlp3 on final test accuracy: 95.00% vs 90.00% "
            "(+5.00 pp, 3 runs of mlp4 vs 3 runs of mlp3). Every seed gave the same final "
            "accuracy for each config, so the gap (+5.00 pp) is exact for this sample and these "
            "seeds, but seed noise cannot be estimated and no significance is claimed: try more "
            "seeds or another sample.")


class TestHolm:
    def test_holm_by_hand(self):
        # sorted 0.01, 0.03, 0.04 (m = 3): 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04)
        assert holm_adjust([0.01, 0.04, 0.03, math.nan]) == pytest.approx(
            [0.03, 0.06, 0.06, math.nan], nan_ok=True)
        # the running maximum: 2 * 0.011 = 0.022 is raised to 3 * 0.01 = 0.03
        assert holm_adjust([0.01, 0.011, 0.5]) == pytest.approx([0.03, 0.03, 0.5])
        # capped at 1
        assert holm_adjust([0.6, 0.5]) == pytest.approx([1.0, 1.0])
        assert holm_adjust([]) == []

    def test_three_configs_are_adjusted_over_every_pair_and_raw_5_percent_is_not_enough(self):
        mlp4 = [0.950, 0.952, 0.954, 0.956, 0.958]
        mlp3 = [round(x - 0.005, 6) for x in mlp4]
        mlp2 = [round(x - 0.0057, 6) for x in mlp4]
        configs, pairs, text = compare(seeds("mlp2", mlp2) + seeds("mlp3", mlp3)
                                       + seeds("mlp4", mlp4))
        pairs = pairs.set_index(["a", "b"])
        raw = {pair: welch_by_formula(*finals)["p_value"] for pair, finals in {
            ("mlp2", "mlp3"): (mlp2, mlp3), ("mlp2", "mlp4"): (mlp2, mlp4),
            ("mlp3", "mlp4"): (mlp3, mlp4)}.items()}
        # The finding: at a raw 5% level mlp4 "beats" both others.
        assert 0.015 < raw["mlp2", "mlp4"] < 0.025 and 0.03 < raw["mlp3", "mlp4"] < 0.045
        assert raw["mlp2", "mlp3"] > 0.5
        for pair, p in raw.items():
            assert pairs.loc[pair, "p_value"] == pytest.approx(p, rel=1e-12)

        # Holm by hand, smallest raw p first: (mlp2, mlp4) x 3, (mlp3, mlp4) x 2, (mlp2, mlp3) x 1
        first = 3 * raw["mlp2", "mlp4"]
        second = max(first, 2 * raw["mlp3", "mlp4"])
        third = min(1.0, max(second, raw["mlp2", "mlp3"]))
        assert pairs.loc[("mlp2", "mlp4"), "p_holm"] == pytest.approx(first, rel=1e-12)
        assert pairs.loc[("mlp3", "mlp4"), "p_holm"] == pytest.approx(second, rel=1e-12)
        assert pairs.loc[("mlp2", "mlp3"), "p_holm"] == pytest.approx(third, rel=1e-12)
        assert not pairs["significant"].any()

        lines = text.splitlines()  # the power sentences after each: tests/test_power_equivalence.py
        assert lines[0].startswith(
            "The data cannot tell mlp4 and mlp3 apart on final test accuracy: 95.40% vs 94.90% "
            "(+0.50 pp, 95% CI +0.04 pp to +0.96 pp, Welch's t-test p = 0.0369, Holm-adjusted "
            "p = 0.0739, 5 runs of mlp4 vs 5 runs of mlp3).")
        assert lines[2].startswith(
            "The data cannot tell mlp4 and mlp2 apart on final test accuracy: 95.40% vs 94.83% "
            "(+0.57 pp, 95% CI +0.11 pp to +1.03 pp, Welch's t-test p = 0.0215, Holm-adjusted "
            "p = 0.0644, 5 runs of mlp4 vs 5 runs of mlp2).")
        assert "more accurate" not in text and "significant" not in text
        assert "Holm-adjusted over all 3 pairs of configs" in text


class TestConclusion:
    def test_a_significant_difference_names_the_winner_with_its_evidence(self):
        _, _, text = compare(seeds("mlp3", MLP3_FINALS) + seeds("mlp4", MLP4_FINALS))
        assert text.splitlines()[0] == (
            "mlp4 is more accurate than mlp3: final test accuracy 94.82% vs 94.15% (+0.67 pp, "
            "95% CI +0.19 pp to +1.15 pp, Welch's t-test p = 0.0145, Holm-adjusted p = 0.0145, "
            "5 runs of mlp4 vs 4 runs of mlp3). With 5 runs of mlp4 and 4 runs of mlp3 only a gap "
            "of 0.67 pp or more would have been detected (80% power, 5% two-sided); detecting a "
            "gap of 0.20 pp would take about 36 runs per config.")

    def test_an_indistinguishable_difference_names_no_winner(self):
        _, _, text = compare(seeds("mlp3", [0.940, 0.950, 0.945, 0.935, 0.948])
                             + seeds("mlp4", [0.946, 0.938, 0.951, 0.941, 0.954]))
        assert text.splitlines()[0].startswith(
            "The data cannot tell mlp4 and mlp3 apart on final test accuracy: 94.60% vs 94.36% "
            "(+0.24 pp, 95% CI -0.69 pp to +1.17 pp, Welch's t-test p = 0.569, Holm-adjusted "
            "p = 0.569, 5 runs of mlp4 vs 5 runs of mlp3).")

    def test_run_counts_are_named_with_their_config(self):
        _, pairs, text = compare(seeds("mlp3", [0.940, 0.941, 0.942]) + seeds("mlp4", [0.950, 0.951]))
        assert (pairs.a[0], pairs.n_a[0], pairs.b[0], pairs.n_b[0]) == ("mlp3", 3, "mlp4", 2)
        assert "p = 0.00136, 2 runs of mlp4 vs 3 runs of mlp3)." in text.splitlines()[0]

    def test_single_runs_name_no_winner_and_no_sooner_convergence(self):
        early = record("mlp4", 0, [0.95] * 10)
        late = record("mlp3", 0, [0.80, 0.85, 0.88, 0.90, 0.92, 0.93, 0.94, 0.94, 0.94, 0.94])
        _, _, text = compare([early, late])
        # mlp3: plateau 0.938, so 0.93 at epoch 6 is the last one outside the band
        assert text.splitlines()[:2] == [
            "No winner between mlp4 and mlp3 on final test accuracy: 95.00% vs 94.00% (+1.00 pp, "
            "1 run of mlp4 vs 1 run of mlp3). A single run shows one draw of training noise, so "
            "no significance can be claimed: add seeds to the study to test the difference.",
            "Convergence: mlp4 at epoch 1, mlp3 at epoch 7 (1 run of mlp4 vs 1 run of mlp3): a "
            "single run cannot tell which converges sooner.",
        ]

    def test_sooner_convergence_is_claimed_when_the_test_supports_it(self):
        _, _, text = compare(converging("mlp4", [2, 3, 2, 3, 2], [0.951, 0.952, 0.953, 0.952, 0.951])
                             + converging("mlp3", [7, 8, 6, 7, None]))
        assert text.splitlines()[1] == (
            "Convergence: mlp4 converges sooner than mlp3: mlp4 at epoch 2.4 ± 0.5, mlp3 at epoch "
            "7.0 ± 0.8 (mean ± std over converged runs, 5 of 5 and 4 of 5 converged); 4.6 epochs "
            "sooner, 95% CI 3.4 to 5.8 epochs, Welch's t-test p = 0.000189, Holm-adjusted "
            "p = 0.000189.")

    def test_convergence_within_seed_noise_claims_nothing(self):
        _, _, text = compare(converging("mlp4", [5, 6, 7, 6, 4], [0.951, 0.952, 0.953, 0.952, 0.951])
                             + converging("mlp3", [6, 5, 7, 8, 6]))
        assert text.splitlines()[1] == (
            "Convergence: mlp4 at epoch 5.6 ± 1.1, mlp3 at epoch 6.4 ± 1.1 (mean ± std over "
            "converged runs, 5 of 5 and 5 of 5 converged): the difference is within seed noise "
            "(Welch's t-test p = 0.299, Holm-adjusted p = 0.299).")

    def test_a_config_that_never_converged_is_not_compared_on_convergence(self):
        _, _, text = compare(converging("mlp4", [2, 3, 2], [0.951, 0.952, 0.953])
                             + converging("mlp3", [None, None, None]))
        assert text.splitlines()[1] == (
            "Convergence: mlp4 at epoch 2.3 ± 0.6, mlp3 did not converge (mean ± std over "
            "converged runs, 3 of 3 and 0 of 3 converged): too few converged runs to test the "
            "difference.")

    def test_a_single_config_and_notes(self):
        runs = run_table(seeds("mlp3", [0.94]))
        text = conclusion(config_table(runs), pairwise_tests(runs), ["runs have different lengths"])
        assert text.splitlines()[0] == ("Only mlp3 was compared: final test accuracy 94.00% "
                                        "(1 run of mlp3). Convergence: mlp3 did not converge.")
        assert text.splitlines()[-1] == "Note: runs have different lengths"

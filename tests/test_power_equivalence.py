"""Power and equivalence in compare's statistics (issue 22, parts 1 and 2), on hand-made runs.

Power figures are pinned to Cohen's classic table for the two-sample t-test (equal spreads and
counts, where Welch's degrees of freedom are the pooled test's: 64 per group detect d = 0.5, 26
detect d = 0.8, at 5% two-sided and 80% power), TOST p-values to the two one-sided Welch tests
written out here, and the conclusion's words sentence by sentence.
"""

import math

import numpy as np
import pytest
from scipy import stats

from pipeline.core.comparison import (
    conclusion, config_table, minimal_detectable_difference, pairwise_tests, run_table,
    runs_for_equivalence, runs_to_detect, welch_power,
)
from test_comparison import seeds


def analyse(records, **options):
    runs = run_table(records)
    configs, pairs = config_table(runs), pairwise_tests(runs, **options)
    return pairs.set_index(["a", "b"]), conclusion(configs, pairs)


# Two configs 0.1 pp apart with a spread of about 0.1 pp: no difference is shown at 5 runs.
CLOSE_A = [0.9500, 0.9510, 0.9490, 0.9505, 0.9495]
CLOSE_B = [0.9510, 0.9520, 0.9500, 0.9515, 0.9505]


class TestPower:
    @pytest.mark.parametrize("effect, runs", [(0.5, 64), (0.8, 26)])
    def test_runs_to_detect_match_cohens_table(self, effect, runs):
        assert runs_to_detect(effect, 1.0, 1.0) == runs
        assert welch_power(effect, 1.0, runs, 1.0, runs) >= 0.80
        assert welch_power(effect, 1.0, runs - 1, 1.0, runs - 1) < 0.80

    def test_the_minimal_detectable_difference_is_detected_with_80_percent_power(self):
        detectable = minimal_detectable_difference(1.0, 64, 1.0, 64)
        assert welch_power(detectable, 1.0, 64, 1.0, 64) == pytest.approx(0.80, abs=1e-9)
        assert minimal_detectable_difference(1.0, 63, 1.0, 63) > 0.5 > detectable

    def test_no_spread_or_a_single_run_has_no_power_figures(self):
        assert math.isnan(minimal_detectable_difference(0.0, 5, 0.0, 5))
        assert math.isnan(minimal_detectable_difference(1.0, 1, 1.0, 5))
        assert math.isnan(runs_to_detect(0.002, 0.0, 0.0))

    def test_pairwise_carries_the_detectable_difference_and_the_runs_needed(self):
        pairs, _ = analyse(seeds("mlp3", CLOSE_A) + seeds("mlp4", CLOSE_B),
                           detectable_difference=0.002)
        pair = pairs.loc[("mlp3", "mlp4")]
        variance = np.var(CLOSE_A, ddof=1)  # both configs have the same spread
        assert pair.detectable_difference == pytest.approx(
            minimal_detectable_difference(variance, 5, variance, 5))
        assert welch_power(pair.detectable_difference, variance, 5, variance, 5) == \
            pytest.approx(0.80, abs=1e-6)
        assert pair.target_difference == 0.002
        assert pair.runs_to_detect == runs_to_detect(0.002, variance, variance)
        assert welch_power(0.002, variance, int(pair.runs_to_detect), variance,
                           int(pair.runs_to_detect)) >= 0.8

    def test_the_conclusion_says_what_could_have_been_detected_and_what_it_would_take(self):
        pairs, text = analyse(seeds("mlp3", CLOSE_A) + seeds("mlp4", CLOSE_B),
                              detectable_difference=0.0005)
        pair = pairs.loc[("mlp3", "mlp4")]
        line = text.splitlines()[0]
        assert line.startswith("The data cannot tell mlp4 and mlp3 apart")
        assert (f"With 5 runs per config only a gap of {pair.detectable_difference * 100:.2f} pp "
                f"or more would have been detected (80% power, 5% two-sided); detecting a gap "
                f"of 0.05 pp would take about {pair.runs_to_detect:.0f} runs per config.") in line


def tost_by_formula(a, b, margin):
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    d = b.mean() - a.mean()
    return max(1 - stats.t.cdf((d + margin) / se, df), stats.t.cdf((d - margin) / se, df))


class TestEquivalence:
    def test_tost_p_value_matches_the_two_one_sided_welch_tests(self):
        pairs, _ = analyse(seeds("mlp3", CLOSE_A) + seeds("mlp4", CLOSE_B),
                           equivalence_margin=0.003)
        pair = pairs.loc[("mlp3", "mlp4")]
        assert pair.tost_p_value == pytest.approx(tost_by_formula(CLOSE_A, CLOSE_B, 0.003),
                                                  rel=1e-9)
        assert pair.tost_p_holm == pair.tost_p_value  # one pair: Holm changes nothing
        assert pair.equivalent and not pair.significant
        assert pair.decision == "equivalent"

    def test_equivalent_within_the_margin_is_said_with_its_evidence(self):
        pairs, text = analyse(seeds("mlp3", CLOSE_A) + seeds("mlp4", CLOSE_B),
                              equivalence_margin=0.003)
        pair = pairs.loc[("mlp3", "mlp4")]
        assert (f"mlp4 and mlp3 are equivalent within ±0.30 pp: two one-sided Welch tests "
                f"(TOST) p = {pair.tost_p_value:.3g}, Holm-adjusted p = "
                f"{pair.tost_p_holm:.3g}.") in text.splitlines()[0]

    def test_a_margin_too_narrow_for_the_data_leaves_it_undecided_and_says_what_would_decide(self):
        pairs, text = analyse(seeds("mlp3", CLOSE_A) + seeds("mlp4", CLOSE_B),
                              equivalence_margin=0.001, detectable_difference=0.001)
        pair = pairs.loc[("mlp3", "mlp4")]
        assert not pair.equivalent and not pair.significant
        assert pair.decision == "undecided"
        variance = np.var(CLOSE_A, ddof=1)
        assert pair.runs_for_equivalence == runs_for_equivalence(0.001, variance, variance)
        assert (f"Undecided: neither a difference nor equivalence within ±0.10 pp is shown "
                f"(TOST p = {pair.tost_p_value:.3g}, Holm-adjusted p = {pair.tost_p_holm:.3g}); "
                f"about {pair.runs_for_equivalence:.0f} runs per config would show equivalence "
                f"within ±0.10 pp if the two are equally accurate, about "
                f"{pair.runs_to_detect:.0f} would detect a gap of 0.10 pp.") in text.splitlines()[0]

    def test_without_a_margin_no_equivalence_is_claimed(self):
        pairs, text = analyse(seeds("mlp3", CLOSE_A) + seeds("mlp4", CLOSE_B))
        pair = pairs.loc[("mlp3", "mlp4")]
        assert math.isnan(pair.tost_p_value) and not pair.equivalent
        assert pair.decision == "undecided"
        assert "equivalent" not in text
        assert ("No equivalence margin was given (equivalence_margin_pp), so equivalence is not "
                "tested.") in text.splitlines()[0]

    def test_a_clear_difference_is_decided_for_the_better_config(self):
        pairs, text = analyse(seeds("mlp3", [0.940, 0.941, 0.942, 0.940, 0.941])
                              + seeds("mlp4", CLOSE_B), equivalence_margin=0.003)
        pair = pairs.loc[("mlp3", "mlp4")]
        assert pair.significant and not pair.equivalent
        assert pair.decision == "mlp4 better"
        assert text.splitlines()[0].startswith("mlp4 is more accurate than mlp3")

    def test_tost_is_holm_adjusted_over_all_pairs(self):
        pairs, _ = analyse(seeds("mlp2", [0.9498, 0.9512, 0.9488, 0.9507, 0.9496])
                           + seeds("mlp3", CLOSE_A) + seeds("mlp4", CLOSE_B),
                           equivalence_margin=0.002)
        raw = pairs["tost_p_value"].to_numpy()
        order = np.argsort(raw)
        expected = np.maximum.accumulate(np.minimum(1, raw[order] * np.array([3, 2, 1])))
        assert pairs["tost_p_holm"].to_numpy()[order] == pytest.approx(expected, rel=1e-12)
        assert (pairs["equivalent"] == (pairs["tost_p_holm"] < 0.05)).all()

    def test_a_real_but_negligible_gap_is_called_better_and_within_the_margin(self):
        tight_a = [0.9500, 0.9501, 0.9499, 0.9500, 0.9501]
        tight_b = [0.9505, 0.9506, 0.9504, 0.9505, 0.9506]
        pairs, text = analyse(seeds("mlp3", tight_a) + seeds("mlp4", tight_b),
                              equivalence_margin=0.003)
        pair = pairs.loc[("mlp3", "mlp4")]
        assert pair.significant and pair.equivalent and pair.decision == "mlp4 better"
        assert text.splitlines()[0].startswith("mlp4 is more accurate than mlp3")
        assert (f"The gap is also within ±0.30 pp: two one-sided Welch tests (TOST) p = "
                f"{pair.tost_p_value:.3g}") in text.splitlines()[0]

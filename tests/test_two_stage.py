"""Stein's two-stage procedure in its two-sample form (pipeline.core.two_stage), by hand.

The critical value is checked against a Monte Carlo of T_b - T_a and against its normal limit;
the plan and the final test against Stein's formulas written out here. Its error rates over
thousands of simulated studies: tests/test_statistics_simulation.py.
"""

import math

import numpy as np
import pytest
from scipy import stats

from pipeline.core import two_stage

FIRST_A = [0.9500, 0.9520, 0.9480, 0.9510, 0.9490]  # sd 0.158 pp
FIRST_B = [0.9530, 0.9570, 0.9490, 0.9550, 0.9510]  # sd 0.316 pp


def test_critical_value_is_the_quantile_of_a_difference_of_two_t_variables():
    rng = np.random.default_rng(0)
    draws = stats.t.rvs(4, size=2_000_000, random_state=rng) - \
        stats.t.rvs(4, size=2_000_000, random_state=rng)
    assert two_stage.critical_value(4, 4, 0.025) == pytest.approx(np.quantile(draws, 0.975),
                                                                  abs=0.02)
    assert two_stage.difference_of_t_sf(3.0, 4, 4) == pytest.approx((draws > 3).mean(), abs=5e-4)
    # many degrees of freedom: the difference of two standard normals
    assert two_stage.critical_value(2000, 2000, 0.025) == pytest.approx(
        math.sqrt(2) * stats.norm.ppf(0.975), rel=1e-3)


@pytest.mark.parametrize("x", [0.5, 25.0, 5000.0, 9999.0, 10001.0, 1e6])
def test_the_tail_is_right_far_out_where_the_two_peaks_are_apart(x):
    # with 1 degree of freedom T_b - T_a is Cauchy with scale 2
    assert two_stage.difference_of_t_sf(x, 1, 1) == pytest.approx(
        0.5 - math.atan(x / 2) / math.pi, rel=1e-6)
    # far out, a difference of t variables is beyond x about when one of them is
    if x >= 5000:
        assert two_stage.difference_of_t_sf(x, 4, 4) == pytest.approx(2 * stats.t.sf(x, 4),
                                                                      rel=1e-3)


def test_plan_gives_each_config_the_runs_its_first_stage_spread_needs():
    c = two_stage.critical_value(4, 4, 0.025)
    z = (0.002 / c) ** 2
    expected = {"mlp3": max(5, math.ceil(np.var(FIRST_A, ddof=1) / z)),
                "mlp4": max(5, math.ceil(np.var(FIRST_B, ddof=1) / z))}
    assert expected == {"mlp3": 10, "mlp4": 39}  # the noisier config needs more seeds
    plan = two_stage.plan({"mlp3": FIRST_A, "mlp4": FIRST_B}, half_width=0.002, max_runs=40)
    assert plan.totals == expected and plan.target_reached


def test_a_wide_target_needs_no_second_stage_and_a_cap_says_the_target_is_missed():
    assert two_stage.plan({"a": FIRST_A, "b": FIRST_B}, 0.05, 30).totals == {"a": 5, "b": 5}
    capped = two_stage.plan({"a": FIRST_A, "b": FIRST_B}, 0.002, 20)
    assert capped.totals == {"a": 10, "b": 20} and not capped.target_reached


def test_plan_needs_two_first_stage_runs_per_config():
    with pytest.raises(ValueError, match="at least 2 runs"):
        two_stage.plan({"a": [0.95], "b": FIRST_B}, 0.004, 10)


def test_final_interval_and_p_values_follow_stein():
    rng = np.random.default_rng(1)
    all_a = np.r_[FIRST_A, rng.normal(0.95, 0.0016, 5)]  # the plan's 10 and 39 runs
    all_b = np.r_[FIRST_B, rng.normal(0.953, 0.0032, 34)]
    result = two_stage.test(FIRST_A, FIRST_B, all_a, all_b, margin=0.003)
    c = two_stage.critical_value(4, 4, 0.025)
    scale = math.sqrt(max(np.var(FIRST_A, ddof=1) / 10, np.var(FIRST_B, ddof=1) / 39))
    difference = all_b.mean() - all_a.mean()
    assert result["difference"] == pytest.approx(difference, rel=1e-12)
    assert result["half_width"] == pytest.approx(c * scale, rel=1e-9)
    assert result["half_width"] <= 0.002  # the plan's target
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(
        (difference - c * scale, difference + c * scale), rel=1e-9)
    assert result["p_value"] == pytest.approx(
        2 * two_stage.difference_of_t_sf(abs(difference) / scale, 4, 4), rel=1e-9)
    assert result["tost_p_value"] == pytest.approx(max(
        two_stage.difference_of_t_sf((difference + 0.003) / scale, 4, 4),
        two_stage.difference_of_t_sf((0.003 - difference) / scale, 4, 4)), rel=1e-9)
    # the interval's edge is where the two-sided p-value is exactly 5%
    assert 2 * two_stage.difference_of_t_sf(c, 4, 4) == pytest.approx(0.05, rel=1e-7)


def test_no_spread_in_either_first_stage_is_not_tested():
    result = two_stage.test([0.95] * 3, [0.96] * 3, [0.95] * 3, [0.96] * 3, margin=0.01)
    assert result["difference"] == pytest.approx(0.01)
    assert all(math.isnan(result[k]) for k in ("ci_low", "ci_high", "p_value", "tost_p_value"))

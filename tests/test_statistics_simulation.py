"""The statistics proved by simulation (issue 22, part 4): thousands of synthetic studies.

Accuracies over seeds are drawn from normal distributions (numpy, seeded; no training). For
each decision compare can make the rate of wrong decisions must stay at or below its nominal
level within Monte Carlo error (3 standard errors), the 95% intervals must cover the true
difference at least 95% of the time (same allowance), and the power figures must match the
simulated power. The negative control, naive "add seeds until significant", must fail the very
same checks, so they are strict enough to catch an invalid procedure.
"""

import functools
import math

import numpy as np
import pytest

from pipeline.core import two_stage
from pipeline.core.comparison import (
    minimal_detectable_difference, runs_to_detect, welch_test, welch_tost,
)

ALPHA = 0.05
MEAN = 0.95
# Unequal spreads (Welch's case), of the size the depth study sees: 0.1 and 0.2 pp.
SD_A, SD_B = 0.001, 0.002
MARGIN = 0.002


def monte_carlo_allowance(rate: float, trials: int) -> float:
    return 3 * math.sqrt(rate * (1 - rate) / trials)


def at_most_nominal(hits: int, trials: int, nominal: float) -> bool:
    """The observed rate is not above `nominal` beyond Monte Carlo error."""
    return hits / trials <= nominal + monte_carlo_allowance(nominal, trials)


def covers_nominal(covered: int, trials: int, nominal: float) -> bool:
    return covered / trials >= nominal - monte_carlo_allowance(nominal, trials)


def draw(rng, n, difference=0.0):
    return rng.normal(MEAN, SD_A, n), rng.normal(MEAN + difference, SD_B, n)


# --------------------------------------------------------------------------------------------
# Welch (a fixed number of seeds)
# --------------------------------------------------------------------------------------------

WELCH_STUDIES = 4000


def welch_studies(difference, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [welch_test(*draw(rng, n, difference)) for _ in range(WELCH_STUDIES)]


def test_welch_false_positive_rate_and_coverage_are_nominal():
    results = welch_studies(0.0)
    false_positives = sum(r["p_value"] < ALPHA for r in results)
    covered = sum(r["ci_low"] <= 0 <= r["ci_high"] for r in results)
    assert at_most_nominal(false_positives, WELCH_STUDIES, ALPHA), false_positives
    assert covers_nominal(covered, WELCH_STUDIES, 1 - ALPHA), covered


def test_tost_false_equivalence_rate_is_nominal_at_the_margin():
    for difference in (MARGIN, -MARGIN):  # the least favourable true gaps: just not equivalent
        rng = np.random.default_rng(1)
        claims = sum(welch_tost(*draw(rng, 10, difference), MARGIN) < ALPHA
                     for _ in range(WELCH_STUDIES))
        assert at_most_nominal(claims, WELCH_STUDIES, ALPHA), (difference, claims)


@pytest.mark.parametrize("n", [5, 12])
def test_the_minimal_detectable_difference_is_detected_80_percent_of_the_time(n):
    detectable = minimal_detectable_difference(SD_A ** 2, n, SD_B ** 2, n)
    results = welch_studies(detectable, n=n, seed=2)
    power = sum(r["p_value"] < ALPHA for r in results) / WELCH_STUDIES
    # the noncentral t with Welch's degrees of freedom is itself an approximation (~1 pp)
    assert abs(power - 0.80) <= monte_carlo_allowance(0.80, WELCH_STUDIES) + 0.015, power


def test_runs_to_detect_give_at_least_80_percent_power():
    n = int(runs_to_detect(0.002, SD_A ** 2, SD_B ** 2))
    power = sum(r["p_value"] < ALPHA for r in welch_studies(0.002, n=n, seed=3)) / WELCH_STUDIES
    assert power >= 0.80 - monte_carlo_allowance(0.80, WELCH_STUDIES) - 0.015, (n, power)


# --------------------------------------------------------------------------------------------
# Stein's two-stage procedure (seeds: auto) and the naive negative control
# --------------------------------------------------------------------------------------------

TWO_STAGE_STUDIES = 1000
FIRST_STAGE, HALF_WIDTH, MAX_SEEDS = 5, 0.003, 60


def two_stage_study(rng, difference, half_width=HALF_WIDTH, max_seeds=MAX_SEEDS):
    first_a, first_b = draw(rng, FIRST_STAGE, difference)
    plan = two_stage.plan({"a": first_a, "b": first_b}, half_width, max_seeds)
    more_a, more_b = (draw(rng, plan.totals[c] - FIRST_STAGE, difference)[i]
                      for i, c in enumerate("ab"))
    result = two_stage.test(first_a, first_b, np.r_[first_a, more_a], np.r_[first_b, more_b],
                            MARGIN)
    return {**result, "runs": plan.totals, "reached": plan.target_reached}


def capped_study(rng, difference):
    """A target no study reaches within 8 seeds: every one is capped."""
    return two_stage_study(rng, difference, half_width=0.0005, max_seeds=8)


def naive_study(rng, difference, start=2, max_seeds=20):
    """The negative control: add a seed per config until Welch's test is significant."""
    a, b = draw(rng, start, difference)
    while True:
        result = welch_test(a, b)
        if result["p_value"] < ALPHA or len(a) >= max_seeds:
            return result
        more_a, more_b = draw(rng, 1, difference)
        a, b = np.r_[a, more_a], np.r_[b, more_b]


@functools.cache
def simulated(procedure, difference: float) -> list[dict]:
    """TWO_STAGE_STUDIES studies of a procedure at a true difference (computed once)."""
    rng = np.random.default_rng(4)
    return [procedure(rng, difference) for _ in range(TWO_STAGE_STUDIES)]


def false_positives(results) -> int:
    return sum(r["p_value"] < ALPHA for r in results)


def covered(results, difference) -> int:
    return sum(r["ci_low"] <= difference <= r["ci_high"] for r in results)


def test_two_stage_false_positive_rate_and_coverage_are_nominal():
    results = simulated(two_stage_study, 0.0)
    assert at_most_nominal(false_positives(results), TWO_STAGE_STUDIES, ALPHA), \
        false_positives(results)
    assert covers_nominal(covered(results, 0.0), TWO_STAGE_STUDIES, 1 - ALPHA)
    # Every study reached its target width, with the runs its first stage asked for.
    assert all(r["reached"] and r["half_width"] <= HALF_WIDTH for r in results)
    assert len({tuple(r["runs"].values()) for r in results}) > 5  # the sizes vary


@pytest.mark.parametrize("difference", [MARGIN, -MARGIN])
def test_two_stage_false_equivalence_rate_is_nominal_at_the_margin_and_coverage_holds(difference):
    results = simulated(two_stage_study, difference)  # just not equivalent: the worst case
    claims = sum(r["tost_p_value"] < ALPHA for r in results)
    assert at_most_nominal(claims, TWO_STAGE_STUDIES, ALPHA), claims
    assert covers_nominal(covered(results, difference), TWO_STAGE_STUDIES, 1 - ALPHA)


def test_a_capped_two_stage_study_keeps_its_error_rates():
    results = simulated(capped_study, 0.0)
    assert not any(r["reached"] for r in results)
    assert at_most_nominal(false_positives(results), TWO_STAGE_STUDIES, ALPHA)
    assert covers_nominal(covered(results, 0.0), TWO_STAGE_STUDIES, 1 - ALPHA)


def test_naive_stop_when_significant_fails_the_same_checks():
    results = simulated(naive_study, 0.0)
    assert not at_most_nominal(false_positives(results), TWO_STAGE_STUDIES, ALPHA), \
        false_positives(results)
    assert not covers_nominal(covered(results, 0.0), TWO_STAGE_STUDIES, 1 - ALPHA)

"""Stein's two-stage procedure for the difference of two means (two-sample form: Chapman 1950).

A study that picks its own number of seeds: a first stage of n0 runs per config estimates each
config's spread s_i; from it alone each config's total n_i is fixed so that the final 95%
interval of the difference has at most a stated half-width h:

    c   = the 97.5% point of T_b - T_a, T_a and T_b independent Student t with n0 - 1 df
    z   = (h / c)^2
    n_i = max(n0, ceil(s_i^2 / z)), capped at max_runs

After the second stage, with D = mean(all runs of b) - mean(all runs of a) and
w^2 = max(s_a^2 / n_a, s_b^2 / n_b) (first-stage spreads, final counts), the interval D ± c·w
covers the true difference with probability at least 95% and the test "0 outside it" has level
at most 5%, although n_i was chosen from the data: given the first-stage spreads, D is normal
with variance sigma_a^2/n_a + sigma_b^2/n_b <= w^2 (sigma_a^2/s_a^2 + sigma_b^2/s_b^2), and
Z·sqrt(sigma_a^2/s_a^2 + sigma_b^2/s_b^2) has the law of T_b - T_a (Stein 1945's argument, once
per config). The same bound gives p-values and the two one-sided tests of equivalence. It
assumes a config's accuracies over seeds are normal; docs/statistics.md has the references.

Since w depends only on the first stage and the final counts, a cap (max_runs) keeps every
error rate valid: only the half-width grows (c·w > h) and the target is then not reached.
Pure numpy/scipy: nothing here trains or talks to MLflow.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import integrate, optimize, special

STD_TOLERANCE = 1e-12  # as pipeline.core.comparison: a smaller std is floating point noise
FAR_TAIL = 1e4  # beyond this the law of T_b - T_a is the sum of the two t tails


@functools.cache
def _log_t_density_constant(df: float) -> float:
    return float(special.gammaln((df + 1) / 2) - special.gammaln(df / 2)
                 - 0.5 * math.log(df * math.pi))


def difference_of_t_sf(x: float, df_a: float, df_b: float) -> float:
    """P(T_b - T_a > x) for independent T_a ~ t(df_a), T_b ~ t(df_b) (Chapman's distribution;
    symmetric, so the order of df_a and df_b does not matter), computed on the side where it is
    small so that tiny p-values keep their digits."""
    if x < 0:
        return 1.0 - difference_of_t_sf(-x, df_a, df_b)
    if x > FAR_TAIL:
        # Far out the difference is beyond x about exactly when one of the two is (relative
        # error below 1e-3 from here on); quad loses its digits there.
        return float(special.stdtr(df_a, -x) + special.stdtr(df_b, -x))
    # The t density written out: scipy.stats.t.pdf costs ~50 us a call in quad's inner loop.
    constant, power = _log_t_density_constant(df_a), -(df_a + 1) / 2

    def integrand(u: float) -> float:  # density of T_a at u times P(T_b > x + u)
        return math.exp(constant + power * math.log1p(u * u / df_a)) * special.stdtr(df_b, -(x + u))

    # Two features, far apart for large x: T_a's peak at 0 and T_b's step at -x. One quad over
    # the whole line can miss the second (half the mass for 1 df and x = 5000), so each piece
    # has its features at its ends.
    # The answer is of the order of P(T_a > x) + P(T_b > x): an absolute tolerance on that
    # scale keeps tiny tails accurate without asking quad for digits beyond roundoff.
    scale = special.stdtr(df_a, -x) + special.stdtr(df_b, -x)
    value = sum(integrate.quad(integrand, low, high, epsabs=1e-10 * scale, epsrel=1e-8,
                               limit=200)[0]
                for low, high in ((-np.inf, -x), (-x, -x / 2), (-x / 2, 0.0), (0.0, np.inf)))
    return min(1.0, max(0.0, value))


@functools.cache
def critical_value(df_a: float, df_b: float, tail: float) -> float:
    """c with P(T_b - T_a > c) = tail (the law is symmetric: two-sided level 2·tail)."""
    return float(optimize.brentq(lambda c: difference_of_t_sf(c, df_a, df_b) - tail,
                                 0.0, 1e4, xtol=1e-10))


def _sd(values: np.ndarray) -> float:
    sd = float(np.std(values, ddof=1))
    return 0.0 if sd < STD_TOLERANCE else sd


@dataclass(frozen=True)
class Plan:
    """Runs per config in total (first stage included) and whether the half-width target is
    met by them (False: some config was capped at max_runs)."""

    totals: dict[str, int]
    target_reached: bool


def plan(first_stage: dict[str, np.ndarray], half_width: float, max_runs: int,
         confidence: float = 0.95) -> Plan:
    """Stein's second-stage sizes from the first-stage values of each config. The critical value
    is that of the least-replicated pair of configs, so every pair meets the target."""
    counts = [len(values) for values in first_stage.values()]
    if min(counts) < 2:
        raise ValueError("the first stage needs at least 2 runs per config to estimate spread")
    if half_width <= 0:
        raise ValueError("the target half-width must be positive")
    df = min(counts) - 1
    scale_squared = (half_width / critical_value(df, df, (1 - confidence) / 2)) ** 2
    totals, reached = {}, True
    for config, values in first_stage.items():
        needed = max(len(values), math.ceil(_sd(np.asarray(values, float)) ** 2 / scale_squared
                                            - 1e-9))
        totals[config] = min(needed, max(max_runs, len(values)))
        reached &= needed <= totals[config]
    return Plan(totals, reached)


def test(first_a, first_b, all_a, all_b, margin: float = 0.0,
         confidence: float = 0.95) -> dict:
    """The second-stage analysis of mean(all_b) - mean(all_a): the difference, its interval
    (half-width c·w), the two-sided p-value and, with a margin, the TOST p-value of
    |difference| < margin. NaN interval and p-values where a first stage has fewer than 2 runs
    or neither has spread (no noise to test against)."""
    all_a, all_b = np.asarray(all_a, float), np.asarray(all_b, float)
    difference = float(all_b.mean() - all_a.mean())
    result = {"difference": difference, "ci_low": math.nan, "ci_high": math.nan,
              "p_value": math.nan, "tost_p_value": math.nan, "half_width": math.nan}
    if min(len(first_a), len(first_b)) < 2:
        return result
    sd_a, sd_b = _sd(np.asarray(first_a, float)), _sd(np.asarray(first_b, float))
    scale = math.sqrt(max(sd_a ** 2 / len(all_a), sd_b ** 2 / len(all_b)))
    if scale == 0:
        return result
    df_a, df_b = len(first_a) - 1, len(first_b) - 1
    half_width = critical_value(df_a, df_b, (1 - confidence) / 2) * scale
    result.update(ci_low=difference - half_width, ci_high=difference + half_width,
                  half_width=half_width,
                  p_value=min(1.0, 2 * difference_of_t_sf(abs(difference) / scale, df_a, df_b)))
    if margin:
        # The larger of the two one-sided p-values (H0: diff <= -margin, H0: diff >= margin) is
        # the one of the bound nearer to the difference; the law of T_b - T_a is symmetric.
        result["tost_p_value"] = difference_of_t_sf((margin - abs(difference)) / scale,
                                                    df_a, df_b)
    return result

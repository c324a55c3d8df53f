"""Convergence, per-config tables, statistics and the conclusion, on hand-made histories."""

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.comparison import (
    RunRecord, config_table, conclusion, epochs_to_converge, pairwise_tests, run_table,
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


def seeds(config, finals):
    return [record(config, s, [0.9, 0.92, 0.93, 0.93, final]) for s, final in enumerate(finals)]


def test_clearly_separated_configs_are_significant():
    runs = run_table(seeds("mlp3", [0.940, 0.941, 0.942, 0.939, 0.940])
                     + seeds("mlp4", [0.950, 0.951, 0.949, 0.950, 0.952]))
    pair = pairwise_tests(runs).iloc[0]
    assert (pair.a, pair.b) == ("mlp3", "mlp4")
    assert pair.difference == pytest.approx(0.0100, abs=1e-4)
    assert pair.p_value < 0.001
    assert 0 < pair.ci_low < pair.difference < pair.ci_high
    text = conclusion(config_table(runs), pairwise_tests(runs))
    assert "mlp4 is more accurate than mlp3" in text
    assert "significant at the 5% level" in text and "not significant" not in text


def test_overlapping_configs_are_not_significant():
    runs = run_table(seeds("mlp3", [0.940, 0.950, 0.945, 0.935, 0.948])
                     + seeds("mlp4", [0.946, 0.938, 0.951, 0.941, 0.944]))
    pair = pairwise_tests(runs).iloc[0]
    assert pair.p_value > 0.5
    assert pair.ci_low < 0 < pair.ci_high
    assert "not significant" in conclusion(config_table(runs), pairwise_tests(runs))


def test_single_runs_claim_no_significance():
    runs = run_table(seeds("mlp3", [0.94]) + seeds("mlp4", [0.95]))
    pair = pairwise_tests(runs).iloc[0]
    assert math.isnan(pair.p_value)
    text = conclusion(config_table(runs), pairwise_tests(runs))
    assert "no significance can be claimed" in text
    assert "+1.00 pp" in text


def test_conclusion_names_the_model_that_converges_sooner():
    early = record("mlp4", 0, [0.95] * 10)
    late = record("mlp3", 0, [0.80, 0.85, 0.88, 0.90, 0.92, 0.93, 0.94, 0.94, 0.94, 0.94])
    runs = run_table([early, late])
    text = conclusion(config_table(runs), pairwise_tests(runs))
    # mlp3: plateau 0.938, so 0.93 at epoch 6 is the last one outside the band
    assert "mlp4 converges sooner: epoch 1 vs epoch 7 for mlp3" in text


def test_conclusion_carries_notes():
    runs = run_table(seeds("mlp3", [0.94]))
    text = conclusion(config_table(runs), pairwise_tests(runs), ["runs have different lengths"])
    assert "Only mlp3 was compared" in text
    assert "Note: runs have different lengths" in text

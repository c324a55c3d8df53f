"""A training's summary metrics from its per-epoch history: what train logs at its end and
compare tabulates, kept apart from compare's statistics and wording so that rewording a
conclusion retrains nothing."""

from __future__ import annotations

import pandas as pd


def summarize(history: pd.DataFrame) -> dict:
    """A run's summary: final and best test accuracy and the (first) epoch of the best."""
    best = history.loc[history["test_accuracy"].idxmax()]
    return {
        "final_test_accuracy": float(history["test_accuracy"].iloc[-1]),
        "best_test_accuracy": float(best["test_accuracy"]),
        "best_epoch": int(best["epoch"]),
    }

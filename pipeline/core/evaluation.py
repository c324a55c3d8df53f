"""Classification metrics for a model's logits on a labelled split, via scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import log_softmax
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from pipeline.core.data import NUM_CLASSES

DIGITS = list(range(NUM_CLASSES))


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float  # mean cross-entropy of the logits, as the train stage computes it
    per_class: pd.DataFrame  # index digit; columns precision, recall, f1, support
    confusion: pd.DataFrame  # rows true digit, columns predicted digit
    predictions: np.ndarray

    def metrics(self) -> dict[str, float]:
        flat = {"test_accuracy": self.accuracy, "test_loss": self.loss}
        for digit, row in self.per_class.iterrows():
            for name in ("precision", "recall", "f1"):
                flat[f"{name}_{digit}"] = float(row[name])
        flat["macro_f1"] = float(self.per_class["f1"].mean())
        return flat


def evaluate_logits(logits: np.ndarray, labels: np.ndarray) -> Evaluation:
    logits = np.asarray(logits, dtype=np.float64)
    predictions = logits.argmax(axis=1)
    loss = float(-log_softmax(logits, axis=1)[np.arange(len(labels)), labels].mean())
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=DIGITS, zero_division=0
    )
    per_class = pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support},
        index=pd.Index(DIGITS, name="digit"),
    )
    confusion = pd.DataFrame(
        confusion_matrix(labels, predictions, labels=DIGITS),
        index=pd.Index(DIGITS, name="true"),
        columns=pd.Index(DIGITS, name="predicted"),
    )
    return Evaluation(
        accuracy=float(accuracy_score(labels, predictions)),
        loss=loss,
        per_class=per_class,
        confusion=confusion,
        predictions=predictions,
    )

"""The MLflow flavor `train` logs its model with: PyTorch inside, digits and probabilities out.

`mlflow.pytorch.load_model` gives the network itself (raw 0-255 pixels, shape (N, 784), to
(N, 10) logits). The python_function flavor, which `mlflow models serve` and
`mlflow.pyfunc.load_model` use, answers each image's `digit` and its 10 `probabilities`: a
client of the served model should not have to know what a logit is.

This file is copied into every logged model (its `code/` folder) and named there as the
pyfunc's loader module, so it imports nothing of `pipeline`: the served model needs only
torch, numpy, pandas and mlflow.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

# The module's name inside the model, where code/ is on sys.path: the file's own name.
LOADER_MODULE = Path(__file__).stem
DIGIT, PROBABILITIES = "digit", "probabilities"


def digits_and_probabilities(logits: np.ndarray) -> pd.DataFrame:
    """Per image: the most likely digit (the logits' argmax) and the softmax of its logits."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    return pd.DataFrame({DIGIT: logits.argmax(axis=1),
                         PROBABILITIES: [row.tolist() for row in probabilities]})


def output_schema():
    """What the pyfunc answers, declared rather than inferred (inference warns that an
    integer column cannot hold missing values, which a digit never is)."""
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return Schema([ColSpec(DataType.long, DIGIT), ColSpec(Array(DataType.double), PROBABILITIES)])


def save_model(pytorch_model, path, mlflow_model=None, **kwargs) -> None:
    """`mlflow.pytorch.save_model`, with this module as the pyfunc's loader.

    Called by `mlflow.models.Model.log(flavor=this module, ...)`; keyword arguments are
    `mlflow.pytorch.save_model`'s.
    """
    import mlflow.pytorch
    from mlflow.models import Model

    mlflow_model = mlflow_model or Model()
    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model,
                              code_paths=[__file__], **kwargs)
    mlflow_model.flavors["python_function"]["loader_module"] = LOADER_MODULE
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> "DigitClassifier":
    """The pyfunc loader's entry point (MLflow calls it with the model's data folder)."""
    import mlflow.pytorch

    return DigitClassifier(mlflow.pytorch._load_pyfunc(data_path, model_config))


class DigitClassifier:
    """Wraps MLflow's PyTorch pyfunc (which returns logits) and turns its logits into digits."""

    def __init__(self, logits_model):
        self.logits_model = logits_model

    def get_raw_model(self):
        return self.logits_model.get_raw_model()

    def predict(self, data, params: dict | None = None) -> pd.DataFrame:
        return digits_and_probabilities(np.asarray(self.logits_model.predict(data, params)))

"""evaluate: load a logged or registered model as a consumer would and score it on a sample.

It logs, besides the metrics and figures, `predictions.csv`: every test image's label and
predicted digit, which the served model must answer too."""

from __future__ import annotations

import tempfile

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from sklearn.metrics import ConfusionMatrixDisplay

from pipeline.cache import evaluate_keys
from pipeline.core import plots
from pipeline.core.evaluation import evaluate_logits
from pipeline.errors import PipelineError
from pipeline.runs import samples, tracking
from pipeline.stage_index import STAGES

STAGE = "evaluate"
SOURCE_RUN_TAG = "pipeline.source_run_id"
MISCLASSIFIED_SHOWN = 40


def load_network(model_uri: str) -> tuple[torch.nn.Module, str | None]:
    """The network logged at `model_uri` (runs:/, models:/name@alias, ...) and the run that
    logged it.

    Downloaded once, into a folder removed afterwards: MLflow's own download folder is never
    removed, which left a copy of the model in /tmp per evaluation.
    """
    if not model_uri:
        raise PipelineError("model_uri is required, e.g. runs:/<train run id>/model or "
                            "models:/mnist-mlp@champion")
    with tempfile.TemporaryDirectory(prefix="mnist-model-") as scratch:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch)
            source = Model.load(local).run_id
        except (MlflowException, OSError) as err:
            raise PipelineError(
                f"cannot find a model at {model_uri!r} in {mlflow.get_tracking_uri()}: "
                f"{str(err).splitlines()[0]}. Use runs:/<train run id>/model, "
                f"models:/<name>/<version> or models:/<name>@champion"
            ) from err
        return mlflow.pytorch.load_model(local), source


def data_run_for(params: dict, source_run: str | None) -> str:
    """The given sample, else the one the model was trained on, else the default sample."""
    if not params["data_run_id"] and source_run:
        trained_on = mlflow.get_run(source_run).data.params.get("sample_run_id")
        if trained_on:
            return trained_on
    return samples.resolve_data_run(params, draw=STAGES["sample_data"])


def network_logits(network: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """The network's logits (the loss needs them; the served pyfunc answers digits and
    probabilities), computed as MLflow's PyTorch pyfunc does: float32 input, no autograd."""
    with torch.no_grad():
        return network(torch.from_numpy(features)).numpy()


def run(params: dict) -> str:
    with tracking.stage_run(STAGE, "evaluate", params) as run:
        network, source = load_network(params["model_uri"])
        mlflow.set_tags({"mlflow.runName": evaluate_keys.evaluate_run_name(source),
                         SOURCE_RUN_TAG: source or ""})
        if source:
            mlflow.set_tag("pipeline.model", mlflow.get_run(source).data.tags.get("pipeline.model", ""))
        data_run_id = data_run_for(params, source)
        mlflow.set_tag(tracking.CACHE_KEY_TAG, evaluate_keys.evaluate_key(params, source, data_run_id))
        tracking.log_params_once({"sample_run_id": data_run_id})
        sample = samples.fetch_sample(data_run_id, params["data_dir"])
        samples.log_sample_inputs(sample, data_run_id)

        logits = network_logits(network, sample.test.features().numpy())
        labels = sample.test.labels.numpy()
        result = evaluate_logits(logits, labels)

        mlflow.log_metrics(result.metrics())
        mlflow.log_text(pd.DataFrame({"label": labels, "digit": result.predictions})
                        .to_csv(index_label="test_index"), "predictions.csv")
        mlflow.log_text(result.per_class.to_csv(), "per_class.csv")
        mlflow.log_text(result.confusion.to_csv(), "confusion_matrix.csv")
        display = ConfusionMatrixDisplay(result.confusion.to_numpy(), display_labels=list(range(10)))
        display.plot(cmap="Blues", colorbar=False)
        display.ax_.set_title(f"Confusion matrix, test accuracy {result.accuracy:.4f}")
        mlflow.log_figure(display.figure_, "confusion_matrix.png")
        plots.close(display.figure_)

        wrong = np.flatnonzero(result.predictions != labels)
        shown = wrong[:MISCLASSIFIED_SHOWN]
        titles = [f"true {labels[i]} / pred {result.predictions[i]}" for i in shown]
        fig = plots.digit_grid(sample.test.images[torch.from_numpy(shown)], titles, columns=8)
        fig.suptitle(f"{len(wrong)} misclassified test digits (first {len(shown)} shown)")
        mlflow.log_figure(fig, "misclassified.png")
        plots.close(fig)
        print(f"test accuracy {result.accuracy:.4f}, loss {result.loss:.4f} ({params['model_uri']})")
        return run.info.run_id

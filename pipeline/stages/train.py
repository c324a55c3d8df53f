"""train: fit one configured model on a logged sample and track everything about it.

How a model is trained is pipeline.core.training (the loop) on pipeline.core.models; this
module wires it to its MLflow run: the sample, the cache key, resuming, checkpoints, per-epoch
metrics and the logged model."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cloudpickle

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import Model, ModelSignature, infer_signature

from pipeline import interrupts
from pipeline.cache import train_keys
from pipeline.cache.machine import numerics
from pipeline.core import models, plots
from pipeline.core.checkpoint import meta_differences
from pipeline.core.config import load_model_config
from pipeline.core.models import build_model, count_parameters
from pipeline.core.summary import summarize
from pipeline.core.training import METRIC_NAMES, train
from pipeline.errors import PipelineError
from pipeline.runs import digit_classifier, samples, tracking
from pipeline.runs.checkpoint_store import CheckpointStore, fetch_checkpoint
from pipeline.runs.metric_writer import MetricWriter
from pipeline.runs.resume import numerics_differences
from pipeline.stage_index import STAGES

STAGE = "train"
# A checkpoint continues a run only under the parameters it was made with (and the same
# config content and sample, see checkpoint_meta).
RESUME_MUST_MATCH = ("epochs", "batch_size", "lr", "momentum", "seed", "precision", "normalize",
                     "samples_per_class", "sampling", "sampling_seed")
# On a stop signal the run must end within seconds: metric points and the checkpoint upload
# get this long each, then what is left is in the local checkpoint for a resume here.
STOP_WAIT_S = 2.0
MODEL_ARTIFACT = "model"
# Pinned without local version suffixes (+cpu/+cu130) so pip can install them when serving.
MODEL_REQUIREMENTS = [
    f"torch=={torch.__version__.split('+')[0]}",
    f"mlflow=={mlflow.__version__}",
    f"numpy=={np.__version__}",
    f"pandas=={pd.__version__}",  # the pyfunc answers a DataFrame (digit_classifier)
]


@dataclass(frozen=True)
class ResumePoint:
    """A KILLED, FAILED or (after SIGKILL) RUNNING train run and the checkpoint to go on from."""

    run_id: str
    checkpoint: dict
    source: str  # where the checkpoint was read from
    logged: dict[str, dict[int, float]]  # the points the run already holds, metric -> step -> value
    # What the run's end already logged when a stop came after it (see ResumePoint.to_log):
    summary: dict[str, float]
    model_uri: str | None

    @property
    def epochs_done(self) -> int:
        return self.checkpoint["epochs_done"]

    def to_log(self, summary: dict[str, float]) -> dict[str, float]:
        """The summary metrics the run lacks. A run stopped after its end was logged (during
        the final checkpoint upload, say) holds them already; a second point would make
        `final_test_accuracy` a two-point history."""
        return {name: value for name, value in summary.items() if name not in self.summary}


def checkpoint_meta(params: dict, config, sample_run_id: str) -> dict:
    """What a checkpoint must have been made with to continue under these parameters."""
    return {
        "config": config.name, "config_digest": config.digest, "sample_run_id": sample_run_id,
        **{name: params[name] for name in RESUME_MUST_MATCH},
    }


class OtherNumerics(PipelineError):
    """The run to resume was trained where a training's bits come out otherwise."""


def prepare_resume(params: dict) -> ResumePoint:
    """Check everything about resuming `resume_run_id` before the run is touched."""
    run_id = params["resume_run_id"]
    run = tracking.get_run(run_id, "resume_run_id")
    stage = run.data.tags.get(tracking.STAGE_TAG)
    if stage != STAGE:
        raise PipelineError(f"resume_run_id: run {run_id} is a {stage or 'non-pipeline'} run; "
                            f"only a train run can be resumed")
    if run.info.status == "FINISHED":
        raise PipelineError(f"resume_run_id: run {run_id} already FINISHED; nothing to resume "
                            f"(its model is runs:/{run_id}/{MODEL_ARTIFACT})")
    checkpoint, source = fetch_checkpoint(run_id)
    config = load_model_config(params["config"])
    settings = train_keys.train_settings(params)
    other_numerics = numerics_differences(run.data.params, settings.device)
    if other_numerics:
        raise OtherNumerics(
            f"resume_run_id: run {run_id} was trained with other numerics than this machine's "
            f"(run vs here): {'; '.join(other_numerics)}; its remaining epochs would not match "
            f"its first ones bit for bit. Resume it where these match (the same "
            f"OMP_NUM_THREADS, device and torch, a processor of the same model), or leave "
            f"resume_run_id empty (main: force=true) to start a new run"
        )
    sample_run_id = params["data_run_id"] or run.data.params.get("sample_run_id", "")
    expected = checkpoint_meta(params, config, sample_run_id)
    differences = meta_differences(checkpoint["meta"].get("params", {}), expected)
    if differences:
        raise PipelineError(
            f"resume_run_id: run {run_id}'s checkpoint was made with other parameters "
            f"(checkpoint vs given): {'; '.join(differences)}; pass the checkpoint's values to "
            f"resume it, or leave resume_run_id empty to start a new run"
        )
    client = mlflow.MlflowClient()
    logged = {name: {m.step: m.value for m in client.get_metric_history(run_id, name)}
              for name in METRIC_NAMES}
    return ResumePoint(run_id, checkpoint, source, logged, dict(run.data.metrics),
                       run.data.tags.get(tracking.MODEL_URI_TAG))


def run(params: dict) -> str:
    """Train and log one model (or continue `resume_run_id`); returns the run id."""
    resume = prepare_resume(params) if params["resume_run_id"] else None
    config_name = Path(params["config"]).stem
    tags = {"pipeline.model": config_name}
    with tracking.stage_run(STAGE, train_keys.train_run_name(params), params, tags,
                            resume_run_id=params["resume_run_id"], system_metrics=True) as run:
        config = load_model_config(params["config"])
        mlflow.set_tag("mlflow.note.content", f"{config.name}: {config.description}")
        settings = train_keys.train_settings(params)
        if settings.device.startswith("cuda") and not torch.cuda.is_available():
            raise PipelineError(f"device={params['device']}: the NVIDIA driver shows a GPU but "
                                f"torch {torch.__version__} cannot use it (driver too old for its "
                                f"CUDA {torch.version.cuda}?); pass device=cpu")
        if resume:
            data_run_id = resume.checkpoint["meta"]["params"]["sample_run_id"]
        else:
            data_run_id = samples.resolve_data_run(params, draw=STAGES["sample_data"])
        mlflow.set_tag(tracking.CACHE_KEY_TAG, train_keys.train_key(params, data_run_id))
        machine = numerics(settings.device)
        tracking.log_params_once(
            {"model_config": config.name, "sample_run_id": data_run_id,
             "torch_device": settings.device, **machine}
        )
        sample = samples.fetch_sample(data_run_id, params["data_dir"])
        # The threads the cache key names (machine.numerics), not whatever torch picked.
        torch.set_num_threads(machine["torch_threads"])
        torch.manual_seed(settings.seed)
        model = build_model(config.model, normalize=params["normalize"])
        if resume:
            print(f"resuming {config.name} run {run.info.run_id} after epoch "
                  f"{resume.epochs_done} of {settings.epochs} ({resume.source})")
        else:
            samples.log_sample_inputs(sample, data_run_id)
            mlflow.log_metric("num_params", count_parameters(model))
            print(f"training {config.name} ({count_parameters(model):,} parameters) on "
                  f"{settings.device}, {settings.epochs} epochs")

        history: list[dict] = list(resume.checkpoint["history"]) if resume else []
        already = resume.logged if resume else {}
        client = mlflow.MlflowClient()
        writer = MetricWriter(client, run.info.run_id)
        # Epochs the checkpoint holds but the run lacks (their writes were lost with the server).
        for record in history:
            if record["epoch"] not in already.get("test_accuracy", {}):
                writer.log(_per_epoch(record), step=record["epoch"])
        meta = {"params": checkpoint_meta(params, config, data_run_id)}
        earlier = resume.checkpoint["meta"].get("train_time_s", 0.0) if resume else 0.0
        started = time.perf_counter()
        store = CheckpointStore(run.info.run_id, client)

        def save(state: dict) -> None:
            store.save(state, {**meta, "train_time_s": earlier + time.perf_counter() - started})

        try:
            train(
                model,
                (sample.train.features(), sample.train.labels),
                (sample.test.features(), sample.test.labels),
                settings,
                on_epoch=lambda record: _log_epoch(writer, record, settings.epochs, history,
                                                   already),
                resume=resume.checkpoint if resume else None,
                on_checkpoint=save,
                checkpoint_every=params["checkpoint_every"],
            )
            summary = summarize(pd.DataFrame(history))
            summary["train_time_s"] = earlier + time.perf_counter() - started
            writer.flush()
            _log_history(history, config.name)
            mlflow.log_metrics(resume.to_log(summary) if resume else summary)
            if params["log_model"] and resume and resume.model_uri:
                print(f"model already logged before the stop: {resume.model_uri}")
            elif params["log_model"]:
                log_model(model.cpu(), sample.test.features()[:5])
        except interrupts.Interrupted:
            # Seconds, not minutes: what is not written by then is in the local checkpoint
            # (and its history in the checkpoint); the figures wait for the resume.
            _best_effort_flush(writer, STOP_WAIT_S)
            store.close(timeout=STOP_WAIT_S)
            with tracking.hurried():
                _keep_history(history, config.name, figures=False)
            raise
        except BaseException:
            # A FAILED run can be resumed too (main does). A store that already refused
            # writes gets seconds, not the whole retry window again.
            if writer.last_error is None:
                _best_effort_flush(writer, None)
            store.close(timeout=STOP_WAIT_S if writer.last_error else 60)
            _keep_history(history, config.name)
            raise
        finally:
            writer.close()
        store.close()
        print(f"final test accuracy {summary['final_test_accuracy']:.4f}, best "
              f"{summary['best_test_accuracy']:.4f} at epoch {summary['best_epoch']}")
        return run.info.run_id


def _per_epoch(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "epoch"}


def _best_effort_flush(writer: MetricWriter, timeout: float | None) -> None:
    try:
        writer.flush(timeout)
    except PipelineError as err:
        print(f"warning: {err}", file=sys.stderr, flush=True)


def _log_epoch(writer: MetricWriter, record: dict, epochs: int, history: list[dict],
               already: dict[str, dict[int, float]]) -> None:
    history.append(record)
    epoch = record["epoch"]
    if epoch in already.get("test_accuracy", {}):
        # Trained again after a resume from an older checkpoint: the run holds this epoch's
        # points already, and a second point per step would corrupt its history.
        redone = [k for k in METRIC_NAMES
                  if k != "epoch_time_s" and already[k].get(epoch) != record[k]]
        print(f"epoch {epoch:>3}/{epochs}  already logged"
              f"{'; differs from the logged values in ' + ', '.join(redone) if redone else ''}",
              file=sys.stderr, flush=True)
        return
    # Queued, not written here: training must not wait on the tracking server.
    writer.log(_per_epoch(record), step=epoch)
    print(
        f"epoch {epoch:>3}/{epochs}  "
        f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  "
        f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}  "
        f"{record['epoch_time_s']:.2f}s",
        file=sys.stderr, flush=True,
    )


def _keep_history(history: list[dict], name: str, figures: bool = True) -> None:
    """Even a diverged or interrupted run keeps the epochs it finished, if the store lets it:
    the reason the run stopped matters more than a failure to write its figures."""
    try:
        _log_history(history, name, figures)
    except Exception as err:  # noqa: BLE001
        print(f"warning: could not log history.csv{' and the figures' if figures else ''}: "
              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)


def _log_history(history: list[dict], name: str, figures: bool = True) -> None:
    if not history:
        return
    frame = pd.DataFrame(history)
    mlflow.log_text(frame.to_csv(index=False), "history.csv")
    if not figures:
        return
    for metric, title in (("accuracy", "Accuracy"), ("loss", "Loss")):
        fig = plots.learning_curve(frame, metric, f"{name}: training and test {title.lower()} vs. epoch")
        mlflow.log_figure(fig, f"{metric}.png")
        plots.close(fig)


def log_model(model: torch.nn.Module, example: torch.Tensor) -> None:
    """Log the model with a signature; explicit requirements skip MLflow's slow inference.

    Its flavors: `pytorch` (the network, logits) and a pyfunc that answers digits and
    probabilities (see digit_classifier), which is what `mlflow models serve` serves.
    """
    model.eval()
    # Our own layers (models.Scale) are pickled by value, so the model loads where this
    # package is not installed.
    cloudpickle.register_pickle_by_value(models)
    try:
        info = Model.log(
            artifact_path=None,
            flavor=digit_classifier,
            pytorch_model=model,
            name=MODEL_ARTIFACT,
            signature=ModelSignature(inputs=infer_signature(example.numpy()).inputs,
                                     outputs=digit_classifier.output_schema()),
            input_example=example.numpy(),
            pip_requirements=MODEL_REQUIREMENTS,
        )
    finally:
        cloudpickle.unregister_pickle_by_value(models)
    # MLflow 3 keeps the model as a LoggedModel (models:/m-...); record where it is.
    mlflow.set_tag(tracking.MODEL_URI_TAG, info.model_uri)

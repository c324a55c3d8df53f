"""tune: search depth, width and SGD settings with Ray Tune, Optuna (TPE) and ASHA, honestly.

Trials are scored on a validation split carved from the training sample (stratified, seeded,
logged as its own dataset input); the test split never reaches them. The winner's config is
written as a YAML file that `train --config <file>` takes as is, trained by the train stage
on the whole training sample (a nested run) and so scored once on test; it is registered and
takes @champion only on improvement, as compare's best does.

Reruns: every trial is an MLflow run tagged with a trial key (tune_trial.trial_key:
space, epochs, split, seed, ASHA rules, sample, code, machine; not the number of trials).
FINISHED trials with the key are reused: Optuna is told their points and results
(OptunaSearch's points_to_evaluate/evaluated_rewards) and only the missing trials run. The
same sweep again runs no trial and does not start Ray; a larger `trials` runs only the new
ones; an interrupted sweep keeps the trials it finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow

from pipeline.cache import train_keys
from pipeline.core import search_space
from pipeline.core.search_space import SearchSpace
from pipeline.core.validation_split import split_indices
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.runs import registry, samples, tracking
from pipeline.scale import ray_cluster
from pipeline.stage_index import STAGES
from pipeline.stages.tuning import report, search
from pipeline.stages.tuning import trial as tune_trial

STAGE = "tune"
BEST_CONFIG_ARTIFACT = "best_config.yaml"


def run(params: dict) -> str:
    with tracking.stage_run(STAGE, "tune", params) as parent:
        # Everything the user can get wrong is checked before Ray starts or a trial runs.
        space = search_space.load_search_space(
            params["space"], params["trials"], params["epochs"], params["seed"],
            params["val_size"], params["registered_model_name"])
        ray_cluster.check_resources(params["cpus_per_trial"], params["gpus_per_trial"])
        device = "cuda" if params["gpus_per_trial"] > 0 else "cpu"
        mlflow.set_tags({"mlflow.runName": f"tune-{space.name}", "pipeline.sweep": space.name})
        tracking.log_params_once({
            "sweep_name": space.name, "sweep_trials": space.trials,
            "sweep_epochs": space.epochs, "sweep_val_size": space.val_size,
            "sweep_seed": space.seed, "sweep_device": device,
            **{f"space.{k}": report.describe_value(v) for k, v in space.parameters.items()},
        })
        data_run_id = samples.resolve_data_run(params, draw=STAGES["sample_data"])
        sample = samples.fetch_sample(data_run_id, params["data_dir"])
        labels = sample.train.labels.numpy()
        fit, val = split_indices(labels, space.val_size, space.seed)
        data = tune_trial.split_arrays(sample.train.images.numpy(), labels, fit, val)
        _log_split_inputs(data, data_run_id, space)
        print(f"tune {space.name}: {space.trials} trials of up to {space.epochs} epochs; "
              f"fitting on {len(fit)} images, validating on {len(val)} "
              f"(val_size {space.val_size}, seed {space.seed}); the test split is not used")

        key = tune_trial.trial_key(space, data_run_id, params["cpus_per_trial"], device)
        mlflow.set_tag("pipeline.sweep_trial_key", key)  # the key its trial runs carry
        done = search.finished_trials(key)[:space.trials]
        missing = space.trials - len(done)
        started = time.perf_counter()
        if missing:
            print(f"tune: {len(done)} finished trial(s) reused, running {missing}")
            context = tune_trial.TrialContext(
                env={}, credentials={}, experiment_id=parent.info.experiment_id,
                parent_run_id=parent.info.run_id, trial_key=key, space_name=space.name,
                epochs=space.epochs, seed=space.seed, normalize=space.normalize, device=device)
            search.run_trials(space, data, context, done, missing, params)
        else:
            print(f"tune: all {space.trials} trials reused from earlier sweeps; Ray not started")
        sweep_s = time.perf_counter() - started
        trials = search.finished_trials(key)[:space.trials]
        failed = search.failed_trials_under(parent.info.run_id)
        table = report.trial_table(trials, parent.info.run_id, space.epochs)
        if table.empty:
            raise PipelineError(f"no trial of the sweep finished ({failed} failed); see the "
                                f"trial runs' pipeline.error tags")
        report.log_table(table)
        report.log_plots(space, table)
        winner = report.pick_winner(table, space.epochs)
        values = json.loads(winner["point"])
        config_path = report.write_config(space, values)
        mlflow.log_text(config_path.read_text(), BEST_CONFIG_ARTIFACT)
        new_runs = table[~table.reused]
        mlflow.log_metrics({
            "trials": len(table), "trials_run": len(new_runs), "trials_reused": int(table.reused.sum()),
            "trials_failed": failed, "trials_stopped_early": int(table.early_stopped.sum()),
            "epochs_run": int(table.epochs_run.sum()),
            "epochs_saved_share": 1 - table.epochs_run.sum() / (len(table) * space.epochs),
            "sweep_time_s": sweep_s,
            **({"trials_per_minute": len(new_runs) / sweep_s * 60} if len(new_runs) else {}),
            "best_val_accuracy": winner["val_accuracy"], "best_val_loss": winner["val_loss"],
        })

        train_run_id = retrain(space, values, config_path, data_run_id, device, params)
        trained = mlflow.get_run(train_run_id)
        test_accuracy = trained.data.metrics["final_test_accuracy"]
        mlflow.log_metric("best_test_accuracy", test_accuracy)
        mlflow.set_tag("pipeline.best_train_run_id", train_run_id)
        mlflow.set_tag(registry.BEST_RUN_TAG, train_run_id)
        result = registry.register(space.registered_model_name, train_run_id)
        mlflow.set_tags({"pipeline.registered_version": result.version,
                         "pipeline.champion_version": result.champion_version})
        text = report.describe_result(space, table, winner, failed, test_accuracy,
                                      len(fit) + len(val),
                               result)
        mlflow.set_tag("mlflow.note.content", text)
        mlflow.log_text(text + "\n", "conclusion.md")
        print(text)
        return parent.info.run_id


def _log_split_inputs(data: tune_trial.TrialData, data_run_id: str, space: SearchSpace) -> None:
    """The fit and validation parts as dataset inputs of the tune run: what trials saw."""
    source = mlflow.get_run(data_run_id).info.artifact_uri + "/" + samples.SAMPLE_ARTIFACT
    for images, labels, part, context in (
        (data.fit_images, data.fit_labels, "fit", "training"),
        (data.val_images, data.val_labels, "validation", "validation"),
    ):
        dataset = mlflow.data.from_numpy(
            features=images, targets=labels, source=samples.dataset_source(source),
            name=f"mnist-train-{part}-val{space.val_size:g}-seed{space.seed}")
        mlflow.log_input(dataset, context=context)


def retrain(space: SearchSpace, values: dict, config_path: Path, data_run_id: str, device: str,
            params: dict) -> str:
    """The winner trained by the train stage on the whole training sample (nested run), which
    scores it on the test split; a finished identical training is reused."""
    fit = stage_params("train", {
        "config": str(config_path), "epochs": space.epochs, "seed": space.seed,
        "normalize": space.normalize, "device": device, "data_run_id": data_run_id,
        "data_dir": params["data_dir"], "samples_per_class": params["samples_per_class"],
        "sampling": params["sampling"], "sampling_seed": params["sampling_seed"],
        **search_space.train_overrides(values),
    })
    cached = tracking.find_cached_run(train_keys.train_key(fit, data_run_id))
    if cached:
        print(f"tune: reusing finished train run {cached.info.run_id} of the winner")
        return cached.info.run_id
    print(f"tune: retraining the winner {config_path.stem} on the whole training sample")
    return STAGES["train"](fit)



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

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml
from ray.tune import Callback

from pipeline import interrupts
from pipeline.cache import train_keys
from pipeline.core import search_space
from pipeline.runs import registry, tracking
from pipeline.scale import ray_cluster
from pipeline.stages import tune_trial
from pipeline.parameters import stage_params
from pipeline.errors import PipelineError
from pipeline.cache.file_digests import cache_root
from pipeline.core.search_space import Choice, Range, SearchSpace
from pipeline.runs import samples
from pipeline.stage_index import STAGES
from pipeline.core.validation_split import split_indices

STAGE = "tune"
METRIC, MODE = "val_loss", "min"
BEST_CONFIG_ARTIFACT = "best_config.yaml"
TABLE_COLUMNS = ["trial", "config", "val_accuracy", "val_loss", "epochs_run", "early_stopped",
                 "layers", "width", "batch_norm", "lr", "momentum", "batch_size", "num_params",
                 "reused", "run_id"]


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
            **{f"space.{k}": _describe(v) for k, v in space.parameters.items()},
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
        done = finished_trials(key)[:space.trials]
        missing = space.trials - len(done)
        started = time.perf_counter()
        if missing:
            print(f"tune: {len(done)} finished trial(s) reused, running {missing}")
            context = tune_trial.TrialContext(
                env={}, credentials={}, experiment_id=parent.info.experiment_id,
                parent_run_id=parent.info.run_id, trial_key=key, space_name=space.name,
                epochs=space.epochs, seed=space.seed, normalize=space.normalize, device=device)
            run_trials(space, data, context, done, missing, params)
        else:
            print(f"tune: all {space.trials} trials reused from earlier sweeps; Ray not started")
        sweep_s = time.perf_counter() - started
        trials = finished_trials(key)[:space.trials]
        failed = _failed_here(parent.info.run_id)
        table = trial_table(trials, parent.info.run_id, space.epochs)
        if table.empty:
            raise PipelineError(f"no trial of the sweep finished ({failed} failed); see the "
                                f"trial runs' pipeline.error tags")
        _log_table(table)
        _log_plots(space, table)
        winner = pick_winner(table, space.epochs)
        values = json.loads(winner["point"])
        config_path = write_config(space, values)
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
        text = describe_result(space, table, winner, failed, test_accuracy, len(fit) + len(val),
                               result)
        mlflow.set_tag("mlflow.note.content", text)
        mlflow.log_text(text + "\n", "conclusion.md")
        print(text)
        return parent.info.run_id


def _describe(value) -> str:
    if isinstance(value, Range):
        return f"{value.low}..{value.high}{' log' if value.log else ''}"
    if isinstance(value, Choice):
        return ",".join(tracking.format_param(c) for c in value.choices)
    return tracking.format_param(value)


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


def distributions(space: SearchSpace) -> dict:
    """Optuna distributions of the searched parameters (the fixed ones are added per trial)."""
    import optuna

    result = {}
    for name, value in space.searched().items():
        if isinstance(value, Choice):
            result[name] = optuna.distributions.CategoricalDistribution(list(value.choices))
        elif isinstance(value.low, int) and isinstance(value.high, int):
            result[name] = optuna.distributions.IntDistribution(value.low, value.high, log=value.log)
        else:
            result[name] = optuna.distributions.FloatDistribution(value.low, value.high,
                                                                  log=value.log)
    return result


def finished_trials(key: str) -> list:
    """FINISHED trial runs with this key in the current experiment, oldest first."""
    return mlflow.search_runs(
        filter_string=f"tags.`{tune_trial.TRIAL_KEY_TAG}` = '{key}' "
                      f"and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"], output_format="list")


def _failed_here(parent_run_id: str) -> int:
    runs = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                      f"and tags.`{tracking.STAGE_TAG}` = '{tune_trial.TRIAL_STAGE}'",
        output_format="list")
    return sum(r.info.status != "FINISHED" for r in runs)


def _searched_point(space: SearchSpace, run) -> dict:
    point = json.loads(run.data.tags[tune_trial.POINT_TAG])
    return {name: point[name] for name in space.searched()}


def run_trials(space: SearchSpace, data: tune_trial.TrialData, context: tune_trial.TrialContext,
               done: list, missing: int, params: dict) -> None:
    """Run `missing` new trials on Ray, Optuna knowing the `done` ones."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    # Ray Tune's older console output: silent at verbose=0 (the newer one prints boxes);
    # TrialRunCloser prints one line per trial epoch instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C stays pipeline.interrupts' (the tune run ends KILLED, the command exits 130)
    # rather than Ray Tune's, which would end the sweep quietly and go on to retrain.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    threads = params["cpus_per_trial"]
    with ray_cluster.connected(params["ray_address"], threads, params["gpus_per_trial"]):
        import ray

        context = tune_trial.TrialContext(**{
            **context.__dict__, "env": ray_cluster.worker_env(context.experiment_id, threads),
            "credentials": ray_cluster.credentials()})
        searcher = OptunaSearch(
            space=distributions(space), metric=METRIC, mode=MODE,
            sampler=seeded_sampler(space, len(done)),
            points_to_evaluate=[_searched_point(space, r) for r in done] or None,
            evaluated_rewards=[r.data.metrics[METRIC] for r in done] or None)
        scheduler = ASHAScheduler(
            time_attr="training_iteration", metric=METRIC, mode=MODE, max_t=space.epochs,
            grace_period=min(space.grace_period, space.epochs),
            reduction_factor=space.reduction_factor)
        cpus = ray.cluster_resources().get("CPU", 1)
        concurrent = max(1, int(cpus // threads))
        if params["gpus_per_trial"] > 0:
            gpus = ray.cluster_resources().get("GPU", 0)
            concurrent = min(concurrent, max(1, int(gpus // params["gpus_per_trial"])))
        trainable = tune.with_resources(
            tune.with_parameters(_trainable(space), data=data, context=context),
            {"cpu": threads, "gpu": params["gpus_per_trial"]})
        closer = TrialRunCloser(context.parent_run_id, space, missing, len(done))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=missing, max_concurrent_trials=concurrent,
                                        # One process per concurrent trial, not per trial:
                                        # torch and MLflow are imported once per worker.
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"tune-{context.parent_run_id}",
                storage_path=str(cache_root() / "ray_results"), verbose=0, callbacks=[closer],
                log_to_file=True))
        print(f"tune: Ray runs up to {concurrent} trial(s) at a time, {threads} CPU(s)"
              f"{' and ' + format(params['gpus_per_trial'], 'g') + ' GPU' if params['gpus_per_trial'] else ''}"
              f" each")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for every trial
                tuner.fit()
        except SystemError as err:
            # A signal that lands inside Ray's compiled ray.wait comes out wrapped.
            if isinstance(err.__cause__, interrupts.Interrupted):
                raise err.__cause__ from None
            raise
        finally:
            # Interrupted, or a worker that died: its trial's run must not stay RUNNING.
            closer.close_leftovers()


def seeded_sampler(space: SearchSpace, done: int):
    """Optuna's TPE sampler, seeded, with as many proposals drawn and thrown away as trials
    are reused. A fresh sampler with the same seed would propose the reused trials' points
    again (TPE draws its first points at random); drawn past them, a sweep continued from
    `done` trials proposes what the uninterrupted sweep would have (exactly so during TPE's
    random start-up trials, 10 by default)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=space.seed)
    if done:
        scratch = optuna.create_study(sampler=sampler, direction="minimize")
        for _ in range(done):
            scratch.tell(scratch.ask(distributions(space)), 0.0)
    return sampler


def _trainable(space: SearchSpace):
    fixed = space.fixed()

    def trial(config: dict, data, context) -> None:
        tune_trial.run_trial({**fixed, **config}, data, context)

    return trial


class TrialRunCloser(Callback):
    """On the driver: one line per trial epoch, and the end of each trial's MLflow run.

    A trial that ASHA stops leaves its function at `tune.report` (SystemExit) and may be gone
    before its run is ended, so it is tagged here with the epoch and why, and ended FINISHED if
    still RUNNING. So is a trial stopped at its last epoch (ASHA stops at max_t)."""

    def __init__(self, parent_run_id: str, space: SearchSpace, new_trials: int, reused: int):
        self.parent_run_id = parent_run_id
        self.space = space
        self.total = new_trials + reused
        self.reused = reused
        self.numbers: dict[str, int] = {}
        self.client = mlflow.MlflowClient()

    def _number(self, trial) -> int:
        return self.numbers.setdefault(trial.trial_id, self.reused + len(self.numbers) + 1)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        point = {**self.space.fixed(), **trial.config}
        print(f"[tune] trial {self._number(trial)}/{self.total} "
              f"{search_space.config_name_of(point)} "
              f"epoch {result['training_iteration']}/{self.space.epochs}  "
              f"val loss {result['val_loss']:.4f} acc {result['val_accuracy']:.4f}  "
              f"train loss {result['train_loss']:.4f}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = int((trial.last_result or {}).get("training_iteration", 0))
        run = self._run_of(trial.trial_id)
        if run is None:
            return
        if epochs < self.space.epochs and tune_trial.EARLY_STOP_TAG not in run.data.tags:
            loss = trial.last_result.get("val_loss", float("nan"))
            self.client.set_tag(run.info.run_id, tune_trial.EARLY_STOP_TAG, (
                f"ASHA stopped it after epoch {epochs} of {self.space.epochs}: its val_loss "
                f"{loss:.4f} was not in the best 1/{self.space.reduction_factor} of the trials "
                f"that had reached epoch {epochs}"))
            print(f"[tune] trial {self._number(trial)}/{self.total} stopped early by ASHA "
                  f"after epoch {epochs}", flush=True)
        if self.client.get_run(run.info.run_id).info.status == "RUNNING":
            self.client.set_terminated(run.info.run_id, "FINISHED")

    def _run_of(self, trial_id: str):
        runs = mlflow.search_runs(
            filter_string=f"tags.`{tune_trial.RAY_TRIAL_TAG}` = '{trial_id}' "
                          f"and tags.mlflow.parentRunId = '{self.parent_run_id}'",
            output_format="list")
        return runs[0] if runs else None

    def close_leftovers(self) -> None:
        """Trial runs left RUNNING (the sweep was interrupted, or a worker died): KILLED,
        never reused; a rerun runs those trials again."""
        ray_cluster.end_orphaned_runs(
            [run.info.run_id for run in mlflow.search_runs(
                filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' "
                              f"and attributes.status = 'RUNNING'", output_format="list")],
            "KILLED", "the sweep stopped before this trial finished")


def trial_table(runs: list, tune_run_id: str, epochs: int) -> pd.DataFrame:
    """One row per trial, sorted by validation accuracy (best first)."""
    rows = []
    for number, run in enumerate(runs, start=1):
        point = json.loads(run.data.tags[tune_trial.POINT_TAG])
        metrics = run.data.metrics
        epochs_run = int(run.data.tags.get(tune_trial.EPOCHS_RUN_TAG, 0))
        rows.append({
            "trial": number, "config": search_space.config_name_of(point),
            "val_accuracy": metrics.get("val_accuracy", np.nan),
            "val_loss": metrics.get("val_loss", np.nan), "epochs_run": epochs_run,
            "early_stopped": tune_trial.EARLY_STOP_TAG in run.data.tags,
            **{k: point[k] for k in search_space.PARAMETERS},
            "num_params": int(metrics.get("num_params", 0)),
            "reused": run.data.tags.get("mlflow.parentRunId") != tune_run_id,
            "run_id": run.info.run_id, "point": json.dumps(point, sort_keys=True),
        })
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS + ["point"])
    return frame.sort_values(["val_accuracy", "val_loss"], ascending=[False, True],
                             kind="stable").reset_index(drop=True)


def pick_winner(table: pd.DataFrame, epochs: int) -> pd.Series:
    """The most accurate trial on validation among those that ran every epoch (a trial ASHA
    stopped was judged on fewer epochs), lower val_loss breaking ties."""
    full = table[table.epochs_run == epochs]
    return (full if not full.empty else table).iloc[0]


def _log_table(table: pd.DataFrame) -> None:
    shown = table.drop(columns=["point"])
    mlflow.log_text(shown.to_csv(index=False), "trials.csv")
    mlflow.log_text(shown.to_markdown(index=False, floatfmt=".4g") + "\n", "trials.md")
    mlflow.log_text(shown.to_html(index=False, float_format="{:.4g}".format), "trials.html")


def _log_plots(space: SearchSpace, table: pd.DataFrame) -> None:
    """Optuna's optimization history and parameter importances, from the trials' results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spaces = distributions(space)
    study = optuna.create_study(direction="minimize", study_name=space.name)
    for _, row in table.sort_values("trial").iterrows():
        point = json.loads(row["point"])
        study.add_trial(optuna.trial.create_trial(
            params={k: point[k] for k in spaces}, distributions=spaces,
            value=float(row["val_loss"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is "experimental"
        axes = optuna_plots.plot_optimization_history(study, target_name="val_loss")
        mlflow.log_figure(axes.figure, "optimization_history.png")
        plt.close(axes.figure)
        if len(table) < 2 or not spaces:
            print("tune: parameter importances need at least 2 trials and a searched parameter")
            return
        try:
            axes = optuna_plots.plot_param_importances(study, target_name="val_loss")
        except (ValueError, RuntimeError) as err:  # e.g. every trial with the same val_loss
            print(f"tune: no parameter importances: {err}")
            return
        mlflow.log_figure(axes.figure, "param_importances.png")
        plt.close(axes.figure)


def write_config(space: SearchSpace, values: dict) -> Path:
    """The winner as a config file `train --config <file>` accepts, kept on this machine under
    the pipeline's cache folder (named by its content, so a rerun finds the same file and the
    train stage's cache key, which covers the file's content, reuses the retrained model)."""
    content = yaml.safe_dump(search_space.model_config(space, values), sort_keys=False)
    header = "# Written by the tune stage: the sweep's winner, for train --config <this file>.\n"
    text = header + content
    folder = cache_root() / "tune" / hashlib.sha256(text.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{search_space.config_name(space, values)}.yaml"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


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


def describe_result(space: SearchSpace, table: pd.DataFrame, winner: pd.Series, failed: int,
                    test_accuracy: float, train_images: int, registration) -> str:
    others = table[table.run_id != winner.run_id]
    if others.empty:
        margin = "the only trial"
    else:
        second = others.iloc[0]
        margin = (f"{(winner.val_accuracy - second.val_accuracy) * 100:+.2f} points over the "
                  f"runner-up {second.config} (trial {second.trial}, "
                  f"{second.val_accuracy:.4f})")
    stopped = int(table.early_stopped.sum())
    return (
        f"{winner.config} won the {space.name} sweep with validation accuracy "
        f"{winner.val_accuracy:.4f} (val_loss {winner.val_loss:.4f}; lr {winner.lr:.4g}, "
        f"momentum {winner.momentum:.3g}, batch size {winner.batch_size}), {margin}. "
        f"{len(table)} trials of up to {space.epochs} epochs ({int(table.reused.sum())} reused "
        f"from earlier sweeps, {stopped} stopped early by ASHA"
        f"{f', {failed} failed' if failed else ''}). Retrained on the whole training sample "
        f"({train_images} images) for {space.epochs} epochs, it scored {test_accuracy:.4f} on "
        f"the test split, the sweep's only use of it. Registered as "
        f"{registration.name} version {registration.version}; champion is version "
        f"{registration.champion_version}"
        f"{' (alias moved)' if registration.alias_moved else ''}."
    )

"""tune's search: Optuna's TPE over the space on Ray Tune, ASHA stopping the weak trials early,
trials an earlier sweep finished told to Optuna instead of run again, and each trial's MLflow
run ended from the driver."""

from __future__ import annotations

import json
import os
import warnings

import mlflow
from ray.tune import Callback

from pipeline import interrupts
from pipeline.cache.file_digests import cache_root
from pipeline.core import search_space
from pipeline.core.search_space import Choice, SearchSpace
from pipeline.runs import tracking
from pipeline.scale import ray_cluster
from pipeline.stages.tuning import trial as tune_trial

METRIC, MODE = "val_loss", "min"


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


def failed_trials_under(parent_run_id: str) -> int:
    runs = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                      f"and tags.`{tracking.STAGE_TAG}` = '{tune_trial.TRIAL_STAGE}'",
        output_format="list")
    return sum(r.info.status != "FINISHED" for r in runs)


def searched_point(space: SearchSpace, run) -> dict:
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
            points_to_evaluate=[searched_point(space, r) for r in done] or None,
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
            tune.with_parameters(trial_function(space), data=data, context=context),
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


def trial_function(space: SearchSpace):
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

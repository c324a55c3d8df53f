"""evaluate's run name and cache key: the model, its train run and the sample run."""

from __future__ import annotations

import mlflow

from pipeline.cache.code_digest import cache_key


def evaluate_run_name(source_run: str | None) -> str:
    if source_run:
        name = mlflow.get_run(source_run).info.run_name or source_run
        return "evaluate-" + name.removeprefix("train-")
    return "evaluate"


def evaluate_key(params: dict, source_run: str | None, data_run_id: str) -> str:
    identity = {"model_uri": params["model_uri"], "source_run": source_run, "data": data_run_id}
    return cache_key("evaluate", identity, "pipeline.stages.evaluate")

"""main with `seeds: auto`: the second stage of Stein's two-stage procedure (pipeline.core.two_stage).

The plan is a function of the first stage's final test accuracies only, and those runs are
reused from the cache on a rerun, so an interrupted auto study recomputes the same plan and
goes on with the seeds it had not finished.
"""

from __future__ import annotations

import mlflow

from pipeline.core import two_stage
from pipeline.core.config import Study


def second_stage(study: Study, fits: list[dict], train_runs: list[str]) -> list[tuple[str, int]]:
    """The (config, seed) pairs to train after the first stage (`fits`, run as `train_runs`);
    the plan they come from is recorded on the active (main) run."""
    first: dict[str, list[float]] = {config: [] for config in study.configs}
    for fit, run_id in zip(fits, train_runs):
        first[fit["config"]].append(mlflow.get_run(run_id).data.metrics["final_test_accuracy"])
    plan = two_stage.plan(first, study.auto.half_width_pp / 100, study.auto.max_seeds)
    mlflow.set_tags({
        "pipeline.auto_seeds.runs_per_config": ",".join(f"{c}:{n}" for c, n in plan.totals.items()),
        "pipeline.auto_seeds.target_reached": str(plan.target_reached).lower(),
    })
    print(f"[main] seeds: auto: first stage {study.auto.first_stage} per config; target ±"
          f"{study.auto.half_width_pp:g} pp needs {plan.totals} runs"
          + ("" if plan.target_reached else f" (capped at max_seeds={study.auto.max_seeds}: "
                                            f"the target is not reached)"))
    more = [(config, seed) for config in study.configs
            for seed in range(study.auto.first_stage, plan.totals[config])]
    return more

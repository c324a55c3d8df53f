"""compare's cache key: the train runs compared and the test's settings."""

from __future__ import annotations

from pipeline.cache.code_digest import cache_key


def compare_key(params: dict, train_run_ids: list[str]) -> str:
    identity = {"runs": sorted(train_run_ids), "name": params["registered_model_name"],
                "register": params["register"],
                **{k: params[k] for k in ("detectable_difference_pp", "equivalence_margin_pp",
                                          "first_stage_seeds", "target_half_width_pp")}}
    return cache_key("compare", identity, "pipeline.stages.compare")

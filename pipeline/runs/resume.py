"""Whether a run trained elsewhere can be continued here: the machine values it was trained
with (its cache key's numerics and its device) against this machine's."""

from __future__ import annotations

from pipeline.cache.machine import numerics
from pipeline.runs.tracking import format_param


def numerics_differences(run_params: dict[str, str], device: str) -> list[str]:
    """'name run-value vs this-value' for each machine value (the cache key's numerics, and
    the device) the run was trained with that differs here."""
    here = {"torch_device": device, **numerics(device)}
    names = [n for n in here if n in run_params] + \
        [n for n in run_params if n == "gpu" and n not in here]
    return [f"{name} {run_params[name]} vs {format_param(here.get(name, 'none'))}"
            for name in names if run_params[name] != format_param(here.get(name, ""))]

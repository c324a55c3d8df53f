"""Each stage's parameters as MLproject declares them: defaults, overrides, types.

Read from MLproject when a stage runs, never digested into a cache key: a `help:` text there
reruns nothing, and the stages that need another stage's defaults take them from here, not
from the command line's module."""

from __future__ import annotations

import functools
from pathlib import Path

from pipeline.core.yaml_file import read_yaml
from pipeline.errors import PipelineError

MLPROJECT = Path(__file__).resolve().parents[1] / "MLproject"


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise PipelineError(f"expected true or false, got {value!r}")


CONVERTERS = {"int": int, "float": float, "bool": parse_bool}


@functools.cache
def entry_points() -> dict:
    return read_yaml(MLPROJECT)["entry_points"]


def _convert(stage: str, name: str, spec: dict, value: object) -> object:
    converter = CONVERTERS.get(spec.get("type", "string"), str)
    try:
        return converter(value)
    except (TypeError, ValueError, PipelineError) as err:
        raise PipelineError(
            f"{stage}: parameter {name} must be of type {spec.get('type')}, got {value!r}"
        ) from err


def stage_params(stage: str, overrides: dict | None = None) -> dict:
    """A stage's parameters: MLproject defaults, then `overrides`, converted to their types."""
    points = entry_points()
    if stage not in points:
        raise PipelineError(f"unknown stage {stage!r}: use one of {', '.join(points)}")
    specs = points[stage].get("parameters", {})
    unknown = set(overrides or {}) - set(specs)
    if unknown:
        raise PipelineError(
            f"{stage} has no parameter {', '.join(sorted(unknown))}; "
            f"its parameters are {', '.join(specs)}"
        )
    values = {name: spec.get("default") for name, spec in specs.items()}
    values.update(overrides or {})
    return {name: _convert(stage, name, specs[name], value) for name, value in values.items()}

"""A sweep's search space, read from YAML and checked before anything runs.

Pure Python, no torch, no Ray, no MLflow: `tune` checks the file (and the command-line values
that override it) before it starts Ray or any trial, and every problem is one line naming the
key and what it must be. A sampled point (layers, width, batch_norm, lr, momentum,
batch_size) becomes a model config and training hyperparameters here too, so the trials and
the retrained winner build the same network from the same point.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from pipeline.core.config import read_yaml, resolve_config_path
from pipeline.core.model_spec import check_keys, validate_model_spec
from pipeline.errors import PipelineError

TOP_KEYS = {"name", "description", "trials", "epochs", "val_size", "seed", "normalize",
            "registered_model_name", "asha", "space"}
ASHA_KEYS = {"grace_period", "reduction_factor"}
# Each searched parameter, the type its values must have, and what a value must satisfy.
PARAMETERS = {
    "layers": (int, lambda v: v >= 1, "a whole number of hidden layers >= 1"),
    "width": (int, lambda v: v >= 1, "a whole number of units >= 1"),
    "batch_norm": (bool, lambda v: True, "true or false"),
    "lr": (float, lambda v: 0 < v and math.isfinite(v), "a learning rate > 0"),
    "momentum": (float, lambda v: 0 <= v < 1, "a momentum in [0, 1)"),
    "batch_size": (int, lambda v: v >= 1, "a whole number of images >= 1"),
}
RANGE_KEYS = {"low", "high", "log"}
CHOICE_KEYS = {"choices"}
EXAMPLE = "experiments/mlp_sweep.yaml"


@dataclass(frozen=True)
class Range:
    """Values from low to high (both included); ints for int parameters; log: log-uniform."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    choices: tuple


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    parameters: dict  # name -> Range | Choice | a fixed value
    trials: int
    epochs: int
    val_size: float  # fraction of the training sample held out for validation
    seed: int
    normalize: bool
    registered_model_name: str
    grace_period: int
    reduction_factor: int
    digest: str = field(default="")  # of what decides a trial's result (not `trials`)

    def searched(self) -> dict:
        """The parameters Optuna proposes (not the fixed ones)."""
        return {k: v for k, v in self.parameters.items() if isinstance(v, (Range, Choice))}

    def fixed(self) -> dict:
        return {k: v for k, v in self.parameters.items() if not isinstance(v, (Range, Choice))}


def _is_type(kind: type, value: object) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value(where: str, name: str, value: object) -> object:
    kind, ok, meaning = PARAMETERS[name]
    if not _is_type(kind, value) or not ok(value):
        raise PipelineError(f"{where} must be {meaning}, got {value!r}")
    return float(value) if kind is float else value


def _parameter(name: str, spec: object) -> Range | Choice | object:
    where = f"space.{name}"
    if not isinstance(spec, dict):
        return _value(where, name, spec)  # a fixed value
    keys = set(spec)
    if keys & CHOICE_KEYS and keys & RANGE_KEYS or not keys & (CHOICE_KEYS | RANGE_KEYS):
        raise PipelineError(f"{where} must be a fixed value, {{low: .., high: ..}} (with "
                            f"log: true for log-uniform) or {{choices: [..]}}, got {spec!r}")
    unknown = keys - (CHOICE_KEYS if "choices" in keys else RANGE_KEYS)
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                            f"a range takes low, high and log, a choice takes choices")
    if "choices" in keys:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise PipelineError(f"{where}.choices must be a non-empty list, e.g. "
                                f"[128, 256, 512]; got {choices!r}")
        values = tuple(_value(f"{where}.choices[{i}]", name, c) for i, c in enumerate(choices))
        if len(set(values)) != len(values):
            raise PipelineError(f"{where}.choices lists a value twice: {list(values)}")
        return Choice(values)
    if PARAMETERS[name][0] is bool:
        raise PipelineError(f"{where} is true or false: use choices: [false, true]")
    missing = {"low", "high"} - keys
    if missing:
        raise PipelineError(f"{where}: missing {', '.join(sorted(missing))}; a range needs "
                            f"both low and high")
    low = _value(f"{where}.low", name, spec["low"])
    high = _value(f"{where}.high", name, spec["high"])
    if low > high:
        raise PipelineError(f"{where}: low {low} > high {high}; swap them")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise PipelineError(f"{where}.log must be true or false, got {log!r}")
    return Range(low, high, log)


def _positive_int(where: str, value: object) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise PipelineError(f"{where} must be a positive whole number, got {value!r}") from None
    if not _is_type(int, value) or value < 1:
        raise PipelineError(f"{where} must be a positive whole number, got {value!r}")
    return value


def _int(where: str, value: object) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise PipelineError(f"{where} must be a whole number, got {value!r}") from None
    if not _is_type(int, value):
        raise PipelineError(f"{where} must be a whole number, got {value!r}")
    return value


def _fraction(where: str, value: object) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0 < number < 1:
        raise PipelineError(f"{where} must be a fraction of the training sample in (0, 1), "
                            f"e.g. 0.2; got {value!r}")
    return number


def load_search_space(name_or_path: str, trials: str = "", epochs: str = "", seed: str = "",
                      val_size: str = "", registered_model_name: str = "") -> SearchSpace:
    """Read and check a sweep YAML; non-empty arguments (command-line values) override it."""
    path = resolve_config_path(name_or_path)
    content = read_yaml(path)
    unknown = set(content) - TOP_KEYS
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                            f"allowed keys are {', '.join(sorted(TOP_KEYS))} (see {EXAMPLE})")
    overrides = {"trials": trials, "epochs": epochs, "seed": seed, "val_size": val_size}
    values = {k: (v if str(v).strip() else content.get(k)) for k, v in overrides.items()}
    for key in ("trials", "epochs"):
        if values[key] is None:
            raise PipelineError(f"{path}: missing `{key}:`; add it (see {EXAMPLE}) or pass {key}")
    space = content.get("space")
    if not isinstance(space, dict):
        raise PipelineError(f"{path}: `space:` must map each of {', '.join(PARAMETERS)} to a "
                            f"range or choices (see {EXAMPLE})")
    check_keys(f"{path}: space", space, set(PARAMETERS), set(PARAMETERS))
    parameters = {name: _parameter(name, space[name]) for name in PARAMETERS}
    asha = content.get("asha") or {}
    if not isinstance(asha, dict) or set(asha) - ASHA_KEYS:
        raise PipelineError(f"{path}: asha: takes only {', '.join(sorted(ASHA_KEYS))}, got "
                            f"{asha!r}")
    normalize = content.get("normalize", False)
    if not isinstance(normalize, bool):
        raise PipelineError(f"{path}: normalize must be true or false, got {normalize!r}")
    result = SearchSpace(
        name=str(content.get("name", path.stem)),
        description=str(content.get("description", "")),
        parameters=parameters,
        trials=_positive_int("trials", values["trials"]),
        epochs=_positive_int("epochs", values["epochs"]),
        val_size=_fraction("val_size", values["val_size"] if values["val_size"] is not None
                           else 0.2),
        seed=_int("seed", values["seed"] if values["seed"] is not None else 0),
        normalize=normalize,
        registered_model_name=str(registered_model_name or content.get("registered_model_name")
                                  or "mnist-mlp"),
        grace_period=_positive_int("asha.grace_period", asha.get("grace_period", 1)),
        reduction_factor=_positive_int("asha.reduction_factor", asha.get("reduction_factor", 2)),
    )
    if result.reduction_factor < 2:
        raise PipelineError(f"asha.reduction_factor must be at least 2, got "
                            f"{result.reduction_factor}")
    return _with_digest(result)


def _with_digest(space: SearchSpace) -> SearchSpace:
    """The digest of what decides a trial's outcome: space, epochs, split, seed, ASHA rules.
    Not `trials`: a larger sweep reuses the trials of a smaller one."""
    identity = {
        "parameters": {k: repr(v) for k, v in space.parameters.items()},
        "epochs": space.epochs, "val_size": space.val_size, "seed": space.seed,
        "normalize": space.normalize, "grace_period": space.grace_period,
        "reduction_factor": space.reduction_factor,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return SearchSpace(**{**space.__dict__, "digest": digest})


def point(space: SearchSpace, sampled: dict) -> dict:
    """A full point: the sampled values plus the fixed ones, with their declared types."""
    values = {**space.fixed(), **sampled}
    return {name: _value(f"point.{name}", name, values[name]) for name in PARAMETERS}


def model_spec(values: dict) -> dict:
    """The `model:` block of a point: `layers` hidden layers of `width` units, each followed by
    BatchNorm when `batch_norm` (validated as any config's model is)."""
    layer = {"units": int(values["width"])}
    if values["batch_norm"]:
        layer["batch_norm"] = True
    return validate_model_spec({"type": "mlp", "hidden": [dict(layer)
                                                          for _ in range(int(values["layers"]))]})


def config_name(space: SearchSpace, values: dict) -> str:
    return f"{space.name}-{config_name_of(values)}"


def model_config(space: SearchSpace, values: dict) -> dict:
    """The winner as a config file's content, which `train --config <file>` reads as is."""
    return {
        "name": config_name(space, values),
        "description": (f"{values['layers']} hidden layer(s) of {values['width']} units"
                        f"{' with BatchNorm' if values['batch_norm'] else ''}, found by the "
                        f"{space.name} sweep (lr {values['lr']:.4g}, momentum "
                        f"{values['momentum']:.3g}, batch size {values['batch_size']})"),
        "model": model_spec(values),
    }


def train_overrides(values: dict) -> dict:
    """The point's training hyperparameters, under train's parameter names."""
    return {"lr": float(values["lr"]), "momentum": float(values["momentum"]),
            "batch_size": int(values["batch_size"])}



def config_name_of(values: dict) -> str:
    """A trial's short name: layers x width, -bn with BatchNorm."""
    return f"{values['layers']}x{values['width']}{'-bn' if values['batch_norm'] else ''}"

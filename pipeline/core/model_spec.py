"""The schema of a config's `model:` block, checked before anything is built or trained.

Pure Python, no torch: `main` checks every config of a study before its first stage runs.
A misspelt key or a malformed value would otherwise build another network or fail deep inside
torch, so each problem is one line naming the key and what it must be.
"""

from __future__ import annotations

from pipeline.errors import PipelineError

POOL = "M"  # a 2x2 max-pool in a VGG `conv` list
MLP_KEYS = {"type", "hidden"}
HIDDEN_KEYS = {"units", "batch_norm"}
VGG_KEYS = {"type", "input_size", "conv", "classifier", "dropout"}


def check_keys(where: str, spec: object, allowed: set[str], required: set[str] = frozenset()) -> None:
    if not isinstance(spec, dict):
        raise PipelineError(f"{where} must be a mapping with keys {', '.join(sorted(allowed))}, "
                            f"got {spec!r}")
    unknown = set(spec) - allowed
    missing = set(required) - set(spec)
    if unknown or missing:
        problems = [f"unknown key(s) {', '.join(sorted(map(str, unknown)))}" if unknown else "",
                    f"missing key(s) {', '.join(sorted(missing))}" if missing else ""]
        raise PipelineError(f"{where}: {'; '.join(p for p in problems if p)}; allowed keys are "
                            f"{', '.join(sorted(allowed))}")


def _positive_int(where: str, value: object) -> int:
    # bool is an int in Python; `units: true` is a typo, not 1 unit.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PipelineError(f"{where} must be a positive whole number, got {value!r}")
    return value


def _list(where: str, value: object, example: str) -> list:
    if not isinstance(value, list):
        raise PipelineError(f"{where} must be a YAML list, e.g. {example}; got {value!r}")
    return value


def _check_mlp(spec: dict) -> None:
    check_keys("model", spec, MLP_KEYS)
    hidden = _list("model.hidden", spec.get("hidden", []), "[{units: 512}, {units: 256}]")
    for i, layer in enumerate(hidden):
        check_keys(f"model.hidden[{i}]", layer, HIDDEN_KEYS, {"units"})
        _positive_int(f"model.hidden[{i}].units", layer["units"])
        if not isinstance(layer.get("batch_norm", False), bool):
            raise PipelineError(f"model.hidden[{i}].batch_norm must be true or false, "
                                f"got {layer['batch_norm']!r}")


def _check_vgg(spec: dict) -> None:
    check_keys("model", spec, VGG_KEYS, {"conv"})
    size = _positive_int("model.input_size", spec.get("input_size", 32))
    conv = _list("model.conv", spec["conv"], "[64, M, 128, M]")
    if not any(item != POOL for item in conv):
        raise PipelineError("model.conv must hold at least one convolution width, e.g. [64, M]")
    for i, item in enumerate(conv):
        if item == POOL:
            size //= 2
            if size < 1:
                raise PipelineError(f"model.conv[{i}]: too many max-pools ({POOL}) for "
                                    f"input_size {spec.get('input_size', 32)}")
        else:
            _positive_int(f"model.conv[{i}] (a width or {POOL})", item)
    for i, units in enumerate(_list("model.classifier", spec.get("classifier", []), "[4096, 4096]")):
        _positive_int(f"model.classifier[{i}]", units)
    dropout = spec.get("dropout", 0.5)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise PipelineError(f"model.dropout must be a number in [0, 1), got {dropout!r}")


CHECKS = {"mlp": _check_mlp, "vgg": _check_vgg}


def validate_model_spec(spec: object) -> dict:
    """`spec` if it describes a buildable model, else a PipelineError saying what to fix."""
    if not isinstance(spec, dict):
        raise PipelineError(f"`model:` must be a mapping, got {spec!r}; see experiments/mlp3.yaml")
    kind = spec.get("type")
    if kind not in CHECKS:
        raise PipelineError(
            f"unknown model type {kind!r} in config: use one of {', '.join(sorted(CHECKS))}"
        )
    CHECKS[kind](spec)
    return spec

"""Reading experiment configs (one model each) and studies (which models, epochs, seeds)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path


from pipeline.core.model_spec import validate_model_spec
from pipeline.core.yaml_file import read_yaml
from pipeline.errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model: dict
    digest: str  # of the file's text: part of the cache key, so an edited config retrains
    description: str = ""


def resolve_config_path(name_or_path: str) -> Path:
    """`mlp4`, `mlp4.yaml` and `experiments/mlp4.yaml` all name the same file."""
    candidates = [Path(name_or_path)]
    if not name_or_path.endswith((".yaml", ".yml")):
        candidates.append(EXPERIMENTS_DIR / f"{name_or_path}.yaml")
    candidates.append(EXPERIMENTS_DIR / Path(name_or_path).name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
    raise PipelineError(
        f"config {name_or_path!r} not found: pass a YAML path or one of the names in "
        f"{EXPERIMENTS_DIR}: {available}"
    )


def load_model_config(name_or_path: str) -> ModelConfig:
    path = resolve_config_path(name_or_path)
    content = read_yaml(path)
    if not isinstance(content.get("model"), dict):
        raise PipelineError(f"{path} has no `model:` mapping; see experiments/mlp3.yaml")
    try:
        validate_model_spec(content["model"])
    except PipelineError as err:
        raise PipelineError(f"{path}: {err}") from None
    return ModelConfig(
        name=str(content.get("name", path.stem)),
        model=content["model"],
        digest=hashlib.sha256(path.read_bytes()).hexdigest()[:16],
        description=str(content.get("description", "")),
    )


@dataclass(frozen=True)
class AutoSeeds:
    """`seeds: auto`: Stein's two-stage procedure picks the number of seeds (pipeline.core.two_stage).
    Seeds 0..first_stage-1 first, then as many more per config as its spread needs for a 95%
    interval of every difference no wider than ±half_width_pp, at most max_seeds per config."""

    first_stage: int
    half_width_pp: float  # of the 95% interval, in percentage points
    max_seeds: int


@dataclass(frozen=True)
class Study:
    """Which configs and seeds to train, with what sample and training parameters."""

    name: str
    configs: list[str]
    seeds: list[int]  # with `auto`: the first stage's
    sample: dict  # sample_data parameters
    train: dict  # train parameters shared by every (config, seed)
    registered_model_name: str
    auto: AutoSeeds | None = None
    equivalence_margin_pp: float = 0.0  # 0: no equivalence test


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _number(text, name: str, kind: type, minimum: float, hint: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or value < minimum or (kind is float and not math.isfinite(value)):
        raise PipelineError(f"{name} must be a {'whole ' if kind is int else ''}number of at "
                            f"least {minimum:g}, got {text!r}: {hint}")
    return value


def _auto_seeds(content: dict, path: Path, overrides: dict) -> AutoSeeds:
    """The `auto_seeds:` mapping of a `seeds: auto` study, with non-empty overrides."""
    given = dict(content.get("auto_seeds") or {})
    given.update({key: value for key, value in overrides.items() if str(value).strip()})
    if "half_width_pp" not in given:
        raise PipelineError(f"study {path} has `seeds: auto` but no target: add `auto_seeds: "
                            f"{{half_width_pp: 0.2}}` (or pass half_width_pp)")
    auto = AutoSeeds(
        first_stage=_number(given.get("first_stage", 5), "auto_seeds.first_stage", int, 2,
                            "the first stage needs 2 or more seeds per config to see spread"),
        half_width_pp=_number(given["half_width_pp"], "auto_seeds.half_width_pp", float, 1e-6,
                              "the target 95% CI half-width in percentage points, e.g. 0.2"),
        max_seeds=_number(given.get("max_seeds", 30), "auto_seeds.max_seeds", int, 2,
                          "the most seeds any config may get, e.g. 30"),
    )
    if auto.max_seeds < auto.first_stage:
        raise PipelineError(f"auto_seeds.max_seeds ({auto.max_seeds}) is below first_stage "
                            f"({auto.first_stage}): raise max_seeds")
    return auto


def load_study(name_or_path: str, epochs: str = "", seeds: str = "", configs: str = "",
               registered_model_name: str = "", half_width_pp: str = "", max_seeds: str = "",
               equivalence_margin_pp: str = "") -> Study:
    """Read a study YAML; non-empty arguments override its values (lists are comma-separated).
    `seeds: auto` (in the file or as the argument) lets the study pick its number of seeds."""
    path = resolve_config_path(name_or_path)
    content = read_yaml(path)
    train = dict(content.get("train") or {})
    if str(epochs).strip():
        train["epochs"] = epochs
    seeds_given = str(seeds).strip() or content.get("seeds") or [0]
    auto = None
    if str(seeds_given).strip().lower() == "auto":
        auto = _auto_seeds(content, path, {"half_width_pp": half_width_pp, "max_seeds": max_seeds})
        seeds_given = list(range(auto.first_stage))
    try:
        seed_list = [int(s) for s in (_split_list(seeds_given) if isinstance(seeds_given, str)
                                      else seeds_given)]
    except (TypeError, ValueError) as err:
        raise PipelineError(f"seeds must be whole numbers, e.g. seeds=0,1,2, or auto ({err})") from err
    margin = str(equivalence_margin_pp).strip() or content.get("equivalence_margin_pp", 0)
    study = Study(
        name=str(content.get("name", path.stem)),
        configs=_split_list(configs) if configs else list(content.get("configs") or []),
        seeds=seed_list,
        sample=dict(content.get("sample") or {}),
        train=train,
        registered_model_name=registered_model_name or content.get("registered_model_name", "mnist-mlp"),
        auto=auto,
        equivalence_margin_pp=_number(margin, "equivalence_margin_pp", float, 0,
                                      "a margin in percentage points, e.g. 0.2, or 0 for none"),
    )
    if not study.configs:
        raise PipelineError(f"study {path} lists no configs: add e.g. `configs: [mlp3, mlp4]`")
    if not study.seeds:
        raise PipelineError(f"study {path} lists no seeds: add e.g. `seeds: [0]`")
    for config in study.configs:
        load_model_config(config)  # fail before any stage runs
    return study

"""Reading experiment configs (one model each) and studies (which models, epochs, seeds)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import PipelineError
from pipeline.model_spec import validate_model_spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
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


def read_yaml(path: Path) -> dict:
    text = path.read_text()
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PipelineError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(content, dict):
        raise PipelineError(f"{path} must hold a YAML mapping, not {type(content).__name__}")
    return content


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
class Study:
    """Which configs and seeds to train, with what sample and training parameters."""

    name: str
    configs: list[str]
    seeds: list[int]
    sample: dict  # sample_data parameters
    train: dict  # train parameters shared by every (config, seed)
    registered_model_name: str


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def load_study(name_or_path: str, epochs: str = "", seeds: str = "", configs: str = "",
               registered_model_name: str = "") -> Study:
    """Read a study YAML; non-empty arguments override its values (lists are comma-separated)."""
    path = resolve_config_path(name_or_path)
    content = read_yaml(path)
    train = dict(content.get("train") or {})
    if str(epochs).strip():
        train["epochs"] = epochs
    try:
        seed_list = [int(s) for s in (_split_list(seeds) if seeds else content.get("seeds") or [0])]
    except (TypeError, ValueError) as err:
        raise PipelineError(f"seeds must be whole numbers, e.g. seeds=0,1,2 ({err})") from err
    study = Study(
        name=str(content.get("name", path.stem)),
        configs=_split_list(configs) if configs else list(content.get("configs") or []),
        seeds=seed_list,
        sample=dict(content.get("sample") or {}),
        train=train,
        registered_model_name=registered_model_name or content.get("registered_model_name", "mnist-mlp"),
    )
    if not study.configs:
        raise PipelineError(f"study {path} lists no configs: add e.g. `configs: [mlp3, mlp4]`")
    if not study.seeds:
        raise PipelineError(f"study {path} lists no seeds: add e.g. `seeds: [0]`")
    for config in study.configs:
        load_model_config(config)  # fail before any stage runs
    return study

"""A YAML file that must hold a mapping (configs, studies, spaces, MLproject), or a one-line
error naming the file."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.errors import PipelineError

# libyaml's parser under PyYAML's safe constructor, when PyYAML was built with it: the same
# mappings, read about 50 times faster (MLproject is read by every command, cached or not).
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: Path) -> dict:
    text = path.read_text()
    try:
        content = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as err:
        raise PipelineError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(content, dict):
        raise PipelineError(f"{path} must hold a YAML mapping, not {type(content).__name__}")
    return content

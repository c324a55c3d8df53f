"""Each stage module has a `run(params) -> run_id` taking the parameters MLproject declares."""

import importlib


class _Stages(dict):
    """Stage name -> run function, importing a stage's module only when it is used."""

    def __missing__(self, stage: str):
        return importlib.import_module(f"pipeline.stages.{stage}").run


STAGES = _Stages()

"""Each stage's `run(params) -> run_id` by its MLproject name, its module imported only when
the stage is run: how the command line, main's executors and a Ray worker run a stage by
name, without importing every stage (and without the layers below `stages` importing one)."""

import importlib


class _Stages(dict):
    """Stage name -> run function, importing a stage's module only when it is used."""

    def __missing__(self, stage: str):
        return importlib.import_module(f"pipeline.stages.{stage}").run


STAGES = _Stages()

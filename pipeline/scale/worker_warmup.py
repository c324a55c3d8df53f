"""Importing this module loads what a worker's first job would otherwise wait on, so that its
run, first epoch and first logged model start at once: the local pool's fork server imports it
once and forks every worker from it (pool_processes.ForkServerContext); a Ray worker imports
it while the driver draws the sample (ray_tasks.warm_up).

Nothing here opens a store or runs a torch op (which would start torch's thread pool): the
fork server must stay safe to fork.
"""

import mlflow  # noqa: F401
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - a run's first call opens the store
import torch._dynamo  # noqa: F401 - what mlflow.pytorch.log_model's pt2 export imports first
import torch.export._trace  # noqa: F401 - torch.export itself: another 0.5 s on the first model
from mlflow.utils import requirements_utils

from pipeline.stage_index import STAGES

for _stage in ("train", "evaluate"):
    STAGES[_stage]  # noqa: B018 - looking a stage up imports its module

# The first log_model checks its pip requirements against a map of every installed package's
# modules, which MLflow builds on first use by reading every distribution's file list (0.45 s
# on this machine). Private, hence looked up: a later MLflow without it just builds it later.
getattr(requirements_utils, "_init_modules_to_packages_map", lambda: None)()

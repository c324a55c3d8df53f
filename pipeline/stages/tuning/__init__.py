"""tune's parts: the trial a Ray worker runs and its key (trial.py), the search on Ray Tune
with Optuna's TPE and ASHA (search.py), and the report of a finished sweep (report.py). The
search space itself is pipeline.core.search_space; the stage that wires them is
pipeline.stages.tune."""

"""An entry point that does nothing: `mlflow run . -e bench/empty_entry_point.py` is MLflow's own
floor for this project (its CLI, the run it creates and ends, the command's process), measured
by bench/cached_rerun.py beside a fully cached `mlflow run .`."""

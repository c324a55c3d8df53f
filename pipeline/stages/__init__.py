"""One module per MLproject entry point, each with a `run(params) -> run_id` taking the
parameters MLproject declares; pipeline.stage_index runs them by name. A stage wires the
core, the cache keys, the MLflow edge and Ray together, and imports no other stage."""

"""The MLflow edge: a stage's run and its lifecycle, the sample run as later stages use it,
the metric writer, the checkpoint store, the registry, the logged model's flavor, and access
to the tracking server."""

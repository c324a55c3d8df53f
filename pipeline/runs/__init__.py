"""The MLflow edge: stage runs and their lifecycle, parameters, the metric writer, the checkpoint store, the registry, the logged model's flavor, access to the tracking server."""

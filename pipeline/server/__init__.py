"""A team's tracking server: `mlflow server` on PostgreSQL with proxied artifacts and logins.

`python -m pipeline.server start|stop` (what `make server` and `make server-stop` run); the
tests and bench/tracking_load.py start the same pieces on free ports in temporary folders.
"""

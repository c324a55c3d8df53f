"""Execution on Ray: joining a cluster, the executors main hands trainings to, and what a Ray worker runs."""

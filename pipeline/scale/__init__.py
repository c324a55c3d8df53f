"""Execution on Ray: joining a cluster, the executors main hands its trainings and
evaluations to, and what a Ray worker runs."""

"""The pure core: what a sample, a model, a training, an evaluation and a comparison are,
computed with torch, numpy and scipy only; no MLflow, Ray or Optuna (an import-linter contract
in pyproject.toml holds it)."""

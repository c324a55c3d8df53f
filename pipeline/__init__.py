"""MNIST MLP study as an MLflow project: sample_data, train, evaluate, compare, main."""

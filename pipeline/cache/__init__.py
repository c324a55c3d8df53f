"""What decides whether a stage runs at all: code digests, file digests, this machine's numerics and each stage's cache key; read without importing torch."""

"""Whether a stage runs at all: code digests, file digests, this machine's numerics and each
stage's run name and cache key, read without importing torch."""

"""Serving a checkpoint: `engram serve` (Ray Serve, HTTP) and `engram generate-batch` (Ray actors over JSONL)."""

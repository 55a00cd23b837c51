"""Prefill worker: a gRPC service around the engine that computes uncached prompt suffixes and pushes KV."""

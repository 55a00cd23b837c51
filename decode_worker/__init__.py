"""Decode worker: a gRPC service around the engine that receives KV and runs continuous-batching decode."""

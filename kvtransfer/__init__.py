"""KV block transfer between prefill and decode workers: leased, chunked, checksummed, no pickle."""

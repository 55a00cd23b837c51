"""The global prefix index in Redis: which worker holds which KV block, under worker leases."""

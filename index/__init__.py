"""The global prefix index in Redis: which worker holds which KV block, under worker leases.

- `schema`: key names and msgpack records, the contract between workers and routers.
- `publisher`: the worker side; registers under a lease and publishes block events from the engine.
- `mirror`: the router side; an in-memory mirror fed by the events stream, queried per decision.
- `table`: the in-memory block → workers table and its leading-prefix `match`.
- `redis_server`: an embedded redis-server process, for clusters started without a Redis URL.
- `config`, `client`: the shared settings and the retry-free Redis client both sides use.

Torch-free: the router process imports it.
"""

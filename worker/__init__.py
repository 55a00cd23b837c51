"""What both worker processes share: their engine options (one definition for the workers, `splitserve up`
and `ClusterSpec`) and their process setup (engine, server, index publisher, serve until signalled)."""

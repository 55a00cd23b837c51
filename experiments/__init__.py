"""Routing-policy experiments: workload traces, the replayer against a live cluster, `bench ab`, reports.

The request path is not here: this package drives a cluster through the client SDK (or the simulator
through the same routing policies) and measures it.
"""

"""Cache-aware router: classifies requests as fresh or warm and picks prefill and decode workers.

Imports protos and the torch-free block hashing module only; the router process never imports torch.
"""

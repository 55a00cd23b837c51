"""GPU kernels (Triton), one file per op with its launcher and a plain-torch reference.

Depends on nothing else in splitserve.
"""

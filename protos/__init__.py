"""Protobuf service definitions and their generated stubs (generated, never hand-edited)."""

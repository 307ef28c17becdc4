"""Torch peers for the quantization family (filled in with the family)."""


def run(p):
    pass

"""Quantized modules: the fake-quant reference (integer backends come later)."""

"""Modality-aware quantization: MSQ (per-modality static scales) and AIFS (token reordering)."""

"""Layer-wise calibration: capture block inputs with hooks, quantize block by block, propagate."""

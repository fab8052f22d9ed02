"""Weight quantization algorithms: pure functions on tensors, no model-specific code."""

"""Function-preserving transforms: Hadamard rotations, norm fusion, LN→RMSNorm, online Hadamard."""

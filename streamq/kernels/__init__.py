"""Numba kernels: pure functions, arrays in, arrays out. No I/O, no globals, no validation."""

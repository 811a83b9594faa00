"""Numba kernels: pure functions, arrays in, arrays out. No I/O, no globals.

Each public function validates its arrays (dtype, shape, finiteness: a one-line ``ValueError``) and calls
private ``@njit(cache=True)`` kernels that assume valid input. One concept, one module:

- :mod:`~streamq.kernels.assign`: nearest codeword (centred fused L2 argmin) and ``cluster_stats``, the one
  hard-assignment statistics kernel (counts, sums, sums of squares, distortion).
- :mod:`~streamq.kernels.lloyd`: EMA Lloyd step, LBG split, the dead-codeword policy and its repair.
- :mod:`~streamq.kernels.gmm`: diagonal-GMM E-step (log-likelihoods, posteriors, statistics; Gaussian selection).
- :mod:`~streamq.kernels.selection`: hierarchical Gaussian selection (top-n components without scoring all K).
- :mod:`~streamq.kernels.lattice`: chain-HMM forward-backward and Viterbi.
- :mod:`~streamq.kernels.tied`: tied-mixture emissions of the chain HMM and their statistics.

Plain NumPy references of every kernel are in ``tests/naive.py``.
"""

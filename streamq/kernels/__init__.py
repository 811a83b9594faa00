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

import functools as _functools
import types as _types

import numba as _numba


class ParallelKernel:
    """A ``parallel=True`` Numba kernel and its serial twin (the same code, ``prange`` run as ``range``).

    A call from a thread whose Numba thread count is 1 runs the twin: the parallel build called with one
    thread from a Dask worker's task thread (OpenMP layer) measured ~1.6x the CPU time of the same work in
    the twin or on the worker's main thread. The twin is compiled (and cached) on first use. Results are
    the same: the kernels' reductions do not depend on the thread count.
    """

    def __init__(self, parallel, serial):
        self.parallel, self.serial = parallel, serial
        _functools.update_wrapper(self, parallel.py_func)

    def __call__(self, *args):
        return (self.serial if _numba.get_num_threads() == 1 else self.parallel)(*args)


def parallel_njit(**flags):
    """``@njit(parallel=True, **flags)`` returning a :class:`ParallelKernel` (callable from Python only)."""

    def deco(fn):
        par = _numba.njit(parallel=True, **flags)(fn)
        twin = _types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                                   fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"  # its own cache file
        twin.__module__, twin.__doc__ = fn.__module__, fn.__doc__
        return ParallelKernel(par, _numba.njit(**flags)(twin))

    return deco

"""Codebook updates: EMA Lloyd step, LBG splitting, the dead-codeword policy and repair (Numba kernels).

All kernels are pure: arrays in, new arrays out, inputs never modified.  Randomness
(the repair perturbation) is drawn by the caller and passed in, so results are
deterministic.  The public wrappers refuse non-finite inputs and parameters (``eps = nan``,
a NaN codebook) with a one-line ``ValueError`` instead of returning a NaN codebook.

Empty-cluster handling lives here and only here: :func:`dead_codewords` says which codewords are dead
(streaming trainers, LBG's full passes and the GMM's re-seeding all ask it), :func:`repair_dead`
moves them (faiss-style split of the worst donors).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["ema_update", "split", "dead_codewords", "repair_dead"]


def _finite(name, a):
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or inf (first at flat index {int(np.flatnonzero(~np.isfinite(a))[0])})")


def _finite_scalar(name, x):
    if not math.isfinite(float(x)):
        raise ValueError(f"{name} must be finite, got {x}")
    return float(x)


@njit(cache=True, nogil=True)
def _ema_kernel(C, sums, counts, decay, usage, usage_decay):
    """EMA Lloyd step.

    Parameters
    ----------
    C : float32 (K, D), IN. sums : float64 (K, D), IN. counts : int64 (K,), IN.
    decay : float64. usage : float64 (K,), IN. usage_decay : float64.

    Returns
    -------
    C_new : float32 (K, D). usage_new : float64 (K,).
    """
    K, D = C.shape
    C_new = C.copy()
    B = 0
    for k in range(K):
        B += counts[k]
    usage_new = np.empty(K, dtype=np.float64)
    for k in range(K):
        n = counts[k]
        if n > 0:
            for d in range(D):
                mean = sums[k, d] / n
                C_new[k, d] = np.float32(decay * np.float64(C[k, d]) + (1.0 - decay) * mean)
        share = counts[k] / B if B > 0 else 0.0
        usage_new[k] = usage_decay * usage[k] + (1.0 - usage_decay) * share
    return C_new, usage_new


def ema_update(C, sums, counts, decay, usage, usage_decay):
    """Exponential-moving-average Lloyd step and usage update.

    For codewords with ``counts[k] > 0``:
    ``c_k <- decay * c_k + (1 - decay) * sums_k / counts_k`` (computed in float64);
    codewords not hit keep their value. For all codewords:
    ``usage_k <- usage_decay * usage_k + (1 - usage_decay) * counts_k / B`` with
    ``B = counts.sum()`` (the share term is 0 when ``B == 0``).
    ``decay = 0`` gives exactly the batch means (a Lloyd step on the hit codewords).

    Parameters
    ----------
    C : float32 (K, D). sums : float64 (K, D). counts : int64 (K,).
    decay : float in [0, 1]. usage : float64 (K,). usage_decay : float in [0, 1].

    Returns
    -------
    C_new : float32 (K, D). usage_new : float64 (K,).
    """
    C = np.ascontiguousarray(C, dtype=np.float32)
    sums = np.ascontiguousarray(sums, dtype=np.float64)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    usage = np.ascontiguousarray(usage, dtype=np.float64)
    K = C.shape[0]
    if sums.shape != C.shape or counts.shape != (K,) or usage.shape != (K,):
        raise ValueError(f"shapes disagree: C {C.shape}, sums {sums.shape}, counts {counts.shape}, "
                         f"usage {usage.shape}")
    if not (0.0 <= decay <= 1.0 and 0.0 <= usage_decay <= 1.0):
        raise ValueError(f"decay and usage_decay must lie in [0, 1], got {decay}, {usage_decay}")
    _finite("codebook C", C)
    _finite("sums", sums)
    _finite("usage", usage)
    return _ema_kernel(C, sums, counts, float(decay), usage, float(usage_decay))


@njit(cache=True, nogil=True)
def _split_kernel(C, eps, sigma, use_sigma, idx):
    """LBG split of the codewords listed in ``idx``.

    Parameters
    ----------
    C : float32 (K, D), IN. eps : float64. sigma : float32 (D,), IN (ignored unless
    ``use_sigma``). idx : int64 (M,), IN, distinct values in ``[0, K)``.

    Returns
    -------
    C2 : float32 (K + M, D). Row ``idx[i]`` holds the "+" copy, row ``K + i`` the "-" copy.
    """
    K, D = C.shape
    M = idx.shape[0]
    out = np.empty((K + M, D), dtype=np.float32)
    out[:K] = C
    for i in range(M):
        j = idx[i]
        for d in range(D):
            c = np.float64(C[j, d])
            if use_sigma:
                delta = eps * np.float64(sigma[d])
            else:
                delta = eps * c
            out[j, d] = np.float32(c + delta)
            out[K + i, d] = np.float32(c - delta)
    return out


def split(C, eps, sigma=None, idx=None):
    """LBG codeword splitting.

    Each split codeword ``c`` becomes ``c (1 + eps)`` and ``c (1 - eps)``, or
    ``c + eps sigma`` and ``c - eps sigma`` when a per-dimension ``sigma`` is given
    (which also separates ``c = 0``).

    Layout: ``C2[:K]`` is ``C`` with every split codeword replaced in place by its
    "+" copy; the "-" copies are appended in the order of ``idx``:
    ``C2[K + i]`` is the "-" copy of codeword ``idx[i]``. Without ``idx`` every
    codeword is split (``idx = arange(K)``), so ``C2[k]`` / ``C2[K + k]`` are the
    "+" / "-" copies of ``C[k]`` and ``C2`` has ``2K`` rows.

    Parameters
    ----------
    C : float32 (K, D), finite. eps : float, finite. sigma : float (D,), optional, finite.
    idx : int (M,), optional; distinct codeword indices in ``[0, K)``.

    Returns
    -------
    C2 : float32 (K + M, D).
    """
    C = np.ascontiguousarray(C, dtype=np.float32)
    K, D = C.shape
    eps = _finite_scalar("split eps", eps)
    _finite("codebook C", C)
    if idx is None:
        idx = np.arange(K, dtype=np.int64)
    idx = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= K or np.unique(idx).size != idx.size):
        raise ValueError(f"idx must hold distinct codeword indices in [0, {K})")
    if sigma is None:
        sig = np.zeros(D, dtype=np.float32)
        use_sigma = False
    else:
        sig = np.ascontiguousarray(sigma, dtype=np.float32).reshape(-1)
        if sig.shape != (D,):
            raise ValueError(f"sigma must have shape ({D},), got {np.shape(sigma)}")
        _finite("sigma", sig)
        use_sigma = True
    return _split_kernel(C, float(eps), sig, use_sigma, idx)


def dead_codewords(idle, age, usage, batch_size, usage_decay, dead_threshold, *, pass_counts=None, min_count=1.0):
    """Which codewords are dead: the one dead-codeword policy of streamq (pure NumPy, no state).

    Streaming rule (minibatch trainers, ``pass_counts=None``): codeword ``k`` is dead when

    - it won no frame in the last ``W = max(20, ceil(50 K / B))`` steps (``idle[k] >= W``: about 50
      frames' worth at a fair share ``B / K`` per step), or
    - its usage EMA has settled (``age[k] >= 1 / (1 - usage_decay)`` steps) and is under
      ``dead_threshold / K`` (a share of the fair share ``1 / K``).

    Whole-pass rule (``pass_counts`` given: an exact Lloyd pass over all frames, or an EM pass): a
    pass is a window long enough on its own, so codeword ``k`` is dead when ``pass_counts[k] <= 0``
    or ``pass_counts[k] < min_count`` (LBG's full pass: integer counts, ``min_count = 1``, i.e. no
    frame; the GMM: occupancy in frames, ``min_count`` its parameter). Should every codeword fall
    under ``min_count`` (tiny data), only the empty ones are dead. ``idle``, ``age``, ``usage``,
    ``batch_size``, ``usage_decay`` and ``dead_threshold`` are ignored (they may be None).

    Parameters
    ----------
    idle : int (K,). Steps since the codeword last won a frame.
    age : int (K,). Steps since the codeword was created or last repaired.
    usage : float (K,). EMA of the codeword's share of each batch.
    batch_size : int >= 1. B, frames per step.
    usage_decay : float in [0, 1] (1: the usage test never applies). dead_threshold : float >= 0.
    pass_counts : float or int (K,), optional. Frames (or occupancy) won over a whole pass.
    min_count : float. Whole-pass threshold (default 1).

    Returns
    -------
    dead : bool (K,). A new array; the inputs are not modified.
    """
    if pass_counts is not None:
        n = np.asarray(pass_counts, dtype=np.float64).reshape(-1)
        if np.isnan(n).any():
            raise ValueError("pass_counts holds NaN")
        dead = (n <= 0) | (n < float(min_count))
        if dead.all():
            dead = n <= 0
        return dead
    idle = np.asarray(idle)
    age = np.asarray(age)
    usage = np.asarray(usage, dtype=np.float64)
    K = idle.shape[0]
    if idle.shape != (K,) or age.shape != (K,) or usage.shape != (K,):
        raise ValueError(f"idle, age and usage must have shape (K,), got {idle.shape}, {age.shape}, {usage.shape}")
    if int(batch_size) < 1 or not 0.0 <= float(usage_decay) <= 1.0:
        raise ValueError(f"batch_size must be >= 1 and usage_decay in [0, 1], got {batch_size}, {usage_decay}")
    window = max(20, math.ceil(50 * K / int(batch_size)))
    settle = 1.0 / (1.0 - float(usage_decay)) if usage_decay < 1.0 else np.inf  # 1: the EMA never moves
    mature = age >= settle
    return (idle >= window) | (mature & (usage < float(dead_threshold) / K))


@njit(cache=True, nogil=True)
def _repair_kernel(C, dead, distortion, counts, eps, noise):
    """Faiss-style empty-cluster repair.

    Parameters
    ----------
    C : float32 (K, D), IN. dead : bool (K,), IN. distortion : float64 (K,), IN.
    counts : int64 (K,), IN. eps : float64. noise : float32 (n_dead, D), IN.

    Returns
    -------
    C_new : float32 (K, D). n_repaired : int64.
    """
    K, D = C.shape
    C_new = C.copy()
    dist = distortion.copy()
    eligible = np.empty(K, dtype=np.bool_)
    for k in range(K):
        eligible[k] = (not dead[k]) and counts[k] > 0
    n_rep = 0
    i = 0
    for k in range(K):
        if not dead[k]:
            continue
        best = -1
        for j in range(K):
            if eligible[j] and (best < 0 or dist[j] > dist[best]):
                best = j
        if best < 0:
            break
        for d in range(D):
            c = np.float64(C_new[best, d])
            delta = eps * np.float64(noise[i, d])
            C_new[best, d] = np.float32(c + delta)
            C_new[k, d] = np.float32(c - delta)
        dist[best] *= 0.5
        dist[k] = dist[best]
        eligible[k] = True
        n_rep += 1
        i += 1
    return C_new, n_rep


def repair_dead(C, dead, distortion, counts, eps, noise):
    """Move dead codewords next to the codewords with the largest distortion.

    Dead codewords are visited in increasing index order; the ``i``-th one is
    paired with the donor ``j = argmax distortion`` over codewords that are
    eligible (not dead and ``counts > 0``, or already repaired in this call;
    lowest index on ties). With ``c = C[j]`` (its current value) the donor becomes
    ``c + eps * noise[i]`` and the dead codeword ``c - eps * noise[i]`` (``eps`` is
    absolute: scale ``noise`` per dimension if needed). The donor's distortion is
    halved and the repaired codeword gets the same half, so the next dead codeword
    goes to the next-worst one. If no codeword is eligible nothing is changed.

    Parameters
    ----------
    C : float32 (K, D). dead : bool (K,). distortion : float (K,) (e.g. ``sse`` from
    :func:`streamq.kernels.assign.cluster_stats`). counts : int (K,). eps : float.
    noise : float32 (n_dead, D); standard normal, drawn by the caller from a seeded
    ``numpy.random.Generator`` (``rng.standard_normal((dead.sum(), D), dtype=np.float32)``).

    Returns
    -------
    C_new : float32 (K, D). n_repaired : int.
    """
    C = np.ascontiguousarray(C, dtype=np.float32)
    K, D = C.shape
    dead = np.ascontiguousarray(dead, dtype=np.bool_)
    distortion = np.ascontiguousarray(distortion, dtype=np.float64)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    noise = np.ascontiguousarray(noise, dtype=np.float32)
    n_dead = int(dead.sum())
    if dead.shape != (K,) or distortion.shape != (K,) or counts.shape != (K,):
        raise ValueError("dead, distortion and counts must have shape (K,)")
    if noise.shape != (n_dead, D):
        raise ValueError(f"noise must have shape ({n_dead}, {D}) (one row per dead codeword), "
                         f"got {noise.shape}")
    eps = _finite_scalar("repair eps", eps)
    _finite("codebook C", C)
    _finite("noise", noise)
    if np.isnan(distortion).any():
        raise ValueError("distortion holds NaN")
    C_new, n = _repair_kernel(C, dead, distortion, counts, float(eps), noise)
    return C_new, int(n)

"""Emission kernels of the tied-mixture chain HMM: diagonal Gaussians and per-unit mixtures.

A frame's log-emission under unit ``u`` is ``log sum_k W[u, k] N(x_t; mu_k, diag var_k)`` over one
shared set of K Gaussians (tied mixtures). :func:`diag_gauss_loglik` gives the K Gaussian
log-densities (direct ``(x - mu)^2 / var`` form in float64: no cancellation on uncentred data),
:func:`frame_normalise` subtracts each frame's best so nothing underflows, :func:`mixture_likelihoods`
forms the per-unit mixtures, and :func:`occupancy_by_unit` / :func:`mixture_counts` turn the lattice
posteriors (:mod:`streamq.kernels.lattice`) into the M-step statistics of the tied weights.
:func:`sparse_frame_normalise` splits each frame's top-n log-likelihoods (Gaussian selection,
:mod:`streamq.selection`) into a shift and relative values, once; the per-iteration sparse emissions and
counts over them are :func:`streamq.kernels.lattice.sparse_emissions` / ``sparse_counts`` (linear domain,
fused with the pruned lattice): O(T n U) per iteration instead of O(T K U).

All kernels are pure (arrays in, arrays out), compiled with ``cache=True`` and never read module globals.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["diag_gauss_loglik", "frame_normalise", "occupancy_by_unit", "mixture_likelihoods", "mixture_counts",
           "sparse_frame_normalise", "gather_weights", "add_counts"]

# Linear-domain kernels on finite data may reassociate sums (vectorised reductions); never
# 'nnan'/'ninf' (a frame far from every Gaussian is a legitimate, huge negative number).
_LINEAR_FASTMATH = {"reassoc", "contract", "arcp"}


@njit(cache=True, nogil=True, fastmath=_LINEAR_FASTMATH)
def diag_gauss_loglik(X, means, variances, out):
    """Log-density of each frame under each diagonal Gaussian.

    Parameters
    ----------
    X : float32 (T, D) IN; means : float32 / float64 (K, D) IN; variances : (K, D) IN, > 0.
    out : float64 (T, K) OUT   ``log N(x_t; mu_k, diag(var_k))``.
    """
    T, D = X.shape
    K = means.shape[0]
    prec = np.empty((K, D))
    const = np.empty(K)
    for k in range(K):
        c = -0.5 * D * np.log(2.0 * np.pi)
        for d in range(D):
            prec[k, d] = 1.0 / variances[k, d]
            c -= 0.5 * np.log(variances[k, d])
        const[k] = c
    mu = means.astype(np.float64)
    x = np.empty(D)
    for t in range(T):
        for d in range(D):
            x[d] = X[t, d]
        for k in range(K):
            acc = 0.0
            for d in range(D):
                diff = x[d] - mu[k, d]
                acc += diff * diff * prec[k, d]
            out[t, k] = const[k] - 0.5 * acc
    return out


@njit(cache=True, nogil=True)
def frame_normalise(G):
    """Subtract each row's maximum and exponentiate, in place.

    G : float64 (T, K) INOUT   on exit ``exp(G[t] - max_k G[t])``, values in (0, 1].
    Returns shift : float64 (T,), the row maxima (so ``G_in = shift[:, None] + log G_out``).
    """
    T, K = G.shape
    shift = np.empty(T)
    for t in range(T):
        m = -np.inf
        for k in range(K):
            if G[t, k] > m:
                m = G[t, k]
        shift[t] = m
        for k in range(K):
            G[t, k] = np.exp(G[t, k] - m)
    return shift


@njit(cache=True, nogil=True)
def occupancy_by_unit(gamma, state_unit, n_units):
    """Sum state posteriors over the states sharing a unit.

    gamma : float64 (T, S) IN; state_unit : int64 (S,) IN.
    Returns occ : float64 (T, n_units) OUT, ``occ[t, u] = sum_{s: unit(s)=u} gamma[t, s]``.
    """
    T, S = gamma.shape
    occ = np.zeros((T, n_units))
    for t in range(T):
        for s in range(S):
            occ[t, state_unit[s]] += gamma[t, s]
    return occ


@njit(cache=True, nogil=True, fastmath=_LINEAR_FASTMATH)
def mixture_likelihoods(Gx, W):
    """Per-unit mixture likelihoods relative to each frame's best Gaussian.

    Gx : float64 (T, K) IN   ``exp(G[t, k] - shift[t])`` (see :func:`frame_normalise`).
    W : float64 (U, K) IN    mixture weights of each unit (rows sum to 1).
    Returns P : float64 (T, U) OUT, ``P[t, u] = sum_k W[u, k] Gx[t, k]``; the unit's log-emission is
    ``shift[t] + log P[t, u]``. Plain loops (no BLAS: small products, no thread oversubscription).
    """
    T, K = Gx.shape
    U = W.shape[0]
    P = np.empty((T, U))
    for t in range(T):
        for u in range(U):
            acc = 0.0
            for k in range(K):
                acc += W[u, k] * Gx[t, k]
            P[t, u] = acc
    return P


@njit(cache=True, nogil=True)
def mixture_counts(Gx, occ, P, W):
    """Expected component counts per unit (the M-step statistics of the tied weights).

    ``counts[u, k] = sum_t occ[t, u] * W[u, k] Gx[t, k] / P[t, u]``: the unit's occupancy times the
    component's posterior within the unit's mixture.

    Gx : float64 (T, K) IN; occ : float64 (T, U) IN state occupancy summed per unit;
    P : float64 (T, U) IN from :func:`mixture_likelihoods`; W : float64 (U, K) IN.
    Returns counts : float64 (U, K) OUT (frames with ``occ == 0`` contribute nothing).
    """
    T, K = Gx.shape
    U = W.shape[0]
    acc = np.zeros((U, K))
    for t in range(T):
        for u in range(U):
            o = occ[t, u]
            if o > 0.0 and P[t, u] > 0.0:
                r = o / P[t, u]
                for k in range(K):
                    acc[u, k] += r * Gx[t, k]
    for u in range(U):
        for k in range(K):
            acc[u, k] *= W[u, k]
    return acc


# --------------------------------------------------------------------------- sparse (Gaussian-selected) emissions
# A frame's emissions as a short list: the components idx[t, :n] (-1 = empty slot) and their log-likelihoods
# relative to the frame's best one, rel[t, j] = log N_k(x_t) - shift[t] <= 0 (``shift`` kept by the caller).
# Component ids index the rows of a transposed weight matrix Wt (C, U): the full K or a per-utterance compact
# numbering (the components the utterance's lists use). Per-iteration cost O(T n U), nothing proportional to K.


@njit(cache=True, nogil=True)
def sparse_frame_normalise(ll):
    """Split listed log-likelihoods into a per-frame shift and relative values.

    ll : float64 (T, n) IN   log-likelihoods of each frame's listed components (-inf in empty slots).
    Returns rel : float32 (T, n) ``ll - shift`` (<= 0, -inf stays -inf) and shift : float64 (T,) the row
    maxima (-inf for a row with no finite entry; its rel is all -inf).
    """
    T, n = ll.shape
    rel = np.empty((T, n), np.float32)
    shift = np.empty(T)
    for t in range(T):
        m = -np.inf
        for j in range(n):
            if ll[t, j] > m:
                m = ll[t, j]
        shift[t] = m
        for j in range(n):
            if m > -np.inf:
                rel[t, j] = np.float32(ll[t, j] - m)
            else:
                rel[t, j] = -np.inf
    return rel, shift


@njit(cache=True, nogil=True)
def gather_weights(W, units, comps):
    """The weights of some units at some components, transposed: Wt[c, u] = W[units[u], comps[c]].

    W : float64 (n_units, K) IN; units : int64 (U,) IN; comps : int32 / int64 (C,) IN.
    Returns Wt : float64 (C, U) OUT (the ``Wt`` of :func:`streamq.kernels.lattice.sparse_emissions` for lists
    numbered among ``comps``).
    """
    C = comps.shape[0]
    U = units.shape[0]
    Wt = np.empty((C, U))
    for u in range(U):
        row = W[units[u]]
        for c in range(C):
            Wt[c, u] = row[comps[c]]
    return Wt


@njit(cache=True, nogil=True)
def add_counts(acc, units, comps, counts):
    """Scatter-add sparse counts into the corpus accumulator: acc[units[u], comps[c]] += counts[c, u].

    acc : float64 (n_units, K) INOUT; units : int64 (U,) IN, distinct; comps : int32 / int64 (C,) IN,
    distinct; counts : float64 (C, U) IN (from :func:`streamq.kernels.lattice.sparse_counts`).
    """
    C = comps.shape[0]
    U = units.shape[0]
    for u in range(U):
        r = units[u]
        for c in range(C):
            acc[r, comps[c]] += counts[c, u]
    return acc

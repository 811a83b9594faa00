"""Lattice kernels for the tied-mixture chain HMM used by :mod:`streamq.align`.

The chain has S states, starts in state 0 and ends in state S - 1. State ``s`` may go to

- itself with probability ``stay[s]``,
- the next state with probability ``nxt[s]``,
- the state after next with probability ``skip[s]`` (this is how an optional state,
  e.g. a pause between words, is skipped).

A plain linear chain is ``skip = 0``. Every kernel is O(T * S) in time.

Emissions are given per *unit* (T, U) together with ``state_unit`` (S,), the unit each state
emits with (several states share a unit: the same character in several places of a transcript).
Use ``state_unit = arange(S)`` for one unit per state. The emission side (diagonal Gaussians,
tied mixtures, their statistics) is in :mod:`streamq.kernels.tied`.

All kernels are pure (arrays in, arrays out), compiled with ``cache=True`` and never read
module globals. Log-domain code uses no fastmath at all (inputs may hold ``-inf``).
Tie rule of :func:`viterbi`: on equal scores the predecessor with the smaller jump wins
(stay before next before skip); applied backwards from the last frame, among equal-scoring
paths the one that reaches each state earliest is returned.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["forward_backward", "forward_backward_log", "viterbi"]


# --------------------------------------------------------------------------- helpers
@njit(cache=True, nogil=True)
def _logaddexp3(a, b, c):
    m = max(a, max(b, c))
    if m == -np.inf:
        return -np.inf
    return m + np.log(np.exp(a - m) + np.exp(b - m) + np.exp(c - m))


@njit(cache=True, nogil=True)
def _safe_log(p):
    if p > 0.0:
        return np.log(p)
    return -np.inf


@njit(cache=True, nogil=True)
def _log_transitions(stay, nxt, skip):
    """log of the three transition vectors (float64 (S,) each; log 0 = -inf)."""
    S = stay.shape[0]
    lstay = np.empty(S)
    lnxt = np.empty(S)
    lskip = np.empty(S)
    for s in range(S):
        lstay[s] = _safe_log(stay[s])
        lnxt[s] = _safe_log(nxt[s])
        lskip[s] = _safe_log(skip[s])
    return lstay, lnxt, lskip


# --------------------------------------------------------------------------- scaled forward-backward
@njit(cache=True, nogil=True)
def _fb_scaled(log_emit, state_unit, stay, nxt, skip, gamma, xi):
    """Scaled forward-backward. Returns (ok, loglik); ``ok`` False means underflow: use the log kernel.

    gamma : float64 (T, S) OUT, xi : float64 (S, 3) OUT.
    """
    T = log_emit.shape[0]
    S = state_unit.shape[0]
    alpha = gamma  # alpha_hat is stored in place, turned into the posteriors by the backward pass
    shift = np.empty(T)  # per-frame max log-emission over the states still in play
    scale = np.empty(T)  # c_t: normaliser of alpha_hat_t
    pred = np.empty(S)
    # t = 0: start in state 0
    for s in range(S):
        alpha[0, s] = 0.0
    m = log_emit[0, state_unit[0]]
    if not (m > -np.inf) or m != m:
        return False, -np.inf
    shift[0] = m
    scale[0] = 1.0
    alpha[0, 0] = 1.0
    loglik = m
    for t in range(1, T):
        # predicted state distribution (alpha_hat_{t-1} @ A), and the max emission where it is > 0
        m = -np.inf
        for s in range(S):
            p = stay[s] * alpha[t - 1, s]
            if s >= 1:
                p += nxt[s - 1] * alpha[t - 1, s - 1]
            if s >= 2:
                p += skip[s - 2] * alpha[t - 1, s - 2]
            pred[s] = p
            if p > 0.0:
                v = log_emit[t, state_unit[s]]
                if v > m:
                    m = v
        if not (m > -np.inf) or m != m or m == np.inf:
            return False, -np.inf
        c = 0.0
        for s in range(S):
            p = pred[s]
            if p > 0.0:
                a = p * np.exp(log_emit[t, state_unit[s]] - m)
            else:
                a = 0.0
            alpha[t, s] = a
            c += a
        if not (c > 0.0) or c == np.inf:
            return False, -np.inf
        inv = 1.0 / c
        for s in range(S):
            alpha[t, s] *= inv
        shift[t] = m
        scale[t] = c
        loglik += m + np.log(c)
    # end in state S - 1
    a_end = alpha[T - 1, S - 1]
    if not (a_end > 0.0):
        return False, -np.inf
    loglik += np.log(a_end)
    # backward: beta_hat_{T-1} = e_{S-1} / a_end; gamma_t = alpha_hat_t * beta_hat_t
    beta = np.zeros(S)
    w = np.empty(S)
    beta[S - 1] = 1.0 / a_end
    for s in range(S):
        xi[s, 0] = 0.0
        xi[s, 1] = 0.0
        xi[s, 2] = 0.0
    for s in range(S):
        alpha[T - 1, s] *= beta[s]
    for t in range(T - 2, -1, -1):
        inv = 1.0 / scale[t + 1]
        for r in range(S):
            b = beta[r]
            if b != 0.0:
                w[r] = b * np.exp(log_emit[t + 1, state_unit[r]] - shift[t + 1]) * inv
            else:
                w[r] = 0.0
        for s in range(S):
            a = alpha[t, s]
            x0 = stay[s] * w[s]
            x1 = nxt[s] * w[s + 1] if s + 1 < S else 0.0
            x2 = skip[s] * w[s + 2] if s + 2 < S else 0.0
            bs = x0 + x1 + x2
            if bs == np.inf or bs != bs:
                return False, -np.inf
            beta[s] = bs
            xi[s, 0] += a * x0
            xi[s, 1] += a * x1
            xi[s, 2] += a * x2
            alpha[t, s] = a * bs
    return True, loglik


# --------------------------------------------------------------------------- log-domain forward-backward
@njit(cache=True, nogil=True)
def _fb_log(log_emit, state_unit, stay, nxt, skip, gamma, xi):
    """Log-domain forward-backward (exact, ~3x slower than the scaled one). Same contract as ``_fb_scaled``."""
    T = log_emit.shape[0]
    S = state_unit.shape[0]
    lstay, lnxt, lskip = _log_transitions(stay, nxt, skip)
    la = np.empty((T, S))
    for s in range(S):
        la[0, s] = -np.inf
    la[0, 0] = log_emit[0, state_unit[0]]
    for t in range(1, T):
        for s in range(S):
            a0 = la[t - 1, s] + lstay[s]
            a1 = la[t - 1, s - 1] + lnxt[s - 1] if s >= 1 else -np.inf
            a2 = la[t - 1, s - 2] + lskip[s - 2] if s >= 2 else -np.inf
            la[t, s] = _logaddexp3(a0, a1, a2) + log_emit[t, state_unit[s]]
    loglik = la[T - 1, S - 1]
    for s in range(S):
        xi[s, 0] = 0.0
        xi[s, 1] = 0.0
        xi[s, 2] = 0.0
    if not (loglik > -np.inf) or loglik != loglik:
        gamma[:, :] = 0.0
        return False, -np.inf
    lb = np.full(S, -np.inf)
    lw = np.empty(S)
    lb[S - 1] = 0.0
    for s in range(S):
        gamma[T - 1, s] = np.exp(la[T - 1, s] + lb[s] - loglik)
    for t in range(T - 2, -1, -1):
        for r in range(S):
            lw[r] = lb[r] + log_emit[t + 1, state_unit[r]]
        for s in range(S):
            x0 = lstay[s] + lw[s]
            x1 = lnxt[s] + lw[s + 1] if s + 1 < S else -np.inf
            x2 = lskip[s] + lw[s + 2] if s + 2 < S else -np.inf
            lb[s] = _logaddexp3(x0, x1, x2)
            base = la[t, s] - loglik
            if base > -np.inf:
                xi[s, 0] += np.exp(base + x0)
                xi[s, 1] += np.exp(base + x1)
                xi[s, 2] += np.exp(base + x2)
            gamma[t, s] = np.exp(base + lb[s])
    return True, loglik


@njit(cache=True, nogil=True)
def forward_backward(log_emit, state_unit, stay, nxt, skip):
    """State posteriors of the chain HMM, scaled per frame, exact log-domain fallback on underflow.

    Forward: ``alpha_hat_t = (alpha_hat_{t-1} A) * exp(log_emit_t - m_t) / c_t`` with ``m_t`` the
    frame's maximum log-emission over the states in play, so raw log-likelihoods are never
    exponentiated; ``log P = sum_t (m_t + log c_t) + log alpha_hat_{T-1}[S-1]`` (Rabiner 1989,
    section V.A, with an end state). Should a frame underflow (c_t = 0) or beta overflow, the
    utterance is redone in the log domain.

    Parameters
    ----------
    log_emit : float64 (T, U) IN   log-likelihood of each frame under each emission unit.
    state_unit : int64 (S,) IN     unit of each state, values in [0, U).
    stay, nxt, skip : float64 (S,) IN   transition probabilities s->s, s->s+1, s->s+2.

    Returns
    -------
    gamma : float64 (T, S)   P(state_t = s | X); rows sum to 1 (all zero when no path).
    loglik : float           log P(X, path from state 0 to state S-1); -inf if there is no path.
    xi : float64 (S, 3)      expected transition counts s->s, s->s+1, s->s+2 over the utterance.
    used_log : bool          True if the log-domain fallback ran.
    """
    T = log_emit.shape[0]
    S = state_unit.shape[0]
    gamma = np.empty((T, S))
    xi = np.zeros((S, 3))
    if T == 0 or S == 0:
        return gamma, -np.inf, xi, False
    ok, loglik = _fb_scaled(log_emit, state_unit, stay, nxt, skip, gamma, xi)
    if ok:
        return gamma, loglik, xi, False
    ok, loglik = _fb_log(log_emit, state_unit, stay, nxt, skip, gamma, xi)
    return gamma, loglik, xi, True


@njit(cache=True, nogil=True)
def forward_backward_log(log_emit, state_unit, stay, nxt, skip):
    """The log-domain forward-backward alone (same inputs/outputs as :func:`forward_backward`, no ``used_log``)."""
    T = log_emit.shape[0]
    S = state_unit.shape[0]
    gamma = np.zeros((T, S))
    xi = np.zeros((S, 3))
    if T == 0 or S == 0:
        return gamma, -np.inf, xi
    ok, loglik = _fb_log(log_emit, state_unit, stay, nxt, skip, gamma, xi)
    return gamma, loglik, xi


# --------------------------------------------------------------------------- Viterbi
@njit(cache=True, nogil=True)
def viterbi(log_emit, state_unit, stay, nxt, skip):
    """Best state path from state 0 (frame 0) to state S-1 (frame T-1), log domain.

    Parameters
    ----------
    log_emit : float64 (T, U) IN; state_unit : int64 (S,) IN; stay, nxt, skip : float64 (S,) IN
        As in :func:`forward_backward`.

    Returns
    -------
    path : int64 (T,)   state of each frame (all -1 when there is no finite path). Ties: see the module docstring.
    score : float       log-probability of the path (-inf when there is none).
    """
    T = log_emit.shape[0]
    S = state_unit.shape[0]
    path = np.full(T, -1, np.int64)
    if T == 0 or S == 0:
        return path, -np.inf
    lstay, lnxt, lskip = _log_transitions(stay, nxt, skip)
    back = np.zeros((T, S), np.int8)  # 0: from s, 1: from s-1, 2: from s-2
    prev = np.full(S, -np.inf)
    cur = np.empty(S)
    prev[0] = log_emit[0, state_unit[0]]
    for t in range(1, T):
        for s in range(S):
            best = prev[s] + lstay[s]
            arg = 0
            if s >= 1:
                v = prev[s - 1] + lnxt[s - 1]
                if v > best:
                    best = v
                    arg = 1
            if s >= 2:
                v = prev[s - 2] + lskip[s - 2]
                if v > best:
                    best = v
                    arg = 2
            cur[s] = best + log_emit[t, state_unit[s]]
            back[t, s] = arg
        for s in range(S):
            prev[s] = cur[s]
    score = prev[S - 1]
    if not (score > -np.inf) or score != score:
        return path, -np.inf
    s = S - 1
    for t in range(T - 1, -1, -1):
        path[t] = s
        s -= back[t, s]
    return path, score

"""Lattice kernels for the tied-mixture chain HMM used by :mod:`streamq.align`.

The chain has S states, starts in state 0 and ends in state S - 1. State ``s`` may go to

- itself with probability ``stay[s]``,
- the next state with probability ``nxt[s]``,
- the state after next with probability ``skip[s]`` (this is how an optional state,
  e.g. a pause between words, is skipped).

A plain linear chain is ``skip = 0``. :func:`forward_backward` and :func:`viterbi` are O(T * S) in time and
memory; :func:`forward_backward_pruned` and :func:`viterbi_pruned` (long recordings) work on one window of
states per frame (beam pruning, Kaldi's ``--beam``) with checkpoints, O(T * width) in time and
O(T U + sqrt(T) width) / O(T width) bytes in memory, and equal the dense kernels when nothing is pruned.

Emissions are given per *unit* (T, U) together with ``state_unit`` (S,), the unit each state
emits with (several states share a unit: the same character in several places of a transcript).
Use ``state_unit = arange(S)`` for one unit per state. The emission side (diagonal Gaussians,
tied mixtures, their statistics) is in :mod:`streamq.kernels.tied`, except for the aligner's sparse E-step
(:func:`sparse_e_step`, :func:`sparse_e_steps`: cached Gaussian-selected emissions, the pruned lattice and the
component counts fused in one call), which lives here with the lattice it calls.

All kernels are pure (arrays in, arrays out), compiled with ``cache=True`` and never read
module globals. Log-domain code uses no fastmath at all (inputs may hold ``-inf``).
Tie rule of :func:`viterbi`: on equal scores the predecessor with the smaller jump wins
(stay before next before skip); applied backwards from the last frame, among equal-scoring
paths the one that reaches each state earliest is returned.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import parallel_njit

__all__ = ["forward_backward", "forward_backward_log", "viterbi", "forward_backward_pruned", "viterbi_pruned",
           "end_distance", "m_any", "sparse_emissions", "sparse_counts", "sparse_e_step", "sparse_e_steps"]


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


# --------------------------------------------------------------------------- pruned, checkpointed lattices
# Long recordings (tens of thousands of states, hundreds of thousands of frames): the lattice is restricted
# to one window of states [lo_t, hi_t] per frame, found by the forward pass -- states that cannot reach the
# end in the frames left are never entered (exact), and with a finite ``beam`` states whose scaled forward
# probability is below exp(-beam) times the frame's best are dropped (Kaldi's --beam). Forward-backward then
# is exact on that restricted lattice (rows of gamma sum to 1, xi consistent, EM stays monotone for it) and
# identical to :func:`forward_backward` when the windows hold every state with a path. Forward values are
# kept only every ``every`` frames (checkpoints) and each segment is recomputed on the way back, so the
# working set is O(T + (T / every + every) * width + T U) instead of O(T S); occupancy is summed per unit on
# the fly (no T x S gamma). Status codes: 0 ok; 1 no path inside the windows (none at all when beam = inf);
# 2 numerical underflow / overflow (redo in the log domain).


@njit(cache=True, nogil=True)
def end_distance(nxt, skip):
    """Fewest transitions from each state to the last one, int64 (S,) (a large number where it is unreachable)."""
    S = nxt.shape[0]
    big = np.int64(1) << 60
    d = np.full(S, big, np.int64)
    if S == 0:
        return d
    d[S - 1] = 0
    for s in range(S - 2, -1, -1):
        best = big
        if nxt[s] > 0.0 and d[s + 1] < big:
            best = d[s + 1] + 1
        if s + 2 < S and skip[s] > 0.0 and d[s + 2] < big and d[s + 2] + 1 < best:
            best = d[s + 2] + 1
        d[s] = best
    return d


@njit(cache=True, nogil=True)
def _grow(buf, need):
    if need <= buf.shape[0]:
        return buf
    new = np.empty(max(need, 2 * buf.shape[0]), buf.dtype)
    new[:buf.shape[0]] = buf
    return new


@njit(cache=True, nogil=True)
def m_any(P, t, state_unit, lo, hi):
    """True if a state in [lo, hi] has a positive emission at frame t."""
    for s in range(lo, hi + 1):
        if P[t, state_unit[s]] > 0.0:
            return True
    return False


@njit(cache=True, nogil=True)
def _fb_pruned_single(P, state_unit, stay, nxt, skip, n_units, thr_rel, dend, path, count, cidx, ex, occ_floor, out):
    """:func:`forward_backward_pruned` with every frame's forward values kept (one segment): the same operations
    in the same order (the same bits as the checkpointed walk), on state vectors padded with zeros outside the
    window so that the inner loops have no range tests. Same returns.

    count : bool. When True, each frame's expected component counts (:func:`sparse_counts` before its final
    multiplication by the weights; frames in reverse order) are added to out float64 (C, U) INOUT as the
    backward pass completes the frame's unit occupancies, from cidx int32 (T, n) / ex float32 (T, n) IN
    (:func:`sparse_emissions`), visiting only the units of the frame's window."""
    T = P.shape[0]
    S = state_unit.shape[0]
    U = n_units
    occ = np.zeros((T, U))
    xi = np.zeros((S, 3))
    pp = np.zeros(T)
    info = np.zeros(3)
    lo = np.empty(T, np.int64)
    hi = np.empty(T, np.int64)
    sc = np.empty(T)
    ptr = np.zeros(T + 1, np.int64)
    seg = np.empty(max(16, 4 * T), np.float64)  # every frame's window of forward values, flattened
    # padded state vectors: pv[s + 2] = alpha_hat_{t-1}[s] (0 outside the window), nx1[s] = nxt[s - 1],
    # sk2[s] = skip[s - 2] (0 where there is no such predecessor)
    pv = np.zeros(S + 2)
    cur = np.zeros(S)
    nx1 = np.zeros(S)
    sk2 = np.zeros(S)
    for s in range(1, S):
        nx1[s] = nxt[s - 1]
    for s in range(2, S):
        sk2[s] = skip[s - 2]
    dmax = 0
    for s in range(S):
        if dend[s] > dmax:
            dmax = dend[s]
    e0 = P[0, state_unit[0]]
    if not (e0 > 0.0) or e0 == np.inf:
        return occ, -np.inf, xi, (1 if e0 == 0.0 else 2), pp, info
    lo[0] = 0
    hi[0] = 0
    sc[0] = 1.0
    pv[2] = 1.0
    seg[0] = 1.0
    ptr[1] = 1
    loglik = np.log(e0)
    wsum = 1.0
    wmax = 1
    for t in range(1, T):
        plo = lo[t - 1]
        phi = hi[t - 1]
        chi = min(phi + 2, S - 1)
        left = T - 1 - t
        Pt = P[t]
        for s in range(plo, chi + 1):  # no reductions: vectorisable
            p = stay[s] * pv[s + 2]
            p += nx1[s] * pv[s + 1]
            p += sk2[s] * pv[s]
            cur[s] = p * Pt[state_unit[s]] if p > 0.0 else 0.0
        amax = 0.0
        bad = False
        for s in range(plo, chi + 1):
            a = cur[s]
            if not (a <= 1.7976931348623157e308):  # nan or inf
                bad = True
            if a > amax:
                amax = a
        if bad:
            return occ, -np.inf, xi, 2, pp, info
        if not (amax > 0.0):
            return occ, -np.inf, xi, (2 if m_any(P, t, state_unit, plo, chi) else 1), pp, info
        thr = amax * thr_rel
        nlo = plo
        while nlo <= chi and not (cur[nlo] > 0.0 and cur[nlo] >= thr and dend[nlo] <= left):
            nlo += 1
        if nlo > chi:
            return occ, -np.inf, xi, 1, pp, info
        nhi = chi
        while not (cur[nhi] > 0.0 and cur[nhi] >= thr and dend[nhi] <= left):
            nhi -= 1
        c = 0.0
        if left >= dmax:  # every state can still reach the end
            for s in range(nlo, nhi + 1):
                c += cur[s]
        else:
            for s in range(nlo, nhi + 1):
                if dend[s] > left:
                    cur[s] = 0.0
                c += cur[s]
        if not (c > 1e-290):  # 1 / c would overflow: redo in the log domain
            return occ, -np.inf, xi, 2, pp, info
        ic = 1.0 / c
        w = nhi - nlo + 1
        o = ptr[t]
        if o + w > seg.shape[0]:
            seg = _grow(seg, o + w)
        for s in range(plo, nlo):
            pv[s + 2] = 0.0
        for s in range(nhi + 1, phi + 1):
            pv[s + 2] = 0.0
        for s in range(nlo, nhi + 1):
            v = cur[s] * ic
            pv[s + 2] = v
            seg[o + s - nlo] = v
        ptr[t + 1] = o + w
        lo[t] = nlo
        hi[t] = nhi
        sc[t] = c
        loglik += np.log(1.0) + np.log(c)
        wsum += w
        if w > wmax:
            wmax = w
    if hi[T - 1] < S - 1:
        return occ, -np.inf, xi, 1, pp, info
    a_end = pv[S + 1]
    if not (a_end > 0.0):
        return occ, -np.inf, xi, 2, pp, info
    loglik += np.log(a_end)
    # ---- backward: beta_hat of frame t + 1 in bn over its window; wv[r] = beta * emission / c, 0 outside it
    bn = np.zeros(S + 2)
    bc = np.zeros(S + 2)
    wv = np.zeros(S + 2)
    has_path = path.shape[0] == T
    mark = np.full(U, -1, np.int64)
    xi0 = np.zeros(S)
    xi1 = np.zeros(S)
    xi2 = np.zeros(S)
    gmb = np.empty(S)
    rr = np.empty(U)
    nz = np.empty(U, np.int64)
    n = cidx.shape[1]
    for t in range(T - 1, -1, -1):
        off = ptr[t]
        tlo = lo[t]
        thi = hi[t]
        occ_t = occ[t]
        if t == T - 1:
            for s in range(tlo, thi + 1):
                bc[s] = 0.0
            bc[S - 1] = 1.0 / a_end
            for s in range(tlo, thi + 1):
                gm = seg[off + s - tlo] * bc[s]
                occ_t[state_unit[s]] += gm
                if has_path and path[t] == s:
                    pp[t] = gm
        else:
            nlo = lo[t + 1]
            nhi = hi[t + 1]
            inv = 1.0 / (1.0 * sc[t + 1])
            Pn = P[t + 1]
            for r in range(tlo, nlo):  # wv holds the previous frame's values: zero what this frame reads
                wv[r] = 0.0
            for r in range(nhi + 1, min(thi + 3, S + 2)):
                wv[r] = 0.0
            for r in range(nlo, nhi + 1):
                wv[r] = bn[r] * Pn[state_unit[r]] * inv
            bad = False
            for s in range(tlo, thi + 1):  # no scatter, no early exit: vectorisable
                x0 = stay[s] * wv[s]
                x1 = nxt[s] * wv[s + 1]
                x2 = skip[s] * wv[s + 2]
                bs = x0 + x1 + x2
                if bs == np.inf or bs != bs:
                    bad = True
                al = seg[off + s - tlo]
                xi0[s] += al * x0
                xi1[s] += al * x1
                xi2[s] += al * x2
                bc[s] = bs
                gmb[s] = al * bs
            if bad:
                return np.zeros((T, U)), -np.inf, np.zeros((S, 3)), 2, np.zeros(T), info
            for s in range(tlo, thi + 1):
                occ_t[state_unit[s]] += gmb[s]
            if has_path and path[t] >= tlo and path[t] <= thi:
                pp[t] = gmb[path[t]]
        if count:
            Pt = P[t]
            m = 0
            for s in range(tlo, thi + 1):
                u = state_unit[s]
                if mark[u] != t:
                    mark[u] = t
                    o = occ_t[u]
                    if o > occ_floor and Pt[u] > 0.0:
                        rr[m] = o / Pt[u]
                        nz[m] = u
                        m += 1
            if m > 0:
                for j in range(n):
                    k = cidx[t, j]
                    if k < 0:
                        continue
                    e = np.float64(ex[t, j])
                    if e == 0.0:
                        continue
                    row = out[k]
                    for q in range(m):
                        row[nz[q]] += e * rr[q]
        tmp = bn
        bn = bc
        bc = tmp
    for s in range(S):
        xi[s, 0] = xi0[s]
        xi[s, 1] = xi1[s]
        xi[s, 2] = xi2[s]
    info[0] = (4 * S + occ.size + xi.size + pp.size + sc.size + seg.size + pv.size + cur.size + nx1.size + sk2.size
               + bn.size + bc.size + wv.size + lo.size + hi.size + ptr.size + info.size) * 8.0
    info[1] = wmax
    info[2] = wsum / T
    return occ, loglik, xi, 0, pp, info


@njit(cache=True, nogil=True)
def forward_backward_pruned(P, state_unit, stay, nxt, skip, n_units, beam, every, path):
    """Forward-backward on linear emissions over a pruned, checkpointed lattice; per-unit occupancy.

    Parameters
    ----------
    P : float64 (T, U) IN   emission likelihood of each frame under each unit, on any per-frame scale (the
        caller keeps it: log P(X) = loglik + sum_t log scale_t), >= 0. E.g. ``mixture_likelihoods`` output.
    state_unit : int64 (S,) IN; stay, nxt, skip : float64 (S,) IN   as in :func:`forward_backward`.
    n_units : int   U, columns of the occupancy (>= max(state_unit) + 1).
    beam : float    pruning beam in nats of scaled forward probability (``inf``: no pruning, exact).
    every : int     checkpoint interval in frames; >= T keeps every frame's forward values (no
        recomputation), <= 0 picks ceil(sqrt(T)) when T * S > 2**22 and T otherwise.
    path : int64 (T,) or (0,) IN   a state path (e.g. Viterbi's) whose posterior is returned per frame.

    Returns
    -------
    occ : float64 (T, U)   ``occ[t, u] = sum_{s: unit(s) = u} gamma[t, s]`` (0 outside the windows).
    loglik : float         log P(X) on the lattice relative to the caller's scale (-inf unless status 0).
    xi : float64 (S, 3)    expected transition counts s->s, s->s+1, s->s+2.
    status : int           0 ok, 1 no path inside the windows, 2 numerical under/overflow.
    post_path : float64 (T,)   gamma[t, path[t]] (zeros when ``path`` is empty or status != 0).
    info : float64 (3,)    bytes of every array this call allocated (the working set), widest window, mean
        window width (states).
    """
    T = P.shape[0]
    S = state_unit.shape[0]
    U = n_units
    occ = np.zeros((T, U))
    xi = np.zeros((S, 3))
    pp = np.zeros(T)
    info = np.zeros(3)
    if T == 0 or S == 0:
        return occ, -np.inf, xi, 1, pp, info
    L = every
    if L <= 0:
        L = T if T * S <= (1 << 22) else int(np.ceil(np.sqrt(T)))
    L = min(L, T)
    n_seg = (T + L - 1) // L
    dend = end_distance(nxt, skip)
    thr_rel = np.exp(-beam) if beam < np.inf else 0.0
    lo = np.empty(T, np.int64)
    hi = np.empty(T, np.int64)
    em = np.empty(T)  # per-frame emission normaliser m_t (max over the candidate states)
    sc = np.empty(T)  # c_t: sum of the window's scaled forward values
    prev = np.zeros(S)
    cur = np.zeros(S)
    ck_ptr = np.zeros(n_seg + 1, np.int64)
    ck = np.empty(max(16, S), np.float64)
    single = n_seg == 1
    if single and dend[0] <= T - 1:
        return _fb_pruned_single(P, state_unit, stay, nxt, skip, U, thr_rel, dend, path, False,
                                 np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32), 0.0, np.zeros((0, 0)))
    seg = np.empty(16, np.float64)  # forward values of the segment being walked back (flattened windows)
    seg_ptr = np.zeros(L + 1, np.int64)
    # ---- forward with pruning
    if dend[0] > T - 1:
        return occ, -np.inf, xi, 1, pp, info
    e0 = P[0, state_unit[0]]
    if not (e0 > 0.0) or e0 == np.inf:
        return occ, -np.inf, xi, (1 if e0 == 0.0 else 2), pp, info
    lo[0] = 0
    hi[0] = 0
    em[0] = e0
    sc[0] = 1.0
    prev[0] = 1.0
    loglik = np.log(e0)
    wsum = 1.0
    wmax = 1
    for t in range(T):
        if t > 0:
            plo = lo[t - 1]
            phi = hi[t - 1]
            chi = min(phi + 2, S - 1)
            left = T - 1 - t
            # P <= 1 (relative to the frame's best Gaussian, weights summing to 1) and the previous frame is
            # normalised, so p * e cannot overflow; a frame where it all underflows is status 2
            amax = 0.0
            for s in range(plo, chi + 1):
                p = 0.0
                if s <= phi:
                    p = stay[s] * prev[s]
                if s - 1 >= plo and s - 1 <= phi:
                    p += nxt[s - 1] * prev[s - 1]
                if s - 2 >= plo:
                    p += skip[s - 2] * prev[s - 2]
                a = p * P[t, state_unit[s]] if p > 0.0 else 0.0
                if a != a or a == np.inf:
                    return occ, -np.inf, xi, 2, pp, info
                cur[s] = a
                if a > amax:
                    amax = a
            if not (amax > 0.0):
                return occ, -np.inf, xi, (2 if m_any(P, t, state_unit, plo, chi) else 1), pp, info
            m = 1.0
            # the beam is relative to the best state, even one that can no longer reach the end in time
            # (then the kept ones may die out: no path inside the beam); only those that can are kept
            thr = amax * thr_rel
            nlo = plo
            while nlo <= chi and not (cur[nlo] > 0.0 and cur[nlo] >= thr and dend[nlo] <= left):
                nlo += 1
            if nlo > chi:
                return occ, -np.inf, xi, 1, pp, info
            nhi = chi
            while not (cur[nhi] > 0.0 and cur[nhi] >= thr and dend[nhi] <= left):
                nhi -= 1
            c = 0.0
            for s in range(nlo, nhi + 1):
                if dend[s] > left:
                    cur[s] = 0.0
                c += cur[s]
            if not (c > 1e-290):  # 1 / c would overflow: redo in the log domain
                return occ, -np.inf, xi, 2, pp, info
            ic = 1.0 / c
            for s in range(nlo, nhi + 1):
                prev[s] = cur[s] * ic
            lo[t] = nlo
            hi[t] = nhi
            em[t] = m
            sc[t] = c
            loglik += np.log(m) + np.log(c)
            w = nhi - nlo + 1
            wsum += w
            if w > wmax:
                wmax = w
        w = hi[t] - lo[t] + 1
        if t % L == 0:  # checkpoint
            k = t // L
            ck = _grow(ck, ck_ptr[k] + w)
            for s in range(lo[t], hi[t] + 1):
                ck[ck_ptr[k] + s - lo[t]] = prev[s]
            ck_ptr[k + 1] = ck_ptr[k] + w
        if single:
            seg = _grow(seg, seg_ptr[t] + w)
            for s in range(lo[t], hi[t] + 1):
                seg[seg_ptr[t] + s - lo[t]] = prev[s]
            seg_ptr[t + 1] = seg_ptr[t] + w
    if lo[T - 1] > S - 1 or hi[T - 1] < S - 1:
        return occ, -np.inf, xi, 1, pp, info
    a_end = prev[S - 1]
    if not (a_end > 0.0):
        return occ, -np.inf, xi, 2, pp, info
    loglik += np.log(a_end)
    # ---- backward, segment by segment from the end; beta of frame t + 1 in bn over [lo[t+1], hi[t+1]]
    bn = np.zeros(S)
    bc = np.zeros(S)
    wv = np.zeros(S)
    has_path = path.shape[0] == T
    for k in range(n_seg - 1, -1, -1):
        a = k * L
        b = min(T, a + L)
        if not single:  # recompute the segment's forward values from its checkpoint, same windows and scales
            seg_ptr[0] = 0
            w0 = hi[a] - lo[a] + 1
            seg = _grow(seg, w0)
            for q in range(w0):
                seg[q] = ck[ck_ptr[k] + q]
            seg_ptr[1] = w0
            for t in range(a + 1, b):
                plo = lo[t - 1]
                phi = hi[t - 1]
                o0 = seg_ptr[t - 1 - a]
                o1 = seg_ptr[t - a]
                w = hi[t] - lo[t] + 1
                seg = _grow(seg, o1 + w)
                inv = 1.0 / em[t]
                ic = 1.0 / sc[t]
                left = T - 1 - t
                for s in range(lo[t], hi[t] + 1):
                    p = 0.0
                    if dend[s] > left:
                        pass
                    elif s >= plo and s <= phi:
                        p = stay[s] * seg[o0 + s - plo]
                    if dend[s] <= left and s - 1 >= plo and s - 1 <= phi:
                        p += nxt[s - 1] * seg[o0 + s - 1 - plo]
                    if dend[s] <= left and s - 2 >= plo and s - 2 <= phi:
                        p += skip[s - 2] * seg[o0 + s - 2 - plo]
                    v = p * (P[t, state_unit[s]] * inv) if p > 0.0 else 0.0
                    seg[o1 + s - lo[t]] = v * ic
                seg_ptr[t - a + 1] = o1 + w
        for t in range(b - 1, a - 1, -1):
            off = seg_ptr[t - a] if not single else seg_ptr[t]
            tlo = lo[t]
            thi = hi[t]
            if t == T - 1:
                for s in range(tlo, thi + 1):
                    bc[s] = 0.0
                bc[S - 1] = 1.0 / a_end
            else:
                nlo = lo[t + 1]
                nhi = hi[t + 1]
                inv = 1.0 / (em[t + 1] * sc[t + 1])
                for r in range(nlo, nhi + 1):
                    bb = bn[r]
                    wv[r] = bb * P[t + 1, state_unit[r]] * inv if bb != 0.0 else 0.0
                for s in range(tlo, thi + 1):
                    x0 = stay[s] * wv[s] if s >= nlo and s <= nhi else 0.0
                    x1 = nxt[s] * wv[s + 1] if s + 1 >= nlo and s + 1 <= nhi else 0.0
                    x2 = skip[s] * wv[s + 2] if s + 2 >= nlo and s + 2 <= nhi else 0.0
                    bs = x0 + x1 + x2
                    if bs == np.inf or bs != bs:
                        return np.zeros((T, U)), -np.inf, np.zeros((S, 3)), 2, np.zeros(T), info
                    al = seg[off + s - tlo]
                    xi[s, 0] += al * x0
                    xi[s, 1] += al * x1
                    xi[s, 2] += al * x2
                    bc[s] = bs
            for s in range(tlo, thi + 1):
                gm = seg[off + s - tlo] * bc[s]
                occ[t, state_unit[s]] += gm
                if has_path and path[t] == s:
                    pp[t] = gm
            tmp = bn
            bn = bc
            bc = tmp
    info[0] = (occ.size + xi.size + pp.size + em.size + sc.size + prev.size + cur.size + ck.size + seg.size
               + bn.size + bc.size + wv.size) * 8.0 + (lo.size + hi.size + dend.size + ck_ptr.size
                                                      + seg_ptr.size) * 8.0 + info.size * 8.0
    info[1] = wmax
    info[2] = wsum / T
    return occ, loglik, xi, 0, pp, info


@njit(cache=True, nogil=True)
def viterbi_pruned(log_emit, state_unit, stay, nxt, skip, beam):
    """Best path (as :func:`viterbi`, same tie rule) over a pruned lattice: per frame only the states within
    ``beam`` nats of the frame's best partial score that can still reach the end; backpointers are kept
    for those windows only (one byte per state-frame in them).

    Parameters as :func:`viterbi`, plus beam : float (``inf``: exact, identical to :func:`viterbi`).

    Returns path int64 (T,) (-1 when none), score float (-inf when none), status int (0 ok, 1 no path inside
    the beam), info float64 (3,) (bytes allocated, widest window, mean window width).
    """
    T = log_emit.shape[0]
    S = state_unit.shape[0]
    path = np.full(T, -1, np.int64)
    info = np.zeros(3)
    if T == 0 or S == 0:
        return path, -np.inf, 1, info
    lstay, lnxt, lskip = _log_transitions(stay, nxt, skip)
    dend = end_distance(nxt, skip)
    lo = np.empty(T, np.int64)
    hi = np.empty(T, np.int64)
    ptr = np.zeros(T + 1, np.int64)
    back = np.empty(max(16, S), np.int8)
    prev = np.full(S, -np.inf)
    cur = np.full(S, -np.inf)
    v0 = log_emit[0, state_unit[0]]
    if dend[0] > T - 1 or not (v0 > -np.inf) or v0 != v0:
        return path, -np.inf, 1, info
    prev[0] = v0
    lo[0] = 0
    hi[0] = 0
    back[0] = 0
    ptr[1] = 1
    wsum = 1.0
    wmax = 1
    for t in range(1, T):
        plo = lo[t - 1]
        phi = hi[t - 1]
        chi = min(phi + 2, S - 1)
        left = T - 1 - t
        best_all = -np.inf
        back = _grow(back, ptr[t] + chi - plo + 1)
        for s in range(plo, chi + 1):
            best = -np.inf
            arg = 0
            if s <= phi:
                best = prev[s] + lstay[s]
            if s - 1 >= plo and s - 1 <= phi:
                v = prev[s - 1] + lnxt[s - 1]
                if v > best:
                    best = v
                    arg = 1
            if s - 2 >= plo:
                v = prev[s - 2] + lskip[s - 2]
                if v > best:
                    best = v
                    arg = 2
            best += log_emit[t, state_unit[s]]
            if best != best:
                best = -np.inf
            cur[s] = best
            back[ptr[t] + s - plo] = arg
            if best > best_all:
                best_all = best
        if not (best_all > -np.inf):
            return np.full(T, -1, np.int64), -np.inf, 1, info
        thr = best_all - beam  # relative to the best partial path, even one that can no longer finish
        nlo = plo
        while nlo <= chi and not (cur[nlo] > -np.inf and cur[nlo] >= thr and dend[nlo] <= left):
            nlo += 1
        if nlo > chi:
            return np.full(T, -1, np.int64), -np.inf, 1, info
        nhi = chi
        while not (cur[nhi] > -np.inf and cur[nhi] >= thr and dend[nhi] <= left):
            nhi -= 1
        for s in range(nlo, nhi + 1):
            if dend[s] > left:
                cur[s] = -np.inf
        # keep the window's backpointers only: shift them to the start of this frame's slot
        w = nhi - nlo + 1
        d = nlo - plo
        if d > 0:
            for q in range(w):
                back[ptr[t] + q] = back[ptr[t] + d + q]
        ptr[t + 1] = ptr[t] + w
        for s in range(plo, nlo):
            prev[s] = -np.inf
        for s in range(nlo, nhi + 1):
            prev[s] = cur[s]
        for s in range(nhi + 1, chi + 1):
            prev[s] = -np.inf
        lo[t] = nlo
        hi[t] = nhi
        wsum += w
        if w > wmax:
            wmax = w
    if lo[T - 1] > S - 1 or hi[T - 1] < S - 1:
        return path, -np.inf, 1, info
    score = prev[S - 1]
    if not (score > -np.inf):
        return path, -np.inf, 1, info
    s = S - 1
    for t in range(T - 1, -1, -1):
        path[t] = s
        s -= back[ptr[t] + s - lo[t]]
    info[0] = (path.size + lstay.size + lnxt.size + lskip.size + dend.size + lo.size + hi.size + ptr.size
               + prev.size + cur.size + info.size) * 8.0 + back.size
    info[1] = wmax
    info[2] = wsum / T
    return path, score, 0, info


# --------------------------------------------------------------------------- sparse tied-mixture E-step
# The aligner's EM statistics from cached, Gaussian-selected emissions (:mod:`streamq.align`, ``gselect``). Per
# frame t of an utterance: its top-n Gaussians ``cidx[t]`` (int32, numbered among the utterance's C distinct
# components ``comps``; -1 = empty slot) and their likelihoods relative to the frame's best one,
# ``ex[t, j] = exp(log N_k(x_t) - shift_t)`` in [0, 1] (float32). The Gaussians do not change during alignment
# EM (only the tied weights do), so ``ex`` is computed once and every iteration is linear-domain arithmetic:
# the weights of the utterance's U units at its components (C x U), the unit emissions
# ``P[t, u] = sum_j ex[t, j] Wt[cidx[t, j], u]`` (no exp or log), forward-backward on the pruned lattice above,
# and the expected component counts at the listed components (U x C). :func:`sparse_e_steps` runs a batch of
# utterances in parallel (one utterance per task) and adds their counts to the corpus accumulator in utterance
# order, element by element: the bits of a serial loop over :func:`sparse_e_step`, whatever the thread count.
# Linear-domain products only (no -inf reaches them): fastmath may reassociate and contract.
_LIN_FASTMATH = {"reassoc", "contract", "arcp"}


@njit(cache=True, nogil=True)
def _local_weights(WT, units, comps):
    """Wt[c, u] = WT[comps[c], units[u]]: float64 (C, U) from the transposed corpus weights WT (K, n_units)."""
    C = comps.shape[0]
    U = units.shape[0]
    Wt = np.empty((C, U))
    for c in range(C):
        row = WT[comps[c]]
        for u in range(U):
            Wt[c, u] = row[units[u]]
    return Wt


@njit(cache=True, nogil=True, fastmath=_LIN_FASTMATH)
def sparse_emissions(cidx, ex, Wt):
    """Per-unit mixture likelihoods from each frame's listed components, linear domain.

    Parameters
    ----------
    cidx : int32 (T, n) IN   row of ``Wt`` of each slot; -1 = empty slot (ignored).
    ex : float32 (T, n) IN   likelihood of the slot's component relative to the frame's shift, in [0, 1].
    Wt : float64 (C, U) IN   weights, transposed: Wt[c, u] = weight of component c in unit u.

    Returns
    -------
    P : float64 (T, U)   ``P[t, u] = sum_j Wt[cidx[t, j], u] ex[t, j]`` (slots in order); the unit's
        log-emission is ``shift[t] + log P[t, u]``.
    """
    T, n = cidx.shape
    U = Wt.shape[1]
    P = np.zeros((T, U))
    for t in range(T):
        for j in range(n):
            k = cidx[t, j]
            if k < 0:
                continue
            e = np.float64(ex[t, j])
            if e == 0.0:
                continue
            for u in range(U):
                P[t, u] += e * Wt[k, u]
    return P


@njit(cache=True, nogil=True, fastmath=_LIN_FASTMATH)
def _sparse_counts_into(cidx, ex, occ, P, Wt, occ_floor, out, r, nz):
    """out (C, U) += the expected counts (see :func:`sparse_counts`); r, nz: float64 / int64 (U,) scratch."""
    T, n = cidx.shape
    C, U = Wt.shape
    for t in range(T):
        m = 0
        for u in range(U):
            o = occ[t, u]
            if o > occ_floor and P[t, u] > 0.0:
                r[m] = o / P[t, u]
                nz[m] = u
                m += 1
        if m == 0:
            continue
        for j in range(n):
            k = cidx[t, j]
            if k < 0:
                continue
            e = np.float64(ex[t, j])
            if e == 0.0:
                continue
            row = out[k]
            for q in range(m):
                row[nz[q]] += e * r[q]
    for c in range(C):
        for u in range(U):
            out[c, u] *= Wt[c, u]


@njit(cache=True, nogil=True)
def sparse_counts(cidx, ex, occ, P, Wt, occ_floor=0.0):
    """Expected component counts per unit at the listed components (the M-step statistics of the tied weights).

    ``counts[c, u] = sum_t sum_{j: cidx[t, j] = c} occ[t, u] Wt[c, u] ex[t, j] / P[t, u]``: the unit's occupancy
    times the component's posterior within the unit's (listed) mixture.

    Parameters
    ----------
    cidx, ex : (T, n) IN as in :func:`sparse_emissions`; occ : float64 (T, U) IN state occupancy summed per unit;
    P : float64 (T, U) IN from :func:`sparse_emissions`; Wt : float64 (C, U) IN.
    occ_floor : float   occupancies ``<= occ_floor`` are skipped (0: exact).

    Returns
    -------
    counts : float64 (C, U)   (frames with ``occ <= occ_floor`` or ``P == 0`` contribute nothing).
    """
    C, U = Wt.shape
    out = np.zeros((C, U))
    _sparse_counts_into(cidx, ex, occ, P, Wt, occ_floor, out, np.empty(U), np.empty(U, np.int64))
    return out


@njit(cache=True, nogil=True)
def _fb_counts(P, state_unit, stay, nxt, skip, n_units, beam, cidx, ex, Wt, occ_floor, out):
    """:func:`forward_backward_pruned` (no path) that also adds the expected component counts to out (C, U):
    fused into the backward pass on one segment, from the occupancies afterwards on long (checkpointed)
    lattices. Returns (loglik, xi, status, info)."""
    T = P.shape[0]
    S = state_unit.shape[0]
    nopath = np.zeros(0, np.int64)
    if T > 0 and S > 0 and T * S <= (1 << 22):
        dend = end_distance(nxt, skip)
        if dend[0] <= T - 1:
            thr_rel = np.exp(-beam) if beam < np.inf else 0.0
            occ, ll, xi, status, pp, info = _fb_pruned_single(P, state_unit, stay, nxt, skip, n_units, thr_rel, dend,
                                                              nopath, True, cidx, ex, occ_floor, out)
            if status != 0:
                out[:, :] = 0.0
            return ll, xi, status, info
    occ, ll, xi, status, pp, info = forward_backward_pruned(P, state_unit, stay, nxt, skip, n_units, beam, 0, nopath)
    if status == 0:
        U = out.shape[1]
        _sparse_counts_into(cidx, ex, occ, P, np.ones((Wt.shape[0], U)), occ_floor, out, np.empty(U),
                            np.empty(U, np.int64))
    return ll, xi, status, info


@njit(cache=True, nogil=True)
def _sparse_e_step_into(cidx, ex, comps, units, state_unit, stay, nxt, skip, WT, beams, occ_floor, out, res):
    """One utterance's E-step; counts into out (C, U) (zeroed by the caller). res float64 (7,) OUT: loglik,
    status, xi stay total, xi total, bytes, widest window, beam index tried last."""
    Wt = _local_weights(WT, units, comps)
    P = sparse_emissions(cidx, ex, Wt)
    status = 1
    res[0] = -np.inf
    for b in range(beams.shape[0]):
        ll, xi, status, info = _fb_counts(P, state_unit, stay, nxt, skip, units.shape[0], beams[b], cidx, ex, Wt,
                                          occ_floor, out)
        res[4] = max(res[4], info[0] + (Wt.size + P.size + out.size) * 8.0)
        res[5] = max(res[5], info[1])
        res[6] = b
        if status == 0:
            res[0] = ll
            x0 = 0.0
            xt = 0.0
            for s in range(xi.shape[0]):
                x0 += xi[s, 0]
                xt += xi[s, 0] + xi[s, 1] + xi[s, 2]
            res[2] = x0
            res[3] = xt
            C, U = Wt.shape
            for c in range(C):
                for u in range(U):
                    out[c, u] *= Wt[c, u]
            break
        if status == 2:
            break
    res[1] = status


@njit(cache=True, nogil=True)
def sparse_e_step(cidx, ex, comps, units, state_unit, stay, nxt, skip, WT, beams, occ_floor):
    """One utterance's EM statistics from its cached sparse emissions (the section comment above).

    Parameters
    ----------
    cidx : int32 (T, n) IN; ex : float32 (T, n) IN   as in :func:`sparse_emissions`, cidx numbering ``comps``.
    comps : int32 (C,) IN   the utterance's distinct components (ids in [0, K)).
    units : int64 (U,) IN   the utterance's distinct units (rows of the corpus weights).
    state_unit : int64 (S,) IN   local unit of each state, in [0, U); stay, nxt, skip : float64 (S,) IN.
    WT : float64 (K, n_units) IN   the corpus weights, transposed (WT[k, u] = weight of component k in unit u).
    beams : float64 (B,) IN   beams tried in turn (inf: exact) until one has a path.
    occ_floor : float   unit occupancies at or below it give no counts (:func:`sparse_counts`).

    Returns
    -------
    counts : float64 (C, U)   expected counts of each component in each unit (zero unless status 0); equal to
        :func:`sparse_counts` of the lattice's occupancies up to float64 rounding (frames summed in reverse).
    res : float64 (7,)   loglik relative to the frames' shifts (log P(X) - sum_t shift_t; -inf unless status 0),
        status (0 ok, 1 no path inside the last beam, 2 numerical under/overflow: redo in the log domain),
        expected stay transitions, expected transitions, bytes of the working set, widest window, index of the
        beam tried last.
    """
    out = np.zeros((comps.shape[0], units.shape[0]))
    res = np.zeros(7)
    _sparse_e_step_into(cidx, ex, comps, units, state_unit, stay, nxt, skip, WT, beams, occ_floor, out, res)
    return out, res


@parallel_njit(cache=True, nogil=True)
def sparse_e_steps(cidx, ex, t_ptr, comps, c_ptr, units, u_ptr, state_unit, stay, nxt, skip, s_ptr, lane, WT,
                   beams, occ_floor, lanes):
    """:func:`sparse_e_step` over a batch of N utterances, in parallel over accumulator lanes.

    Utterance i's arrays are the slices ``[p[i]:p[i + 1]]`` of the concatenated ones: frames of cidx / ex by
    ``t_ptr``, comps by ``c_ptr``, units by ``u_ptr``, state_unit / stay / nxt / skip by ``s_ptr`` (int64 (N + 1,)
    each). lane : int64 (N,) IN, the accumulator lane of each utterance (-1: skip it, status 1).
    WT, beams, occ_floor as in :func:`sparse_e_step`.
    lanes : float64 (L, K, n_units) INOUT   ``lanes[lane[i], comps[c], units[u]] += counts[c, u]`` for each
        utterance with status 0, a lane's utterances in batch order (lanes run in parallel): the result
        depends on the lane of each utterance, never on the thread count, and a batch split in two gives the
        same bits.

    Returns
    -------
    res : float64 (N, 7)   each utterance's ``res`` (:func:`sparse_e_step`).
    """
    N = t_ptr.shape[0] - 1
    L = lanes.shape[0]
    res = np.zeros((N, 7))
    for i in range(N):
        if lane[i] < 0:
            res[i, 0] = -np.inf
            res[i, 1] = 1
    for l in prange(L):
        acc = lanes[l]
        for i in range(N):
            if lane[i] != l:
                continue
            U = u_ptr[i + 1] - u_ptr[i]
            c0 = c_ptr[i]
            C = c_ptr[i + 1] - c0
            u0 = u_ptr[i]
            out = np.zeros((C, U))
            a, b = t_ptr[i], t_ptr[i + 1]
            s0, s1 = s_ptr[i], s_ptr[i + 1]
            _sparse_e_step_into(cidx[a:b], ex[a:b], comps[c0:c0 + C], units[u0:u0 + U], state_unit[s0:s1],
                                stay[s0:s1], nxt[s0:s1], skip[s0:s1], WT, beams, occ_floor, out, res[i])
            if res[i, 1] != 0:
                continue
            for c in range(C):  # most (component, unit) pairs never meet: skip their zeros (x + 0 = x)
                row = acc[comps[c0 + c]]
                for u in range(U):
                    v = out[c, u]
                    if v != 0.0:
                        row[units[u0 + u]] += v
    return res

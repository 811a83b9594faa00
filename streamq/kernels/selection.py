"""Hierarchical Gaussian selection kernels: per-frame top-n components of a diagonal GMM without scoring all K.

The K Gaussians are grouped (``streamq.selection.build_selection``); group ``j`` holds the components
``member_idx[member_ptr[j]:member_ptr[j + 1]]`` and has a representative Gaussian (the moment-matched merge
of its members). Per frame x, with x' = x - shift and z = [x', x'^2] (the dot-product form of
:mod:`streamq.kernels.gmm`)::

    1. score the G representatives:      r_j = rep_const_j + z . rep_W[:, j]          (G dot products)
    2. keep the g best groups (ties: lower group index first)
    3. score their members:              s_p = mem_const_p + z . W_p                 (sum of group sizes)
    4. keep the n best members by s (a sorted array for n <= 64, else a min-heap; ties: lower id first)
    5. re-evaluate the n kept exactly in float64 by the direct form
           log w_k N(x | mu_k, diag s2_k) = lconst_k - 1/2 sum_d (x_d - mu_kd)^2 prec_kd,
           lconst_k = log w_k - 1/2 sum_d log(2 pi s2_kd),  prec_kd = 1 / s2_kd
       and return them sorted by decreasing value (ties: lower component index first).

Steps 1 and 3 run in the dtype of ``rep_W`` / ``mem_Wb`` (float32: ranking only, per-value error ~1e-6
relative on centred data); the returned log-likelihoods are always float64 from step 5. The per-frame work is
G + (sizes of the g groups searched) dot products of length 2D, plus O(n D): nothing proportional to K unless
g = G. With g = G and n = K every component is scored and kept: the exact mode is the same code path.

Companions turn the lists into frame log-likelihoods (log-sum-exp over the n), posteriors, and zeroth / first /
second order EM statistics (float64, one buffer per thread chunk, reduced after the ``prange``), and re-score
stored lists under new parameters (Kaldi's reuse of ``gmm-gselect`` output across iterations).

Member-order arrays (``mem_const``, ``mem_Wb``) are indexed by position p in ``member_idx`` (component
``member_idx[p]``); ``mem_Wb`` holds each group's W columns as one contiguous block; ``means``, ``prec``, ``lconst`` are in component order. No fastmath: log-domain values
may be -inf (a zero-weight component).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import parallel_njit


# ------------------------------------------------------------------ top-n heap
@njit(cache=True)
def _worse(v1, i1, v2, i2):
    """True if (v1, i1) ranks below (v2, i2): smaller value, or equal value and larger index."""
    return v1 < v2 or (v1 == v2 and i1 > i2)


@njit(cache=True)
def _sift_down(hv, hi, p, n):
    """Restore the min-heap (worst at the root) below position p of hv[:n], hi[:n]."""
    while True:
        c = 2 * p + 1
        if c >= n:
            return
        if c + 1 < n and _worse(hv[c + 1], hi[c + 1], hv[c], hi[c]):
            c += 1
        if _worse(hv[c], hi[c], hv[p], hi[p]):
            tv = hv[c]
            ti = hi[c]
            hv[c] = hv[p]
            hi[c] = hi[p]
            hv[p] = tv
            hi[p] = ti
            p = c
        else:
            return


@njit(cache=True)
def _push(hv, hi, cnt, cap, v, i):
    """Offer (v, i) to the heap of the best ``cap`` items held in hv[:cnt], hi[:cnt]; returns the new count."""
    if cnt < cap:
        p = cnt
        hv[p] = v
        hi[p] = i
        while p > 0:  # sift up
            q = (p - 1) // 2
            if _worse(hv[p], hi[p], hv[q], hi[q]):
                tv = hv[q]
                ti = hi[q]
                hv[q] = hv[p]
                hi[q] = hi[p]
                hv[p] = tv
                hi[p] = ti
                p = q
            else:
                break
        return cnt + 1
    if _worse(hv[0], hi[0], v, i):
        hv[0] = v
        hi[0] = i
        _sift_down(hv, hi, 0, cap)
    return cnt


@njit(cache=True)
def _heap_sort_desc(hv, hi, cnt):
    """Sort hv[:cnt], hi[:cnt] in place by decreasing value (ties: increasing index). Heap order not required."""
    for p in range(cnt // 2 - 1, -1, -1):
        _sift_down(hv, hi, p, cnt)
    for m in range(cnt - 1, 0, -1):  # move the worst to the end, shrink
        tv = hv[0]
        ti = hi[0]
        hv[0] = hv[m]
        hi[0] = hi[m]
        hv[m] = tv
        hi[m] = ti
        _sift_down(hv, hi, 0, m)


# ------------------------------------------------------------------ selection
@njit(cache=True)
def _insert_sorted(hv, hi, cnt, cap, v, i):
    """Insert (v, i) into hv[:cnt], hi[:cnt] kept best-first (worst at cnt - 1), dropping the worst beyond cap."""
    p = cnt if cnt < cap else cap - 1  # the slot freed for the new item
    while p > 0 and _worse(hv[p - 1], hi[p - 1], v, i):
        if p < cap:
            hv[p] = hv[p - 1]
            hi[p] = hi[p - 1]
        p -= 1
    hv[p] = v
    hi[p] = i
    return min(cnt + 1, cap)


@njit(cache=True)
def _offer(vals, ids, L, hv, hi, cnt, cap):
    """Offer (vals[p], ids[p]) for p < L to the best-``cap`` set hv[:cnt], hi[:cnt]; returns the new count.

    The set is a sorted array (best first) when cap <= 64, else a min-heap (worst at the root): the same cap
    must always be used with the same arrays. Blocks of 16 with no value >= the set's worst are skipped by
    one vectorisable count (most blocks once the set is full), the rest go through a one-compare reject.
    """
    small = cap <= 64
    for b in range(0, L, 16):
        e = min(b + 16, L)
        if cnt == cap:
            w = cap - 1 if small else 0
            thr = vals.dtype.type(hv[w])  # exact: the set holds values of vals' dtype
            hit = 0
            for p in range(b, e):
                hit += vals[p] >= thr
            if hit == 0:
                continue
        for p in range(b, e):
            v = np.float64(vals[p])
            k = np.int64(ids[p])
            if small:
                if cnt == cap and not _worse(hv[cap - 1], hi[cap - 1], v, k):
                    continue
                cnt = _insert_sorted(hv, hi, cnt, cap, v, k)
            else:
                if cnt == cap and not _worse(hv[0], hi[0], v, k):
                    continue
                cnt = _push(hv, hi, cnt, cap, v, k)
    return cnt


@njit(cache=True)
def _dot_block(z, W, cw, out):
    """out[:G] = cw + z . W  for W (2D, G) C-contiguous in W's dtype (loop over columns vectorises)."""
    G = W.shape[1]
    for p in range(G):
        out[p] = cw[p]
    for j in range(z.shape[0]):
        zj = z[j]
        for p in range(G):
            out[p] += zj * W[j, p]


@njit(cache=True)
def _dot_group(z, Wb, cw, p0, p1, out):
    """out[:L] = cw[p0:p1] + z . B, L = p1 - p0, B = Wb[2D p0 : 2D p1] viewed as (2D, L) row-major.

    Indexing goes through slices so every index is a non-negative range variable (Numba then emits no
    negative-index wraparound, and LLVM vectorises the loop over p instead of gathering).
    """
    L = p1 - p0
    J = z.shape[0]
    c = cw[p0:p1]
    for p in range(L):
        out[p] = c[p]
    for j in range(J):
        zj = z[j]
        row = Wb[J * p0 + j * L:J * p0 + (j + 1) * L]
        for p in range(L):
            out[p] += zj * row[p]


@njit(cache=True)
def _dot_group2(z1, z2, Wb, cw, p0, p1, out1, out2):
    """:func:`_dot_group` for two frames at once (each row of the block is loaded once for both)."""
    L = p1 - p0
    J = z1.shape[0]
    c = cw[p0:p1]
    for p in range(L):
        out1[p] = c[p]
        out2[p] = c[p]
    for j in range(J):
        a1 = z1[j]
        a2 = z2[j]
        row = Wb[J * p0 + j * L:J * p0 + (j + 1) * L]
        for p in range(L):
            out1[p] += a1 * row[p]
            out2[p] += a2 * row[p]


@parallel_njit(cache=True, nogil=True)
def select_topn(X, shift, rep_const, rep_W, member_ptr, member_idx, mem_const, mem_Wb, means, prec, lconst,
                n, g, n_chunks, tile):
    """Per-frame top-n components by hierarchical selection (module docstring).

    Frames are processed in tiles: the representatives of every frame of the tile are scored, then each group
    searched by at least one frame of the tile is scored for all those frames while its block of ``mem_Wb``
    is in L1 (the blocks total 2D K values). Each frame's best group is scored first (a first pass over the
    tile), so its heap holds good values before the other groups and most of their 16-blocks are rejected
    without a heap operation.

    Parameters
    ----------
    X : float32 or float64 (N, D) IN. Frames.
    shift : float64 (D,) IN. Centring offset (the one given to ``gmm_precompute`` for rep_W and mem_Wb).
    rep_const : float64 (G,) IN. rep_W : float32 or float64 (2D, G) IN, C-contiguous. Representatives'
        dot-product form (``streamq.kernels.gmm.gmm_precompute`` of the representatives).
    member_ptr : int64 (G + 1,) IN. CSR row pointer, member_ptr[0] = 0, member_ptr[G] = M = len(member_idx).
    member_idx : int32 (M,) IN. Component ids, grouped; each in [0, K).
    mem_const : float64 (M,) IN. Dot-product constants of component member_idx[p] at p.
    mem_Wb : (2D M,) IN, dtype of rep_W. Group j's block mem_Wb[2D p0 : 2D p1] (p0, p1 = member_ptr[j],
        member_ptr[j + 1]) is its members' W columns as a row-major (2D, p1 - p0) matrix.
    means : float64 (K, D) IN. prec : float64 (K, D) IN, 1 / variances. lconst : float64 (K,) IN,
        log w - 1/2 sum_d log(2 pi s2) (-inf for a zero weight). Component order.
    n : int >= 1. Components kept per frame (the output width).
    g : int >= 1. Groups searched per frame (clamped to G).
    n_chunks : int. Frames are split in this many contiguous chunks (parallel units, one scratch set each).
    tile : int >= 1. Frames per tile (scratch O(tile (n + g + 2D))).

    Returns
    -------
    idx : int32 (N, n) OUT. Component ids, by decreasing log-likelihood (ties: lower id first); -1 in the
        slots past the number of candidates (when the g groups hold fewer than n components).
    ll : float64 (N, n) OUT. log w_k N(x | mu_k, diag s2_k) of those components, exact float64; -inf where
        idx is -1.
    """
    N, D = X.shape
    G = rep_const.shape[0]
    gg = min(max(g, 1), G)
    T = max(1, tile)
    idx = np.full((N, n), -1, np.int32)
    ll = np.full((N, n), -np.inf, np.float64)
    maxsize = 1
    for j in range(G):
        maxsize = max(maxsize, member_ptr[j + 1] - member_ptr[j])
    C = max(1, min(n_chunks, N))
    per = (N + C - 1) // C
    for c in prange(C):
        a0 = c * per
        b0 = min(N, a0 + per)
        Z = np.empty((T, 2 * D), rep_W.dtype)
        rcw = rep_const.astype(rep_W.dtype)
        mcw = mem_const.astype(mem_Wb.dtype)
        rs = np.empty(G, rep_W.dtype)
        ms = np.empty(maxsize, mem_Wb.dtype)
        ms2 = np.empty(maxsize, mem_Wb.dtype)
        gv = np.empty(gg, np.float64)
        gi = np.empty(gg, np.int64)
        tg = np.empty((T, gg), np.int64)  # groups searched by each frame of the tile
        tgc = np.empty(T, np.int64)
        gcnt = np.zeros(G + 1, np.int64)  # frames of the tile per group (CSR over the tile)
        gfr = np.empty(T * gg, np.int64)
        hv = np.empty((T, n), np.float64)
        hi = np.empty((T, n), np.int64)
        hc = np.zeros(T, np.int64)
        gids = np.arange(G)
        for a in range(a0, b0, T):
            b = min(a + T, b0)
            nb = b - a
            for i in range(nb):
                for d in range(D):
                    v = np.float64(X[a + i, d]) - shift[d]
                    Z[i, d] = v
                    Z[i, D + d] = v * v
                _dot_block(Z[i], rep_W, rcw, rs)
                cg = _offer(rs, gids, G, gv, gi, 0, gg)
                best = 0  # the frame's best group goes first (phase 0): its members fill the heap with
                for q in range(1, cg):  # good values, so most blocks of the other groups are rejected whole
                    if _worse(gv[best], gi[best], gv[q], gi[q]):
                        best = q
                tgc[i] = cg
                tg[i, 0] = gi[best]
                r = 1
                for q in range(cg):
                    if q != best:
                        tg[i, r] = gi[q]
                        r += 1
                hc[i] = 0
            for phase in range(2):
                for j in range(G + 1):
                    gcnt[j] = 0
                for i in range(nb):
                    q0, q1 = (0, 1) if phase == 0 else (1, tgc[i])
                    for q in range(q0, q1):
                        gcnt[tg[i, q] + 1] += 1
                for j in range(G):
                    gcnt[j + 1] += gcnt[j]
                for i in range(nb):  # counting sort of (group, frame): frames in increasing order per group
                    q0, q1 = (0, 1) if phase == 0 else (1, tgc[i])
                    for q in range(q0, q1):
                        j = tg[i, q]
                        gfr[gcnt[j]] = i
                        gcnt[j] += 1
                start = 0
                for j in range(G):  # gcnt[j] is now the end of group j's frames
                    stop = gcnt[j]
                    p0 = member_ptr[j]
                    p1 = member_ptr[j + 1]
                    ids = member_idx[p0:p1]
                    r = start
                    while r + 1 < stop:  # frames in pairs: each block row is loaded once for two frames
                        i1 = gfr[r]
                        i2 = gfr[r + 1]
                        _dot_group2(Z[i1], Z[i2], mem_Wb, mcw, p0, p1, ms, ms2)
                        hc[i1] = _offer(ms, ids, p1 - p0, hv[i1], hi[i1], hc[i1], n)
                        hc[i2] = _offer(ms2, ids, p1 - p0, hv[i2], hi[i2], hc[i2], n)
                        r += 2
                    if r < stop:
                        i = gfr[r]
                        _dot_group(Z[i], mem_Wb, mcw, p0, p1, ms)
                        hc[i] = _offer(ms, ids, p1 - p0, hv[i], hi[i], hc[i], n)
                    start = stop
            for i in range(nb):  # exact float64 re-evaluation of the kept components, sorted
                t = a + i
                ch = hc[i]
                hvi = hv[i]
                hii = hi[i]
                for q in range(ch):
                    k = hii[q]
                    v = lconst[k]
                    for d in range(D):
                        e = np.float64(X[t, d]) - means[k, d]
                        v -= 0.5 * e * e * prec[k, d]
                    hvi[q] = v
                _heap_sort_desc(hvi, hii, ch)
                for q in range(ch):
                    idx[t, q] = hii[q]
                    ll[t, q] = hvi[q]
    return idx, ll


@parallel_njit(cache=True, nogil=True)
def score_listed(X, idx, means, prec, lconst, n_chunks):
    """Exact float64 log w_k N(x_t | mu_k, diag s2_k) for the listed components (re-use of stored lists).

    Parameters
    ----------
    X : float32 or float64 (N, D) IN.
    idx : int32 (N, n) IN. Component ids; -1 = empty slot.
    means, prec, lconst : as for :func:`select_topn` (the current parameters).
    n_chunks : int.

    Returns
    -------
    ll : float64 (N, n) OUT, in the order of idx (not re-sorted); -inf at empty slots.
    """
    N, D = X.shape
    n = idx.shape[1]
    ll = np.empty((N, n), np.float64)
    C = max(1, min(n_chunks, N))
    per = (N + C - 1) // C
    for c in prange(C):
        for t in range(c * per, min(N, (c + 1) * per)):
            for q in range(n):
                k = idx[t, q]
                if k < 0:
                    ll[t, q] = -np.inf
                    continue
                v = lconst[k]
                for d in range(D):
                    e = np.float64(X[t, d]) - means[k, d]
                    v -= 0.5 * e * e * prec[k, d]
                ll[t, q] = v
    return ll


# ------------------------------------------------------------------ companions
@njit(cache=True)
def _row_lse(ll, t):
    n = ll.shape[1]
    m = -np.inf
    for q in range(n):
        m = max(m, ll[t, q])
    if m == -np.inf:
        return -np.inf
    s = 0.0
    for q in range(n):
        s += np.exp(ll[t, q] - m)
    return m + np.log(s)


@parallel_njit(cache=True, nogil=True)
def selected_loglik(ll, n_chunks):
    """Frame log-likelihoods over the selected components: logsumexp_q ll[t, q] (max-subtracted).

    ll : float64 (N, n) IN (-inf entries ignored). Returns float64 (N,) OUT; -inf for a row of -inf only.
    """
    N = ll.shape[0]
    out = np.empty(N, np.float64)
    C = max(1, min(n_chunks, N))
    per = (N + C - 1) // C
    for c in prange(C):
        for t in range(c * per, min(N, (c + 1) * per)):
            out[t] = _row_lse(ll, t)
    return out


@parallel_njit(cache=True, nogil=True)
def selected_posteriors(ll, n_chunks):
    """Posteriors over each frame's selected components (renormalised over the n).

    ll : float64 (N, n) IN. Returns (lse float64 (N,) OUT, post float64 (N, n) OUT); rows of post sum to 1,
    zeros at -inf entries; a row of -inf only gives lse = -inf and post = 0.
    """
    N, n = ll.shape
    out = np.empty(N, np.float64)
    post = np.zeros((N, n), np.float64)
    C = max(1, min(n_chunks, N))
    per = (N + C - 1) // C
    for c in prange(C):
        for t in range(c * per, min(N, (c + 1) * per)):
            lse = _row_lse(ll, t)
            out[t] = lse
            if lse > -np.inf:
                for q in range(n):
                    post[t, q] = np.exp(ll[t, q] - lse)
    return out, post


@parallel_njit(cache=True, nogil=True)
def selected_stats(X, shift, idx, ll, K, n_chunks):
    """EM statistics from the selected lists: posteriors renormalised over each frame's n components.

    Parameters
    ----------
    X : float32 or float64 (N, D) IN.
    shift : float64 (D,) IN. Statistics are about this offset (as :func:`streamq.kernels.gmm.diag_gmm_stats`).
    idx : int32 (N, n) IN, ll : float64 (N, n) IN. From :func:`select_topn` or :func:`score_listed`.
    K : int. Number of components (ids in [0, K)).
    n_chunks : int. One float64 buffer set per chunk, reduced after the ``prange``.

    Returns
    -------
    total : float64. Sum of the frame log-likelihoods (logsumexp over each row; frames of -inf only skipped
        from the statistics but counted as -inf).
    occ : float64 (K,) OUT. sum_t gamma_tk.  f : float64 (K, D) OUT. sum_t gamma_tk (x_t - shift).
    s : float64 (K, D) OUT. sum_t gamma_tk (x_t - shift)^2.
    """
    N, D = X.shape
    n = idx.shape[1]
    C = max(1, min(n_chunks, N))
    tn = np.zeros((C, K), np.float64)
    tf = np.zeros((C, K, D), np.float64)
    ts = np.zeros((C, K, D), np.float64)
    tot = np.zeros(C, np.float64)
    per = (N + C - 1) // C
    for c in prange(C):
        xs = np.empty(D, np.float64)
        acc = 0.0
        for t in range(c * per, min(N, (c + 1) * per)):
            lse = _row_lse(ll, t)
            acc += lse
            if lse == -np.inf:
                continue
            for d in range(D):
                xs[d] = np.float64(X[t, d]) - shift[d]
            for q in range(n):
                k = idx[t, q]
                if k < 0:
                    continue
                gm = np.exp(ll[t, q] - lse)
                if gm == 0.0:
                    continue
                tn[c, k] += gm
                for d in range(D):
                    gx = gm * xs[d]
                    tf[c, k, d] += gx
                    ts[c, k, d] += gx * xs[d]
        tot[c] = acc
    occ = np.zeros(K, np.float64)
    f = np.zeros((K, D), np.float64)
    s = np.zeros((K, D), np.float64)
    total = 0.0
    for c in range(C):
        total += tot[c]
        for k in range(K):
            occ[k] += tn[c, k]
            for d in range(D):
                f[k, d] += tf[c, k, d]
                s[k, d] += ts[c, k, d]
    return total, occ, f, s

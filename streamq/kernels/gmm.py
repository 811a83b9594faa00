"""Diagonal-covariance GMM kernels: per-frame log-likelihoods, posteriors and EM statistics.

The quadratic form of every component is a dot product. With a centring ``shift`` (D,) applied to
frames and means (so the expansion does not cancel on data far from the origin), x' = x - shift,
mu' = mu - shift, z = [x', x'^2] (2D,)::

    log w_k N(x | mu_k, diag s2_k) = const_k + sum_j z_j W[j, k]
    const_k = log w_k - 1/2 sum_d log(2 pi s2_kd) - 1/2 sum_d mu'_kd^2 / s2_kd
    W[d, k] = mu'_kd / s2_kd,   W[D + d, k] = -1/2 / s2_kd

The E-step is fused (Kaldi-style per-batch statistics, never an N x K matrix): for a tile of frames,
component log-likelihoods (tile x K), log-sum-exp with max subtraction, posteriors, and zeroth /
first / second order statistics accumulated in float64, one buffer per thread, reduced after the
``prange``. Terms more than ``log_prune`` nats below a frame's best component are skipped; together
they hold less than K * exp(-log_prune) of the frame's likelihood (DiagGMM uses log K + 23: < 1e-10). Optional
Gaussian selection (Kaldi ``gselect``): only each frame's ``gselect`` best components get a
posterior (renormalised over them).

No fastmath: log-domain values may legitimately be -inf (a zero-weight component).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def gmm_precompute(weights, means, variances, shift):
    """Per-component constants of the dot-product form.

    Parameters
    ----------
    weights : float64 (K,) IN. Mixture weights (may hold zeros: that component's const is -inf).
    means : float64 (K, D) IN.
    variances : float64 (K, D) IN, > 0.
    shift : float64 (D,) IN. Centring offset subtracted from frames and means.

    Returns
    -------
    const : float64 (K,) OUT.
    W : float64 (2D, K) OUT. Rows 0..D-1: mu'/s2; rows D..2D-1: -1/(2 s2).
    """
    K, D = means.shape
    const = np.empty(K, np.float64)
    W = np.empty((2 * D, K), np.float64)
    log2pi = np.log(2.0 * np.pi)
    for k in range(K):
        c = np.log(weights[k]) if weights[k] > 0 else -np.inf
        for d in range(D):
            m = means[k, d] - shift[d]
            p = 1.0 / variances[k, d]
            c -= 0.5 * (log2pi + np.log(variances[k, d]) + m * m * p)
            W[d, k] = m * p
            W[D + d, k] = -0.5 * p
        const[k] = c
    return const, W


@njit(cache=True)
def _tile_loglik(X, a, b, shift, W, ll, z):
    """ll[:b-a] = z @ W for frames X[a:b] (the quadratic forms without const; BLAS gemm in W's dtype).

    ll : (tile, K) scratch in W's dtype; z : (tile, 2D) scratch in W's dtype.
    """
    D = X.shape[1]
    nb = b - a
    for i in range(nb):
        for d in range(D):
            v = np.float64(X[a + i, d]) - shift[d]
            z[i, d] = v
            z[i, D + d] = v * v
    for i in range(nb, z.shape[0]):
        for j in range(2 * D):
            z[i, j] = 0.0
    np.dot(z, W, ll)


@njit(cache=True)
def _exp_nonpos(x, out, scratch, n):
    """out[:n] = exp(x[:n]) for x in [-708, 0], a loop LLVM vectorises (no SVML needed).

    Cody-Waite reduction x = t ln2 + r (|r| <= ln2/2), degree-11 Taylor polynomial for exp(r)
    (relative error < 1e-14), and 2^t built from the exponent bits of a magic-number rounding.
    x, out, scratch : float64 (>= n,). scratch is overwritten.
    """
    for j in range(n):
        v = x[j]
        y = v * 1.4426950408889634 + 6755399441055744.0  # 1.5 * 2^52: low mantissa bits = round(v / ln2)
        scratch[j] = y
        t = y - 6755399441055744.0
        r = v - t * 0.6931471803691238
        r = r - t * 1.9082149292705877e-10
        out[j] = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
            1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (
                1.0 / 3628800 + r * (1.0 / 39916800)))))))))))
    bits = scratch.view(np.int64)
    for j in range(n):
        bits[j] = (bits[j] + 1023) << 52  # exponent field of 2^t; higher bits shift out
    for j in range(n):
        out[j] *= scratch[j]


@njit(cache=True)
def _max8(c, x):
    """max_k (c[k] + x[k]) with 8 independent lanes (ILP / SLP-vectorisable, no fastmath). c, x : (K,), same dtype."""
    K = x.shape[0]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = x.dtype.type(-np.inf)
    k = 0
    while k + 8 <= K:
        a0 = max(a0, c[k] + x[k])
        a1 = max(a1, c[k + 1] + x[k + 1])
        a2 = max(a2, c[k + 2] + x[k + 2])
        a3 = max(a3, c[k + 3] + x[k + 3])
        a4 = max(a4, c[k + 4] + x[k + 4])
        a5 = max(a5, c[k + 5] + x[k + 5])
        a6 = max(a6, c[k + 6] + x[k + 6])
        a7 = max(a7, c[k + 7] + x[k + 7])
        k += 8
    m = max(max(max(a0, a1), max(a2, a3)), max(max(a4, a5), max(a6, a7)))
    while k < K:
        m = max(m, c[k] + x[k])
        k += 1
    return m


@njit(cache=True)
def _frame_posteriors(lli, const, constw, log_prune, gselect, idx, val, scratch, heap_v, heap_i):
    """Sparse posteriors of one frame.

    lli : (K,) IN, z . W[:, k] for this frame (W's dtype). const : float64 (K,) IN. The component
    log-likelihoods are const + lli (float64). constw : const in W's dtype (K,) IN, used for the
    reference maximum and the pruning test only (a float32 reference point is as good as the exact one).
    idx : int64 (K,) OUT, val : float64 (K,) OUT: the kept components and their posteriors in [:n].
    scratch : float64 (K,), heap_v : float64 (>= gselect,), heap_i : int64 (>= gselect,) scratch.
    log_prune : float in (0, 700]. gselect : int, 0 = all components.
    Returns (n, log p(x)).
    """
    K = lli.shape[0]
    mw = _max8(constw, lli)  # reference maximum in W's dtype
    thr = lli.dtype.type(np.float64(mw) - log_prune)
    cnt = 0
    for k in range(K):  # branch-free compaction of the components within log_prune of the best
        idx[cnt] = k
        cnt += constw[k] + lli[k] >= thr  # >=: the best one always passes, even where thr rounds to mw
    m = -np.inf
    for j in range(cnt):  # exact float64 values of the candidates, and their exact maximum
        v = const[idx[j]] + lli[idx[j]]
        val[j] = v
        m = max(m, v)
    for j in range(cnt):
        val[j] -= m
    if gselect > 0 and gselect < cnt:
        # keep the top gselect of the candidates: min-heap of size n (heap_v[0] is the smallest kept)
        n = gselect
        for j in range(n):
            heap_v[j] = val[j]
            heap_i[j] = idx[j]
        for p0 in range(n // 2 - 1, -1, -1):  # heapify
            _sift_down(heap_v, heap_i, p0, n)
        for j in range(n, cnt):
            if val[j] > heap_v[0]:
                heap_v[0] = val[j]
                heap_i[0] = idx[j]
                _sift_down(heap_v, heap_i, 0, n)
        for j in range(n):
            val[j] = heap_v[j]
            idx[j] = heap_i[j]
        cnt = n
    _exp_nonpos(val, val, scratch, cnt)
    s = 0.0
    for j in range(cnt):
        s += val[j]
    inv = 1.0 / s
    for j in range(cnt):
        val[j] *= inv
    return cnt, m + np.log(s)


@njit(cache=True)
def _sift_down(hv, hi, p, n):
    while True:
        c = 2 * p + 1
        if c >= n:
            return
        if c + 1 < n and hv[c + 1] < hv[c]:
            c += 1
        if hv[c] < hv[p]:
            tv = hv[c]
            ti = hi[c]
            hv[c] = hv[p]
            hi[c] = hi[p]
            hv[p] = tv
            hi[p] = ti
            p = c
        else:
            return


@njit(cache=True, parallel=True)
def diag_gmm_stats(X, shift, const, W, n_chunks, tile, log_prune, gselect):
    """Fused E-step over a batch: log-likelihood total and sufficient statistics.

    Parameters
    ----------
    X : float32 (N, D) IN. Frames.
    shift : float64 (D,) IN. Centring offset (the same one given to :func:`gmm_precompute`).
    const : float64 (K,) IN. From :func:`gmm_precompute`.
    W : float32 or float64 (2D, K) IN, C-contiguous. From :func:`gmm_precompute`, optionally cast to float32:
        the quadratic forms are then a float32 GEMM (about 2x faster; per-frame error ~1e-6 relative).
    n_chunks : int. Frames are split in this many contiguous chunks, one per-thread buffer each.
    tile : int. Frames per tile (the tile x K log-likelihood scratch is the only K-wide buffer).
    log_prune : float. Components more than this many nats below a frame's best are skipped.
    gselect : int. If 0 < gselect < K, only each frame's ``gselect`` best components get a posterior.

    Returns
    -------
    total : float64. Sum over frames of log p(x) (over the selected components when gselect).
    n : float64 (K,) OUT. Occupancies sum_t gamma_tk.
    f : float64 (K, D) OUT. sum_t gamma_tk (x_t - shift).
    s : float64 (K, D) OUT. sum_t gamma_tk (x_t - shift)^2.
    """
    N, D = X.shape
    K = const.shape[0]
    C = max(1, min(n_chunks, N))
    tn = np.zeros((C, K), np.float64)
    tf = np.zeros((C, K, D), np.float64)
    ts = np.zeros((C, K, D), np.float64)
    tot = np.zeros(C, np.float64)
    per = (N + C - 1) // C
    G = gselect if 0 < gselect < K else 1
    for c in prange(C):
        a0 = c * per
        b0 = min(N, a0 + per)
        ll = np.empty((tile, K), W.dtype)
        constw = const.astype(W.dtype)
        z = np.empty((tile, 2 * D), W.dtype)
        idx = np.empty(K, np.int64)
        val = np.empty(K, np.float64)
        scratch = np.empty(K, np.float64)
        heap_v = np.empty(G, np.float64)
        heap_i = np.empty(G, np.int64)
        xs = np.empty(D, np.float64)
        acc = 0.0
        for a in range(a0, b0, tile):
            b = min(a + tile, b0)
            _tile_loglik(X, a, b, shift, W, ll, z)
            for i in range(b - a):
                cnt, lse = _frame_posteriors(ll[i], const, constw, log_prune, gselect, idx, val, scratch,
                                             heap_v, heap_i)
                acc += lse
                for d in range(D):
                    xs[d] = np.float64(X[a + i, d]) - shift[d]
                for j in range(cnt):
                    k = idx[j]
                    g = val[j]
                    tn[c, k] += g
                    for d in range(D):
                        gx = g * xs[d]
                        tf[c, k, d] += gx
                        ts[c, k, d] += gx * xs[d]
        tot[c] = acc
    n = np.zeros(K, np.float64)
    f = np.zeros((K, D), np.float64)
    s = np.zeros((K, D), np.float64)
    total = 0.0
    for c in range(C):
        total += tot[c]
        for k in range(K):
            n[k] += tn[c, k]
            for d in range(D):
                f[k, d] += tf[c, k, d]
                s[k, d] += ts[c, k, d]
    return total, n, f, s


@njit(cache=True, parallel=True)
def _loglik_or_posteriors(X, shift, const, W, n_chunks, tile, log_prune, gselect, dense):
    N, D = X.shape
    K = const.shape[0]
    out = np.empty(N, np.float64)
    post = np.zeros((N if dense else 0, K), np.float64)
    C = max(1, min(n_chunks, N))
    per = (N + C - 1) // C
    G = gselect if 0 < gselect < K else 1
    for c in prange(C):
        a0 = c * per
        b0 = min(N, a0 + per)
        ll = np.empty((tile, K), W.dtype)
        constw = const.astype(W.dtype)
        z = np.empty((tile, 2 * D), W.dtype)
        idx = np.empty(K, np.int64)
        val = np.empty(K, np.float64)
        scratch = np.empty(K, np.float64)
        heap_v = np.empty(G, np.float64)
        heap_i = np.empty(G, np.int64)
        for a in range(a0, b0, tile):
            b = min(a + tile, b0)
            _tile_loglik(X, a, b, shift, W, ll, z)
            for i in range(b - a):
                cnt, lse = _frame_posteriors(ll[i], const, constw, log_prune, gselect, idx, val, scratch,
                                             heap_v, heap_i)
                out[a + i] = lse
                if dense:
                    for j in range(cnt):
                        post[a + i, idx[j]] = val[j]
    return out, post


@njit(cache=True)
def diag_gmm_loglik(X, shift, const, W, n_chunks, tile, log_prune, gselect):
    """Per-frame log-likelihood log p(x_t) = logsumexp_k (const_k + z_t . W[:, k]).

    Parameters
    ----------
    X : float32 or float64 (N, D) IN.
    shift, const, W, n_chunks, tile, log_prune, gselect : as for :func:`diag_gmm_stats`.

    Returns
    -------
    out : float64 (N,) OUT.
    """
    return _loglik_or_posteriors(X, shift, const, W, n_chunks, tile, log_prune, gselect, False)[0]


@njit(cache=True)
def diag_gmm_posteriors(X, shift, const, W, n_chunks, tile, log_prune, gselect):
    """Dense posteriors for small N (predict_proba). Arguments as for :func:`diag_gmm_loglik`.

    Returns
    -------
    loglik : float64 (N,) OUT. post : float64 (N, K) OUT, rows sum to 1 (zeros where pruned / not selected).
    """
    return _loglik_or_posteriors(X, shift, const, W, n_chunks, tile, log_prune, gselect, True)


@njit(cache=True, parallel=True)
def cluster_stats(X, labels, K, shift, n_chunks):
    """Hard-assignment statistics: per-cluster counts, sums and sums of squares of x - shift.

    Parameters
    ----------
    X : float32 (N, D) IN.
    labels : int64 (N,) IN, values in [0, K).
    K : int.
    shift : float64 (D,) IN.
    n_chunks : int. Number of per-thread buffers.

    Returns
    -------
    n : float64 (K,) OUT. f : float64 (K, D) OUT. s : float64 (K, D) OUT.
    """
    N, D = X.shape
    C = max(1, min(n_chunks, N))
    tn = np.zeros((C, K), np.float64)
    tf = np.zeros((C, K, D), np.float64)
    ts = np.zeros((C, K, D), np.float64)
    per = (N + C - 1) // C
    for c in prange(C):
        for t in range(c * per, min(N, (c + 1) * per)):
            k = labels[t]
            tn[c, k] += 1.0
            for d in range(D):
                v = np.float64(X[t, d]) - shift[d]
                tf[c, k, d] += v
                ts[c, k, d] += v * v
    n = np.zeros(K, np.float64)
    f = np.zeros((K, D), np.float64)
    s = np.zeros((K, D), np.float64)
    for c in range(C):
        for k in range(K):
            n[k] += tn[c, k]
            for d in range(D):
                f[k, d] += tf[c, k, d]
                s[k, d] += ts[c, k, d]
    return n, f, s

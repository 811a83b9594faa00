"""Plain NumPy reference implementations of every kernel in ``streamq.kernels`` (float64, obvious code).

Slow on purpose: loops or the most direct vectorised NumPy, no centring tricks, no pruning, no
threads. Every kernel test compares against these (stumpy's ``tests/naive.py`` pattern). Tie rules
follow the kernels' documented ones: the lowest index wins.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

# ------------------------------------------------------------------------------------------ assign


def sq_distances(X, C):
    """float64 brute-force squared distances (B, K) from the float32 (or any) inputs."""
    X = np.asarray(X, np.float64)
    C = np.asarray(C, np.float64)
    return ((X[:, None, :] - C[None, :, :]) ** 2).sum(-1)


def assign(X, C):
    """Nearest codeword (lowest index on exact ties), its float64 squared distance, and all distances."""
    D2 = sq_distances(X, C)
    lab = D2.argmin(1) if len(X) else np.zeros(0, np.int64)  # argmin returns the first minimum
    return lab, D2[np.arange(len(X)), lab], D2


def cluster_stats(X, labels, K, shift=None, d2=None):
    """counts int64 (K,), sums (K, D) of x - shift, sq (K, D) of (x - shift)^2, sse (K,) of d2, by a loop."""
    X = np.asarray(X, np.float64)
    D = X.shape[1]
    shift = np.zeros(D) if shift is None else np.asarray(shift, np.float64)
    counts = np.zeros(K, np.int64)
    sums = np.zeros((K, D))
    sq = np.zeros((K, D))
    sse = np.zeros(K)
    for i in range(len(X)):
        k = labels[i]
        v = X[i] - shift
        counts[k] += 1
        sums[k] += v
        sq[k] += v * v
        if d2 is not None:
            sse[k] += d2[i]
    return counts, sums, sq, sse


# ------------------------------------------------------------------------------------------- lloyd


def ema_update(C, sums, counts, decay, usage, usage_decay):
    Cn = np.asarray(C, np.float64).copy()
    for k in range(len(C)):
        if counts[k] > 0:
            Cn[k] = decay * Cn[k] + (1 - decay) * sums[k] / counts[k]
    B = counts.sum()
    un = usage_decay * usage + (1 - usage_decay) * (counts / B if B else 0)
    return Cn.astype(np.float32), un


def split(C, eps, sigma=None, idx=None):
    C = np.asarray(C, np.float64)
    K = len(C)
    idx = np.arange(K) if idx is None else np.asarray(idx, np.int64)
    out = np.concatenate([C, C[idx]]) if len(idx) else C.copy()
    for i, j in enumerate(idx):
        delta = eps * (np.asarray(sigma, np.float64) if sigma is not None else C[j])
        out[j] = C[j] + delta
        out[K + i] = C[j] - delta
    return out.astype(np.float32)


def repair_dead(C, dead, distortion, counts, eps, noise):
    C = np.asarray(C, np.float64).copy()
    dist = np.asarray(distortion, np.float64).copy()
    elig = (~dead) & (counts > 0)
    n = 0
    for i, k in enumerate(np.nonzero(dead)[0]):
        if not elig.any():
            break
        j = int(np.argmax(np.where(elig, dist, -np.inf)))  # first maximum: lowest index on ties
        c = C[j].copy()
        C[j] = c + eps * noise[i]
        C[k] = c - eps * noise[i]
        dist[j] /= 2
        dist[k] = dist[j]
        elig[k] = True
        n += 1
    return C.astype(np.float32), n


def dead_codewords(idle, age, usage, batch_size, usage_decay, dead_threshold, pass_counts=None, min_count=1.0):
    """The dead-codeword rule written out codeword by codeword."""
    if pass_counts is not None:
        dead = [n <= 0 or n < min_count for n in pass_counts]
        if all(dead):
            dead = [n <= 0 for n in pass_counts]
        return np.array(dead, bool)
    K = len(idle)
    window = max(20, math.ceil(50 * K / batch_size))
    settle = 1 / (1 - usage_decay) if usage_decay < 1 else math.inf
    return np.array([idle[k] >= window or (age[k] >= settle and usage[k] < dead_threshold / K)
                     for k in range(K)], bool)


# --------------------------------------------------------------------------------------------- gmm


def component_loglik(X, w, mu, var):
    """log w_k N(x_t | mu_k, diag var_k), float64 (N, K), by the direct (x - mu)^2 / var form."""
    X = np.asarray(X, np.float64)
    with np.errstate(divide="ignore"):
        lw = np.log(w)
    quad = (((X[:, None, :] - mu[None]) ** 2) / var[None]).sum(-1)
    return lw[None] - 0.5 * np.log(2 * np.pi * var).sum(1)[None] - 0.5 * quad


def logsumexp(L):
    m = L.max(1, keepdims=True)
    return (m + np.log(np.exp(L - m).sum(1, keepdims=True)))[:, 0]


def gselect_top_n(L, n):
    """Mask (N, K) of each row's n largest entries; ties go to the lowest index (stable sort)."""
    keep = np.argsort(-L, axis=1, kind="stable")[:, :n]
    mask = np.zeros(L.shape, bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return mask


def gmm_precompute(w, mu, var, shift):
    """const (K,) and W (2D, K) of the dot-product form, written from the formula."""
    m = mu - shift
    with np.errstate(divide="ignore"):
        const = np.log(w) - 0.5 * np.log(2 * np.pi * var).sum(1) - 0.5 * (m ** 2 / var).sum(1)
    return const, np.vstack([(m / var).T, (-0.5 / var).T])


def gmm_stats(X, w, mu, var, shift, gselect=0):
    """(total, n, f, s, posteriors, per-frame loglik) of the E-step; f, s about ``shift``."""
    L = component_loglik(X, w, mu, var)
    if 0 < gselect < L.shape[1]:
        L = np.where(gselect_top_n(L, gselect), L, -np.inf)
    lse = logsumexp(L)
    G = np.exp(L - lse[:, None])
    Xc = np.asarray(X, np.float64) - shift
    return lse.sum(), G.sum(0), G.T @ Xc, G.T @ Xc ** 2, G, lse


# ----------------------------------------------------------------------------------------- lattice


def dense_logA(stay, nxt, skip):
    S = len(stay)
    A = np.zeros((S, S))
    for s in range(S):
        A[s, s] = stay[s]
        if s + 1 < S:
            A[s, s + 1] = nxt[s]
        if s + 2 < S:
            A[s, s + 2] = skip[s]
    with np.errstate(divide="ignore"):
        return np.log(A)


def forward_backward(log_emit, state_unit, stay, nxt, skip):
    """Log-space forward-backward over the dense transition matrix; start in 0, end in S-1."""
    from scipy.special import logsumexp as lse

    lb = log_emit[:, state_unit]
    T, S = lb.shape
    lA = dense_logA(stay, nxt, skip)
    la = np.full((T, S), -np.inf)
    la[0, 0] = lb[0, 0]
    for t in range(1, T):
        la[t] = lse(la[t - 1][:, None] + lA, axis=0) + lb[t]
    lbeta = np.full((T, S), -np.inf)
    lbeta[T - 1, S - 1] = 0.0
    for t in range(T - 2, -1, -1):
        lbeta[t] = lse(lA + (lb[t + 1] + lbeta[t + 1])[None, :], axis=1)
    ll = la[T - 1, S - 1]
    if not np.isfinite(ll):
        return np.zeros((T, S)), -np.inf, np.zeros((S, 3))
    gamma = np.exp(la + lbeta - ll)
    xi = np.zeros((S, 3))
    for t in range(T - 1):
        x = np.exp(la[t][:, None] + lA + (lb[t + 1] + lbeta[t + 1])[None, :] - ll)
        for s in range(S):
            for j in range(3):
                if s + j < S:
                    xi[s, j] += x[s, s + j]
    return gamma, ll, xi


def path_score(log_emit, state_unit, stay, nxt, skip, path):
    lA = dense_logA(stay, nxt, skip)
    lb = log_emit[:, state_unit]
    return lb[0, path[0]] + sum(lA[path[t - 1], path[t]] + lb[t, path[t]] for t in range(1, len(path)))


def viterbi(log_emit, state_unit, stay, nxt, skip):
    """Brute force over every state sequence from 0 to S-1 (tiny T and S only)."""
    T = log_emit.shape[0]
    S = len(state_unit)
    best, arg = -np.inf, None
    for rest in itertools.product(range(S), repeat=T - 1):
        path = (0,) + rest
        if path[-1] != S - 1:
            continue
        sc = path_score(log_emit, state_unit, stay, nxt, skip, path)
        if sc > best:
            best, arg = sc, path
    return arg, best


# -------------------------------------------------------------------------------------------- tied


def diag_gauss_loglik(X, means, variances):
    X = np.asarray(X, np.float64)
    return -0.5 * (np.log(2 * np.pi * variances).sum(1)[None]
                   + (((X[:, None] - means[None]) ** 2) / variances[None]).sum(2))


def frame_normalise(G):
    shift = G.max(1)
    return np.exp(G - shift[:, None]), shift


def occupancy_by_unit(gamma, state_unit, n_units):
    occ = np.zeros((gamma.shape[0], n_units))
    for s, u in enumerate(state_unit):
        occ[:, u] += gamma[:, s]
    return occ


def mixture_likelihoods(Gx, W):
    return Gx @ W.T


def mixture_counts(Gx, occ, P, W):
    T, U = occ.shape
    ref = np.zeros((U, Gx.shape[1]))
    for t in range(T):
        for u in range(U):
            if occ[t, u] > 0 and P[t, u] > 0:
                ref[u] += occ[t, u] * W[u] * Gx[t] / P[t, u]
    return ref


# --------------------------------------------------------------------------------------- selection
# (hierarchical Gaussian selection, streamq.kernels.selection / streamq.selection)


def moment_merge(w, mu, var, group_of, G):
    """Representatives (weights (G,), means (G, D), variances (G, D)): moment-matched merge of each group,
    member weights w_k / sum (plain averages for a group whose weights sum to 0)."""
    D = mu.shape[1]
    rw, rm, rv = np.zeros(G), np.zeros((G, D)), np.zeros((G, D))
    for j in range(G):
        mem = np.flatnonzero(group_of == j)
        a = w[mem] / w[mem].sum() if w[mem].sum() > 0 else np.full(len(mem), 1.0 / len(mem))
        rw[j] = w[mem].sum()
        rm[j] = a @ mu[mem]
        rv[j] = a @ (var[mem] + mu[mem] ** 2) - rm[j] ** 2
    return rw, rm, rv


def _top(vals, ids, n):
    """The n best (value, id) pairs by decreasing value, ties to the lower id."""
    order = sorted(range(len(ids)), key=lambda q: (-vals[q], ids[q]))[:n]
    return [ids[q] for q in order], [vals[q] for q in order]


def hierarchical_select(X, w, mu, var, group_of, rep_w, rep_mu, rep_var, n, g):
    """Per frame: the g best representatives (float64 direct form, ties to the lower group), then the n best
    of their members (ties to the lower component id). Returns idx int (N, n) (-1 = empty) and ll (N, n)."""
    R = component_loglik(X, rep_w, rep_mu, rep_var)
    L = component_loglik(X, w, mu, var)
    N, G = R.shape
    idx = np.full((N, n), -1)
    ll = np.full((N, n), -np.inf)
    for t in range(N):
        groups, _ = _top(list(R[t]), list(range(G)), min(g, G))
        cand = [k for k in range(len(w)) if group_of[k] in groups]
        ids, vals = _top([L[t, k] for k in cand], cand, n)
        idx[t, :len(ids)] = ids
        ll[t, :len(ids)] = vals
    return idx, ll


def selected_stats(X, idx, ll, K, shift):
    """(total, occ (K,), f (K, D), s (K, D)) from per-frame lists: posteriors softmax over each row's entries."""
    X = np.asarray(X, np.float64)
    N, D = X.shape
    occ, f, s = np.zeros(K), np.zeros((K, D)), np.zeros((K, D))
    total = 0.0
    for t in range(N):
        keep = idx[t] >= 0
        lse = logsumexp(ll[t:t + 1, keep])[0]
        total += lse
        xc = X[t] - shift
        for k, v in zip(idx[t, keep], ll[t, keep]):
            gm = math.exp(v - lse)
            occ[k] += gm
            f[k] += gm * xc
            s[k] += gm * xc ** 2
    return total, occ, f, s


# ----------------------------------------------------------------------- hostile data (issue 9 item 6)


def clustered_case(offset, scale, B, K, D, seed=0):
    """Clustered float32 frames and codebook, offset by ``offset`` and scaled by ``scale``, as a user has them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((K, D)) * 3
    C = (offset + scale * centres).astype(np.float32)
    X = (offset + scale * (centres[rng.integers(0, K, B)] + rng.standard_normal((B, D)))).astype(np.float32)
    return X, C


def gmm_case(offset, scale, N, K, D, seed=0):
    """Float32 frames drawn from a diagonal GMM offset by ``offset`` and scaled by ``scale``; (X, w, mu, var)."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(K) * 5)
    mu0 = rng.normal(size=(K, D)) * 3
    var0 = rng.uniform(0.3, 2.0, size=(K, D))
    z = rng.choice(K, N, p=w)
    X = (offset + scale * (mu0[z] + rng.normal(size=(N, D)) * np.sqrt(var0[z]))).astype(np.float32)
    return X, w, offset + scale * mu0, var0 * scale ** 2


# ------------------------------------------------------------------------- sparse emissions, pruned lattices
# (streamq.kernels.tied sparse_frame_normalise, streamq.kernels.lattice sparse_* and the pruned lattices)


def sparse_frame_normalise(ll):
    shift = ll.max(1)
    with np.errstate(invalid="ignore"):
        rel = np.where(np.isfinite(shift)[:, None], ll - shift[:, None], -np.inf)
    return rel.astype(np.float32), shift


def end_distance(nxt, skip):
    """Fewest transitions to the last state, by brute-force relaxation (a large number if unreachable)."""
    S = len(nxt)
    big = 1 << 60
    d = [big] * S
    d[S - 1] = 0
    for _ in range(S):
        for s in range(S - 1):
            if nxt[s] > 0 and d[s + 1] < big:
                d[s] = min(d[s], d[s + 1] + 1)
            if s + 2 < S and skip[s] > 0 and d[s + 2] < big:
                d[s] = min(d[s], d[s + 2] + 1)
    return np.array(d, np.int64)


def pruned_windows(P, state_unit, stay, nxt, skip, beam):
    """The forward pass's windows [lo_t, hi_t]: dense forward over every state; the first and last state whose
    scaled forward value is > 0, within exp(-beam) of the frame's best (any state) and able to reach the end in
    the frames left; values outside the window, and of states inside it that cannot reach the end, dropped."""
    T, S = P.shape[0], len(state_unit)
    A = np.exp(dense_logA(stay, nxt, skip))
    d = end_distance(nxt, skip)
    lo, hi = np.zeros(T, np.int64), np.zeros(T, np.int64)
    a = np.zeros(S)
    a[0] = 1.0
    for t in range(1, T):
        a = (a @ A) * P[t, state_unit]
        ok = d <= T - 1 - t
        keep = np.flatnonzero((a > 0) & (a >= a.max() * math.exp(-beam)) & ok)
        lo[t], hi[t] = keep[0], keep[-1]
        a[~ok] = 0.0
        a[:lo[t]] = 0.0
        a[hi[t] + 1:] = 0.0
        a /= a.sum()
    return lo, hi


def pruned_forward_backward(P, state_unit, stay, nxt, skip, beam):
    """Forward-backward restricted to :func:`pruned_windows` (emissions -inf outside): (gamma, loglik, xi)."""
    lo, hi = pruned_windows(P, state_unit, stay, nxt, skip, beam)
    T, S = P.shape[0], len(state_unit)
    with np.errstate(divide="ignore"):
        le = np.log(P[:, state_unit])
    mask = np.zeros((T, S), bool)
    for t in range(T):
        mask[t, lo[t]:hi[t] + 1] = True
    le[~mask] = -np.inf
    return forward_backward(le, np.arange(S), stay, nxt, skip)


def gather_weights(W, units, comps):
    return W[np.ix_(units, comps)].T.copy()


def add_counts(acc, units, comps, counts):
    out = acc.copy()
    out[np.ix_(units, comps)] += counts.T
    return out


def sparse_emissions(cidx, ex, Wt):
    """P[t, u] = sum_j Wt[cidx[t, j], u] ex[t, j] over the slots with cidx >= 0 (linear likelihoods)."""
    T, n = cidx.shape
    P = np.zeros((T, Wt.shape[1]))
    for t in range(T):
        for j in range(n):
            if cidx[t, j] >= 0:
                P[t] += Wt[cidx[t, j]] * float(ex[t, j])
    return P


def sparse_counts(cidx, ex, occ, P, Wt, occ_floor=0.0):
    """counts[c, u] = sum over slots listing c of occ[t, u] Wt[c, u] ex[t, j] / P[t, u] (occ > occ_floor)."""
    T, n = cidx.shape
    out = np.zeros(Wt.shape)
    for t in range(T):
        for u in range(Wt.shape[1]):
            if occ[t, u] > occ_floor and P[t, u] > 0:
                for j in range(n):
                    c = cidx[t, j]
                    if c >= 0:
                        out[c, u] += occ[t, u] * Wt[c, u] * float(ex[t, j]) / P[t, u]
    return out


def sparse_e_step(cidx, ex, comps, units, state_unit, stay, nxt, skip, WT, beams, occ_floor=0.0):
    """One utterance's sparse E-step from the dense references: the first beam with a path (pruned_forward_backward
    over pruned_windows), its occupancies per unit and sparse_counts. Returns (counts (C, U), loglik relative to
    the shifts, expected stay transitions, expected transitions) or None when no beam has a path."""
    Wt = WT[np.ix_(comps, units)]
    P = sparse_emissions(cidx, ex, Wt)
    for beam in beams:
        try:
            gamma, ll, xi = pruned_forward_backward(P, state_unit, stay, nxt, skip, beam)
        except IndexError:  # a frame without any state left in the window
            continue
        if not np.isfinite(ll):
            continue
        occ = occupancy_by_unit(gamma, state_unit, len(units))
        return sparse_counts(cidx, ex, occ, P, Wt, occ_floor), ll, xi[:, 0].sum(), xi.sum()
    return None

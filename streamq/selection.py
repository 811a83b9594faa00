"""Hierarchical Gaussian selection for diagonal GMMs (the data structure, its builder and thin wrappers), and
the codeword partitions of the exact grouped L2 search (:func:`group_codewords`, :func:`codeword_groups`,
:func:`regroup_codewords`; the kernel is :func:`streamq.kernels.assign.assign` ``group_of=``).

A :class:`Selection` groups the K components of a diagonal GMM into about G groups by clustering their means
(seeded k-means++ then a few Lloyd iterations, in the space where each dimension is divided by the root mean
variance, so a unit of distance is about one standard deviation of a component); groups of more than 2 K / G
members are split (dense regions would otherwise make a few huge groups, the ones frames search most). Each
group gets a representative Gaussian, the moment-matched merge of its members:

    w_j = sum_k w_k,   mu_j = sum_k a_k mu_k,   s2_j = sum_k a_k (s2_k + mu_k^2) - mu_j^2,   a_k = w_k / w_j

(plain averages a_k = 1 / |group| when the group's weights sum to 0). Per frame the kernel
(:func:`streamq.kernels.selection.select_topn`) scores the G representatives, then every member of the best
``n_search`` groups, keeps the top ``n`` and re-evaluates those exactly in float64. With
``n_search = G`` and ``n = K`` the result is the exact full log-likelihood (same code path).

``n_search`` is calibrated at build time (:func:`calibrate_n_search`): the smallest number of groups that
recovers 99 % of the exact top-n of frames sampled from the model (or of given frames), or loses at most
0.005 nats of their top-n log-likelihood on average. How many groups are needed depends on how clustered
the means are: a few percent of G for speech-like mixtures, a quarter of G for an unstructured random one.

Build cost at K = 16384, D = 13: ~0.5 s (grouping ~0.3 s, calibration ~0.2 s). The grouping can be kept
while the parameters move: :func:`refresh_selection` recomputes the representatives and the member arrays
(O(K D)) and re-calibrates.

Layout (all plain arrays, so they can be saved, shared with workers or passed to kernels):

- ``group_of`` int32 (K,): group of each component. ``member_ptr`` int64 (G + 1,) and ``member_idx`` int32
  (K,): CSR lists of the members of each group (increasing component id inside a group).
- ``rep_weights`` float64 (G,), ``rep_means`` / ``rep_variances`` float64 (G, D): the representatives.
- ``shift`` float64 (D,): centring offset (the weighted mean of the means, as in :class:`streamq.gmm.DiagGMM`).
- kernel arrays: ``rep_const`` (G,), ``rep_W`` (2D, G); ``mem_const`` (K,) in member order and ``mem_Wb``
  (2D K,), group j's members' W columns as one row-major (2D, size_j) block at [2D member_ptr[j] : 2D
  member_ptr[j + 1]] (dtype of ``rep_W`` / ``mem_Wb`` = ``dot_dtype``); ``means``, ``prec`` (K, D) and
  ``lconst`` (K,) in component order for the exact float64 re-evaluation.
- ``n_search`` int, ``recall_curve`` / ``gap_curve`` float64 (G,): the calibration.

Use:

- scoring: ``selected_score_samples(X, sel, n)`` (float64 (N,), log-sum-exp over each frame's top n);
- EM: ``selected_accumulate(X, sel, n)`` -> (total, occ (K,), f (K, D), s (K, D)), f and s about
  ``sel.shift`` (the M-step's shift);
- stored candidate lists (Kaldi's ``gmm-gselect`` reused across iterations, or an aligner whose Gaussians
  are fixed): ``idx, ll = select(X, sel, n)`` once, then ``kernels.selection.score_listed(X, idx, sel.means,
  sel.prec, sel.lconst, n_chunks)`` under new parameters (``refresh_selection``) and
  ``kernels.selection.selected_stats`` / ``selected_posteriors``. ``ll`` includes log w_k: the unweighted
  log N(x | k) is ``ll - log(w[idx])``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numba
import numpy as np

from .kernels import gmm as _kg
from .kernels import selection as _ks

__all__ = ["Selection", "build_selection", "refresh_selection", "group_means", "default_n_groups",
           "group_codewords", "regroup_codewords", "codeword_groups", "GROUPED_FROM_K",
           "default_n_search", "calibrate_n_search", "select", "selected_score_samples", "selected_accumulate"]


@dataclass(frozen=True)
class Selection:
    """Grouping of K diagonal Gaussians with representatives and the kernel arrays (see module docstring)."""

    group_of: np.ndarray
    member_ptr: np.ndarray
    member_idx: np.ndarray
    rep_weights: np.ndarray
    rep_means: np.ndarray
    rep_variances: np.ndarray
    shift: np.ndarray
    rep_const: np.ndarray
    rep_W: np.ndarray
    mem_const: np.ndarray
    mem_Wb: np.ndarray
    means: np.ndarray
    prec: np.ndarray
    lconst: np.ndarray
    n_search: int = 0
    recall_curve: np.ndarray | None = None
    gap_curve: np.ndarray | None = None

    @property
    def n_components(self) -> int:
        return int(self.group_of.shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.member_ptr.shape[0] - 1)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def group_sizes(self) -> np.ndarray:
        return np.diff(self.member_ptr)

    def kernel_args(self) -> tuple:
        """(shift, rep_const, rep_W, member_ptr, member_idx, mem_const, mem_Wb, means, prec, lconst): the arrays
        :func:`streamq.kernels.selection.select_topn` takes after X, in its order."""
        return (self.shift, self.rep_const, self.rep_W, self.member_ptr, self.member_idx, self.mem_const,
                self.mem_Wb, self.means, self.prec, self.lconst)


def default_n_groups(K: int) -> int:
    """G = round(2 sqrt(K)), at most K (K = 16384: 256 groups of ~64)."""
    return int(max(1, min(K, round(2.0 * np.sqrt(K)))))


def default_n_search(n_groups: int, n: int = 8) -> int:
    """Uncalibrated fallback: max(4, n / 2 rounded up, G / 16) groups, at most G (G = 256: 16 groups)."""
    return int(min(n_groups, max(4, -(-n // 2), -(-n_groups // 16))))


def calibrate_n_search(sel: "Selection", n=8, target=0.99, n_samples=None, seed=0, target_gap=0.005,
                       frames=None):
    """Smallest number of groups g to search per frame, measured on frames sampled from the model itself
    or on given ``frames``.

    Frames: ``frames`` (float (N, D), e.g. a held-out sample of the data; a seeded subsample of at most
    ``n_samples`` rows is used; default n_samples = 2^25 / K clipped to [2000, 8000], a constant cost) or,
    when None, ``n_samples`` frames x ~ the GMM (seeded). For each frame, its
    exact top max(4n, 64) components (:func:`streamq.kernels.selection.select_topn` with every group
    searched) and the rank of each one's group among the representatives' scores. Two curves over g = 1..G:

    - recall(g): the fraction of the exact top-n components whose group is among the g best;
    - gap(g): the mean over frames of (exact top-n log-sum-exp - log-sum-exp of the top-n components found
      in the g best groups), in nats; an upper bound (only the frame's top max(4n, 64) count as found; a
      frame with none found counts 1000 nats).

    g = the smallest value with recall(g) >= ``target`` or gap(g) <= ``target_gap``: recall is the strict
    criterion when the top-n are well separated; where they are not, components far down the top-n carry
    little likelihood and the gap decides. A miss of a frame's best component can cost many nats, and is
    rare, so the gap needs thousands of frames to be measured. Cost O(n_samples K D) (K = 16384: 2048
    frames, ~0.3 s on 2 idle cores). Returns (g, recall float64 (G,), gap float64 (G,)), index g - 1 holding the
    value for g groups; gap is only evaluated up to the chosen g (NaN beyond).
    """
    K, D, G = sel.n_components, sel.dim, sel.n_groups
    n = int(min(max(1, n), K))
    M = int(min(K, max(4 * n, 64)))
    n_samples = int(np.clip(2 ** 25 // K, 2000, 8000)) if n_samples is None else int(n_samples)
    rng = np.random.default_rng([seed, 7])
    if frames is not None:
        X = np.asarray(frames, np.float64)
        if X.ndim != 2 or X.shape[1] != D or len(X) == 0 or not np.isfinite(X).all():
            raise ValueError(f"calibration frames: expected finite (N >= 1, {D}) frames, got shape {X.shape}")
        if len(X) > n_samples:
            X = X[np.sort(rng.choice(len(X), int(n_samples), replace=False))]
    else:
        w = np.exp(sel.lconst + 0.5 * np.log(2.0 * np.pi / sel.prec).sum(1))  # the weights back from lconst
        comp = rng.choice(K, size=int(n_samples), p=w / w.sum())
        X = sel.means[comp] + rng.standard_normal((int(n_samples), D)) / np.sqrt(sel.prec[comp])
    # the exact top-M of every frame: the selection kernel in its exact mode (all groups searched)
    top, V = _ks.select_topn(np.ascontiguousarray(X), *sel.kernel_args(), M, G, numba.get_num_threads(), TILE)
    Xc = X - sel.shift
    rc, rW = _kg.gmm_precompute(sel.rep_weights, sel.rep_means, sel.rep_variances, sel.shift)
    RKs = []
    for a in range(0, len(X), 1024):
        xc = Xc[a:a + 1024]
        R = rc[None] + np.hstack([xc, xc * xc]) @ rW
        rank = np.empty_like(R, dtype=np.int64)
        np.put_along_axis(rank, np.argsort(-R, axis=1, kind="stable"), np.arange(G)[None, :], axis=1)
        RKs.append(np.take_along_axis(rank, sel.group_of[top[a:a + 1024]].astype(np.int64), 1))  # group ranks
    RK = np.vstack(RKs)
    curve = np.cumsum(np.bincount(RK[:, :n].ravel(), minlength=G)) / (n * len(V))
    g_rec = min(G, int(np.searchsorted(curve, target - 1e-12)) + 1)
    E = np.exp(V - V[:, :1])
    exact = np.log(E[:, :n].sum(1))
    gap = np.full(G, np.nan)
    for g in range(1, g_rec + 1):  # only up to where the recall criterion holds: g is at most that
        m = RK < g
        keep = m & (np.cumsum(m, axis=1) <= n)
        with np.errstate(divide="ignore"):
            gap[g - 1] = np.minimum(exact - np.log(np.where(keep, E, 0.0).sum(1)), 1e3).mean()
        if gap[g - 1] <= target_gap:
            return g, curve, gap
    return g_rec, curve, gap


# -------------------------------------------------------------------- params
def _check_params(weights, means, variances):
    w = np.asarray(weights, np.float64).ravel()
    m = np.asarray(means, np.float64)
    v = np.asarray(variances, np.float64)
    if m.ndim != 2 or v.shape != m.shape or w.shape != (m.shape[0],):
        raise ValueError(f"expected weights (K,), means and variances (K, D); got {w.shape}, {m.shape}, {v.shape}")
    if m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"means: need K >= 1 components of dim D >= 1, got {m.shape}")
    if not (np.isfinite(w).all() and np.isfinite(m).all() and np.isfinite(v).all()):
        raise ValueError("weights, means and variances must be finite")
    if (v <= 0).any():
        raise ValueError(f"variances must be > 0 ({int((v <= 0).sum())} are not)")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be >= 0 and not all zero")
    return w / w.sum(), np.ascontiguousarray(m), np.ascontiguousarray(v)


def _kmeans(Y, k, rng, n_iter):
    """Labels int64 (len(Y),) of seeded k-means++ then ``n_iter`` Lloyd iterations; no group left empty."""
    K = Y.shape[0]
    k = int(min(max(1, k), K))
    yy = np.einsum("kd,kd->k", Y, Y)
    cent = np.empty((k, Y.shape[1]))
    cent[0] = Y[int(rng.integers(K))]
    d2 = np.maximum(yy - 2 * Y @ cent[0] + cent[0] @ cent[0], 0.0)
    for j in range(1, k):
        tot = d2.sum()
        i = int(rng.integers(K)) if tot <= 0 else int(min(np.searchsorted(np.cumsum(d2), rng.random() * tot), K - 1))
        cent[j] = Y[i]
        d2 = np.minimum(d2, np.maximum(yy - 2 * Y @ cent[j] + cent[j] @ cent[j], 0.0))
    lab = np.zeros(K, np.int64)
    Y32 = Y.astype(np.float32)
    for _ in range(max(1, n_iter)):
        D2 = np.einsum("gd,gd->g", cent, cent).astype(np.float32)[None, :] - 2.0 * (Y32 @ cent.T.astype(np.float32))
        lab = np.argmin(D2, axis=1)  # ||y||^2 left out: the same for every centre (float32: grouping only)
        best = D2[np.arange(K), lab] + yy
        cnt = np.bincount(lab, minlength=k)
        for j in np.flatnonzero(cnt == 0):  # refill an empty group with the worst-fitted point of a larger one
            i = int(np.argmax(np.where(cnt[lab] > 1, best, -np.inf)))
            cnt[lab[i]] -= 1
            lab[i] = j
            cnt[j] = 1
            best[i] = -np.inf
        cent = np.stack([np.bincount(lab, weights=Y[:, d], minlength=k) for d in range(Y.shape[1])], 1) / cnt[:, None]
    return lab


def group_means(means, variances, n_groups, seed=0, n_iter=8, max_size=None) -> np.ndarray:
    """Cluster the K means into about ``n_groups`` groups; returns group_of int32 (K,), every group non-empty.

    Seeded k-means++ then ``n_iter`` Lloyd iterations, in the space where dimension d is divided by
    sqrt(mean_k variances[k, d]). Groups of more than ``max_size`` members (default 2 K / n_groups, at least
    16) are split by k-means into ceil(size / max_size) parts, and what is still too big is cut into equal
    slabs along its principal axis: dense regions would otherwise make a few huge groups, the ones frames
    search most. So the result may hold a few more than ``n_groups`` groups. Cost O(n_iter K G D).
    """
    m = np.asarray(means, np.float64)
    K = m.shape[0]
    G = int(min(max(1, n_groups), K))
    cap = int(max(16, np.ceil(2.0 * K / G))) if max_size is None else int(max(1, max_size))
    scale = np.sqrt(np.asarray(variances, np.float64).mean(0))
    Y = (m - m.mean(0)) / scale
    rng = np.random.default_rng(seed)
    lab = _kmeans(Y, G, rng, n_iter)
    groups = [np.flatnonzero(lab == j) for j in range(G)]
    out = []
    while groups:
        mem = groups.pop(0)
        if len(mem) <= cap:
            out.append(mem)
            continue
        parts = int(np.ceil(len(mem) / cap))
        sub = _kmeans(Y[mem], parts, rng, n_iter)
        pieces = [mem[sub == j] for j in range(parts)]
        if max(len(p) for p in pieces) >= len(mem):  # k-means could not split it: cut slabs
            yc = Y[mem] - Y[mem].mean(0)
            axis = np.linalg.svd(yc, full_matrices=False)[2][0]
            o = mem[np.argsort(yc @ axis, kind="stable")]
            pieces = [o[i * len(o) // parts:(i + 1) * len(o) // parts] for i in range(parts)]
        groups.extend(p for p in pieces if len(p))
    out.sort(key=lambda a: int(a[0]))  # group numbers follow their lowest member id (deterministic)
    group_of = np.empty(K, np.int32)
    for j, mem in enumerate(out):
        group_of[mem] = j
    return group_of


def _prepare(group_of, G, w, m, v, dot_dtype):
    K, D = m.shape
    order = np.argsort(group_of, kind="stable").astype(np.int32)  # members by group, increasing id inside
    counts = np.bincount(group_of, minlength=G)
    ptr = np.zeros(G + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    wsum = np.bincount(group_of, weights=w, minlength=G)
    a = np.where(wsum[group_of] > 0, w / np.where(wsum > 0, wsum, 1.0)[group_of], 1.0 / counts[group_of])
    rep_m = np.zeros((G, D))
    rep_s = np.zeros((G, D))
    np.add.at(rep_m, group_of, a[:, None] * m)
    np.add.at(rep_s, group_of, a[:, None] * (v + m * m))
    rep_v = np.maximum(rep_s - rep_m * rep_m, v.min(0)[None, :])  # rounding can not make it tiny or negative
    shift = np.ascontiguousarray(w @ m / w.sum())
    rep_const, rep_W = _kg.gmm_precompute(wsum, rep_m, rep_v, shift)
    mem_const, mem_W = _kg.gmm_precompute(w[order], np.ascontiguousarray(m[order]), np.ascontiguousarray(v[order]),
                                          shift)
    with np.errstate(divide="ignore"):
        lconst = np.log(w) - 0.5 * np.log(2.0 * np.pi * v).sum(1)
    dt = np.dtype(dot_dtype)
    if dt == np.float32 and max(np.abs(rep_W).max(), np.abs(mem_W).max()) > 1e30:
        dt = np.dtype(np.float64)  # float32 would overflow (tiny variances far from shift): rank in float64
    Wb = np.empty(mem_W.size, dt)  # group blocks, each row-major (2D, size)
    for j in range(G):
        p0, p1 = ptr[j], ptr[j + 1]
        Wb[2 * D * p0:2 * D * p1] = mem_W[:, p0:p1].ravel()
    return Selection(group_of=np.ascontiguousarray(group_of, np.int32), member_ptr=ptr, member_idx=order,
                     rep_weights=wsum, rep_means=rep_m, rep_variances=rep_v, shift=shift, rep_const=rep_const,
                     rep_W=np.ascontiguousarray(rep_W, dt), mem_const=mem_const, mem_Wb=Wb, means=m.copy(), prec=1.0 / v, lconst=lconst)


def _calibrated(sel, calibrate_n, target, target_gap, seed, frames):
    if not calibrate_n:
        return dataclasses.replace(sel, n_search=default_n_search(sel.n_groups, 8))
    g, curve, gap = calibrate_n_search(sel, calibrate_n, target, seed=seed, target_gap=target_gap, frames=frames)
    return dataclasses.replace(sel, n_search=g, recall_curve=curve, gap_curve=gap)


def build_selection(weights, means, variances, n_groups=None, seed=0, n_iter=8, dot_dtype="float32",
                    calibrate_n=8, target_recall=0.99, target_gap=0.005, max_size=None,
                    calibrate_X=None) -> Selection:
    """Group the K components (:func:`group_means`) and prepare the selection arrays.

    Parameters
    ----------
    weights : (K,), means, variances : (K, D), float64 (converted). Weights are normalised to sum to 1.
    n_groups : int or None. Groups of the clustering (clamped to [1, K]); None = :func:`default_n_groups`.
        Oversized groups are then split (``max_size``, :func:`group_means`), so ``n_groups`` of the result
        may be a little larger.
    seed : int. Seeds the k-means++ initialisation (same seed and parameters give the same grouping).
    n_iter : int. Lloyd iterations of the grouping.
    dot_dtype : 'float32' or 'float64'. Dtype of the ranking dot products (the returned log-likelihoods are
        float64 either way).
    calibrate_n, target_recall, target_gap : ``n_search``, the default number of groups searched per frame,
        is the smallest one that recovers ``target_recall`` of the exact top-``calibrate_n`` components of
        2000-8000 frames sampled from the model, or loses at most ``target_gap`` nats of their top-``calibrate_n``
        log-likelihood on average (:func:`calibrate_n_search`; ``recall_curve`` and ``gap_curve`` keep the
        curves).
        ``calibrate_n=0``: no calibration (:func:`default_n_search`).
    calibrate_X : float (N, D) or None. Frames to calibrate on instead of frames sampled from the model (a
        held-out sample of the data the selection will score: real data sits where the model is dense, so
        this usually allows a smaller ``n_search`` than the model's own samples, which are pessimistic).
    """
    w, m, v = _check_params(weights, means, variances)
    if dot_dtype not in ("float32", "float64"):
        raise ValueError(f"dot_dtype must be 'float32' or 'float64', got {dot_dtype!r}")
    K = m.shape[0]
    G = default_n_groups(K) if n_groups is None else int(n_groups)
    if G < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    G = min(G, K)
    group_of = group_means(m, v, G, seed=seed, n_iter=n_iter, max_size=max_size)
    G = int(group_of.max()) + 1
    return _calibrated(_prepare(group_of, G, w, m, v, dot_dtype), calibrate_n, target_recall, target_gap, seed,
                       calibrate_X)


def refresh_selection(sel: Selection, weights, means, variances, dot_dtype=None, calibrate_n=8,
                      target_recall=0.99, seed=0, target_gap=0.005, calibrate_X=None) -> Selection:
    """The same grouping with representatives and kernel arrays for new parameters (O(K D), no clustering),
    re-calibrated as in :func:`build_selection` (``calibrate_n=0``: keep the old ``n_search``)."""
    w, m, v = _check_params(weights, means, variances)
    if m.shape[0] != sel.n_components:
        raise ValueError(f"means: {m.shape[0]} components, the selection has {sel.n_components}")
    new = _prepare(sel.group_of, sel.n_groups, w, m, v, dot_dtype or sel.mem_Wb.dtype.name)
    if not calibrate_n:
        return dataclasses.replace(new, n_search=sel.n_search, recall_curve=sel.recall_curve,
                                   gap_curve=sel.gap_curve)
    return _calibrated(new, calibrate_n, target_recall, target_gap, seed, calibrate_X)


# ------------------------------------------------------------------ wrappers
def _frames(X, D):
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != D:
        raise ValueError(f"X: expected (N, {D}) frames, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        raise TypeError(f"X: expected float frames, got {X.dtype}; pass X.astype(np.float32)")
    if X.dtype != np.float64:
        X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(X).all():
        raise ValueError("X: frames hold NaN or inf; clean or drop them first")
    return np.ascontiguousarray(X)


def _ns(sel, n, n_search):
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n = min(n, sel.n_components)
    g = sel.n_search if n_search is None else int(n_search)
    if g < 1:
        raise ValueError(f"n_search must be >= 1, got {n_search}")
    return n, min(g, sel.n_groups)


TILE = 512  # frames per tile of select_topn (each searched group's block is reused by ~tile g / G frames)


def select(X, sel: Selection, n=8, n_search=None, n_threads=None):
    """Each frame's top-n components: (idx int32 (N, n), ll float64 (N, n)), sorted by decreasing ll.

    ``n`` is clamped to K; ``n_search`` groups are searched (None = ``sel.n_search``). Slots past the
    candidates found hold idx -1 and ll -inf.
    """
    X = _frames(X, sel.dim)
    n, g = _ns(sel, n, n_search)
    return _ks.select_topn(X, *sel.kernel_args(), n, g, n_threads or numba.get_num_threads(), TILE)


def selected_score_samples(X, sel: Selection, n=8, n_search=None, n_threads=None) -> np.ndarray:
    """Per-frame log-likelihood over the selected top-n components, float64 (N,)."""
    _, ll = select(X, sel, n, n_search, n_threads)
    return _ks.selected_loglik(ll, n_threads or numba.get_num_threads())


def selected_accumulate(X, sel: Selection, n=8, n_search=None, n_threads=None):
    """E-step with selection: (total loglik, occ (K,), f (K, D), s (K, D)), statistics about ``sel.shift``."""
    X = _frames(X, sel.dim)
    nt = n_threads or numba.get_num_threads()
    idx, ll = select(X, sel, n, n_search, nt)
    return _ks.selected_stats(X, sel.shift, idx, ll, sel.n_components, nt)


# -------------------------------------------------------------------- codeword groups (exact L2 search)
GROUPED_FROM_K = 2048  # codebooks at least this large are searched by group bounds (faster from here)


def group_codewords(C, n_groups=None, seed=0, n_iter=4) -> np.ndarray:
    """Partition of the K codewords of ``C`` (float (K, D)) into about ``n_groups`` (default 2 sqrt(K)) compact
    groups, for the exact search by group bounds (:func:`streamq.kernels.assign.assign` ``group_of=``):
    :func:`group_means` in plain Euclidean space. Returns group_of int32 (K,). Cost O(n_iter K G D): ~0.1 s
    at K = 16384."""
    C = np.asarray(C, np.float64)
    K = C.shape[0]
    return group_means(C, np.ones_like(C), default_n_groups(K) if n_groups is None else n_groups, seed=seed,
                       n_iter=n_iter)


_GROUP_CACHE: dict = {}


def codeword_groups(C) -> np.ndarray | None:
    """The partition :func:`streamq.kernels.assign.assign` should search codebook ``C`` with
    (``assign(X, C, group_of=codeword_groups(C))``): :func:`group_codewords` (seed 0) when K >= GROUPED_FROM_K,
    None below (the fused scan is faster there). Memoised on the codebook's bytes (the last 4 codebooks), so
    the passes over a corpus with one codebook group it once. The labels do not depend on the partition."""
    C = np.ascontiguousarray(C, np.float32)
    if C.ndim != 2 or C.shape[0] < GROUPED_FROM_K:
        return None
    import hashlib

    key = (C.shape, hashlib.blake2b(C.tobytes(), digest_size=16).digest())
    g = _GROUP_CACHE.get(key)
    if g is None:
        g = group_codewords(C)
        if len(_GROUP_CACHE) >= 4:
            _GROUP_CACHE.pop(next(iter(_GROUP_CACHE)))
        _GROUP_CACHE[key] = g
    return g


def regroup_codewords(C, group_of) -> np.ndarray:
    """One Lloyd step of the grouping after the codewords moved: each codeword joins the group whose centre
    (its members' mean) is nearest. Keeps groups compact while a codebook trains, at O(K G D) float32
    (~5 ms at K = 16384); empty groups vanish. Returns group_of int32 (K,)."""
    from .kernels.assign import assign

    C = np.ascontiguousarray(C, np.float32)
    _, g = np.unique(np.asarray(group_of).ravel(), return_inverse=True)
    G = int(g.max()) + 1
    cnt = np.bincount(g, minlength=G)
    cent = np.stack([np.bincount(g, weights=C[:, d], minlength=G) for d in range(C.shape[1])], 1) / cnt[:, None]
    return assign(C, cent.astype(np.float32))[0].astype(np.int32)

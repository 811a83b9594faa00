"""Hierarchical Gaussian selection (streamq.selection, streamq.kernels.selection) against tests/naive.py.

Exactness: with every group searched and n = K the selected log-likelihood is the exact full one. Otherwise
the kernel equals the plain hierarchical algorithm (naive.hierarchical_select), and its quality is asserted
as a property: recall of the exact top-8 and the log-likelihood gap to the exact top-8 log-sum-exp.
"""

import numpy as np
import pytest

import naive
from streamq import selection as S
from streamq.kernels import selection as ks


def random_gmm(rng, K, D, spread=3.0, offset=0.0):
    w = rng.dirichlet(np.ones(K))
    mu = rng.normal(size=(K, D)) * spread + offset
    var = rng.uniform(0.3, 2.0, size=(K, D))
    return w, mu, var


def sample(rng, w, mu, var, N):
    k = rng.choice(len(w), N, p=w / w.sum())
    return (mu[k] + rng.normal(size=(N, mu.shape[1])) * np.sqrt(var[k])).astype(np.float32)


def exact_top(X, w, mu, var, n):
    L = naive.component_loglik(X, w, mu, var)
    order = np.argsort(-L, axis=1, kind="stable")[:, :n]
    return order, np.take_along_axis(L, order, 1), naive.logsumexp(L)


def rel(a, b):
    return np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))


# ----------------------------------------------------------------- structure
def test_structure_is_a_consistent_csr_with_moment_matched_representatives(rng):
    w, mu, var = random_gmm(rng, 200, 4)
    sel = S.build_selection(w, mu, var, n_groups=13, seed=3, dot_dtype="float64")
    K, G = 200, sel.n_groups
    assert sel.n_components == K and 13 <= G <= 20 and sel.dim == 4
    assert sel.group_sizes.max() <= 31  # oversized groups split: at most 2 K / n_groups members
    assert sel.group_of.dtype == np.int32 and sel.member_idx.dtype == np.int32 and sel.member_ptr.dtype == np.int64
    assert sel.member_ptr[0] == 0 and sel.member_ptr[-1] == K and (np.diff(sel.member_ptr) >= 1).all()
    assert sorted(sel.member_idx.tolist()) == list(range(K))
    for j in range(G):
        mem = sel.member_idx[sel.member_ptr[j]:sel.member_ptr[j + 1]]
        assert (sel.group_of[mem] == j).all() and (np.diff(mem) > 0).all()
    rw, rm, rv = naive.moment_merge(w / w.sum(), mu, var, sel.group_of, G)
    np.testing.assert_allclose(sel.rep_weights, rw, rtol=1e-12)
    np.testing.assert_allclose(sel.rep_means, rm, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sel.rep_variances, rv, rtol=1e-9)
    # the representative covers its members: its variance is at least the mean member variance
    assert (sel.rep_variances >= np.minimum.reduceat(var[sel.member_idx], sel.member_ptr[:-1]) - 1e-12).all()
    np.testing.assert_allclose(sel.shift, w @ mu / w.sum(), rtol=1e-12)
    # kernel arrays: the dot-product form of the members, group blocks row-major (2D, size)
    c, W = naive.gmm_precompute(w / w.sum(), mu, var, sel.shift)
    np.testing.assert_allclose(sel.mem_const, c[sel.member_idx], rtol=1e-12)
    for j in range(G):
        p0, p1 = sel.member_ptr[j], sel.member_ptr[j + 1]
        blk = sel.mem_Wb[8 * p0:8 * p1].reshape(8, p1 - p0)
        np.testing.assert_allclose(blk, W[:, sel.member_idx[p0:p1]], rtol=1e-12)


def test_grouping_is_deterministic_for_a_seed_and_clusters_separated_means(rng):
    centres = rng.normal(size=(10, 3)) * 50.0
    mu = np.repeat(centres, 12, axis=0) + rng.normal(size=(120, 3))
    var = np.ones((120, 3))
    w = np.full(120, 1 / 120)
    a = S.build_selection(w, mu, var, n_groups=10, seed=5)
    b = S.build_selection(w, mu, var, n_groups=10, seed=5)
    for f in ("group_of", "member_ptr", "member_idx", "rep_means", "mem_Wb"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    # ten far-apart clusters of 12 means: each group is exactly one cluster
    truth = np.repeat(np.arange(10), 12)
    assert len({(int(t), int(g)) for t, g in zip(truth, a.group_of)}) == 10
    assert (a.group_sizes == 12).all()


def test_oversized_groups_are_split_and_calibration_meets_its_target(rng):
    # a dense core of 300 means and 100 scattered ones: k-means makes a huge core group; it gets split
    mu = np.vstack([rng.normal(size=(300, 3)) * 0.1, rng.normal(size=(100, 3)) * 30.0])
    var = np.ones((400, 3))
    w = rng.dirichlet(np.ones(400))
    sel = S.build_selection(w, mu, var, n_groups=10, max_size=40)
    assert sel.group_sizes.max() <= 40 and sel.group_sizes.min() >= 1
    assert sorted(sel.member_idx.tolist()) == list(range(400))
    # calibration: the recall curve is a CDF over the number of groups searched, n_search the first >= target
    c, gap, g = sel.recall_curve, sel.gap_curve, sel.n_search
    assert c.shape == gap.shape == (sel.n_groups,)
    assert (np.diff(c) >= 0).all() and c[-1] == pytest.approx(1.0)
    ok = (c >= 0.99) | (gap <= 0.005)  # the first g meeting either criterion
    assert ok[g - 1] and not ok[:g - 1].any()
    assert np.isnan(gap[g:]).all() and (np.diff(gap[:g]) <= 1e-12).all()  # the gap falls as g grows
    # on frames from the model the calibrated search reaches about its target
    X = sample(rng, w, mu, var, 2000)
    recall, _ = _quality(X, w, mu, var, sel, 8, None)
    assert recall >= 0.95
    again = S.build_selection(w, mu, var, n_groups=10, max_size=40)
    assert again.n_search == sel.n_search and np.array_equal(again.recall_curve, sel.recall_curve)


def test_build_is_fast_at_16384_components():
    import time

    rng = np.random.default_rng(0)
    w, mu, var = random_gmm(rng, 16384, 13)
    t = time.perf_counter()
    sel = S.build_selection(w, mu, var)
    assert time.perf_counter() - t < 5.0  # ~0.3 s idle; generous for a loaded 2-core box
    assert S.default_n_groups(16384) == 256 and 256 <= sel.n_groups <= 320
    assert sel.group_sizes.max() <= 2 * 16384 / 256


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("dot_dtype", ["float64", "float32"])
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("K", [60, 90])  # n = K <= 64: sorted-array top-n; > 64: heap
def test_degenerate_case_equals_exact_full_loglik(rng, dot_dtype, offset, K):
    """All groups searched and n = K: every component kept, values exact float64 (uncentred data too)."""
    w, mu, var = random_gmm(rng, K, 5, offset=offset)
    X = sample(rng, w, mu, var, 300)
    sel = S.build_selection(w, mu, var, n_groups=7, dot_dtype=dot_dtype)
    G = sel.n_groups
    idx, ll = S.select(X, sel, n=K, n_search=G)
    order, vals, full = exact_top(X, w, mu, var, K)
    lse = ks.selected_loglik(ll, 2)
    assert rel(lse, full) < 1e-6
    assert rel(S.selected_score_samples(X, sel, n=K, n_search=G), full) < 1e-6
    np.testing.assert_allclose(ll, vals, rtol=1e-9, atol=1e-9)
    if dot_dtype == "float64":
        np.testing.assert_array_equal(idx, order)
    else:  # the float32 ranking may swap near-ties, the kept set is all K and the values are sorted
        assert (np.sort(idx, 1) == np.arange(K)).all()
        assert (np.diff(ll, axis=1) <= 0).all()
    # n >= every candidate: the slots past K stay empty
    idx2, ll2 = ks.select_topn(np.ascontiguousarray(X), *sel.kernel_args(), K + 4, G, 2, S.TILE)
    assert (idx2[:, K:] == -1).all() and np.isneginf(ll2[:, K:]).all()
    assert rel(ks.selected_loglik(ll2, 2), full) < 1e-6


@pytest.mark.parametrize("K,D,G,g,n", [(50, 3, 6, 2, 4), (120, 6, 11, 3, 8), (40, 2, 40, 5, 3), (30, 4, 1, 1, 5),
                                       (200, 3, 100, 80, 70)])  # the last: > 64 groups searched and kept: heaps
def test_kernel_equals_plain_hierarchical_selection(rng, K, D, G, g, n):
    w, mu, var = random_gmm(rng, K, D)
    X = sample(rng, w, mu, var, 200)
    sel = S.build_selection(w, mu, var, n_groups=G, dot_dtype="float64")
    idx, ll = S.select(X, sel, n=n, n_search=g)
    ridx, rll = naive.hierarchical_select(X, w / w.sum(), mu, var, sel.group_of, sel.rep_weights, sel.rep_means,
                                          sel.rep_variances, n, g)
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_allclose(ll, rll, rtol=1e-10, atol=1e-10)
    assert idx.dtype == np.int32 and ll.dtype == np.float64 and idx.shape == (200, n)


def test_results_do_not_depend_on_threads_or_tile(rng):
    w, mu, var = random_gmm(rng, 300, 5)
    X = np.ascontiguousarray(sample(rng, w, mu, var, 777))
    sel = S.build_selection(w, mu, var, n_groups=20)
    ref = ks.select_topn(X, *sel.kernel_args(), 8, 4, 1, 512)
    for chunks, tile in ((2, 512), (7, 3), (3, 1), (1, 10000)):
        out = ks.select_topn(X, *sel.kernel_args(), 8, 4, chunks, tile)
        np.testing.assert_array_equal(out[0], ref[0])
        np.testing.assert_array_equal(out[1], ref[1])


def test_ties_go_to_the_lower_component_id():
    """Duplicated components: equal values, the lower ids are kept, in increasing order."""
    mu = np.array([[0.0], [0.0], [0.0], [5.0], [0.0]])
    var = np.ones((5, 1))
    w = np.full(5, 0.2)
    sel = S.build_selection(w, mu, var, n_groups=2, dot_dtype="float64")
    idx, ll = S.select(np.zeros((3, 1), np.float32), sel, n=3, n_search=2)
    np.testing.assert_array_equal(idx, [[0, 1, 2]] * 3)
    assert (ll[:, 0] == ll[:, 1]).all() and (ll[:, 1] == ll[:, 2]).all()


# --------------------------------------------------------------------- quality
def _quality(X, w, mu, var, sel, n, g):
    idx, ll = S.select(X, sel, n=n, n_search=g)
    order, vals, _ = exact_top(X, w, mu, var, n)
    recall = (idx[:, :, None] == order[:, None, :]).any(1).mean()
    err = naive.logsumexp(vals) - ks.selected_loglik(ll, 2)
    return recall, err


def test_quality_on_well_separated_clusters(rng):
    """64 far-apart clusters of 16 Gaussians: the default search finds the exact top-8 almost always."""
    centres = rng.normal(size=(64, 8)) * 20.0
    mu = np.repeat(centres, 16, axis=0) + rng.normal(size=(1024, 8)) * 1.5
    var = rng.uniform(0.5, 1.5, size=(1024, 8))
    w = rng.dirichlet(np.ones(1024) * 5)
    X = sample(rng, w, mu, var, 3000)
    sel = S.build_selection(w, mu, var)
    recall, err = _quality(X, w, mu, var, sel, 8, None)
    assert recall >= 0.99
    assert err.min() >= -1e-9  # the selected top-8 can not beat the exact top-8
    assert err.mean() <= 0.005 and np.percentile(err, 99) <= 0.1


def test_quality_on_a_random_gmm(rng):
    """Overlapping random GMM (K = 1024, D = 13, frames from the model): the default search rule recovers
    >= 95 % of the exact top-8 and the frame log-likelihood is within 0.02 nats of the exact top-8 on average."""
    w, mu, var = random_gmm(rng, 1024, 13, spread=1.5)
    X = sample(rng, w, mu, var, 3000)
    sel = S.build_selection(w, mu, var)
    recall, err = _quality(X, w, mu, var, sel, 8, None)
    assert recall >= 0.95
    assert err.min() >= -1e-9
    assert err.mean() <= 0.02
    # searching more groups never loses quality here, and all of them is exact
    recall_all, err_all = _quality(X, w, mu, var, sel, 8, sel.n_groups)
    assert recall_all == 1.0 and np.abs(err_all).max() < 1e-9


# ------------------------------------------------------------------ companions
def test_stats_posteriors_and_loglik_equal_naive(rng):
    w, mu, var = random_gmm(rng, 90, 4, offset=50.0)
    X = sample(rng, w, mu, var, 400)
    sel = S.build_selection(w, mu, var, n_groups=9)
    idx, ll = S.select(X, sel, n=6, n_search=3)
    total, occ, f, s = ks.selected_stats(X, sel.shift, idx, ll, 90, 3)
    rt, ro, rf, rs = naive.selected_stats(X, idx, ll, 90, sel.shift)
    assert abs(total - rt) < 1e-9 * abs(rt)
    np.testing.assert_allclose(occ, ro, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(f, rf, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s, rs, rtol=1e-9, atol=1e-9)
    assert abs(occ.sum() - 400) < 1e-9
    lse, post = ks.selected_posteriors(ll, 2)
    np.testing.assert_allclose(post.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(lse, naive.logsumexp(ll), rtol=1e-12)
    np.testing.assert_allclose(ks.selected_loglik(ll, 5), lse, rtol=1e-12)
    # the wrapper (select + stats in one call)
    wt, wo, wf, ws = S.selected_accumulate(X, sel, n=6, n_search=3)
    assert wt == pytest.approx(total, rel=1e-12)
    np.testing.assert_allclose(wo, occ, rtol=1e-12)


def test_degenerate_stats_equal_the_exact_e_step(rng):
    """g = G and n = K: the statistics are the exact full E-step's (naive.gmm_stats); n < K, g = G: gselect=n."""
    w, mu, var = random_gmm(rng, 40, 3)
    w = w / w.sum()
    X = sample(rng, w, mu, var, 250)
    sel = S.build_selection(w, mu, var, n_groups=5, dot_dtype="float64")
    for n in (40, 7):
        total, occ, f, s = S.selected_accumulate(X, sel, n=n, n_search=5)
        rt, ro, rf, rs, _, _ = naive.gmm_stats(X, w, mu, var, sel.shift, gselect=0 if n == 40 else n)
        assert total == pytest.approx(rt, rel=1e-10)
        np.testing.assert_allclose(occ, ro, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(f, rf, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(s, rs, rtol=1e-8, atol=1e-8)


def test_stored_lists_rescored_give_the_same_statistics(rng):
    """Kaldi-style reuse: lists found once, re-scored under the same parameters = recomputed; under new
    parameters = the exact values of those components."""
    w, mu, var = random_gmm(rng, 70, 3)
    X = sample(rng, w, mu, var, 300)
    sel = S.build_selection(w, mu, var, n_groups=8)
    idx, ll = S.select(X, sel, n=5, n_search=3)
    ll2 = ks.score_listed(X, idx, sel.means, sel.prec, sel.lconst, 2)
    np.testing.assert_array_equal(ll2, ll)
    a = ks.selected_stats(X, sel.shift, idx, ll, 70, 2)
    b = ks.selected_stats(X, sel.shift, idx, ll2, 70, 2)
    assert a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:]))
    # new parameters, same grouping (refresh): rescored lists are the exact component log-likelihoods
    w2, mu2, var2 = w[::-1].copy(), mu + 0.3, var * 1.2
    sel2 = S.refresh_selection(sel, w2, mu2, var2)
    np.testing.assert_array_equal(sel2.group_of, sel.group_of)
    ll3 = ks.score_listed(X, idx, sel2.means, sel2.prec, sel2.lconst, 2)
    L = naive.component_loglik(X, w2 / w2.sum(), mu2, var2)
    np.testing.assert_allclose(ll3, np.take_along_axis(L, idx.astype(np.int64), 1), rtol=1e-10)
    idx[0, 2] = -1
    assert np.isneginf(ks.score_listed(X, idx, sel2.means, sel2.prec, sel2.lconst, 2)[0, 2])


def test_em_on_fixed_lists_never_lowers_the_selected_objective(rng):
    """EM restricted to fixed candidate lists (the aligner's / Kaldi's reuse) is monotone."""
    w, mu, var = random_gmm(rng, 32, 3)
    X = sample(rng, w, mu, var, 2000)
    w0, mu0, var0 = np.full(32, 1 / 32), mu + rng.normal(size=mu.shape), np.ones_like(var)
    sel = S.build_selection(w0, mu0, var0, n_groups=6)
    idx, ll = S.select(X, sel, n=4, n_search=2)
    prev = -np.inf
    for _ in range(6):
        total, occ, f, s = ks.selected_stats(X, sel.shift, idx, ll, 32, 2)
        assert total >= prev - 1e-9 * abs(total)
        prev = total
        ok = occ > 1e-3
        m = np.where(ok[:, None], f / np.maximum(occ, 1e-300)[:, None], mu0 - sel.shift)
        v = np.where(ok[:, None], s / np.maximum(occ, 1e-300)[:, None] - m * m, var0)
        w0, mu0, var0 = occ / occ.sum(), m + sel.shift, np.maximum(v, 1e-3)
        sel = S.refresh_selection(sel, w0 + 1e-300, mu0, var0)
        ll = ks.score_listed(X, idx, sel.means, sel.prec, sel.lconst, 2)


# ------------------------------------------------------------------ edge cases
def test_single_component_dimension_and_frame():
    w, mu, var = np.array([1.0]), np.array([[2.0]]), np.array([[0.5]])
    sel = S.build_selection(w, mu, var)
    assert sel.n_groups == 1
    X = np.array([[1.0]], np.float32)
    idx, ll = S.select(X, sel, n=8)
    assert idx.shape == (1, 1)  # n is clamped to K
    ref = naive.component_loglik(X, w, mu, var)[0, 0]
    assert idx[0, 0] == 0 and ll[0, 0] == pytest.approx(ref, rel=1e-12)
    total, occ, f, s = S.selected_accumulate(X, sel, n=1)
    assert total == pytest.approx(ref, rel=1e-12) and occ[0] == 1.0
    assert f[0, 0] == pytest.approx(1.0 - 2.0) and s[0, 0] == pytest.approx(1.0)


def test_no_frames_and_float64_frames(rng):
    w, mu, var = random_gmm(rng, 30, 3)
    sel = S.build_selection(w, mu, var, n_groups=4)
    idx, ll = S.select(np.zeros((0, 3), np.float32), sel, n=5)
    assert idx.shape == (0, 5) and ll.shape == (0, 5)
    total, occ, f, s = S.selected_accumulate(np.zeros((0, 3), np.float32), sel, n=5)
    assert total == 0.0 and not occ.any() and f.shape == (30, 3)
    X = sample(rng, w, mu, var, 50)
    a = S.select(X.astype(np.float64), sel, n=5, n_search=2)
    b = S.select(X, sel, n=5, n_search=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12)


def test_zero_weight_components_are_never_preferred(rng):
    w, mu, var = random_gmm(rng, 20, 2)
    w[:10] = 0.0
    w /= w.sum()
    X = sample(rng, w, mu, var, 100)
    sel = S.build_selection(w, mu, var, n_groups=4, dot_dtype="float64")
    idx, ll = S.select(X, sel, n=20, n_search=4)
    assert (idx[:, :10] >= 10).all() and np.isneginf(ll[:, 10:]).all()
    _, _, full = exact_top(X, w, mu, var, 20)
    assert rel(ks.selected_loglik(ll, 2), full) < 1e-9
    _, occ, _, _ = ks.selected_stats(X, sel.shift, idx, ll, 20, 2)
    assert (occ[:10] == 0).all()


def test_errors_name_the_field():
    w, mu, var = np.ones(3), np.zeros((3, 2)), np.ones((3, 2))
    with pytest.raises(ValueError, match="variances"):
        S.build_selection(w, mu, -var)
    with pytest.raises(ValueError, match="expected weights"):
        S.build_selection(w[:2], mu, var)
    sel = S.build_selection(w, mu, var)
    with pytest.raises(ValueError, match="X: expected"):
        S.select(np.zeros((4, 3), np.float32), sel)
    with pytest.raises(ValueError, match="n must be"):
        S.select(np.zeros((4, 2), np.float32), sel, n=0)
    with pytest.raises(ValueError, match="NaN"):
        S.select(np.full((4, 2), np.nan, np.float32), sel)
    with pytest.raises(ValueError, match="components"):
        S.refresh_selection(sel, np.ones(4), np.zeros((4, 2)), np.ones((4, 2)))

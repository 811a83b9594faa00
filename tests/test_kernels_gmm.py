"""streamq.kernels.gmm against plain NumPy references (written here), on hand-made, random and edge cases."""

import numpy as np
import pytest

from streamq.kernels import gmm as k

PRUNE = 50.0


# ------------------------------------------------------------------ references
def ref_component_loglik(X, w, mu, var):
    """log w_k N(x_t | mu_k, diag var_k), float64 (N, K), by the direct (x - mu)^2 / var form."""
    X = np.asarray(X, np.float64)
    with np.errstate(divide="ignore"):
        lw = np.log(w)
    quad = (((X[:, None, :] - mu[None]) ** 2) / var[None]).sum(-1)
    return lw[None] - 0.5 * np.log(2 * np.pi * var).sum(1)[None] - 0.5 * quad


def ref_logsumexp(L):
    m = L.max(1, keepdims=True)
    return (m + np.log(np.exp(L - m).sum(1, keepdims=True)))[:, 0]


def ref_stats(X, w, mu, var, shift, gselect=0):
    L = ref_component_loglik(X, w, mu, var)
    if 0 < gselect < L.shape[1]:
        keep = np.argsort(-L, axis=1, kind="stable")[:, :gselect]
        mask = np.full(L.shape, -np.inf)
        np.put_along_axis(mask, keep, 0.0, axis=1)
        L = L + mask
    lse = ref_logsumexp(L)
    G = np.exp(L - lse[:, None])
    Xc = np.asarray(X, np.float64) - shift
    return lse.sum(), G.sum(0), G.T @ Xc, G.T @ Xc ** 2, G, lse


def model(rng, K, D, spread=3.0):
    w = rng.dirichlet(np.ones(K))
    mu = rng.normal(size=(K, D)) * spread
    var = rng.uniform(0.3, 2.0, size=(K, D))
    return w, mu, var


def prep(w, mu, var, dtype=np.float64, shift=None):
    shift = np.ascontiguousarray(w @ mu if shift is None else shift, dtype=np.float64)
    const, W = k.gmm_precompute(w, mu, var, shift)
    return shift, const, np.ascontiguousarray(W, dtype=dtype)


# ----------------------------------------------------------------------- tests
def test_precompute_hand_made():
    w = np.array([0.25, 0.75])
    mu = np.array([[1.0, -2.0], [0.0, 3.0]])
    var = np.array([[4.0, 1.0], [0.5, 2.0]])
    shift = np.array([1.0, 1.0])
    const, W = k.gmm_precompute(w, mu, var, shift)
    m = mu - shift
    exp_const = np.log(w) - 0.5 * np.log(2 * np.pi * var).sum(1) - 0.5 * (m ** 2 / var).sum(1)
    np.testing.assert_allclose(const, exp_const, rtol=1e-14)
    np.testing.assert_allclose(W[:2], (m / var).T, rtol=1e-14)
    np.testing.assert_allclose(W[2:], (-0.5 / var).T, rtol=1e-14)
    # zero weight: const is -inf, never NaN
    const0, _ = k.gmm_precompute(np.array([0.0, 1.0]), mu, var, shift)
    assert const0[0] == -np.inf and np.isfinite(const0[1])


def test_loglik_hand_made_single_gaussian():
    # K = 1, D = 1, N(0, 1): log p(x) = -0.5 log(2 pi) - x^2 / 2
    X = np.array([[0.0], [1.0], [-2.0]], np.float32)
    shift, const, W = prep(np.array([1.0]), np.zeros((1, 1)), np.ones((1, 1)))
    out = k.diag_gmm_loglik(X, shift, const, W, 2, 4, PRUNE, 0)
    np.testing.assert_allclose(out, -0.5 * np.log(2 * np.pi) - X[:, 0].astype(np.float64) ** 2 / 2, rtol=1e-14)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-11), (np.float32, 2e-5)])
@pytest.mark.parametrize("K, N, tile, chunks", [(1, 37, 8, 2), (7, 203, 16, 3), (64, 500, 32, 2)])
def test_stats_match_reference(dtype, rtol, K, N, tile, chunks):
    rng = np.random.default_rng(K * 1000 + N)
    D = 5
    w, mu, var = model(rng, K, D)
    X = (rng.normal(size=(N, D)) * 3).astype(np.float32)
    shift, const, W = prep(w, mu, var, dtype)
    tot, n, f, s = k.diag_gmm_stats(X, shift, const, W, chunks, tile, PRUNE, 0)
    rt, rn, rf, rs, G, lse = ref_stats(X, w, mu, var, shift)
    np.testing.assert_allclose(tot, rt, rtol=rtol)
    np.testing.assert_allclose(n, rn, rtol=rtol * 10, atol=1e-9 * N)
    np.testing.assert_allclose(f, rf, rtol=rtol * 10, atol=1e-8 * N)
    np.testing.assert_allclose(s, rs, rtol=rtol * 10, atol=1e-8 * N)
    np.testing.assert_allclose(n.sum(), N, rtol=1e-12)
    ll = k.diag_gmm_loglik(X, shift, const, W, chunks, tile, PRUNE, 0)
    np.testing.assert_allclose(ll, lse, rtol=rtol)
    ll2, post = k.diag_gmm_posteriors(X, shift, const, W, chunks, tile, PRUNE, 0)
    np.testing.assert_allclose(ll2, ll, rtol=1e-15)
    np.testing.assert_allclose(post, G, atol=rtol * 10)
    np.testing.assert_allclose(post.sum(1), 1.0, rtol=1e-12)


def test_stats_independent_of_chunks_and_tile():
    rng = np.random.default_rng(3)
    w, mu, var = model(rng, 16, 4)
    X = rng.normal(size=(301, 4)).astype(np.float32)
    shift, const, W = prep(w, mu, var)
    a = k.diag_gmm_stats(X, shift, const, W, 1, 256, PRUNE, 0)
    b = k.diag_gmm_stats(X, shift, const, W, 5, 7, PRUNE, 0)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gselect", [1, 3, 10])
def test_gselect_matches_top_n_reference(gselect):
    rng = np.random.default_rng(gselect)
    w, mu, var = model(rng, 12, 3, spread=1.0)  # overlapping components: selection matters
    X = rng.normal(size=(150, 3)).astype(np.float32)
    shift, const, W = prep(w, mu, var)
    tot, n, f, s = k.diag_gmm_stats(X, shift, const, W, 2, 16, PRUNE, gselect)
    rt, rn, rf, rs, G, lse = ref_stats(X, w, mu, var, shift, gselect)
    np.testing.assert_allclose(tot, rt, rtol=1e-11)
    np.testing.assert_allclose(n, rn, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(f, rf, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s, rs, rtol=1e-9, atol=1e-9)
    _, post = k.diag_gmm_posteriors(X, shift, const, W, 2, 16, PRUNE, gselect)
    assert ((post > 0).sum(1) <= gselect).all()
    np.testing.assert_allclose(post, G, atol=1e-12)
    # the top-n sum is a lower bound of the full mixture likelihood
    full = k.diag_gmm_loglik(X, shift, const, W, 2, 16, PRUNE, 0)
    sel = k.diag_gmm_loglik(X, shift, const, W, 2, 16, PRUNE, gselect)
    assert (sel <= full + 1e-12).all()


def test_gselect_at_least_k_is_exact():
    rng = np.random.default_rng(9)
    w, mu, var = model(rng, 5, 3)
    X = rng.normal(size=(40, 3)).astype(np.float32)
    shift, const, W = prep(w, mu, var)
    a = k.diag_gmm_stats(X, shift, const, W, 2, 16, PRUNE, 0)
    b = k.diag_gmm_stats(X, shift, const, W, 2, 16, PRUNE, 5)
    c = k.diag_gmm_stats(X, shift, const, W, 2, 16, PRUNE, 99)
    for x, y, z in zip(a, b, c):
        np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(x, z, rtol=1e-13, atol=1e-13)


def test_far_frames_finite_and_posteriors_go_to_nearest():
    rng = np.random.default_rng(4)
    w, mu, var = model(rng, 6, 3)
    X = np.array([[1e4, -1e4, 1e4], [-3e5, 0.0, 0.0], [1e6, 1e6, 1e6]], np.float32)
    for dtype in (np.float64, np.float32):
        shift, const, W = prep(w, mu, var, dtype)
        ll, post = k.diag_gmm_posteriors(X, shift, const, W, 2, 8, PRUNE, 0)
        tot, n, f, s = k.diag_gmm_stats(X, shift, const, W, 2, 8, PRUNE, 0)
        assert np.isfinite(ll).all() and np.isfinite(post).all() and np.isfinite(tot)
        assert np.isfinite(n).all() and np.isfinite(f).all() and np.isfinite(s).all()
        ref = ref_component_loglik(X, w, mu, var)
        np.testing.assert_allclose(ll, ref_logsumexp(ref), rtol=1e-6)
        np.testing.assert_allclose(post.sum(1), 1.0)
        assert (post.argmax(1) == ref.argmax(1)).all()


def test_zero_weight_component_gets_nothing():
    rng = np.random.default_rng(5)
    w, mu, var = model(rng, 4, 2)
    w[2] = 0.0
    w /= w.sum()
    X = np.vstack([mu[2] + 0.01 * rng.normal(size=(20, 2)), rng.normal(size=(20, 2))]).astype(np.float32)
    shift, const, W = prep(w, mu, var)
    tot, n, f, s = k.diag_gmm_stats(X, shift, const, W, 2, 8, PRUNE, 0)
    assert n[2] == 0.0 and (f[2] == 0).all() and (s[2] == 0).all()
    assert np.isfinite(tot)
    np.testing.assert_allclose(tot, ref_stats(X, w, mu, var, shift)[0], rtol=1e-12)


def test_duplicate_frames_and_zero_variance_dimension_data():
    # all frames identical: second-order stats about the mean are exactly zero after centring
    X = np.tile(np.array([[2.0, -1.0, 0.5]], np.float32), (50, 1))
    w = np.array([1.0])
    mu = X[:1].astype(np.float64)
    var = np.full((1, 3), 1e-3)
    shift, const, W = prep(w, mu, var)
    tot, n, f, s = k.diag_gmm_stats(X, shift, const, W, 2, 8, PRUNE, 0)
    assert n[0] == 50.0
    np.testing.assert_allclose(f, 0.0, atol=1e-12)
    np.testing.assert_allclose(s, 0.0, atol=1e-12)
    np.testing.assert_allclose(tot / 50, -0.5 * np.log(2 * np.pi * 1e-3) * 3, rtol=1e-12)


def test_single_frame_and_empty_batch():
    rng = np.random.default_rng(6)
    w, mu, var = model(rng, 3, 2)
    shift, const, W = prep(w, mu, var)
    X1 = rng.normal(size=(1, 2)).astype(np.float32)
    tot, n, f, s = k.diag_gmm_stats(X1, shift, const, W, 4, 8, PRUNE, 0)
    np.testing.assert_allclose(tot, ref_stats(X1, w, mu, var, shift)[0], rtol=1e-12)
    X0 = np.zeros((0, 2), np.float32)
    tot, n, f, s = k.diag_gmm_stats(X0, shift, const, W, 4, 8, PRUNE, 0)
    assert tot == 0.0 and n.sum() == 0.0
    assert k.diag_gmm_loglik(X0, shift, const, W, 2, 8, PRUNE, 0).shape == (0,)


def test_exp_kernel_accuracy():
    x = -np.concatenate([np.linspace(0, 50, 1001), np.random.default_rng(0).uniform(0, 700, 1000), [0.0]])
    out = np.empty_like(x)
    k._exp_nonpos(x, out, np.empty_like(x), len(x))
    np.testing.assert_allclose(out, np.exp(x), rtol=1e-13)
    assert out[-1] == 1.0


def test_max8_matches_numpy():
    rng = np.random.default_rng(8)
    for n in (1, 7, 8, 9, 100):
        x = rng.normal(size=n)
        c = rng.normal(size=n)
        assert k._max8(c, x) == (c + x).max()
    assert k._max8(np.array([-np.inf, -np.inf, 1.0]), np.array([1.0, 2.0, 3.0])) == 4.0
    x32 = rng.normal(size=13).astype(np.float32)
    assert k._max8(x32, x32) == (2 * x32).max()


def test_cluster_stats_after_assign():
    from streamq.kernels.assign import assign

    rng = np.random.default_rng(10)
    X = rng.normal(size=(400, 3)).astype(np.float32)
    C = rng.normal(size=(9, 3)).astype(np.float32)
    labels, d2 = assign(X, C)
    D2 = ((X[:, None, :].astype(np.float64) - C[None]) ** 2).sum(-1)
    assert (labels == D2.argmin(1)).all()
    scale = (X.astype(np.float64) ** 2).sum(1).max() + (C.astype(np.float64) ** 2).sum(1).max()
    np.testing.assert_allclose(d2, D2.min(1), rtol=1e-5, atol=1e-6 * scale)  # fused float32 expansion
    shift = np.array([0.5, -0.5, 1.0])
    K = 11  # two clusters never used
    n, f, s = k.cluster_stats(X, labels, K, shift, 3)
    Xc = X.astype(np.float64) - shift
    for j in range(K):
        sel = labels == j
        assert n[j] == sel.sum()
        np.testing.assert_allclose(f[j], Xc[sel].sum(0), atol=1e-10)
        np.testing.assert_allclose(s[j], (Xc[sel] ** 2).sum(0), atol=1e-10)
    assert n[9] == 0 and n[10] == 0

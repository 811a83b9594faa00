"""streamq.kernels.gmm against tests/naive.py, on hand-made, random, edge and numerically hostile cases."""

import numpy as np
import pytest

import naive
from streamq.kernels import gmm as k

PRUNE = 50.0


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
    rt, rn, rf, rs, G, lse = naive.gmm_stats(X, w, mu, var, shift)
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
    rt, rn, rf, rs, G, lse = naive.gmm_stats(X, w, mu, var, shift, gselect)
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
        ref = naive.component_loglik(X, w, mu, var)
        np.testing.assert_allclose(ll, naive.logsumexp(ref), rtol=1e-6)
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
    np.testing.assert_allclose(tot, naive.gmm_stats(X, w, mu, var, shift)[0], rtol=1e-12)


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
    np.testing.assert_allclose(tot, naive.gmm_stats(X1, w, mu, var, shift)[0], rtol=1e-12)
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


def test_precompute_matches_naive_and_refuses_bad_parameters():
    rng = np.random.default_rng(11)
    w, mu, var = model(rng, 6, 4)
    w[3] = 0.0
    shift = w @ mu
    const, W = k.gmm_precompute(w, mu, var, shift)
    rc, rW = naive.gmm_precompute(w, mu, var, shift)
    np.testing.assert_allclose(const, rc, rtol=1e-13)
    np.testing.assert_allclose(W, rW, rtol=1e-13)
    bad_mu = mu.copy()
    bad_mu[2, 1] = np.nan
    with pytest.raises(ValueError, match="GMM means hold NaN or inf"):
        k.gmm_precompute(w, bad_mu, var, shift)
    with pytest.raises(ValueError, match="variances must be > 0"):
        k.gmm_precompute(w, mu, -var, shift)
    with pytest.raises(ValueError, match="GMM shift"):
        k.gmm_precompute(w, mu, var, shift + np.inf)
    with pytest.raises(ValueError, match="at least one > 0"):
        k.gmm_precompute(np.zeros(6), mu, var, shift)


def test_gselect_ties_keep_lowest_index():
    # four identical components (exact ties) and one far one: top-2 must be components 0 and 1
    mu = np.array([[0.0, 0.0]] * 4 + [[5.0, 5.0]])
    var = np.ones((5, 2))
    w = np.full(5, 0.2)
    X = np.random.default_rng(2).normal(size=(30, 2)).astype(np.float32)
    shift, const, W = prep(w, mu, var)
    _, post = k.diag_gmm_posteriors(X, shift, const, W, 2, 8, PRUNE, 2)
    assert (post[:, 2:] == 0).all() and (post[:, :2] > 0).all()
    L = naive.component_loglik(X, w, mu, var)
    assert (naive.gselect_top_n(L, 2)[:, :2]).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_frames_and_parameters_refused(bad):
    rng = np.random.default_rng(12)
    w, mu, var = model(rng, 5, 3)
    X = rng.normal(size=(40, 3)).astype(np.float32)
    shift, const, W = prep(w, mu, var, np.float32)
    Xb = X.copy()
    Xb[17, 1] = bad
    for f in (k.diag_gmm_stats, k.diag_gmm_loglik, k.diag_gmm_posteriors):
        with pytest.raises(ValueError, match="X row 17 holds NaN or inf"):
            f(Xb, shift, const, W, 2, 8, PRUNE, 0)
    Wb = W.copy()
    Wb[0, 2] = bad
    with pytest.raises(ValueError, match="W hold NaN or inf"):
        k.diag_gmm_stats(X, shift, const, Wb, 2, 8, PRUNE, 0)
    cb = const.copy()
    cb[1] = np.nan
    with pytest.raises(ValueError, match="constants"):
        k.diag_gmm_loglik(X, shift, cb, W, 2, 8, PRUNE, 0)
    with pytest.raises(ValueError, match="constants"):
        k.diag_gmm_loglik(X, shift, np.full_like(const, -np.inf), W, 2, 8, PRUNE, 0)
    with pytest.raises(ValueError, match="shift"):
        k.diag_gmm_loglik(X, shift * bad, const, W, 2, 8, PRUNE, 0)


@pytest.mark.parametrize("mag", [1e19, 1e30, 3e38])
def test_huge_frames_finite_never_system_error(mag):
    """|x| 1e19 .. float32 max: the float32 GEMM would overflow; the wrapper computes in float64 instead."""
    rng = np.random.default_rng(13)
    w, mu, var = model(rng, 4, 3)
    X = np.array([[mag, 0, 0], [0, -mag, 0], [1.0, 2.0, 3.0]], np.float32)
    for dtype in (np.float32, np.float64):
        shift, const, W = prep(w, mu, var, dtype)
        ll, post = k.diag_gmm_posteriors(X, shift, const, W, 2, 8, PRUNE, 0)
        tot, n, f, s = k.diag_gmm_stats(X, shift, const, W, 2, 8, PRUNE, 0)
        ref = naive.component_loglik(X, w, mu, var)
        assert np.isfinite(ll).all() and np.isfinite(post).all() and np.isfinite(tot)
        assert np.isfinite(n).all() and np.isfinite(f).all() and np.isfinite(s).all()
        np.testing.assert_allclose(ll, naive.logsumexp(ref), rtol=1e-6)
        assert (post.argmax(1) == ref.argmax(1)).all()
    # a model so far out that even float64 cannot hold the quadratic form: refused, one line
    Xd = np.array([[1e200, 0, 0]])
    shift, const, W = prep(w, mu, var)
    with pytest.raises(ValueError, match="rescale the features"):
        k.diag_gmm_loglik(Xd, shift, const, W, 2, 8, PRUNE, 0)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
@pytest.mark.parametrize("scale", [1e-3, 1e-1, 1.0, 1e1, 1e3])
def test_loglik_offset_scale_table(offset, scale):
    """With the contract's shift (the mixture mean), float32 W agrees with the float64 direct form."""
    X, w, mu, var = naive.gmm_case(offset, scale, N=3000, K=16, D=13)
    shift, const, W = prep(w, mu, var, np.float32)
    ll, post = k.diag_gmm_posteriors(X, shift, const, W, 2, 64, PRUNE, 0)
    ref = naive.component_loglik(X, w, mu, var)
    rll = naive.logsumexp(ref)
    np.testing.assert_allclose(ll, rll, rtol=0, atol=1e-4 * (1 + np.abs(rll).max()))
    assert (post.argmax(1) == ref.argmax(1)).mean() >= 0.999
    tot, n, f, s = k.diag_gmm_stats(X, shift, const, W, 2, 64, PRUNE, 0)
    rt, rn, rf, rs, _, _ = naive.gmm_stats(X, w, mu, var, shift)
    assert abs(tot - rt) <= 1e-5 * abs(rt) + 1e-4 * len(X)
    np.testing.assert_allclose(n, rn, rtol=1e-4, atol=1e-3)


def test_exp_kernel_below_domain_is_tiny_not_garbage():
    x = np.array([-708.0, -709.0, -1e5, -1e300, 0.0])
    out = np.empty_like(x)
    k._exp_nonpos(x, out, np.empty_like(x), len(x))
    assert np.isfinite(out).all() and (out[:4] >= 0).all() and (out[:4] <= 1e-307).all() and out[4] == 1.0


def test_far_shift_violating_the_contract_stays_finite():
    """shift = 0 on data at 1e4 (scale 1e-2) is imprecise with float32 W, but never NaN or an exception."""
    X, w, mu, var = naive.gmm_case(1e4, 1e-2, N=500, K=8, D=5)
    shift, const, W = prep(w, mu, var, np.float32, shift=np.zeros(5))
    ll = k.diag_gmm_loglik(X, shift, const, W, 2, 64, PRUNE, 0)
    assert np.isfinite(ll).all()

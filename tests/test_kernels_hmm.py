"""Chain-HMM kernels against plain NumPy references, hmmlearn's lattice code and brute force."""

import itertools

import numpy as np
import pytest

from streamq.kernels.hmm import (diag_gauss_loglik, forward_backward, forward_backward_log, frame_normalise,
                                 mixture_counts, mixture_likelihoods, nearest_stats, occupancy_by_unit, viterbi)


# --------------------------------------------------------------------------- NumPy references
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


def ref_forward_backward(log_emit, state_unit, stay, nxt, skip):
    """Log-space forward-backward over the dense transition matrix; start in 0, end in S-1."""
    from scipy.special import logsumexp

    lb = log_emit[:, state_unit]
    T, S = lb.shape
    lA = dense_logA(stay, nxt, skip)
    la = np.full((T, S), -np.inf)
    la[0, 0] = lb[0, 0]
    for t in range(1, T):
        la[t] = logsumexp(la[t - 1][:, None] + lA, axis=0) + lb[t]
    lbeta = np.full((T, S), -np.inf)
    lbeta[T - 1, S - 1] = 0.0
    for t in range(T - 2, -1, -1):
        lbeta[t] = logsumexp(lA + (lb[t + 1] + lbeta[t + 1])[None, :], axis=1)
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


def brute_viterbi(log_emit, state_unit, stay, nxt, skip):
    lb = log_emit[:, state_unit]
    T, S = lb.shape
    lA = dense_logA(stay, nxt, skip)
    best, arg = -np.inf, None
    for rest in itertools.product(range(S), repeat=T - 1):
        path = (0,) + rest
        if path[-1] != S - 1:
            continue
        sc = lb[0, 0] + sum(lA[path[t - 1], path[t]] + lb[t, path[t]] for t in range(1, T))
        if sc > best:
            best, arg = sc, path
    return arg, best


def random_chain(rng, S, skips=True):
    stay = rng.uniform(0.2, 0.9, S)
    nxt = 1 - stay
    skip = np.zeros(S)
    if skips:
        for s in range(0, S - 2, 3):  # every third state may skip the next one
            q = rng.uniform(0.2, 0.8)
            skip[s], nxt[s] = (1 - stay[s]) * q, (1 - stay[s]) * (1 - q)
    return stay, nxt, skip


def check_fb(log_emit, su, stay, nxt, skip, tol=1e-8):
    g_ref, ll_ref, xi_ref = ref_forward_backward(log_emit, su, stay, nxt, skip)
    g, ll, xi, _ = forward_backward(log_emit, su, stay, nxt, skip)
    g2, ll2, xi2 = forward_backward_log(log_emit, su, stay, nxt, skip)
    for gg, l, x in ((g, ll, xi), (g2, ll2, xi2)):
        if np.isfinite(ll_ref):
            assert l == pytest.approx(ll_ref, rel=1e-10, abs=1e-8)
            np.testing.assert_allclose(gg, g_ref, atol=tol)
            np.testing.assert_allclose(x, xi_ref, atol=tol * len(log_emit))
        else:
            assert l == -np.inf
    return g, ll, xi


# --------------------------------------------------------------------------- forward-backward
def test_hand_made_two_states():
    # two states, three frames: paths 0-0-1 and 0-1-1 only
    le = np.log(np.array([[1.0, 0.5], [0.2, 0.4], [0.3, 0.9]]))
    su = np.arange(2)
    stay, nxt, skip = np.array([0.6, 1.0]), np.array([0.4, 0.0]), np.zeros(2)
    p001 = 1.0 * 0.6 * 0.2 * 0.4 * 0.9
    p011 = 1.0 * 0.4 * 0.4 * 1.0 * 0.9
    g, ll, xi, used_log = forward_backward(le, su, stay, nxt, skip)
    assert not used_log
    assert ll == pytest.approx(np.log(p001 + p011))
    np.testing.assert_allclose(g[1], np.array([p001, p011]) / (p001 + p011))
    np.testing.assert_allclose(g[0], [1, 0])
    np.testing.assert_allclose(g[2], [0, 1])
    np.testing.assert_allclose(xi[0], [p001 / (p001 + p011), 1.0, 0.0])


@pytest.mark.parametrize("T,S,U,skips", [(1, 1, 1, False), (5, 1, 1, False), (4, 4, 4, False), (12, 5, 3, True),
                                         (40, 9, 9, True), (60, 20, 7, True), (3, 7, 7, True)])
def test_forward_backward_matches_reference(T, S, U, skips):
    rng = np.random.default_rng(T * 100 + S)
    le = rng.normal(size=(T, U)) * 2
    su = rng.integers(0, U, S).astype(np.int64)
    stay, nxt, skip = random_chain(rng, S, skips)
    g, ll, xi = check_fb(le, su, stay, nxt, skip)
    if np.isfinite(ll):
        np.testing.assert_allclose(g.sum(1), 1.0, atol=1e-12)
        assert xi.sum() == pytest.approx(T - 1)


def test_forward_backward_matches_hmmlearn():
    from hmmlearn import _hmmc

    rng = np.random.default_rng(7)
    T, S = 80, 12
    le = rng.normal(size=(T, S)) * 3
    le[-1, :-1] = -np.inf  # the end constraint, expressed through the last frame for hmmlearn
    su = np.arange(S)
    stay, nxt, skip = random_chain(rng, S, skips=True)
    A = np.exp(dense_logA(stay, nxt, skip))
    A[-1, -1] = 1.0
    stay[-1] = 1.0
    start = np.eye(S)[0]
    ll_h, fw = _hmmc.forward_log(start, A, le)
    bw = _hmmc.backward_log(start, A, le)
    post = np.exp(fw + bw - ll_h)
    g, ll, xi, _ = forward_backward(le, su, stay, nxt, skip)
    assert ll == pytest.approx(ll_h, rel=1e-10)
    np.testing.assert_allclose(g, post, atol=1e-6)
    # and the scaled variant
    ll_s, fws, sc = _hmmc.forward_scaling(start, A, np.exp(le))
    bws = _hmmc.backward_scaling(start, A, np.exp(le), sc)
    np.testing.assert_allclose(g, fws * bws / (fws * bws).sum(1, keepdims=True), atol=1e-6)


def test_long_utterance_no_underflow():
    # T = 30,000 frames, 300 states, emissions with a true path and many nats of contrast per frame
    rng = np.random.default_rng(3)
    T, S = 30_000, 300
    true = np.sort(rng.choice(np.arange(1, T), S - 1, replace=False))
    path = np.zeros(T, np.int64)
    path[true] = 1
    path = np.cumsum(path)
    le = -0.5 * (rng.normal(size=(T, 1)) + (path[:, None] - np.arange(S)[None, :]) * 1.5) ** 2
    su = np.arange(S)
    p = 1 - S / T
    stay, nxt, skip = np.full(S, p), np.full(S, 1 - p), np.zeros(S)
    g, ll, xi, used_log = forward_backward(le, su, stay, nxt, skip)
    assert not used_log
    assert np.isfinite(ll) and np.isfinite(g).all() and np.isfinite(xi).all()
    np.testing.assert_allclose(g.sum(1), 1.0, atol=1e-9)
    g2, ll2, _ = forward_backward_log(le, su, stay, nxt, skip)
    assert ll == pytest.approx(ll2, rel=1e-10)
    np.testing.assert_allclose(g, g2, atol=1e-7)
    assert (g.argmax(1) == path).mean() > 0.9
    vp, score = viterbi(le, su, stay, nxt, skip)
    assert np.isfinite(score) and (vp == path).mean() > 0.9 and (np.diff(vp) >= 0).all()


def test_scaled_underflow_falls_back_to_log_domain():
    # random emissions over a long chain: the forward filter's mass on the smoothed path underflows
    rng = np.random.default_rng(0)
    T, S = 3000, 120
    le = rng.normal(size=(T, S)) * 6
    su = np.arange(S)
    stay, nxt, skip = np.full(S, 0.96), np.full(S, 0.04), np.zeros(S)
    g, ll, xi, used_log = forward_backward(le, su, stay, nxt, skip)
    assert used_log
    g2, ll2, xi2 = forward_backward_log(le, su, stay, nxt, skip)
    assert np.isfinite(ll) and ll == ll2
    np.testing.assert_allclose(g.sum(1), 1.0, atol=1e-9)


def test_transition_probabilities_zero_and_one():
    rng = np.random.default_rng(5)
    T, S = 6, 4
    le = rng.normal(size=(T, S))
    su = np.arange(S)
    # stay = 0 everywhere but the end: only the path 0,1,2,3,3,3
    stay, nxt, skip = np.array([0.0, 0.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0, 0.0]), np.zeros(S)
    g, ll, xi = check_fb(le, su, stay, nxt, skip)
    np.testing.assert_allclose(g.argmax(1), [0, 1, 2, 3, 3, 3])
    np.testing.assert_allclose(g.max(1), 1.0)
    assert ll == pytest.approx(le[[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 3, 3]].sum())
    # a state that cannot be left (stay = 1): no path reaches the end
    stay, nxt = np.array([0.5, 1.0, 0.5, 1.0]), np.array([0.5, 0.0, 0.5, 0.0])
    g, ll, xi, _ = forward_backward(le, su, stay, nxt, skip)
    assert ll == -np.inf and not g.any()
    path, score = viterbi(le, su, stay, nxt, skip)
    assert score == -np.inf and (path == -1).all()
    # skip = 1 from state 0 jumps over state 1: state 1 is never visited
    stay, nxt, skip = np.array([0.0, 0.5, 0.5, 1.0]), np.array([0.0, 0.5, 0.5, 0.0]), np.array([1.0, 0.0, 0.0, 0.0])
    g, ll, xi = check_fb(le, su, stay, nxt, skip)
    assert g[:, 1].max() == 0.0 and np.isfinite(ll)
    # more states than frames: no path
    g, ll, xi, _ = forward_backward(le[:3], su, np.full(4, 0.5), np.full(4, 0.5), np.zeros(4))
    assert ll == -np.inf


def test_minus_inf_emissions():
    rng = np.random.default_rng(9)
    T, S = 10, 4
    le = rng.normal(size=(T, S))
    le[3:6, 1] = -np.inf
    le[0, 2] = -np.inf
    stay, nxt, skip = random_chain(rng, S)
    check_fb(le, np.arange(S), stay, nxt, skip)
    le[0, 0] = -np.inf  # the start state cannot emit frame 0
    g, ll, xi, _ = forward_backward(le, np.arange(S), stay, nxt, skip)
    assert ll == -np.inf


# --------------------------------------------------------------------------- Viterbi
@pytest.mark.parametrize("seed", range(6))
def test_viterbi_brute_force(seed):
    rng = np.random.default_rng(seed)
    S = int(rng.integers(1, 5))
    T = int(rng.integers(S, 8))
    U = max(1, S - 1)
    le = rng.normal(size=(T, U)) * 2
    su = rng.integers(0, U, S).astype(np.int64)
    stay, nxt, skip = random_chain(rng, S, skips=True)
    if seed == 0:
        stay[:] = 0.5  # ties broken either way must still give the best score
    path, score = viterbi(le, su, stay, nxt, skip)
    bpath, bscore = brute_viterbi(le, su, stay, nxt, skip)
    assert score == pytest.approx(bscore, rel=1e-12)
    lA = dense_logA(stay, nxt, skip)
    lb = le[:, su]
    mine = lb[0, path[0]] + sum(lA[path[t - 1], path[t]] + lb[t, path[t]] for t in range(1, T))
    assert path[0] == 0 and path[-1] == S - 1 and mine == pytest.approx(bscore, rel=1e-12)


def test_seed_collapse_fixed_self_loop_vs_duration_init():
    """Seed notes: p = 0.75 on a long utterance puts one frame in each early state, the rest in the last."""
    rng = np.random.default_rng(5)
    S, T = 4, 800
    true = np.repeat(np.arange(S), T // S)
    mu = np.arange(S) * 0.25  # a reasonable, but weak, observation model (unit noise)
    x = mu[true] + rng.normal(size=T)
    le = -0.5 * (x[:, None] - mu[None, :]) ** 2
    su = np.arange(S)

    def decode(p):
        stay, nxt = np.full(S, p), np.full(S, 1 - p)
        stay[-1], nxt[-1] = 1.0, 0.0  # absorbing final state, as in the seed's chain
        path, _ = viterbi(le, su, stay, nxt, np.zeros(S))
        return np.bincount(path, minlength=S)

    fixed = decode(0.75)
    assert fixed[-1] > 0.6 * T and (fixed[1:-1] <= 3).all()
    dur = decode(1 - S / T)
    assert dur.min() >= (T / S) / 4 and dur.max() <= (T / S) * 4


# --------------------------------------------------------------------------- emissions and statistics
def test_diag_gauss_loglik_and_normalise():
    rng = np.random.default_rng(2)
    T, K, D = 37, 6, 5
    X = rng.normal(size=(T, D)).astype(np.float32)
    mu = rng.normal(size=(K, D))
    var = rng.uniform(0.1, 3, (K, D))
    out = np.empty((T, K))
    diag_gauss_loglik(X, mu, var, out)
    Xd = X.astype(np.float64)
    ref = -0.5 * (np.log(2 * np.pi * var).sum(1)[None] + (((Xd[:, None] - mu[None]) ** 2) / var[None]).sum(2))
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    G = ref.copy()
    G[0, :] = -1e4  # a frame far from everything: no underflow after the shift
    shift = frame_normalise(G)
    np.testing.assert_allclose(shift, np.r_[-1e4, ref[1:].max(1)])
    np.testing.assert_allclose(G.max(1), 1.0)
    np.testing.assert_allclose(np.log(G[1:]) + shift[1:, None], ref[1:], atol=1e-10)


def test_occupancy_by_unit():
    rng = np.random.default_rng(4)
    g = rng.uniform(size=(9, 7))
    su = np.array([0, 2, 2, 1, 0, 2, 3], np.int64)
    occ = occupancy_by_unit(g, su, 5)
    ref = np.zeros((9, 5))
    for s, u in enumerate(su):
        ref[:, u] += g[:, s]
    np.testing.assert_allclose(occ, ref)
    assert not occ[:, 4].any()


def test_nearest_stats():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(1001, 3)).astype(np.float32)
    C = rng.normal(size=(5, 3)).astype(np.float32)
    C[4] = 50.0  # an empty cluster
    counts, sums, sq = nearest_stats(X, C)
    a = ((X[:, None, :].astype(np.float64) - C[None]) ** 2).sum(2).argmin(1)
    np.testing.assert_allclose(counts, np.bincount(a, minlength=5))
    Xd = X.astype(np.float64)
    for k in range(5):
        np.testing.assert_allclose(sums[k], Xd[a == k].sum(0), atol=1e-9)
        np.testing.assert_allclose(sq[k], (Xd[a == k] ** 2).sum(0), atol=1e-9)
    assert counts[4] == 0


def test_mixture_likelihoods_and_counts():
    rng = np.random.default_rng(8)
    T, K, U = 23, 9, 4
    Gx = rng.uniform(size=(T, K))
    Gx[3] = 0.0  # a frame no component explains (after the shift this cannot happen, but must not crash)
    W = rng.dirichlet(np.ones(K), U)
    W[2, :5] = 0.0
    W[2] /= W[2].sum()
    P = mixture_likelihoods(Gx, W)
    np.testing.assert_allclose(P, Gx @ W.T, rtol=1e-12)
    occ = rng.uniform(size=(T, U))
    occ[:, 1] = 0.0  # a unit nobody occupies
    occ[3] = 0.0
    counts = mixture_counts(Gx, occ, P, W)
    ref = np.zeros((U, K))
    for t in range(T):
        for u in range(U):
            if occ[t, u] > 0:
                ref[u] += occ[t, u] * W[u] * Gx[t] / (W[u] @ Gx[t])
    np.testing.assert_allclose(counts, ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(counts.sum(1), occ.sum(0), rtol=1e-10)  # counts redistribute occupancy
    assert not counts[1].any() and not counts[2, :5].any()

"""Lattice kernels (forward-backward, Viterbi) against tests/naive.py, hmmlearn's lattice code and brute force."""

import numpy as np
import pytest

import naive
from naive import dense_logA
from streamq.kernels.lattice import forward_backward, forward_backward_log, viterbi


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
    g_ref, ll_ref, xi_ref = naive.forward_backward(log_emit, su, stay, nxt, skip)
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
    bpath, bscore = naive.viterbi(le, su, stay, nxt, skip)
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


def test_sequence_of_length_one():
    le = np.array([[-1.5, -0.2]])
    g, ll, xi, used_log = forward_backward(le, np.array([0], np.int64), np.ones(1), np.zeros(1), np.zeros(1))
    assert ll == -1.5 and g.tolist() == [[1.0]] and not xi.any()
    path, score = viterbi(le, np.array([1], np.int64), np.ones(1), np.zeros(1), np.zeros(1))
    assert path.tolist() == [0] and score == -0.2
    # T = 1 with S = 2 states: the end state cannot be reached
    g, ll, xi, _ = forward_backward(le, np.arange(2), np.full(2, 0.5), np.full(2, 0.5), np.zeros(2))
    assert ll == -np.inf
    assert viterbi(le, np.arange(2), np.full(2, 0.5), np.full(2, 0.5), np.zeros(2))[1] == -np.inf


def test_viterbi_tie_rule_prefers_smaller_jump():
    # flat emissions, stay = next = 0.5: every path 0..S-1 of length T has the same score; the
    # documented rule (predecessor via stay before next before skip, applied backwards from the last
    # frame) gives the path that reaches the end state as early as possible
    T, S = 5, 3
    le = np.zeros((T, S))
    path, score = viterbi(le, np.arange(S), np.full(S, 0.5), np.full(S, 0.5), np.zeros(S))
    bpath, bscore = naive.viterbi(le, np.arange(S), np.full(S, 0.5), np.full(S, 0.5), np.zeros(S))
    assert score == pytest.approx(bscore)
    assert path.tolist() == [0, 1, 2, 2, 2]


# --------------------------------------------------------------------------- pruned, checkpointed lattices
from streamq.kernels.lattice import end_distance, forward_backward_pruned, viterbi_pruned  # noqa: E402

NOPATH = np.zeros(0, np.int64)


def chain_problem(T, S, seed=0, contrast=0.8, skips=False):
    """Aligner-like emissions: a true path with ~T/S frames per state; returns (P, shift, su, stay, nxt, skip, truth)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, T), S - 1, replace=False))
    truth = np.zeros(T, np.int64)
    truth[cuts] = 1
    truth = np.cumsum(truth)
    le = -0.5 * (rng.normal(size=(T, 1)) + (truth[:, None] - np.arange(S)[None, :]) * contrast) ** 2 - 10.0
    if skips:
        stay, nxt, skip = random_chain(rng, S, True)
    else:
        p = 1 - S / T
        stay, nxt, skip = np.full(S, p), np.full(S, 1 - p), np.zeros(S)
        stay[-1], nxt[-1] = 1.0, 0.0
    shift = le.max(1)
    return np.exp(le - shift[:, None]), shift, np.arange(S, dtype=np.int64), stay, nxt, skip, truth


def occ_of(gamma, su, U):
    occ = np.zeros((gamma.shape[0], U))
    for s, u in enumerate(su):
        occ[:, u] += gamma[:, s]
    return occ


def test_end_distance_matches_reference():
    rng = np.random.default_rng(3)
    for S in (1, 2, 7, 30):
        stay, nxt, skip = random_chain(rng, S, True)
        nxt[S // 2] = 0.0 if S > 3 else nxt[S // 2]  # a state that can only skip (or is stuck)
        np.testing.assert_array_equal(end_distance(nxt, skip), naive.end_distance(nxt, skip))


@pytest.mark.parametrize("T,S,U,skips", [(1, 1, 1, False), (5, 1, 1, False), (4, 4, 4, False), (12, 5, 3, True),
                                         (40, 9, 9, True), (60, 20, 7, True), (3, 7, 7, True), (200, 30, 11, True)])
def test_pruned_without_beam_equals_dense(T, S, U, skips):
    """beam = inf: the exact lattice (naive dense reference and forward_backward), for every checkpoint interval."""
    rng = np.random.default_rng(T * 100 + S)
    le = rng.normal(size=(T, U)) * 2 + 50.0
    su = rng.integers(0, U, S).astype(np.int64)
    stay, nxt, skip = random_chain(rng, S, skips)
    shift = le.max(1)
    P = np.exp(le - shift[:, None])
    g_ref, ll_ref, xi_ref = naive.forward_backward(le, su, stay, nxt, skip)
    g, ll, xi, _ = forward_backward(le, su, stay, nxt, skip)
    path, score = viterbi(le, su, stay, nxt, skip)
    vp, vs, vst, _ = viterbi_pruned(le, su, stay, nxt, skip, np.inf)
    np.testing.assert_array_equal(vp, path)
    assert vs == score or (vs == -np.inf and score == -np.inf)
    for every in (0, 1, 2, 7, T):
        occ, ll2, xi2, st, pp, info = forward_backward_pruned(P, su, stay, nxt, skip, U, np.inf, every,
                                                               path if np.isfinite(score) else NOPATH)
        if not np.isfinite(ll_ref):
            assert st == 1 and ll2 == -np.inf and vst == 1
            continue
        assert st == 0 and vst == 0
        assert ll2 + shift.sum() == pytest.approx(ll_ref, rel=1e-10, abs=1e-8)
        assert ll2 + shift.sum() == pytest.approx(ll, rel=1e-12, abs=1e-9)
        np.testing.assert_allclose(occ, occ_of(g_ref, su, U), atol=1e-9)
        np.testing.assert_allclose(xi2, xi_ref, atol=1e-9 * T)
        np.testing.assert_allclose(pp, g_ref[np.arange(T), path], atol=1e-9)
        np.testing.assert_allclose(occ.sum(1), 1.0, rtol=1e-10)


@pytest.mark.parametrize("beam,skips", [(3.0, False), (8.0, True), (30.0, False)])
def test_pruned_beam_is_exact_on_its_windows(beam, skips):
    """A finite beam: forward-backward on the restricted lattice (naive: dense over the same windows, -inf
    outside), identical for every checkpoint interval, narrower than S."""
    P, shift, su, stay, nxt, skip, _ = chain_problem(400, 40, seed=int(beam), skips=skips)
    S = len(su)
    g_ref, ll_ref, xi_ref = naive.pruned_forward_backward(P, su, stay, nxt, skip, beam)
    runs = [forward_backward_pruned(P, su, stay, nxt, skip, S, beam, every, NOPATH) for every in (0, 1, 19, 400)]
    occ, ll, xi, st, pp, info = runs[0]
    assert st == 0 and info[1] < S
    assert ll == pytest.approx(ll_ref, rel=1e-10)
    np.testing.assert_allclose(occ, g_ref, atol=1e-9)
    np.testing.assert_allclose(xi, xi_ref, atol=1e-7)
    for r in runs[1:]:  # checkpoints recompute the same numbers
        np.testing.assert_array_equal(r[0], occ)
        np.testing.assert_array_equal(r[2], xi)
        assert r[1] == ll
    # the exact lattice's likelihood is an upper bound, reached as the beam widens
    with np.errstate(divide="ignore"):
        g, ll_full, _, _ = forward_backward(np.log(P) + shift[:, None], su, stay, nxt, skip)
    assert ll + shift.sum() <= ll_full + 1e-9
    if beam >= 30:
        assert ll + shift.sum() == pytest.approx(ll_full, abs=1e-6)
        np.testing.assert_allclose(occ, g, atol=1e-8)


def test_viterbi_pruned_finite_beam_finds_the_exact_path():
    P, shift, su, stay, nxt, skip, truth = chain_problem(3000, 120, seed=4)
    with np.errstate(divide="ignore"):
        le = np.log(P) + shift[:, None]
    path, score = viterbi(le, su, stay, nxt, skip)
    p2, s2, st, info = viterbi_pruned(le, su, stay, nxt, skip, 50.0)
    assert st == 0 and info[1] < 120
    np.testing.assert_array_equal(p2, path)
    assert s2 == score
    assert np.abs(np.argmax(np.diff(np.r_[0, p2]) > 0) - np.argmax(np.diff(np.r_[0, truth]) > 0)) <= 3


def test_viterbi_pruned_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(4):
        T, S, U = 6, 4, 3
        le = rng.normal(size=(T, U)) * 2
        su = rng.integers(0, U, S).astype(np.int64)
        stay, nxt, skip = random_chain(rng, S, True)
        ref_path, ref = naive.viterbi(le, su, stay, nxt, skip)
        p, sc, st, _ = viterbi_pruned(le, su, stay, nxt, skip, np.inf)
        assert sc == pytest.approx(ref)
        assert naive.path_score(le, su, stay, nxt, skip, p) == pytest.approx(ref)


def test_pruned_lattice_dies_when_the_beam_cuts_the_only_way_out():
    """Every frame but the last few fits state 0 best: the forward keeps state 0 and prunes the states ahead;
    at the end no kept state can reach the last one in time -> status 1 with a narrow beam, a path with a
    wide one (a retry-beam)."""
    T, S = 60, 6
    le = np.full((T, S), -40.0)
    le[:, 0] = 0.0
    le[-2:, -1] = 0.0
    su = np.arange(S, dtype=np.int64)
    stay, nxt, skip = np.full(S, 0.9), np.full(S, 0.1), np.zeros(S)
    stay[-1], nxt[-1] = 1.0, 0.0
    P = np.exp(le)
    assert forward_backward_pruned(P, su, stay, nxt, skip, S, 5.0, 0, NOPATH)[3] == 1
    assert viterbi_pruned(le, su, stay, nxt, skip, 5.0)[2] == 1
    occ, ll, xi, st, pp, _ = forward_backward_pruned(P, su, stay, nxt, skip, S, 400.0, 0, NOPATH)
    assert st == 0
    assert ll == pytest.approx(forward_backward(le, su, stay, nxt, skip)[1], rel=1e-10)
    assert viterbi_pruned(le, su, stay, nxt, skip, 400.0)[2] == 0


def test_pruned_working_set_is_what_it_allocates_and_bounded():
    """T = 20000 frames, S = 2000 states, beam 20: the kernel's reported working set (the sum of the arrays it
    allocates, float64 = 8 bytes) is far below the dense lattice's T x S x 8, and matches its own formula."""
    T, S, U = 20000, 2000, 25
    _, _, _, stay, nxt, skip, truth = chain_problem(T, S, seed=1)
    rng = np.random.default_rng(1)
    su = np.arange(S, dtype=np.int64) % U  # states cycle through U units (characters of a transcript)
    le = np.where(np.arange(U)[None, :] == (truth % U)[:, None], 0.0, -8.0) + rng.normal(size=(T, U))
    shift = le.max(1)
    P = np.exp(le - shift[:, None])
    occ, ll, xi, st, pp, info = forward_backward_pruned(P, su, stay, nxt, skip, U, 20.0, 0, NOPATH)
    assert st == 0
    L = int(np.ceil(np.sqrt(T)))  # T x S > 2**22: checkpoints every ceil(sqrt(T)) frames
    dense = T * S * 8
    fixed = (occ.size + xi.size + pp.size) * 8 + T * 4 * 8 + 5 * S * 8 + S * 8
    assert fixed <= info[0] <= fixed + (2 * (T // L + 1) + 2 * L) * info[1] * 8 + (T // L + 2 + L + 1 + 3) * 8 + 64 * 8
    assert info[0] < dense / 50 and info[0] - occ.nbytes < dense / 300, (info, dense)  # O(T U) + small
    np.testing.assert_allclose(occ.sum(1), 1.0, rtol=1e-9)
    assert (occ.argmax(1) == truth % U).mean() > 0.95
    le = np.log(P) + shift[:, None]
    path, score, vst, vinfo = viterbi_pruned(le, su, stay, nxt, skip, 20.0)
    assert vst == 0 and vinfo[0] < T * S / 20  # one byte per kept state-frame + O(T + S)
    assert np.abs(path - truth).mean() < 1.0


def test_pruned_underflow_is_status_2_and_the_aligner_redoes_it_in_the_log_domain():
    """A frame whose every emission is subnormal relative to the frame scale: status 2 (not 'no path'); the
    aligner's lattice helper then runs the exact log-domain kernel and gets its answer."""
    from types import SimpleNamespace

    from streamq.align import _lattice_posteriors

    rng = np.random.default_rng(2)
    T, S = 30, 5
    le = rng.normal(size=(T, S))
    le[10] -= 740.0  # exp(-740) ~ 4e-322: subnormal in the linear domain
    su = np.arange(S, dtype=np.int64)
    stay, nxt, skip = random_chain(rng, S, False)
    P = np.exp(le)
    assert forward_backward_pruned(P, su, stay, nxt, skip, S, np.inf, 0, NOPATH)[3] == 2
    g, ll, xi, _ = forward_backward(np.log(P), su, stay, nxt, skip)  # P's subnormals hold few bits
    est = SimpleNamespace(beam=None, retry_beam=None)
    occ, ll2, xi2, pp, used = _lattice_posteriors(est, P, np.zeros(T), su, S, stay, nxt, skip)
    assert used and ll2 == pytest.approx(ll, rel=1e-9)
    np.testing.assert_allclose(occ, g, atol=1e-9)
    # zero emissions everywhere at a frame: no path at all (status 1)
    P0 = np.exp(rng.normal(size=(T, S)))
    P0[12] = 0.0
    assert forward_backward_pruned(P0, su, stay, nxt, skip, S, np.inf, 0, NOPATH)[3] == 1


# --------------------------------------------------------------------------- sparse tied-mixture E-step
from streamq.kernels.lattice import sparse_counts, sparse_e_step, sparse_e_steps, sparse_emissions  # noqa: E402


def sparse_utterance(rng, T, S, C, n, n_units=None, K=None, skips=True, empty=True):
    """An aligner-like utterance with sparse emissions: a true path through S states of U <= S local units, each
    frame listing n of the utterance's C components (ex = 1 for its best), a corpus of n_units units x K comps."""
    U = max(1, (S + 1) // 2)
    n_units = n_units or U + 3
    K = K or C + 5
    state_unit = (np.arange(S) % U).astype(np.int64)
    units = np.sort(rng.choice(n_units, U, replace=False)).astype(np.int64)
    comps = np.sort(rng.choice(K, C, replace=False)).astype(np.int32)
    truth = np.sort(rng.integers(0, S, T))
    truth[0], truth[-1] = 0, S - 1
    cidx = np.stack([rng.choice(C, n, replace=False) for _ in range(T)]).astype(np.int32)
    # the true state's unit favours components (its own block of comps): likelihood-like contrast
    ex = np.exp(-rng.exponential(3.0, (T, n))).astype(np.float32)
    ex[:, 0] = 1.0
    if empty and T > 2 and n > 1:
        cidx[1, -1] = -1
        ex[1, -1] = 0.0
    WT = rng.dirichlet(np.ones(K), n_units).T.copy()  # (K, n_units)
    for t in range(T):  # make the listed components of frame t likely under the true unit
        WT[comps[cidx[t, 0]], units[state_unit[truth[t]]]] += 0.5
    WT /= WT.sum(0, keepdims=True)
    stay, nxt, skip = random_chain(rng, S, skips)
    stay[-1], nxt[-1], skip[-1] = 1.0, 0.0, 0.0
    if S > 1:
        skip[-2] = 0.0
        nxt[-2] = 1.0 - stay[-2]
    return cidx, ex, comps, units, state_unit, stay, nxt, skip, WT


def test_sparse_emissions_and_counts_match_reference():
    rng = np.random.default_rng(11)
    cidx, ex, comps, units, su, stay, nxt, skip, WT = sparse_utterance(rng, 30, 7, 9, 4)
    Wt = WT[np.ix_(comps, units)]
    P = sparse_emissions(cidx, ex, Wt)
    np.testing.assert_allclose(P, naive.sparse_emissions(cidx, ex, Wt), rtol=1e-12)
    occ = rng.uniform(size=P.shape)
    occ[:, -1] = 0.0
    for floor in (0.0, float(np.median(occ))):
        np.testing.assert_allclose(sparse_counts(cidx, ex, occ, P, Wt, floor),
                                   naive.sparse_counts(cidx, ex, occ, P, Wt, floor), rtol=1e-10, atol=1e-300)
    ex0 = ex.copy()
    ex0[:, 1:] = 0.0  # components that underflowed in float32 add nothing
    np.testing.assert_allclose(sparse_emissions(cidx, ex0, Wt), Wt[cidx[:, 0]], rtol=1e-12)


def check_sparse_e_step(case, beams=(np.inf,), floor=0.0):
    cidx, ex, comps, units, su, stay, nxt, skip, WT = case
    counts, res = sparse_e_step(cidx, ex, comps, units, su, stay, nxt, skip, WT, np.array(beams, float), floor)
    ref = naive.sparse_e_step(cidx, ex, comps, units, su, stay, nxt, skip, WT, beams, floor)
    if ref is None:
        assert res[1] == 1 and res[0] == -np.inf and not counts.any()
        return counts, res
    c_ref, ll_ref, x0_ref, xt_ref = ref
    assert res[1] == 0
    assert res[0] == pytest.approx(ll_ref, rel=1e-10, abs=1e-9)
    np.testing.assert_allclose(counts, c_ref, rtol=1e-9, atol=1e-12)
    assert res[2] == pytest.approx(x0_ref, rel=1e-9, abs=1e-12)
    assert res[3] == pytest.approx(xt_ref, rel=1e-9, abs=1e-12)
    return counts, res


@pytest.mark.parametrize("T,S,C,n,skips", [(1, 1, 1, 1, False), (6, 1, 3, 2, False), (5, 5, 4, 2, False),
                                            (40, 9, 12, 4, True), (120, 21, 30, 6, True)])
def test_sparse_e_step_matches_reference(T, S, C, n, skips):
    """Exact lattice (beam inf) and a finite beam: the naive dense forward-backward over the same windows; one
    state, one frame, fewer frames than states (no path)."""
    rng = np.random.default_rng(T + 7 * S)
    case = sparse_utterance(rng, T, S, C, n, skips=skips)
    counts, res = check_sparse_e_step(case)
    if T >= S:
        # every frame's occupancy is redistributed over its listed components
        assert counts.sum() == pytest.approx(T, rel=1e-9)
        assert res[3] == pytest.approx(T - 1, abs=1e-9)
    check_sparse_e_step(case, beams=(4.0,))
    check_sparse_e_step(case, beams=(4.0,), floor=1e-3)
    short = sparse_utterance(rng, max(1, S - 2), S, C, n, skips=False) if S > 2 else None
    if short is not None:
        check_sparse_e_step(short)


def test_sparse_e_step_every_component_listed_equals_dense():
    """n = C = K (every component listed, in a per-frame random order): the dense emissions' lattice and counts."""
    rng = np.random.default_rng(4)
    T, S, K = 50, 8, 6
    cidx, ex, comps, units, su, stay, nxt, skip, WT = sparse_utterance(rng, T, S, K, K, K=K, empty=False)
    comps = np.arange(K, dtype=np.int32)
    Wt = WT[np.ix_(comps, units)]
    Gx = np.zeros((T, K))
    for t in range(T):
        Gx[t, cidx[t]] = ex[t]
    from streamq.kernels.tied import mixture_counts, mixture_likelihoods, occupancy_by_unit

    Pd = mixture_likelihoods(Gx, Wt.T.copy())
    with np.errstate(divide="ignore"):
        g, ll, xi, _ = forward_backward(np.log(Pd), su, stay, nxt, skip)
    counts, res = sparse_e_step(cidx, ex, comps, units, su, stay, nxt, skip, WT, np.array([np.inf]), 0.0)
    assert res[1] == 0 and res[0] == pytest.approx(ll, rel=1e-10)
    dense = mixture_counts(Gx, occupancy_by_unit(g, su, len(units)), Pd, Wt.T.copy())
    np.testing.assert_allclose(counts.T, dense, rtol=1e-8, atol=1e-12)


def test_sparse_e_step_ties_and_retry_beam():
    """Identical frames (every state ties) give a symmetric, exact result; a beam too narrow for the path is
    retried at the next one (the index of the beam used is returned)."""
    rng = np.random.default_rng(8)
    T, S = 12, 4
    case = list(sparse_utterance(rng, T, S, 3, 3, skips=False, empty=False))
    case[0] = np.tile(np.array([[0, 1, 2]], np.int32), (T, 1))
    case[1] = np.ones((T, 3), np.float32)
    check_sparse_e_step(tuple(case))
    cidx, ex, comps, units, su, stay, nxt, skip, WT = sparse_utterance(rng, 80, 10, 12, 4)
    stay[:] = 0.95  # slow self-loops: the forward lags behind the end, a 1-nat beam loses the path
    nxt[:-1], skip[:] = 0.05, 0.0
    stay[-1], nxt[-1] = 1.0, 0.0
    c1, r1 = sparse_e_step(cidx, ex, comps, units, su, stay, nxt, skip, WT, np.array([1e-3]), 0.0)
    c2, r2 = sparse_e_step(cidx, ex, comps, units, su, stay, nxt, skip, WT, np.array([1e-3, np.inf]), 0.0)
    assert r1[1] == 1 and not c1.any()
    assert r2[1] == 0 and r2[6] == 1
    check_sparse_e_step((cidx, ex, comps, units, su, stay, nxt, skip, WT), beams=(1e-3, np.inf))


def test_sparse_e_step_long_lattice_counts_from_occupancies():
    """A lattice over 2**22 state-frames is checkpointed (counts from the occupancies afterwards instead of in
    the backward pass): the same counts as the one-segment pass to float64 rounding."""
    rng = np.random.default_rng(2)
    T, S = 2200, 2000
    cidx, ex, comps, units, su, stay, nxt, skip, WT = sparse_utterance(rng, T, S, 40, 3, skips=False)
    stay[:-1], nxt[:-1] = 1 - S / T, S / T
    beams = np.array([30.0, np.inf])
    counts, res = sparse_e_step(cidx, ex, comps, units, su, stay, nxt, skip, WT, beams, 1e-12)
    assert res[1] == 0
    Wt = WT[np.ix_(comps, units)]
    P = sparse_emissions(cidx, ex, Wt)
    occ, ll, xi, st, _, _ = forward_backward_pruned(P, su, stay, nxt, skip, len(units), beams[int(res[6])], T,
                                                    NOPATH)
    assert st == 0 and res[0] == pytest.approx(ll, rel=1e-12)
    np.testing.assert_allclose(counts, sparse_counts(cidx, ex, occ, P, Wt, 1e-12), rtol=1e-9, atol=1e-12)


def pack(cases):
    def ptr(xs):
        return np.concatenate([[0], np.cumsum([len(x) for x in xs])]).astype(np.int64)

    cols = list(zip(*cases))
    return (np.concatenate(cols[0]), np.concatenate(cols[1]), ptr(cols[0]), np.concatenate(cols[2]), ptr(cols[2]),
            np.concatenate(cols[3]), ptr(cols[3]), np.concatenate(cols[4]), np.concatenate(cols[5]),
            np.concatenate(cols[6]), np.concatenate(cols[7]), ptr(cols[4]))


def test_sparse_e_steps_batch_equals_utterances_and_ignores_threads():
    """The batch: each utterance's sparse_e_step, counts added into its lane (utterances without a lane are
    skipped); the same bits with 1 or 2 threads and when the batch is split in two."""
    import numba

    rng = np.random.default_rng(21)
    n_units, K = 9, 40
    cases = [sparse_utterance(rng, int(rng.integers(5, 60)), int(rng.integers(1, 9)), int(rng.integers(3, 12)), 3,
                              n_units=n_units, K=K) for _ in range(11)]
    WT = cases[0][8]
    cases = [c[:8] for c in cases]
    beams = np.array([20.0, np.inf])
    lane = np.arange(len(cases)) % 3
    lane[4] = -1
    ref = np.zeros((3, K, n_units))
    for i, c in enumerate(cases):
        counts, res = sparse_e_step(*c, WT, beams, 1e-12)
        if lane[i] >= 0 and res[1] == 0:
            np.add.at(ref[lane[i]], np.ix_(c[2], c[3]), counts)
    runs = []
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        lanes = np.zeros((3, K, n_units))
        res = sparse_e_steps(*pack(cases), lane, WT, beams, 1e-12, lanes)
        runs.append(lanes)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert res[4, 1] == 1 and res[4, 0] == -np.inf
    np.testing.assert_allclose(runs[0], ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(runs[0], runs[1])
    split = np.zeros((3, K, n_units))
    sparse_e_steps(*pack(cases[:5]), lane[:5], WT, beams, 1e-12, split)
    sparse_e_steps(*pack(cases[5:]), lane[5:], WT, beams, 1e-12, split)
    np.testing.assert_array_equal(split, runs[0])

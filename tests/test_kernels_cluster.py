"""Clustering kernels (assign, cluster_stats, ema_update, split, dead_codewords, repair_dead) against tests/naive.py."""

import numpy as np
import numpy.testing as npt
import pytest

import naive
from streamq.kernels.assign import assign, cluster_stats
from streamq.kernels.lloyd import dead_codewords, ema_update, repair_dead, split
from streamq.selection import GROUPED_FROM_K, codeword_groups, group_codewords, regroup_codewords


def check_assign(X, C, rtol=1e-5, max_share=1e-3, group_of=None):
    """Labels equal the float64 reference except at near-ties (relative to the *centred* norms); d2 matches."""
    lab, d2 = assign(X, C, group_of=group_of)
    assert lab.dtype == np.int64 and d2.dtype == np.float32
    assert lab.shape == (len(X),) and d2.shape == (len(X),)
    rlab, rd2, D2 = naive.assign(X, C)
    s = C.astype(np.float64).mean(0)
    scale = (((X.astype(np.float64) - s) ** 2).sum(1) + ((C.astype(np.float64) - s) ** 2).sum(1).max() + 1e-300)
    diff = np.nonzero(lab != rlab)[0]
    for i in diff:  # only true near-ties may differ
        assert abs(D2[i, lab[i]] - D2[i, rlab[i]]) <= rtol * scale[i], (i, lab[i], rlab[i])
    assert len(diff) <= max(1, int(len(X) * max_share))
    # d2 is the chosen codeword's distance, computed directly: float32 rounding of the float64 value
    npt.assert_allclose(d2, D2[np.arange(len(X)), lab], rtol=2 ** -23, atol=np.finfo(np.float32).tiny)
    assert (d2 >= 0).all()
    return lab, d2


# ---------------------------------------------------------------- assign
@pytest.mark.parametrize("B,K,D", [(1, 1, 1), (7, 1, 13), (100, 3, 1), (5, 9, 2), (9, 9, 13),
                                   (200, 256, 13), (1000, 37, 39), (97, 513, 128), (3000, 1024, 13)])
def test_assign_random(B, K, D):
    rng = np.random.default_rng(B * 1000 + K * 10 + D)
    X = rng.standard_normal((B, D), dtype=np.float32) * 3 + 1
    C = rng.standard_normal((K, D), dtype=np.float32) * 3 + 1
    check_assign(X, C)


def test_assign_hand_made():
    C = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    X = np.array([[1, 1], [9, 1], [1, 8], [0, 0], [6, 0]], dtype=np.float32)
    lab, d2 = assign(X, C)
    npt.assert_array_equal(lab, [0, 1, 2, 0, 1])
    npt.assert_array_equal(d2, [2, 2, 5, 0, 16])  # exact: computed directly, no expansion


def test_assign_n_smaller_than_k_and_d1():
    C = np.array([[5.0], [-1.0], [2.0], [9.0], [0.0]], np.float32)  # K = 5, D = 1, N = 2 < K
    lab, d2 = assign(np.array([[1.9], [7.1]], np.float32), C)
    npt.assert_array_equal(lab, [2, 3])
    npt.assert_allclose(d2, [0.01, 3.61], rtol=1e-6)


def test_assign_large_k_small_b():
    rng = np.random.default_rng(1)
    C = rng.standard_normal((65536, 13), dtype=np.float32)
    X = np.concatenate([C[[5, 65535, 40000]] + 1e-3, rng.standard_normal((50, 13), dtype=np.float32)])
    lab, _ = check_assign(X, C)
    npt.assert_array_equal(lab[:3], [5, 65535, 40000])


def test_assign_exact_ties_lowest_index():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((20, 5), dtype=np.float32)
    C = np.concatenate([base, base, base])  # every codeword three times: 0..19, 20..39, 40..59
    X = np.concatenate([base, rng.standard_normal((300, 5), dtype=np.float32)])
    lab, d2 = assign(X, C)
    assert lab.max() < 20
    npt.assert_array_equal(lab[:20], np.arange(20))
    npt.assert_array_equal(d2[:20], 0)
    # a point exactly half-way between two codewords (symmetric, exactly representable), also off-centre
    for off in (0.0, 1e4):
        C2 = np.array([[-1 + off, 0], [1 + off, 0]], dtype=np.float32)
        lab2, d22 = assign(np.full((50, 2), [off, 0], np.float32), C2)
        assert (lab2 == 0).all() and np.allclose(d22, 1)
        lab3, _ = assign(np.full((3, 2), [off, 0], np.float32), C2[::-1].copy())
        assert (lab3 == 0).all()
        assert (naive.assign(np.full((3, 2), [off, 0], np.float32), C2)[0] == 0).all()


def test_assign_duplicates_zero_distance_and_tile_edges():
    rng = np.random.default_rng(3)
    C = rng.standard_normal((50, 13), dtype=np.float32) * 20 + 300  # large norms: cancellation without centring
    for B in (1, 47, 48, 49, 95, 96, 97, 48 * 8 * 2 + 5):
        idx = rng.integers(0, 50, B)
        lab, d2 = assign(C[idx], C)
        npt.assert_array_equal(lab, idx)
        npt.assert_array_equal(d2, 0)


def test_assign_options_and_buffers():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((1000, 13), dtype=np.float32)
    C = rng.standard_normal((300, 13), dtype=np.float32)
    lab0, d20 = assign(X, C)
    for kb, tpg in [(4, 1), (8, 3), (100, 2), (10 ** 6, 16)]:
        lab, d2 = assign(X, C, kblock=kb, tiles_per_group=tpg)
        npt.assert_array_equal(lab, lab0)
        npt.assert_array_equal(d2, d20)
    ol = np.empty(1000, np.int64)
    od = np.empty(1000, np.float32)
    r = assign(X, C, out_labels=ol, out_d2=od)
    assert r[0] is ol and r[1] is od
    npt.assert_array_equal(ol, lab0)
    npt.assert_array_equal(assign(np.asfortranarray(X), C)[0], lab0)  # non-contiguous input
    assert assign(X[:0], C)[0].shape == (0,)


def test_assign_validation():
    X = np.zeros((3, 2), np.float32)
    with pytest.raises(TypeError, match="float32"):
        assign(X.astype(np.float64), X)
    with pytest.raises(ValueError):
        assign(X, np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError):
        assign(X, np.zeros((0, 2), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_assign_refuses_non_finite(bad):
    rng = np.random.default_rng(12)
    X = rng.standard_normal((200, 4), dtype=np.float32)
    C = rng.standard_normal((9, 4), dtype=np.float32)
    Xb = X.copy()
    Xb[137, 2] = bad
    with pytest.raises(ValueError, match="X row 137 holds NaN or inf"):
        assign(Xb, C)
    Cb = C.copy()
    Cb[4, 1] = bad
    with pytest.raises(ValueError, match="codebook C holds NaN or inf.*row 4"):
        assign(X, Cb)


def test_assign_huge_values():
    rng = np.random.default_rng(13)
    # 1e18-scale data and codebook: the expansion would overflow float32 without the power-of-two scale
    C = (rng.standard_normal((16, 3)) * 1e17).astype(np.float32)
    X = (C[rng.integers(0, 16, 300)] + rng.standard_normal((300, 3)) * 1e15).astype(np.float32)
    lab, d2 = check_assign(X, C)
    assert np.isfinite(d2).all()
    # points far beyond the codebook's scale (|x| 1e30, codebook ~1): labels still exact (fallback scan) ...
    C1 = rng.standard_normal((8, 2), dtype=np.float32)
    Xf = np.array([[1e30, 0], [0, -1e30], [-1e30, 1e30]], np.float32)
    with pytest.raises(ValueError, match="overflows float32"):  # ... but d2 ~ 1e60 cannot be float32
        assign(Xf, C1)
    Xs = (Xf * 1e-12).astype(np.float32)  # |x| 1e18, codebook ~1: finite d2 ~1e36
    lab, d2 = assign(Xs, C1)
    # float64 (x - c)^2 cannot resolve 1e18 +- 1 (its ulp there is 128); the expansion about 0 can
    C64, X64 = C1.astype(np.float64), Xs.astype(np.float64)
    npt.assert_array_equal(lab, ((C64 ** 2).sum(1)[None] - 2 * X64 @ C64.T).argmin(1))
    npt.assert_allclose(d2, naive.assign(Xs, C1)[1], rtol=1e-6)
    # the case: |x| 1e19 with a codebook of such frames is refused with one line, never NaN
    with pytest.raises(ValueError, match="overflows float32"):
        assign(np.full((4, 13), 1e19, np.float32), np.full((2, 13), -1e19, np.float32))
    # tiny values: no underflow to ties
    Ct = (rng.standard_normal((10, 3)) * 1e-30).astype(np.float32)
    Xt = (Ct[rng.integers(0, 10, 200)] + rng.standard_normal((200, 3)) * 1e-32).astype(np.float32)
    check_assign(Xt, Ct)


# -------------------------------------------------- numeric robustness: offset x scale table (issue 9 item 6)
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
@pytest.mark.parametrize("scale", [1e-3, 1e-1, 1.0, 1e1, 1e3])
def test_assign_offset_scale_table(offset, scale):
    X, C = naive.clustered_case(offset, scale, B=4000, K=64, D=13)
    lab, d2 = check_assign(X, C, max_share=1e-3)
    _, rd2, _ = naive.assign(X, C)
    loss, rloss = d2.astype(np.float64).mean(), rd2.mean()
    assert abs(loss - rloss) <= 1e-6 * rloss  # the case: 0.036 reported for a true 11.99


def test_assign_determinism():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((5000, 13), dtype=np.float32)
    C = rng.standard_normal((700, 13), dtype=np.float32)
    a = assign(X, C)
    b = assign(X, C)
    npt.assert_array_equal(a[0], b[0])
    npt.assert_array_equal(a[1], b[1])


# ---------------------------------------------------------------- cluster_stats
# -------------------------------------------------- assign by group bounds (group_of=): exact all the same
def partitions(C, seed=0):
    """Partitions the grouped search must be exact under: compact groups, random ones, one group, singletons."""
    K = len(C)
    rng = np.random.default_rng(seed)
    return {"compact": group_codewords(C), "random": rng.integers(0, max(1, K // 7), K),
            "one": np.zeros(K, np.int64), "singletons": np.arange(K)[::-1].copy()}


@pytest.mark.parametrize("B,K,D", [(1, 1, 1), (7, 1, 13), (100, 3, 1), (5, 9, 2), (200, 256, 13),
                                   (1000, 37, 39), (97, 513, 128), (3000, 2048, 13)])
def test_assign_grouped_matches_reference_under_any_partition(B, K, D):
    rng = np.random.default_rng(B * 1000 + K * 10 + D + 1)
    centres = rng.standard_normal((max(1, K // 8), D)) * 4 + 2  # clustered codewords, as a trained codebook
    C = (centres[rng.integers(0, len(centres), K)] + rng.standard_normal((K, D))).astype(np.float32)
    X = (C[rng.integers(0, K, B)] + rng.standard_normal((B, D)) * 1.5).astype(np.float32)
    labs = {}
    for name, g in partitions(C).items():
        labs[name] = check_assign(X, C, group_of=g)[0]
    for name, lab in labs.items():  # the labels do not depend on the partition (same float32 distances)
        npt.assert_array_equal(lab, labs["compact"], err_msg=name)


def test_assign_grouped_ties_duplicates_and_stale_partition():
    rng = np.random.default_rng(21)
    base = rng.standard_normal((20, 5), dtype=np.float32)
    C = np.concatenate([base, base, base])  # every codeword three times: the lowest index must win
    X = np.concatenate([base, rng.standard_normal((300, 5), dtype=np.float32)])
    for g in partitions(C).values():
        lab, d2 = assign(X, C, group_of=g)
        assert lab.max() < 20
        npt.assert_array_equal(lab[:20], np.arange(20))
        npt.assert_array_equal(d2[:20], 0)
    # a partition made for another codebook (the codewords have since moved far): slower, still exact
    C0 = (rng.standard_normal((300, 13)) * 3).astype(np.float32)
    g0 = group_codewords(C0)
    C1 = C0.copy()
    C1[::3] += rng.standard_normal((100, 13)).astype(np.float32) * 10
    X1 = (C1[rng.integers(0, 300, 2000)] + rng.standard_normal((2000, 13))).astype(np.float32)
    check_assign(X1, C1, group_of=g0)
    check_assign(X1, C1, group_of=regroup_codewords(C1, g0))


def test_assign_grouped_offsets_scales_and_huge_values():
    for offset in (0.0, 1e4):
        for scale in (1e-3, 1.0, 1e3):
            X, C = naive.clustered_case(offset, scale, B=3000, K=300, D=13)
            lab, d2 = check_assign(X, C, group_of=group_codewords(C))
            npt.assert_array_equal(lab, check_assign(X, C)[0][lab == lab])  # same labels as the fused scan here
    rng = np.random.default_rng(22)
    C = (rng.standard_normal((64, 3)) * 1e17).astype(np.float32)
    X = (C[rng.integers(0, 64, 300)] + rng.standard_normal((300, 3)) * 1e15).astype(np.float32)
    check_assign(X, C, group_of=group_codewords(C))
    # points far beyond the codebook's scale go to the fused scan: the same labels as without groups
    C1 = rng.standard_normal((8, 2), dtype=np.float32)
    Xs = np.array([[1e18, 0], [0, -1e18], [-1e18, 1e18], [0.5, 0.5]], np.float32)
    g1 = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    for a, b in zip(assign(Xs, C1, group_of=g1), assign(Xs, C1)):
        npt.assert_array_equal(a, b)
    Xb = X.copy()
    Xb[17, 1] = np.nan
    with pytest.raises(ValueError, match="X row 17 holds NaN or inf"):
        assign(Xb, C, group_of=group_codewords(C))
    with pytest.raises(ValueError, match="one group id per codeword"):
        assign(X, C, group_of=np.zeros(3, np.int64))


def test_codeword_groups_threshold_memo_and_regroup():
    rng = np.random.default_rng(23)
    small = rng.standard_normal((GROUPED_FROM_K - 1, 4)).astype(np.float32)
    assert codeword_groups(small) is None
    C = rng.standard_normal((GROUPED_FROM_K, 4)).astype(np.float32)
    g = codeword_groups(C)
    assert g.shape == (GROUPED_FROM_K,) and 40 <= len(np.unique(g)) <= 140  # ~2 sqrt(K) = 91 groups
    assert codeword_groups(C.copy()) is g  # memoised on the bytes
    C2 = C + np.float32(0.01)
    assert codeword_groups(C2) is not g
    r = regroup_codewords(C2, g)
    assert r.shape == g.shape and r.min() >= 0
    # compact groups prune: far fewer codewords scanned than K when the codewords are clustered (as a trained
    # codebook of speech is; a uniform cloud in 13 dimensions prunes little)
    from streamq.kernels.assign import _assign_grouped
    centres = rng.standard_normal((64, 13)) * 6
    Cc = (centres[rng.integers(0, 64, 4096)] + rng.standard_normal((4096, 13))).astype(np.float32)
    Xc = (Cc[rng.integers(0, 4096, 4000)] + rng.standard_normal((4000, 13)) * 0.3).astype(np.float32)
    lab, d2 = np.empty(4000, np.int64), np.empty(4000, np.float32)
    scanned = _assign_grouped(Xc, Cc, group_codewords(Cc), lab, d2)
    assert scanned.mean() < 4096 / 8
    npt.assert_array_equal(lab, assign(Xc, Cc)[0])
    # an isotropic cloud: the bounds do not pay, so after the 1024-point probe the fused scan takes over
    Cu = rng.standard_normal((4096, 13)).astype(np.float32)
    Xu = rng.standard_normal((3000, 13)).astype(np.float32)
    lab, d2 = np.empty(3000, np.int64), np.empty(3000, np.float32)
    scanned = _assign_grouped(Xu, Cu, group_codewords(Cu), lab, d2)
    assert (scanned[1024:] == 4096).all() and scanned[:1024].mean() > 4096 / 6
    check_assign(Xu, Cu, group_of=group_codewords(Cu))


@pytest.mark.parametrize("B,K,D,n_slices", [(1, 1, 1, None), (500, 7, 13, None), (20000, 64, 3, 2),
                                            (9000, 300, 13, 3), (5, 10, 4, 1), (3, 8, 2, 5), (200000, 5, 2, None)])
def test_cluster_stats_matches_reference(B, K, D, n_slices):
    rng = np.random.default_rng(B + K)
    X = (rng.standard_normal((B, D)) + 50).astype(np.float32)
    labels = rng.integers(0, K, B)
    d2 = rng.random(B, dtype=np.float32)
    shift = rng.standard_normal(D) + 50
    rc, rs, rq, re = naive.cluster_stats(X, labels, K, shift, d2)
    st = cluster_stats(X, labels, K, shift=shift, d2=d2, n_slices=n_slices)
    assert st.counts.dtype == np.int64 and st.sums.dtype == np.float64 and st.sq.dtype == np.float64
    npt.assert_array_equal(st.counts, rc)
    npt.assert_allclose(st.sums, rs, rtol=1e-10, atol=1e-9)
    npt.assert_allclose(st.sq, rq, rtol=1e-10, atol=1e-9)
    npt.assert_allclose(st.sse, re, rtol=1e-10, atol=1e-9)
    assert st.counts.sum() == B
    # first order only, no shift, no d2
    st1 = cluster_stats(X, labels, K, second_order=False, n_slices=n_slices)
    assert st1.sq is None and st1.sse is None
    npt.assert_allclose(st1.sums, naive.cluster_stats(X, labels, K)[1], rtol=1e-12)


def test_cluster_stats_slices_agree():
    rng = np.random.default_rng(14)
    X = rng.standard_normal((30000, 4), dtype=np.float32)
    labels = rng.integers(0, 17, 30000)
    a = cluster_stats(X, labels, 17, n_slices=1)
    b = cluster_stats(X, labels, 17, n_slices=4)
    npt.assert_array_equal(a.counts, b.counts)
    npt.assert_allclose(a.sums, b.sums, rtol=1e-12, atol=1e-10)
    npt.assert_allclose(a.sq, b.sq, rtol=1e-12, atol=1e-10)


def test_cluster_stats_empty_cluster_k1_and_validation():
    X = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    st = cluster_stats(X, np.array([0, 0, 2]), 4, d2=np.array([1, 2, 3], np.float32))
    npt.assert_array_equal(st.counts, [2, 0, 1, 0])
    npt.assert_array_equal(st.sums, [[4, 6], [0, 0], [5, 6], [0, 0]])
    npt.assert_array_equal(st.sq, [[10, 20], [0, 0], [25, 36], [0, 0]])
    npt.assert_array_equal(st.sse, [3, 0, 3, 0])
    st = cluster_stats(X, np.zeros(3, np.int64), 1, shift=[3, 4])  # K = 1 about the mean
    npt.assert_array_equal(st.sums, [[0, 0]])
    npt.assert_array_equal(st.sq, [[8, 8]])
    st = cluster_stats(X[:0], np.zeros(0, np.int64), 3, d2=np.zeros(0, np.float32))
    assert st.counts.sum() == 0 and st.sse.shape == (3,)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        cluster_stats(X, np.array([0, 4, 1]), 4)
    with pytest.raises(ValueError, match="shift"):
        cluster_stats(X, np.zeros(3, np.int64), 2, shift=[np.nan, 0])
    with pytest.raises(ValueError, match="NaN or inf"):
        cluster_stats(np.array([[np.nan, 1]], np.float32), np.zeros(1, np.int64), 2)
    with pytest.raises(TypeError):
        cluster_stats(X.astype(np.float64), np.zeros(3, np.int64), 2)


def test_cluster_stats_after_assign_centred_variances():
    """Second-order sums about a shift near the data give variances that plain sums about 0 lose."""
    rng = np.random.default_rng(10)
    X = (rng.normal(size=(4000, 3)) * 1e-3 + 1e4).astype(np.float32)
    C = X[:9].copy()
    labels, d2 = assign(X, C)
    shift = C.astype(np.float64).mean(0)
    st = cluster_stats(X, labels, 11, shift=shift, d2=d2)  # two clusters never used
    rc, rs, rq, re = naive.cluster_stats(X, labels, 11, shift, d2)
    npt.assert_array_equal(st.counts, rc)
    npt.assert_allclose(st.sq, rq, rtol=1e-10, atol=1e-18)
    npt.assert_allclose(st.sse, re, rtol=1e-6)
    assert st.counts[9] == 0 and st.counts[10] == 0
    ok = st.counts > 1
    var = st.sq[ok] / st.counts[ok, None] - (st.sums[ok] / st.counts[ok, None]) ** 2
    Xd = X.astype(np.float64)
    ref = np.array([Xd[labels == k].var(0) for k in np.flatnonzero(ok)])
    npt.assert_allclose(var, ref, rtol=1e-6, atol=1e-14)


# ---------------------------------------------------------------- ema_update
def test_ema_update_random_and_empty():
    rng = np.random.default_rng(7)
    K, D = 30, 13
    C = rng.standard_normal((K, D), dtype=np.float32)
    counts = rng.integers(0, 5, K)
    counts[[0, 7]] = 0
    sums = rng.standard_normal((K, D)) * counts[:, None]
    usage = rng.random(K)
    for decay, mu in [(0.9, 0.99), (0.5, 0.0), (1.0, 1.0)]:
        Cn, un = ema_update(C, sums, counts, decay, usage, mu)
        rC, ru = naive.ema_update(C, sums, counts, decay, usage, mu)
        assert Cn.dtype == np.float32 and un.dtype == np.float64
        npt.assert_allclose(Cn, rC, rtol=1e-6, atol=1e-6)
        npt.assert_allclose(un, ru, rtol=1e-12)
        npt.assert_array_equal(Cn[[0, 7]], C[[0, 7]])  # untouched when not hit
    Cn, un = ema_update(C, sums, np.zeros(K, np.int64), 0.3, usage, 0.5)
    npt.assert_array_equal(Cn, C)
    npt.assert_allclose(un, 0.5 * usage)
    with pytest.raises(ValueError, match="sums holds NaN"):
        ema_update(C, np.full((K, D), np.nan), counts, 0.5, usage, 0.5)
    with pytest.raises(ValueError, match="codebook C holds NaN"):
        ema_update(np.full((K, D), np.inf, np.float32), sums, counts, 0.5, usage, 0.5)


def test_ema_decay_zero_is_batch_mean_and_lloyd_never_raises_loss():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((4000, 13), dtype=np.float32)
    C = X[rng.choice(4000, 64, replace=False)].copy()
    C[3] = 100.0  # a codeword far away: empty cluster
    loss = []
    for _ in range(4):
        lab, d2 = assign(X, C)
        loss.append(d2.astype(np.float64).mean())
        st = cluster_stats(X, lab, len(C), d2=d2, second_order=False)
        Cn, _ = ema_update(C, st.sums, st.counts, 0.0, np.zeros(len(C)), 0.9)
        for k in range(len(C)):
            if st.counts[k]:
                npt.assert_array_equal(Cn[k], (X[lab == k].astype(np.float64).mean(0)).astype(np.float32))
        assert st.counts[3] == 0 and (Cn[3] == 100.0).all()
        C = Cn
    assert all(b <= a * (1 + 1e-6) for a, b in zip(loss, loss[1:]))


# ---------------------------------------------------------------- split
def test_split_layouts():
    C = np.array([[1, 2], [0, 0], [-3, 4]], np.float32)
    S = split(C, 0.5)
    npt.assert_allclose(S, [[1.5, 3], [0, 0], [-4.5, 6], [0.5, 1], [0, 0], [-1.5, 2]])
    npt.assert_allclose(S, naive.split(C, 0.5))
    sigma = np.array([1.0, 2.0], np.float32)
    S = split(C, 0.5, sigma=sigma)
    npt.assert_allclose(S, [[1.5, 3], [0.5, 1], [-2.5, 5], [0.5, 1], [-0.5, -1], [-3.5, 3]])
    S = split(C, 0.5, sigma=sigma, idx=np.array([2, 1]))
    npt.assert_allclose(S, [[1, 2], [0.5, 1], [-2.5, 5], [-3.5, 3], [-0.5, -1]])
    npt.assert_allclose(S, naive.split(C, 0.5, sigma, [2, 1]))
    S = split(C, 0.1, idx=np.array([], np.int64))
    npt.assert_array_equal(S, C)
    with pytest.raises(ValueError):
        split(C, 0.1, idx=[1, 1])
    with pytest.raises(ValueError):
        split(C, 0.1, sigma=np.ones(3))


@pytest.mark.parametrize("eps", [np.nan, np.inf])
def test_split_refuses_non_finite_eps(eps):
    C = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="split eps must be finite"):
        split(C, eps)
    with pytest.raises(ValueError, match="sigma holds NaN"):
        split(C, 0.1, sigma=[1, np.nan, 1])


def test_split_random_matches_reference():
    rng = np.random.default_rng(9)
    C = rng.standard_normal((17, 13), dtype=np.float32)
    idx = rng.choice(17, 6, replace=False)
    S = split(C, 0.01, idx=idx)
    npt.assert_allclose(S, naive.split(C, 0.01, idx=idx), rtol=1e-6)
    assert S.shape == (23, 13) and S.dtype == np.float32
    K1 = split(C[:1], 0.1)  # K = 1 (the first LBG stage)
    npt.assert_allclose(K1, naive.split(C[:1], 0.1), rtol=1e-6)


# ---------------------------------------------------------------- dead_codewords
def test_dead_codewords_streaming_rule():
    rng = np.random.default_rng(15)
    K = 40
    for B, ud, thr in [(64, 0.99, 0.01), (4096, 0.9, 0.2), (8, 0.0, 0.5), (100, 1.0, 0.1)]:
        idle = rng.integers(0, 300, K)
        age = rng.integers(0, 300, K)
        usage = rng.random(K) / K
        got = dead_codewords(idle, age, usage, B, ud, thr)
        npt.assert_array_equal(got, naive.dead_codewords(idle, age, usage, B, ud, thr))
        assert got.dtype == bool and got.shape == (K,)
    # hand-made: K = 4, B = 10 -> window max(20, 20) = 20; usage_decay 0.5 -> mature at age 2
    idle = np.array([19, 20, 0, 0])
    age = np.array([100, 100, 1, 2])
    usage = np.array([1.0, 1.0, 0.0, 0.0])
    npt.assert_array_equal(dead_codewords(idle, age, usage, 10, 0.5, 0.1), [False, True, False, True])
    assert dead_codewords([21], [0], [1.0], 1, 0.5, 0.1)[0] == (21 >= 50)  # K = 1, B = 1: window 50
    # K = 1: never idle, fair share 1 -> alive
    assert not dead_codewords([0], [1000], [1.0], 256, 0.99, 0.1).any()


def test_dead_codewords_whole_pass_rule():
    npt.assert_array_equal(dead_codewords(None, None, None, None, None, None, pass_counts=[3, 0, 1, 7]),
                           [False, True, False, False])  # LBG full pass: no frame in the whole pass
    occ = np.array([0.0, 4.5, 12.0, 10.0, 9.99])  # GMM: occupancy under min_count = 10
    npt.assert_array_equal(dead_codewords(None, None, None, None, None, None, pass_counts=occ, min_count=10),
                           [True, True, False, False, True])
    npt.assert_array_equal(dead_codewords(None, None, None, None, None, None, pass_counts=occ, min_count=10),
                           naive.dead_codewords(None, None, None, None, None, None, occ, 10))
    # every component under min_count (tiny data): only the empty ones are dead
    npt.assert_array_equal(dead_codewords(None, None, None, None, None, None, pass_counts=[0, 2, 3], min_count=10),
                           [True, False, False])


# ---------------------------------------------------------------- repair_dead
def test_repair_several_dead():
    rng = np.random.default_rng(10)
    K, D = 12, 13
    C = rng.standard_normal((K, D), dtype=np.float32)
    dead = np.zeros(K, bool)
    dead[[1, 4, 5, 9]] = True
    counts = np.where(dead, 0, rng.integers(1, 50, K))
    distortion = np.where(dead, 0.0, rng.random(K) * 10)
    distortion[7] = 100.0  # worst: gets the first dead one, then (halved, 50) the second
    distortion[2] = 40.0
    noise = np.random.default_rng(11).standard_normal((4, D), dtype=np.float32)
    Cn, n = repair_dead(C, dead, distortion, counts, 0.01, noise)
    rC, rn = naive.repair_dead(C, dead, distortion, counts, 0.01, noise)
    assert n == rn == 4
    npt.assert_allclose(Cn, rC, rtol=1e-6, atol=1e-7)
    # dead 1 <- donor 7 (100 -> 50 each); dead 4 <- donor 1 (tie 50/50, lowest index);
    # dead 5 <- donor 7 (50 > 40 > 25); dead 9 <- donor 2 (40)
    n0, n1, n2, n3 = noise.astype(np.float64) * 0.01
    c7 = C[7].astype(np.float64)
    npt.assert_allclose(Cn[4], c7 - n0 - n1, rtol=1e-5)
    npt.assert_allclose(Cn[1], c7 - n0 + n1, rtol=1e-5)
    npt.assert_allclose(Cn[5], c7 + n0 - n2, rtol=1e-5)
    npt.assert_allclose(Cn[7], c7 + n0 + n2, rtol=1e-5)
    npt.assert_allclose(Cn[9], C[2] - n3, rtol=1e-5)
    npt.assert_allclose(Cn[2], C[2] + n3, rtol=1e-5)
    untouched = [0, 3, 6, 8, 10, 11]
    npt.assert_array_equal(Cn[untouched], C[untouched])
    Cn2, _ = repair_dead(C, dead, distortion, counts, 0.01, noise)
    npt.assert_array_equal(Cn, Cn2)
    assert distortion[7] == 100.0  # inputs unchanged


def test_repair_edge_cases():
    C = np.ones((3, 2), np.float32)
    Cn, n = repair_dead(C, np.zeros(3, bool), np.ones(3), np.ones(3), 0.1, np.zeros((0, 2), np.float32))
    assert n == 0 and np.array_equal(Cn, C)
    Cn, n = repair_dead(C, np.ones(3, bool), np.zeros(3), np.zeros(3), 0.1, np.zeros((3, 2), np.float32))
    assert n == 0  # nobody alive to split
    assert naive.repair_dead(C, np.ones(3, bool), np.zeros(3), np.zeros(3), 0.1, np.zeros((3, 2)))[1] == 0
    with pytest.raises(ValueError):
        repair_dead(C, np.array([True, False, False]), np.ones(3), np.ones(3), 0.1, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="repair eps must be finite"):
        repair_dead(C, np.array([True, False, False]), np.ones(3), np.ones(3), np.nan, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="noise holds NaN"):
        repair_dead(C, np.array([True, False, False]), np.ones(3), np.ones(3), 0.1, np.full((1, 2), np.nan))


def test_parallel_kernels_run_their_serial_twin_with_one_thread():
    import threading

    import numba

    from streamq.kernels import assign as ka

    rng = np.random.default_rng(31)
    C = rng.standard_normal((300, 13)).astype(np.float32)
    X = rng.standard_normal((5000, 13)).astype(np.float32)
    ref = assign(X, C)
    out = {}

    def one_thread():  # set_num_threads is per thread, as in a Dask task
        numba.set_num_threads(1)
        out["fused"] = assign(X, C)
        out["grouped"] = assign(X, C, group_of=group_codewords(C))

    t = threading.Thread(target=one_thread)
    t.start()
    t.join()
    assert ka._assign_kernel.serial.signatures and ka._grouped_kernel.serial.signatures  # the twins ran
    for a, b in zip(out["fused"], ref):
        npt.assert_array_equal(a, b)
    npt.assert_array_equal(out["grouped"][1], check_assign(X, C, group_of=group_codewords(C))[1])

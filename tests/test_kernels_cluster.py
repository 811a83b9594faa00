"""Clustering kernels (assign, accumulate, ema_update, split, repair_dead) against NumPy references."""

import numpy as np
import numpy.testing as npt
import pytest

from streamq.kernels.assign import accumulate, assign, assign_accumulate
from streamq.kernels.lloyd import ema_update, repair_dead, split


# ---------------------------------------------------------------- references
def ref_d2(X, C):
    """float64 brute-force squared distances (B, K)."""
    X = X.astype(np.float64)
    C = C.astype(np.float64)
    return ((X[:, None, :] - C[None, :, :]) ** 2).sum(-1)


def ref_assign(X, C):
    D2 = ref_d2(X, C)
    lab = D2.argmin(1)  # first minimum = lowest index
    return lab, D2[np.arange(len(X)), lab], D2


def ref_accumulate(X, labels, d2, K):
    sums = np.zeros((K, X.shape[1]))
    counts = np.zeros(K, dtype=np.int64)
    sse = np.zeros(K)
    for i in range(len(X)):
        sums[labels[i]] += X[i]
        counts[labels[i]] += 1
        sse[labels[i]] += d2[i]
    return sums, counts, sse


def check_assign(X, C, rtol=1e-5):
    """Labels equal the float64 reference except at near-ties; d2 matches."""
    lab, d2 = assign(X, C)
    assert lab.dtype == np.int64 and d2.dtype == np.float32
    assert lab.shape == (len(X),) and d2.shape == (len(X),)
    rlab, rd2, D2 = ref_assign(X, C)
    scale = (X.astype(np.float64) ** 2).sum(1) + (C.astype(np.float64) ** 2).sum(1).max() + 1e-30
    diff = np.nonzero(lab != rlab)[0]
    for i in diff:  # only true near-ties may differ
        assert abs(D2[i, lab[i]] - D2[i, rlab[i]]) <= rtol * scale[i], (i, lab[i], rlab[i])
    assert len(diff) <= max(1, len(X) // 1000)
    npt.assert_allclose(d2, D2[np.arange(len(X)), lab], rtol=1e-4, atol=1e-5 * scale.max())
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
    npt.assert_allclose(d2, [2, 2, 5, 0, 16], atol=1e-5)


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
    # a point exactly half-way between two codewords (symmetric, exactly representable)
    C2 = np.array([[-1, 0], [1, 0]], dtype=np.float32)
    lab2, d22 = assign(np.zeros((50, 2), np.float32), C2)
    assert (lab2 == 0).all() and np.allclose(d22, 1)
    lab3, _ = assign(np.zeros((3, 2), np.float32), C2[::-1].copy())
    assert (lab3 == 0).all()


def test_assign_duplicates_zero_distance_and_tile_edges():
    rng = np.random.default_rng(3)
    C = rng.standard_normal((50, 13), dtype=np.float32) * 20  # large norms: cancellation
    for B in (1, 47, 48, 49, 95, 96, 97, 48 * 8 * 2 + 5):
        idx = rng.integers(0, 50, B)
        lab, d2 = assign(C[idx], C)
        npt.assert_array_equal(lab, idx)
        assert (d2 >= 0).all() and (d2 < 1e-2).all()


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
    # non-contiguous input is accepted and gives the same answer
    X2 = np.asfortranarray(X)
    npt.assert_array_equal(assign(X2, C)[0], lab0)
    assert assign(X[:0], C)[0].shape == (0,)


def test_assign_validation():
    X = np.zeros((3, 2), np.float32)
    with pytest.raises(TypeError, match="float32"):
        assign(X.astype(np.float64), X)
    with pytest.raises(ValueError):
        assign(X, np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError):
        assign(X, np.zeros((0, 2), np.float32))


def test_assign_deterministic():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((5000, 13), dtype=np.float32)
    C = rng.standard_normal((700, 13), dtype=np.float32)
    a = assign(X, C)
    b = assign(X, C)
    npt.assert_array_equal(a[0], b[0])
    npt.assert_array_equal(a[1], b[1])


# ---------------------------------------------------------------- accumulate
@pytest.mark.parametrize("B,K,D,n_slices", [(1, 1, 1, None), (500, 7, 13, None), (20000, 64, 3, 2),
                                            (9000, 300, 13, 3), (5, 10, 4, 1)])
def test_accumulate(B, K, D, n_slices):
    rng = np.random.default_rng(B + K)
    X = rng.standard_normal((B, D), dtype=np.float32)
    labels = rng.integers(0, K, B)
    d2 = rng.random(B, dtype=np.float32)
    sums, counts, sse = accumulate(X, labels, d2, K, n_slices=n_slices)
    rs, rc, re = ref_accumulate(X, labels, d2, K)
    assert sums.dtype == np.float64 and counts.dtype == np.int64 and sse.dtype == np.float64
    npt.assert_allclose(sums, rs, rtol=1e-10, atol=1e-9)
    npt.assert_array_equal(counts, rc)
    npt.assert_allclose(sse, re, rtol=1e-10, atol=1e-9)
    assert counts.sum() == B


def test_accumulate_empty_cluster_and_validation():
    X = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    sums, counts, sse = accumulate(X, np.array([0, 0, 2]), np.array([1, 2, 3], np.float32), 4)
    npt.assert_array_equal(counts, [2, 0, 1, 0])
    npt.assert_array_equal(sums, [[4, 6], [0, 0], [5, 6], [0, 0]])
    npt.assert_array_equal(sse, [3, 0, 3, 0])
    with pytest.raises(ValueError):
        accumulate(X, np.array([0, 4, 1]), np.zeros(3, np.float32), 4)


def test_assign_accumulate_matches_parts():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((3000, 13), dtype=np.float32)
    C = X[:100].copy()
    lab, d2, sums, counts, sse = assign_accumulate(X, C)
    rs, rc, re = ref_accumulate(X, lab, d2, 100)
    npt.assert_array_equal(counts, rc)
    npt.assert_allclose(sums, rs, rtol=1e-10, atol=1e-9)
    npt.assert_allclose(sse, re, rtol=1e-10, atol=1e-9)
    assert (counts >= 1).all()  # each codeword is its own point's nearest


# ---------------------------------------------------------------- ema_update
def ref_ema(C, sums, counts, decay, usage, mu):
    Cn = C.astype(np.float64).copy()
    for k in range(len(C)):
        if counts[k] > 0:
            Cn[k] = decay * Cn[k] + (1 - decay) * sums[k] / counts[k]
    B = counts.sum()
    un = mu * usage + (1 - mu) * (counts / B if B else 0)
    return Cn.astype(np.float32), un


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
        rC, ru = ref_ema(C, sums, counts, decay, usage, mu)
        assert Cn.dtype == np.float32 and un.dtype == np.float64
        npt.assert_allclose(Cn, rC, rtol=1e-6, atol=1e-6)
        npt.assert_allclose(un, ru, rtol=1e-12)
        npt.assert_array_equal(Cn[[0, 7]], C[[0, 7]])  # untouched when not hit
    # no input was modified
    Cn, un = ema_update(C, sums, np.zeros(K, np.int64), 0.3, usage, 0.5)
    npt.assert_array_equal(Cn, C)
    npt.assert_allclose(un, 0.5 * usage)


def test_ema_decay_zero_is_batch_mean_and_lloyd_never_raises_loss():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((4000, 13), dtype=np.float32)
    C = X[rng.choice(4000, 64, replace=False)].copy()
    C[3] = 100.0  # a codeword far away: empty cluster
    loss = []
    for _ in range(4):
        lab, d2 = assign(X, C)
        loss.append(d2.astype(np.float64).mean())
        sums, counts, sse = accumulate(X, lab, d2, len(C))
        Cn, _ = ema_update(C, sums, counts, 0.0, np.zeros(len(C)), 0.9)
        for k in range(len(C)):
            if counts[k]:
                npt.assert_array_equal(Cn[k], (X[lab == k].astype(np.float64).mean(0)).astype(np.float32))
        assert counts[3] == 0 and (Cn[3] == 100.0).all()
        C = Cn
    assert all(b <= a * (1 + 1e-6) for a, b in zip(loss, loss[1:]))


# ---------------------------------------------------------------- split
def test_split_layouts():
    C = np.array([[1, 2], [0, 0], [-3, 4]], np.float32)
    S = split(C, 0.5)
    npt.assert_allclose(S, [[1.5, 3], [0, 0], [-4.5, 6], [0.5, 1], [0, 0], [-1.5, 2]])
    sigma = np.array([1.0, 2.0], np.float32)
    S = split(C, 0.5, sigma=sigma)
    npt.assert_allclose(S, [[1.5, 3], [0.5, 1], [-2.5, 5], [0.5, 1], [-0.5, -1], [-3.5, 3]])
    S = split(C, 0.5, sigma=sigma, idx=np.array([2, 1]))
    npt.assert_allclose(S, [[1, 2], [0.5, 1], [-2.5, 5], [-3.5, 3], [-0.5, -1]])
    S = split(C, 0.1, idx=np.array([], np.int64))
    npt.assert_array_equal(S, C)
    with pytest.raises(ValueError):
        split(C, 0.1, idx=[1, 1])
    with pytest.raises(ValueError):
        split(C, 0.1, sigma=np.ones(3))


def test_split_random_matches_reference():
    rng = np.random.default_rng(9)
    C = rng.standard_normal((17, 13), dtype=np.float32)
    idx = rng.choice(17, 6, replace=False)
    S = split(C, 0.01, idx=idx)
    ref = np.concatenate([C, C[idx] * 0.99]).astype(np.float64)
    ref[idx] = C[idx].astype(np.float64) * 1.01
    npt.assert_allclose(S, ref, rtol=1e-6)
    assert S.shape == (23, 13) and S.dtype == np.float32


# ---------------------------------------------------------------- repair_dead
def ref_repair(C, dead, distortion, counts, eps, noise):
    C = C.astype(np.float64).copy()
    dist = distortion.astype(np.float64).copy()
    elig = (~dead) & (counts > 0)
    n = 0
    for i, k in enumerate(np.nonzero(dead)[0]):
        if not elig.any():
            break
        cand = np.where(elig, dist, -np.inf)
        j = int(np.argmax(cand))
        c = C[j].copy()
        C[j] = c + eps * noise[i]
        C[k] = c - eps * noise[i]
        dist[j] /= 2
        dist[k] = dist[j]
        elig[k] = True
        n += 1
    return C.astype(np.float32), n


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
    rC, rn = ref_repair(C, dead, distortion, counts, 0.01, noise)
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
    # determinism: the same inputs give the same output, inputs unchanged
    Cn2, _ = repair_dead(C, dead, distortion, counts, 0.01, noise)
    npt.assert_array_equal(Cn, Cn2)
    assert distortion[7] == 100.0


def test_repair_edge_cases():
    C = np.ones((3, 2), np.float32)
    Cn, n = repair_dead(C, np.zeros(3, bool), np.ones(3), np.ones(3), 0.1, np.zeros((0, 2), np.float32))
    assert n == 0 and np.array_equal(Cn, C)
    Cn, n = repair_dead(C, np.ones(3, bool), np.zeros(3), np.zeros(3), 0.1, np.zeros((3, 2), np.float32))
    assert n == 0  # nobody alive to split
    with pytest.raises(ValueError):
        repair_dead(C, np.array([True, False, False]), np.ones(3), np.ones(3), 0.1, np.zeros((2, 2)))

"""Tied-mixture emission kernels (diagonal Gaussians, per-unit mixtures and their counts) against tests/naive.py."""

import numpy as np
import pytest

import naive
from streamq.kernels.tied import (diag_gauss_loglik, frame_normalise, mixture_counts, mixture_likelihoods,
                                  occupancy_by_unit)


@pytest.mark.parametrize("T,K,D,offset", [(37, 6, 5, 0.0), (1, 1, 1, 0.0), (50, 9, 13, 1e4)])
def test_diag_gauss_loglik_matches_reference(T, K, D, offset):
    rng = np.random.default_rng(T + K)
    X = (offset + rng.normal(size=(T, D))).astype(np.float32)
    mu = offset + rng.normal(size=(K, D))
    var = rng.uniform(0.1, 3, (K, D))
    out = np.empty((T, K))
    diag_gauss_loglik(X, mu, var, out)
    np.testing.assert_allclose(out, naive.diag_gauss_loglik(X, mu, var), rtol=1e-10)  # direct form: no cancellation


def test_diag_gauss_loglik_huge_values_finite():
    X = np.array([[1e30, -1e30]], np.float32)
    out = np.empty((1, 2))
    diag_gauss_loglik(X, np.zeros((2, 2)), np.ones((2, 2)), out)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, naive.diag_gauss_loglik(X, np.zeros((2, 2)), np.ones((2, 2))), rtol=1e-12)


def test_frame_normalise():
    rng = np.random.default_rng(2)
    G = rng.normal(size=(20, 6)) * 10
    G[0, :] = -1e4  # a frame far from everything: no underflow after the shift
    G[1, 3] = -np.inf  # a zero-weight / impossible component
    ref_G, ref_shift = naive.frame_normalise(G)
    shift = frame_normalise(G)
    np.testing.assert_allclose(shift, ref_shift)
    np.testing.assert_allclose(G, ref_G, rtol=1e-14)
    np.testing.assert_allclose(G.max(1), 1.0)
    assert G[1, 3] == 0.0


def test_occupancy_by_unit():
    rng = np.random.default_rng(4)
    g = rng.uniform(size=(9, 7))
    su = np.array([0, 2, 2, 1, 0, 2, 3], np.int64)
    occ = occupancy_by_unit(g, su, 5)
    np.testing.assert_allclose(occ, naive.occupancy_by_unit(g, su, 5))
    assert not occ[:, 4].any()
    np.testing.assert_allclose(occupancy_by_unit(g[:1], su, 5), naive.occupancy_by_unit(g[:1], su, 5))  # T = 1


def test_mixture_likelihoods_and_counts():
    rng = np.random.default_rng(8)
    T, K, U = 23, 9, 4
    Gx = rng.uniform(size=(T, K))
    Gx[3] = 0.0  # a frame no component explains (after the shift this cannot happen, but must not crash)
    W = rng.dirichlet(np.ones(K), U)
    W[2, :5] = 0.0  # zero weights
    W[2] /= W[2].sum()
    P = mixture_likelihoods(Gx, W)
    np.testing.assert_allclose(P, naive.mixture_likelihoods(Gx, W), rtol=1e-12)
    occ = rng.uniform(size=(T, U))
    occ[:, 1] = 0.0  # a unit nobody occupies
    occ[3] = 0.0
    counts = mixture_counts(Gx, occ, P, W)
    np.testing.assert_allclose(counts, naive.mixture_counts(Gx, occ, P, W), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(counts.sum(1), occ.sum(0), rtol=1e-10)  # counts redistribute occupancy
    assert not counts[1].any() and not counts[2, :5].any()
    # K = 1: one Gaussian, every unit's mixture is that Gaussian
    P1 = mixture_likelihoods(Gx[:, :1], np.ones((U, 1)))
    np.testing.assert_allclose(P1, np.repeat(Gx[:, :1], U, 1))


# --------------------------------------------------------------------------- sparse (Gaussian-selected) emissions
from streamq.kernels.lattice import sparse_counts, sparse_emissions  # noqa: E402
from streamq.kernels.tied import sparse_frame_normalise  # noqa: E402


def sparse_case(rng, T, n, C, U, empty=True):
    idx = np.stack([rng.choice(C, n, replace=False) for _ in range(T)]).astype(np.int32)
    ll = -rng.exponential(5, (T, n)) - 1e3  # uncentred log-likelihoods
    if empty and T > 2 and n > 1:
        idx[1, -1] = -1  # an empty slot (fewer candidates than n)
        ll[1, -1] = -np.inf
    Wt = rng.dirichlet(np.ones(C), U).T.copy()
    return idx, ll, Wt


def test_sparse_frame_normalise():
    rng = np.random.default_rng(1)
    idx, ll, _ = sparse_case(rng, 20, 5, 9, 3)
    ll[4] = -np.inf  # a frame with nothing listed
    rel, shift = sparse_frame_normalise(ll)
    ref_rel, ref_shift = naive.sparse_frame_normalise(ll)
    np.testing.assert_array_equal(shift, ref_shift)
    np.testing.assert_array_equal(rel, ref_rel)
    assert rel.dtype == np.float32 and (rel[np.isfinite(rel)] <= 0).all() and (rel[[0, 2]].max(1) == 0).all()


@pytest.mark.parametrize("T,n,C,U", [(31, 4, 11, 5), (1, 1, 1, 1), (17, 6, 6, 3), (9, 3, 40, 1)])
def test_sparse_emissions_and_counts_edge_cases(T, n, C, U):
    rng = np.random.default_rng(T * n + C)
    idx, ll, Wt = sparse_case(rng, T, n, C, U)
    Wt[0, :] = 0.0  # a component no unit uses
    rel, shift = sparse_frame_normalise(ll)
    ex = np.exp(rel)  # the aligner's cache: linear likelihoods relative to the frame's shift
    P = sparse_emissions(idx, ex, Wt)
    np.testing.assert_allclose(P, naive.sparse_emissions(idx, ex, Wt), rtol=1e-12)
    occ = rng.uniform(size=(T, U))
    if U > 1:
        occ[:, -1] = 0.0  # a unit nobody occupies
    counts = sparse_counts(idx, ex, occ, P, Wt)
    np.testing.assert_allclose(counts, naive.sparse_counts(idx, ex, occ, P, Wt), rtol=1e-10, atol=1e-300)
    ok = (P > 0)
    np.testing.assert_allclose(counts.sum(0), (occ * ok).sum(0), rtol=1e-10)  # occupancy redistributed
    floor = float(np.median(occ))  # the floor skips the occupancies at or below it, exactly as the reference
    np.testing.assert_allclose(sparse_counts(idx, ex, occ, P, Wt, floor),
                               naive.sparse_counts(idx, ex, occ, P, Wt, floor), rtol=1e-10, atol=1e-300)
    assert not counts[0].any()
    if U > 1:
        assert not counts[:, -1].any()
    # only listed components receive counts
    listed = np.zeros(C, bool)
    listed[idx[idx >= 0]] = True
    assert not counts[~listed].any()


def test_sparse_with_every_component_equals_dense():
    """n = K with idx a per-frame permutation: the dense kernels' results, transposed."""
    rng = np.random.default_rng(5)
    T, K, U, D = 25, 7, 4, 3
    X = (100 + rng.normal(size=(T, D))).astype(np.float32)
    mu, var = 100 + rng.normal(size=(K, D)), rng.uniform(0.2, 2, (K, D))
    G = np.empty((T, K))
    diag_gauss_loglik(X, mu, var, G)
    idx = np.stack([rng.permutation(K) for _ in range(T)]).astype(np.int32)
    ll = np.take_along_axis(G, idx.astype(np.int64), 1)
    Gx = G.copy()
    shift = frame_normalise(Gx)
    rel, shift2 = sparse_frame_normalise(ll)
    np.testing.assert_allclose(shift2, shift)
    W = rng.dirichlet(np.ones(K), U)
    ex = np.exp(rel)
    P = sparse_emissions(idx, ex, W.T.copy())
    Pd = mixture_likelihoods(Gx, W)
    np.testing.assert_allclose(P, Pd, rtol=1e-6)  # rel is float32
    occ = rng.uniform(size=(T, U))
    np.testing.assert_allclose(sparse_counts(idx, ex, occ, P, W.T.copy()).T,
                               mixture_counts(Gx, occ, Pd, W), rtol=1e-5)


def test_sparse_huge_relative_values_underflow_to_nothing():
    idx = np.array([[0, 1], [1, -1]], np.int32)
    rel = np.array([[0.0, -1e4], [0.0, -np.inf]], np.float32)
    Wt = np.array([[0.5, 1.0], [0.5, 0.0]])
    ex = np.exp(rel)  # float32: e^-1e4 and e^-inf are 0
    P = sparse_emissions(idx, ex, Wt)
    np.testing.assert_allclose(P, [[0.5, 1.0], [0.5, 0.0]])
    counts = sparse_counts(idx, ex, np.ones((2, 2)), P, Wt)
    np.testing.assert_allclose(counts, [[1.0, 1.0], [1.0, 0.0]])  # frame 1 of unit 1: P = 0, nothing
    assert np.isfinite(counts).all()


def test_gather_weights_and_add_counts():
    from streamq.kernels.tied import add_counts, gather_weights

    rng = np.random.default_rng(9)
    W = rng.uniform(size=(7, 30))
    units = np.array([5, 0, 3], np.int64)
    comps = np.array([2, 29, 11, 12], np.int32)
    np.testing.assert_array_equal(gather_weights(W, units, comps), naive.gather_weights(W, units, comps))
    counts = rng.uniform(size=(4, 3))
    acc = rng.uniform(size=(7, 30))
    ref = naive.add_counts(acc, units, comps, counts)
    add_counts(acc, units, comps, counts)
    np.testing.assert_allclose(acc, ref, rtol=1e-15)
    one = np.zeros((1, 1))  # K = 1, one unit
    add_counts(one, np.zeros(1, np.int64), np.zeros(1, np.int32), np.full((1, 1), 2.5))
    assert one[0, 0] == 2.5

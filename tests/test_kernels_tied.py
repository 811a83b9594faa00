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

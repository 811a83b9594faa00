#!/usr/bin/env python
"""Benchmark hierarchical Gaussian selection (streamq.selection) against the exact diagonal-GMM E-step.

Model: a K-component diagonal GMM (default K = 16384, D = 13) initialised from a codebook on speech-like
synthetic frames (scripts/make_synthetic_store.py's generator): codebook = K random training frames refined
by ``--lloyd`` Lloyd passes (streamq.kernels.assign), then DiagGMM.init_from_codebook and ``--em`` exact EM
iterations on the ``--train`` frames. Test frames: ``--batch`` (65,536) frames of disjoint utterances.

Timed in one run, medians of ``--repeats`` (compile time kept out by a warm-up), all with the process's
threads (2 here):
  build          build_selection at each G (grouping + kernel arrays)
  exact          DiagGMM.score_samples(X) (kernels/gmm.diag_gmm_loglik: all K scored, float32 GEMM)
  exact E-step   kernels/gmm.diag_gmm_stats on the batch (one EM pass's per-frame cost)
  sgemm floor    z @ W for all K columns in float32 (BLAS, 2 threads, in row blocks): the floor of any
                 method that scores every component
  selected       select_topn + selected_loglik (score_samples with selection, top --n) at each (G, g), and
                 select_topn + selected_stats (an E-step with selection)
Quality vs the exact top-n (float64 NumPy oracle, all K components): recall of the exact top-n components,
mean / 99th percentile / max of (exact top-n log-sum-exp - selected top-n log-sum-exp) in nats, and the mean
gap of the selected value to the full (all-K) log-likelihood. Extrapolated EM pass time for --pass-frames.

    python scripts/bench_gselect.py                     # K = 16384, B = 65536, configs G:g
    python scripts/bench_gselect.py --K 1024 --batch 8192 --configs 64:4,64:8 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_time(fn, repeats):
    ts, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def make_model(K, D, n_train, n_lloyd, n_em, seed, cache=None):
    """(weights, means, variances) of a codebook-initialised DiagGMM on synthetic speech-like frames."""
    if cache and Path(cache).exists():
        z = np.load(cache)
        if z["means"].shape == (K, D):
            return z["weights"], z["means"], z["variances"]
    from make_synthetic_store import synth_frames

    from streamq.gmm import DiagGMM
    from streamq.kernels.assign import assign

    X = synth_frames(n_train, D, seed=seed)
    rng = np.random.default_rng(seed)
    C = X[rng.choice(len(X), K, replace=False)].copy()
    for _ in range(n_lloyd):
        lab, _ = assign(X, C)
        cnt = np.bincount(lab, minlength=K)
        S = np.zeros((K, D))
        np.add.at(S, lab, X.astype(np.float64))
        ok = cnt > 0
        C[ok] = (S[ok] / cnt[ok, None]).astype(np.float32)
    gmm = DiagGMM(K, max_iter=n_em, n_heldout=0)
    gmm.init_from_codebook(X, C)
    for _ in range(n_em):
        gmm.em_step(X)
    if cache:
        np.savez(cache, weights=gmm.weights_, means=gmm.means_, variances=gmm.variances_)
    return gmm.weights_, gmm.means_, gmm.variances_


def exact_top(X, w, mu, var, n, block=512):
    """Exact float64 top-n (ids, values) and full log-likelihood per frame, all K components (NumPy)."""
    from scipy.special import logsumexp

    N = len(X)
    prec = 1.0 / var
    lconst = np.log(w) - 0.5 * np.log(2 * np.pi * var).sum(1) - 0.5 * (mu * mu * prec).sum(1)
    A = np.ascontiguousarray((mu * prec).T)
    Bm = np.ascontiguousarray((-0.5 * prec).T)
    ids = np.empty((N, n), np.int64)
    vals = np.empty((N, n))
    full = np.empty(N)
    for a in range(0, N, block):
        x = X[a:a + block].astype(np.float64)
        L = lconst[None] + x @ A + (x * x) @ Bm
        p = np.argpartition(-L, n - 1, axis=1)[:, :n]
        v = np.take_along_axis(L, p, 1)
        o = np.argsort(-v, axis=1, kind="stable")
        ids[a:a + block] = np.take_along_axis(p, o, 1)
        vals[a:a + block] = np.take_along_axis(v, o, 1)
        full[a:a + block] = logsumexp(L, axis=1)
    return ids, vals, full


def sgemm_floor(X, shift, W32, block=2048):
    xc = (X.astype(np.float64) - shift).astype(np.float32)
    Z = np.ascontiguousarray(np.hstack([xc, xc * xc]))
    out = np.empty((block, W32.shape[1]), np.float32)
    for a in range(0, len(Z), block):
        z = Z[a:a + block]
        np.dot(z, W32, out=out[:len(z)])
    return out[0, 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", type=int, default=16384)
    ap.add_argument("--D", type=int, default=13)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--train", type=int, default=400_000)
    ap.add_argument("--lloyd", type=int, default=2)
    ap.add_argument("--em", type=int, default=1)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--configs", default="128:c,256:c,256:4,256:8,256:16,512:c",
                    help="comma-separated G:g (groups requested : groups searched per frame); g = 'c': the "
                         "calibrated default (Selection.n_search, 98%% recall of top-n on frames sampled from "
                         "the model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pass-frames", type=float, default=11e6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-cache", default=None, help=".npz to reuse the model between runs")
    a = ap.parse_args()

    from make_synthetic_store import synth_frames
    from threadpoolctl import threadpool_limits

    from streamq import selection as S
    from streamq.gmm import DiagGMM
    from streamq.kernels import gmm as kg
    from streamq.kernels import selection as ks

    nt = numba.get_num_threads()
    t0 = time.perf_counter()
    w, mu, var = make_model(a.K, a.D, a.train, a.lloyd, a.em, a.seed, a.model_cache)
    print(f"model: K={a.K} D={a.D}, codebook-initialised on {a.train:,} synthetic frames "
          f"({a.lloyd} Lloyd, {a.em} EM), {time.perf_counter() - t0:.1f} s; threads={nt}")
    X = synth_frames(a.batch, a.D, seed=a.seed, first_block=10 ** 6)
    gmm = DiagGMM.from_gaussians({"weights": w, "means": mu, "variances": var}, n_heldout=0)
    w = gmm.weights_

    t = time.perf_counter()
    ids, vals, full = exact_top(X, w, mu, var, a.n)
    from scipy.special import logsumexp
    top_lse = logsumexp(vals, axis=1)
    print(f"oracle (NumPy float64, all K): {time.perf_counter() - t:.1f} s; mean full loglik {full.mean():.4f}, "
          f"mean (full - exact top-{a.n}) {np.mean(full - top_lse):.4f} nats")

    # warm-up (compile) on a tiny input
    sel0 = S.build_selection(w[:64], mu[:64], var[:64], n_groups=8)
    S.selected_accumulate(X[:16], sel0, a.n, 2)
    gmm.score_samples(X[:16])

    B = len(X)
    t_exact, ll_exact = median_time(lambda: gmm.score_samples(X), a.repeats)
    shift, const, W = gmm._prepared()
    with threadpool_limits(1, user_api="blas"):
        t_estep, _ = median_time(lambda: kg.diag_gmm_stats(X, shift, const, W, nt, gmm._tile(), gmm._log_prune(), 0),
                                 a.repeats)
    W32 = np.ascontiguousarray(W, np.float32)
    t_gemm, _ = median_time(lambda: sgemm_floor(X, shift, W32), a.repeats)
    print(f"exact score_samples: {t_exact:.3f} s ({t_exact / B * 1e6:.2f} us/frame); mean |exact - oracle| "
          f"{np.abs(ll_exact - full).mean():.2e}")
    print(f"exact E-step (diag_gmm_stats): {t_estep:.3f} s ({t_estep / B * 1e6:.2f} us/frame) -> "
          f"{t_estep / B * a.pass_frames:.0f} s per {a.pass_frames / 1e6:.0f}M-frame pass")
    print(f"sgemm floor (B x 2D @ 2D x K, float32, BLAS): {t_gemm:.3f} s ({t_gemm / B * 1e6:.2f} us/frame)")
    print()
    hdr = (f"{'G':>5} {'g':>4} {'cal':>6} {'build s':>8} {'score s':>8} {'us/fr':>6} {'x exact':>7} {'x sgemm':>7} "
           f"{'E-step s':>8} {'x exact':>7} {'pass s':>7} {'recall':>7} {'err mean':>9} {'err p99':>8} "
           f"{'err max':>8} {'vs full':>8} {'cand':>6}")
    print(hdr)
    for cfg in a.configs.split(","):
        gs, gg = cfg.split(":")
        G = int(gs)
        t_build, sel = median_time(lambda: S.build_selection(w, mu, var, n_groups=G, seed=a.seed), a.repeats)
        g = sel.n_search if gg == "c" else int(gg)
        args = sel.kernel_args()

        def score():
            idx, ll = ks.select_topn(X, *args, a.n, g, nt, S.TILE)
            return idx, ll, ks.selected_loglik(ll, nt)

        def estep():
            idx, ll = ks.select_topn(X, *args, a.n, g, nt, S.TILE)
            return ks.selected_stats(X, sel.shift, idx, ll, a.K, nt)

        t_sel, (idx, ll, lse) = median_time(score, a.repeats)
        t_es, _ = median_time(estep, a.repeats)
        hit = (idx[:, :, None] == ids[:, None, :]).any(1).mean()
        err = top_lse - lse
        # members scored per frame (the selected groups' sizes): from the representatives' ranking
        sizes = np.diff(sel.member_ptr)
        Xc = X[:8192].astype(np.float64) - sel.shift
        R = sel.rep_const[None] + np.hstack([Xc, Xc * Xc]) @ sel.rep_W.astype(np.float64)
        top_g = np.argpartition(-R, min(g, sel.n_groups) - 1, axis=1)[:, :g]
        cand = sizes[top_g].sum(1).mean()
        cal = sel.recall_curve[g - 1]
        print(f"{sel.n_groups:5d} {g:4d} {cal:6.3f} {t_build:8.3f} {t_sel:8.3f} {t_sel / B * 1e6:6.2f} {t_exact / t_sel:7.1f} "
              f"{t_gemm / t_sel:7.2f} {t_es:8.3f} {t_estep / t_es:7.1f} {t_es / B * a.pass_frames:7.1f} "
              f"{hit:7.4f} {err.mean():9.5f} {np.percentile(err, 99):8.4f} {err.max():8.3f} "
              f"{np.mean(full - lse):8.4f} {cand:6.0f}")


    # the estimator's path: DiagGMM(gselect=n).score_samples (builds its selection on first use, then cached)
    try:
        g8 = DiagGMM.from_gaussians({"weights": w, "means": mu, "variances": var}, n_heldout=0, gselect=a.n)
        t = time.perf_counter()
        ll8 = g8.score_samples(X)
        t_first = time.perf_counter() - t
        t_cached, ll8 = median_time(lambda: g8.score_samples(X), a.repeats)
        print(f"\nDiagGMM(gselect={a.n}).score_samples: first call (builds the selection) {t_first:.3f} s "
              f"({t_exact / t_first:.1f}x faster than exact), cached {t_cached:.3f} s ({t_exact / t_cached:.1f}x); "
              f"mean (exact top-{a.n} - selected) {np.mean(top_lse - ll8):.5f} nats, "
              f"mean (full - selected) {np.mean(full - ll8):.5f}")
    except TypeError as e:  # the estimator's API may differ
        print(f"DiagGMM(gselect=...) path not measured: {e}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Numeric robustness of the assignment and GMM kernels on uncentred, rescaled and hostile data (issue 9 item 6).

Clustered float32 data is offset by 0 / 1e3 / 1e4 and scaled by 1e-3 .. 1e3; each kernel is compared with a
float64 brute-force reference (tests/naive.py). Then a list of bad inputs and what each gets.

    python scripts/numeric_robustness.py            # B = 20000 points, K = 256 codewords / 64 components
    python scripts/numeric_robustness.py --quick    # B = 4000, K = 64 / 16
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import naive  # noqa: E402  (the tests' float64 references and data generators)


def ref_d2(X, C, block=512):
    """float64 (B, K) squared distances by naive's direct form, in blocks (bounded memory)."""
    return np.concatenate([naive.sq_distances(X[i:i + block], C) for i in range(0, len(X), block)])


def assign_table(B, K, D, offsets, scales):
    from streamq.kernels.assign import assign

    print(f"assign (B={B}, K={K}, D={D}): streamq.kernels.assign.assign vs float64 brute force")
    print(f"  {'offset':>7} {'scale':>7} | {'labels agree':>12} {'loss rel.err':>12} | "
          f"{'uncentred f32 expansion: agree':>30} {'loss rel.err':>12}")
    for off in offsets:
        for sc in scales:
            X, C = naive.clustered_case(off, sc, B, K, D, seed=0)
            D2 = ref_d2(X, C)
            rlab = D2.argmin(1)
            rloss = D2[np.arange(B), rlab].mean()
            lab, d2 = assign(X, C)
            agree = (lab == rlab).mean()
            lerr = abs(d2.astype(np.float64).mean() - rloss) / rloss
            # the pre-fix formula, for contrast: ||x||^2 - 2 x.c + ||c||^2 in float32 about the origin
            Xn = (X * X).sum(1, dtype=np.float32)
            Cn = (C * C).sum(1, dtype=np.float32)
            E = Xn[:, None] - np.float32(2) * (X @ C.T) + Cn[None]
            olab = E.argmin(1)
            oloss = np.maximum(E[np.arange(B), olab], 0).astype(np.float64).mean()
            print(f"  {off:7.0e} {sc:7.0e} | {100 * agree:11.3f}% {lerr:12.1e} | {100 * (olab == rlab).mean():29.3f}% "
                  f"{abs(oloss - rloss) / rloss:12.1e}")
    print()


def gmm_table(N, K, D, offsets, scales):
    from streamq.kernels import gmm as kg

    print(f"GMM E-step (N={N}, K={K}, D={D}, float32 W as DiagGMM): streamq.kernels.gmm vs float64 direct form")
    print(f"  {'offset':>7} {'scale':>7} | shift = weights @ means (the contract):      | shift = 0 (contract violated):")
    print(f"  {'':>7} {'':>7} | {'loglik max err':>14} {'argmax agree':>12} {'total rel.err':>13} | "
          f"{'loglik max err':>14} {'argmax agree':>12}")
    for off in offsets:
        for sc in scales:
            X, w, mu, var = naive.gmm_case(off, sc, N, K, D, seed=0)
            L = naive.component_loglik(X, w, mu, var)
            rll = naive.logsumexp(L)
            rarg = L.argmax(1)
            row = []
            for shift in (w @ mu, np.zeros(D)):
                const, W = kg.gmm_precompute(w, mu, var, shift)
                W = np.ascontiguousarray(W, np.float32)
                ll, post = kg.diag_gmm_posteriors(X, shift, const, W, 2, 64, 50.0, 0)
                err = np.abs(ll - rll).max() / (1 + np.abs(rll).max())
                row.append((err, (post.argmax(1) == rarg).mean()))
                if len(row) == 1:
                    tot = kg.diag_gmm_stats(X, shift, const, W, 2, 64, 50.0, 0)[0]
                    terr = abs(tot - rll.sum()) / abs(rll.sum())
            (e1, a1), (e0, a0) = row
            print(f"  {off:7.0e} {sc:7.0e} | {e1:14.1e} {100 * a1:11.3f}% {terr:13.1e} | {e0:14.1e} {100 * a0:11.3f}%")
    print("  (loglik max err: max |ll - ref| / (1 + max |ref|) over frames)\n")


def bad_inputs():
    from streamq.kernels import gmm as kg
    from streamq.kernels.assign import assign, cluster_stats
    from streamq.kernels.lloyd import repair_dead, split

    rng = np.random.default_rng(1)
    X = rng.standard_normal((100, 13), dtype=np.float32)
    C = rng.standard_normal((8, 13), dtype=np.float32)
    w, mu, var = np.full(8, 1 / 8), C.astype(np.float64), np.ones((8, 13))
    sh = w @ mu
    const, W = kg.gmm_precompute(w, mu, var, sh)
    W32 = W.astype(np.float32)

    def put(a, v, i=(5, 3)):
        a = a.copy()
        a[i] = v
        return a

    cases = [
        ("assign: NaN in X", lambda: assign(put(X, np.nan), C)),
        ("assign: inf in X", lambda: assign(put(X, np.inf), C)),
        ("assign: NaN in codebook", lambda: assign(X, put(C, np.nan))),
        ("assign: |x| = 1e19 (frames and codebook)", lambda: assign(np.full((4, 13), 1e19, np.float32),
                                                                    np.full((2, 13), -1e19, np.float32))),
        ("assign: |x| = 1e30, codebook ~1", lambda: assign(put(X, 1e30), C)),
        ("assign: |x| = 1e18, codebook ~1", lambda: assign(put(X, 1e18), C)[1][5]),
        ("cluster_stats: NaN in X", lambda: cluster_stats(put(X, np.nan), np.zeros(100, np.int64), 8)),
        ("split: eps = nan", lambda: split(C, float("nan"))),
        ("split: eps = inf", lambda: split(C, float("inf"))),
        ("repair_dead: eps = nan", lambda: repair_dead(C, np.eye(8, dtype=bool)[0], np.ones(8), np.ones(8),
                                                        float("nan"), np.zeros((1, 13), np.float32))),
        ("gmm_precompute: NaN means", lambda: kg.gmm_precompute(w, put(mu, np.nan, (0, 0)), var, sh)),
        ("diag_gmm_loglik: NaN frame", lambda: kg.diag_gmm_loglik(put(X, np.nan), sh, const, W32, 2, 64, 50.0, 0)),
        ("diag_gmm_loglik: 1e30 frame (float32 W)",
         lambda: kg.diag_gmm_loglik(put(X, 1e30), sh, const, W32, 2, 64, 50.0, 0)[5]),
        ("diag_gmm_stats: 3e38 frame (float32 W)",
         lambda: kg.diag_gmm_stats(put(X, 3e38), sh, const, W32, 2, 64, 50.0, 0)[0]),
        ("diag_gmm_stats: 1e200 frame (float64)",
         lambda: kg.diag_gmm_stats(put(X.astype(np.float64), 1e200), sh, const, W, 2, 64, 50.0, 0)[0]),
    ]
    print("bad inputs to the public kernel wrappers, and what each gets:")
    for name, f in cases:
        try:
            r = f()
            out = f"returns {float(r):.4g} (finite)" if np.isfinite(r) else f"returns {r} (NOT FINITE)"
        except (ValueError, TypeError) as e:
            out = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 -- reported, never expected
            out = f"UNEXPECTED {type(e).__name__}: {e}"
        print(f"  {name:<42} -> {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    a = ap.parse_args()
    B, K, N, KG = (4000, 64, 2000, 16) if a.quick else (20000, 256, 5000, 64)
    offsets = [0.0, 1e3, 1e4]
    scales = [1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3]
    assign_table(B, K, 13, offsets, scales)
    gmm_table(N, KG, 13, offsets, scales)
    bad_inputs()


if __name__ == "__main__":
    main()

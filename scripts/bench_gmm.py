"""Benchmark the streaming diagonal-GMM E-step.

Default: E-step throughput (frames x components per second) of streamq against scikit-learn's
GaussianMixture(covariance_type='diag') on the same 200,000 synthetic 13-dim frames and the same K = 1024
parameters, in one run, as medians of --repeats runs (compile time excluded by a warm-up), with ratios.
streamq's E-step includes the sufficient statistics; sklearn's ``_e_step`` does not (its statistics are
in ``_m_step``), so both "E-step" and "E-step + statistics" are timed for sklearn.
Also: the effect of Gaussian selection on the held-out log-likelihood after a few EM iterations.

``--big``: K = 16384 on a synthetic 11,000,000-frame store (written once to --store-dir): seconds per EM
iteration and peak resident memory, with and without Gaussian selection. A full pass at K = 16384 does
not fit this machine's time budget, so each EM iteration runs on a fixed, stated subsample streamed from
the big store (--big-frames) and the full-pass time is extrapolated linearly (the E-step is linear in N).

    python scripts/bench_gmm.py [--repeats 3] [--big --big-frames 50000 --store-dir /tmp/streamq_big]
    python scripts/bench_gmm.py --big-only --big-iters 1 --big-frames 50000 --big-full 8   # + one full pass
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time
import warnings

import numba
import numpy as np


def synth(n, d, k_true, seed):
    """MFCC-like synthetic frames: a k_true-cluster mixture with per-dimension scales like cepstra."""
    rng = np.random.default_rng(seed)
    scale = np.concatenate([[15.0], 10.0 / (1 + np.arange(1, d))])
    centres = rng.normal(size=(k_true, d)) * scale
    lab = rng.integers(0, k_true, n)
    return (centres[lab] + rng.normal(size=(n, d)) * scale * 0.4).astype(np.float32)


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def model_from(X, K, seed):
    rng = np.random.default_rng(seed)
    means = X[rng.choice(len(X), K, replace=False)].astype(np.float64)
    var = np.tile(X.var(0).astype(np.float64) * 0.1, (K, 1))
    return np.full(K, 1.0 / K), means, var


def bench_small(args):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky, _estimate_gaussian_parameters

    from streamq.artifacts import Gaussians
    from streamq.gmm import DiagGMM

    N, K, D = args.frames, args.k, 13
    X = synth(N, D, 256, 0)
    w, m, v = model_from(X, K, 1)
    print(f"E-step, N = {N:,} frames, K = {K}, D = {D}, {numba.get_num_threads()} Numba threads; "
          f"median of {args.repeats} runs")
    fc = N * K
    res = {}
    for name, kw in [("streamq fp32-GEMM", dict(dot_dtype="float32")),
                     ("streamq fp64-GEMM", dict(dot_dtype="float64")),
                     ("streamq gselect=32", dict(gselect=32)),
                     ("streamq gselect=8", dict(gselect=8))]:
        g = DiagGMM.from_gaussians(Gaussians.checked(w, m, v), n_heldout=0, batch_size=65536, **kw)
        g.accumulate(X[:2000])  # compile / warm up
        res[name] = median_time(lambda: g.accumulate(X), args.repeats)

    sk = GaussianMixture(K, covariance_type="diag")
    sk.weights_, sk.means_, sk.covariances_ = w, m, v
    sk.precisions_cholesky_ = _compute_precision_cholesky(v, "diag")
    X64 = X.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk._e_step(X64[:2000])
        res["sklearn _e_step"] = median_time(lambda: sk._e_step(X64), args.repeats)

        def e_and_stats():
            _, log_resp = sk._e_step(X64)
            _estimate_gaussian_parameters(X64, np.exp(log_resp), sk.reg_covar, "diag")

        res["sklearn _e_step + stats"] = median_time(e_and_stats, args.repeats)
    base = res["sklearn _e_step"]
    base2 = res["sklearn _e_step + stats"]
    print(f"{'method':26s} {'seconds':>9s} {'Mfc/s':>9s} {'vs sk E':>8s} {'vs sk E+stats':>14s}")
    for name, t in res.items():
        print(f"{name:26s} {t:9.3f} {fc / t / 1e6:9.1f} {base / t:7.1f}x {base2 / t:13.1f}x")

    # gselect's effect on held-out log-likelihood: same init, 5 EM iterations each
    Xh = synth(20000, D, 256, 99)
    print(f"\nEM from the same init, 5 iterations on the {N:,} frames, held-out = 20,000 other frames:")
    print(f"{'E-step':16s} {'held-out nats/frame':>20s} {'s / iteration':>14s}")
    for gs in (None, 32, 8, 2):
        g = DiagGMM.from_gaussians(Gaussians.checked(w, m, v), n_heldout=0, batch_size=65536, gselect=gs, min_count=1)
        for _ in range(5):
            g.em_step(X)
        ts = [r["em_seconds"] for r in g.history_]
        print(f"{'all components' if gs is None else f'gselect={gs}':16s} {g.score_samples(Xh).mean():20.4f} "
              f"{statistics.median(ts):14.2f}")


class PeakRSS:
    """Sample this process's resident memory every 50 ms (ru_maxrss would include the store writer)."""

    def __init__(self):
        import psutil

        self.p, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.peak = self.p.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.p.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self.t.join()
        self.peak = max(self.peak, self.p.memory_info().rss)


def make_big_store(path, n, d, seed=0):
    from streamq.store import FrameStore

    if os.path.exists(os.path.join(path, "zarr.json")):
        st = FrameStore.open(path)
        if st.n_frames >= n and st.dim == d:
            return st
        raise SystemExit(f"{path}: holds {st.n_frames} frames of dim {st.dim}; remove it or pick --store-dir")
    st = FrameStore.create(path, d)
    step, utt = 1_000_000, 1000
    t0 = time.perf_counter()
    with st.writer_lock():
        for s in range(0, n, step):
            X = synth(min(step, n - s), d, 4096, seed + s)
            st.append([{"id": f"u{s + i}", "frames": X[i:i + utt]} for i in range(0, len(X), utt)])
            print(f"  wrote {s + len(X):,} / {n:,} frames ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return st


def bench_big(args):
    from streamq.artifacts import Gaussians
    from streamq.gmm import DiagGMM
    from streamq.store import FrameStore

    K, D, N = 16384, 13, args.big_n
    print(f"\n--big: K = {K}, store of {N:,} frames at {args.store_dir}")
    make_big_store(args.store_dir, N, D)
    st = FrameStore.open(args.store_dir)
    init = st.sample(K, seed=5)
    w = np.full(K, 1.0 / K)
    v = np.tile(init.var(0).astype(np.float64) * 0.05, (K, 1))
    sub = args.big_frames
    print(f"each EM iteration streams a fixed subsample of {sub:,} frames from the store "
          f"(batches of 65,536 through the shuffled chunk reader); full-pass time = per-frame time x {N:,}")
    print(f"{'E-step':16s} {'s/iter (sub)':>13s} {'us/frame':>9s} {'extrap. s/iter (11M)':>21s} "
          f"{'peak RSS MB':>12s} {'held-out':>9s}")
    for gs in (None, 64, 8):
        g = DiagGMM.from_gaussians(Gaussians.checked(w, init, v), n_heldout=20000, batch_size=65536, gselect=gs, subsample=sub, min_count=1,
                    verbose=0)
        g.set_heldout(st)
        g.accumulate(init[:256])  # compile / warm up
        with PeakRSS() as mem:
            for _ in range(args.big_iters):
                g.em_step(st)
        t = statistics.median(r["em_seconds"] for r in g.history_)  # E-step pass + M-step, not held-out scoring
        print(f"{'all components' if gs is None else f'gselect={gs}':16s} {t:13.2f} {t / sub * 1e6:9.1f} "
              f"{t / sub * N:21.0f} {mem.peak / 2**20:12.0f} {g.history_[-1]['heldout_loglik']:9.3f}")
    if args.big_full is not None:
        gs = args.big_full or None
        g = DiagGMM.from_gaussians(Gaussians.checked(w, init, v), n_heldout=20000, batch_size=65536, gselect=gs, min_count=1,
                    verbose=1)
        g.set_heldout(st)
        g.accumulate(init[:256])
        with PeakRSS() as mem:
            g.em_step(st)
        r = g.history_[-1]
        print(f"full pass over all {N:,} frames, {'all components' if gs is None else f'gselect={gs}'}: "
              f"{r['em_seconds']:.0f} s for the EM iteration ({r['em_seconds'] / N * 1e6:.1f} us/frame), "
              f"peak RSS {mem.peak / 2**20:.0f} MB, held-out {r['heldout_loglik']:.3f}")
    print(f"process max RSS over the whole run (ru_maxrss, includes writing the store): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", action="store_true", help="also the K = 16384, 11M-frame store measurement")
    ap.add_argument("--big-only", action="store_true", help="only the --big measurement")
    ap.add_argument("--big-n", type=int, default=11_000_000)
    ap.add_argument("--big-frames", type=int, default=50_000, help="fixed subsample per EM iteration")
    ap.add_argument("--big-iters", type=int, default=2)
    ap.add_argument("--big-full", type=int, default=None, metavar="GSELECT",
                    help="also one full EM pass over the big store (0 = all components, n = gselect n)")
    ap.add_argument("--store-dir", default="/tmp/streamq_bench_big_store")
    args = ap.parse_args()
    if not args.big_only:
        bench_small(args)
    if args.big or args.big_only:
        bench_big(args)


if __name__ == "__main__":
    main()

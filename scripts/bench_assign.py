#!/usr/bin/env python
"""Benchmark nearest-codeword assignment: streamq vs faiss vs scikit-learn vs blocked BLAS.

Two streamq rows: the fused scan (``assign(X, C)``) and the exact search by group bounds
(``assign(X, C, group_of=codeword_groups(C))``, what the trainers use from K = 2048; its one-off grouping
time is printed beside it). Group bounds pay on structured data (speech frames, a trained codebook), not on
an isotropic Gaussian cloud in 13 dimensions (the default data): pass ``--store`` (frames from a streamq
store) and ``--codebook`` (a trained ``codebook.npy``; default: K frames sampled from the store).

All peers run with 2 threads in the same process, interleaved repeat by repeat, and
the table reports medians and ratios (timings on a shared machine are noisy; compare
ratios, not lone absolute times). Compile time is kept out (every method is warmed up).

    python scripts/bench_assign.py --n 1000000 --d 13 --ks 256,1024,4096,16384 --repeats 5
    python scripts/bench_assign.py --store /tmp/streamq_synth_11M --codebook /tmp/bench_recipe/codebook/codebook.npy
"""

import argparse
import os
import sys
import time

_BAD_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(v in os.environ for v in _BAD_ENV) and not os.environ.get("_BENCH_ASSIGN_REEXEC"):
    # these force a slow OpenBLAS kernel on this machine: re-run this script without them
    env = {k: v for k, v in os.environ.items() if k not in _BAD_ENV}
    env["_BENCH_ASSIGN_REEXEC"] = "1"
    print(f"re-executing without {[v for v in _BAD_ENV if v in os.environ]}", flush=True)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="points per search")
    ap.add_argument("--d", type=int, default=13, help="dimension")
    ap.add_argument("--ks", default="256,1024,4096,16384", help="comma-separated codebook sizes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sklearn", action="store_true", help="skip KMeans.predict (slow at large K)")
    ap.add_argument("--store", default=None, help="take the points from this streamq store (its first --n frames)")
    ap.add_argument("--codebook", default=None, help="a (K, D) .npy codebook (sets --ks to its K)")
    args = ap.parse_args()
    T = args.threads

    import faiss
    import numba
    from threadpoolctl import threadpool_info, threadpool_limits

    from streamq.kernels.assign import assign
    from streamq.selection import codeword_groups

    numba.set_num_threads(T)
    faiss.omp_set_num_threads(T)
    threadpool_limits(T)
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            print(f"BLAS: {info.get('internal_api')} {info.get('version')} kernel={info.get('architecture')} "
                  f"threads={info.get('num_threads')} ({os.path.basename(info.get('filepath', ''))})")
    print(f"faiss {faiss.__version__}, numba {numba.__version__} ({numba.get_num_threads()} threads), "
          f"numpy {np.__version__}; n={args.n} d={args.d} repeats={args.repeats}")

    # machine limit: a large sgemm
    A = np.random.default_rng(1).standard_normal((4096, 4096), dtype=np.float32)
    A @ A
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        A @ A
        ts.append(time.perf_counter() - t)
    sgemm = 2 * 4096 ** 3 / np.median(ts) / 1e9
    del A
    print(f"sgemm 4096^3 float32: {sgemm:.1f} GFLOP/s (median of 3)\n")

    rng = np.random.default_rng(args.seed)
    store = None
    if args.store:
        from streamq.store import FrameStore

        store = FrameStore.open(args.store)
        X = store.read(0, min(args.n, store.n_frames))
        args.n, args.d = X.shape
    else:
        X = rng.standard_normal((args.n, args.d), dtype=np.float32)
    fixed = np.load(args.codebook).astype(np.float32) if args.codebook else None
    if fixed is not None:
        args.ks = str(len(fixed))
    out_l = np.empty(args.n, np.int64)
    out_d = np.empty(args.n, np.float32)

    def blocked_numpy(X, C, cn, bs=512):
        lab = np.empty(len(X), np.int64)
        Ct = np.ascontiguousarray(-2.0 * C.T)
        for i in range(0, len(X), bs):
            Dm = X[i:i + bs] @ Ct
            Dm += cn
            lab[i:i + bs] = Dm.argmin(1)
        return lab

    for K in [int(k) for k in args.ks.split(",")]:
        if fixed is not None:
            C = np.ascontiguousarray(fixed)
        elif store is not None:
            C = store.sample(K, seed=args.seed + 1)
        else:
            C = rng.standard_normal((K, args.d), dtype=np.float32)
        t = time.perf_counter()
        groups = codeword_groups(C)
        t_group = time.perf_counter() - t
        cn = (C.astype(np.float64) ** 2).sum(1).astype(np.float32)
        index = faiss.IndexFlatL2(args.d)
        index.add(C)
        methods = {
            "streamq": lambda: assign(X, C, out_labels=out_l, out_d2=out_d),
            "streamq-grouped": lambda: assign(X, C, out_labels=out_l, out_d2=out_d, group_of=groups),
            "faiss": lambda: index.search(X, 1),
            "numpy-blocked": lambda: blocked_numpy(X, C, cn),
        }
        if not args.no_sklearn:
            from sklearn.cluster import KMeans
            km = KMeans(n_clusters=K, n_init=1, max_iter=1, random_state=0).fit(C)
            km.cluster_centers_ = C.copy()
            methods["sklearn-predict"] = lambda: km.predict(X)
        # warm-up on a slice (Numba compile / cache load, thread pools)
        Xw = X[:20000]
        assign(Xw, C)
        assign(Xw, C, group_of=groups)
        index.search(Xw, 1)
        blocked_numpy(Xw, C, cn)
        if "sklearn-predict" in methods:
            km.predict(Xw)
        times = {m: [] for m in methods}
        for _ in range(args.repeats):
            for m, f in methods.items():
                t = time.perf_counter()
                f()
                times[m].append(time.perf_counter() - t)
        lab_s = assign(X, C)[0]
        lab_f = index.search(X, 1)[1][:, 0]
        agree = (lab_s == lab_f).mean()
        tf = np.median(times["faiss"])
        agree_g = (assign(X, C, group_of=groups)[0] == lab_f).mean()
        print(f"K = {K}   (label agreement with faiss: fused {100 * agree:.4f} %, grouped {100 * agree_g:.4f} %; "
              f"grouping {t_group:.3f} s once, {'none below K = 2048' if groups is None else len(set(groups))} groups)")
        print(f"  {'method':<16} {'median s':>9} {'G evals/s':>10} {'GFLOP/s':>8} {'% sgemm':>8} {'faiss/x':>8}")
        for m, ts in times.items():
            if m == "streamq-grouped" and groups is None:
                continue
            t = np.median(ts)
            evals = args.n * K / t / 1e9
            gflops = 2 * args.d * args.n * K / t / 1e9
            print(f"  {m:<16} {t:9.4f} {evals:10.2f} {gflops:8.1f} {100 * gflops / sgemm:7.1f}% {tf / t:8.2f}")
        best = min(np.median(times["streamq"]), np.median(times["streamq-grouped"]) if groups is not None else np.inf)
        print(f"  ratio streamq/faiss (speed): {tf / np.median(times['streamq']):.2f} fused, {tf / best:.2f} as the "
              "trainers run it\n", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark codebook training: streamq LBG / MiniBatchLloyd vs faiss Kmeans vs scikit-learn (Mini)KMeans.

K codewords (default 1024) learned from N training frames (default 1,000,000) and scored on the SAME
held-out frames (disjoint utterances, never seen by any method) with one exact float64 scorer.

Data (``--data``):
  synthetic  speech-like anisotropic Gaussian mixture (scripts/make_synthetic_store.py's generator,
             4096 true components with varied scales); held-out = utterances from a disjoint RNG range.
  mfcc       frames of a streamq store (``--store``, e.g. made with scripts/make_corpus.py +
             ``streamq ingest``); utterances are shuffled (seeded) and split into held-out
             (>= ``--heldout`` frames) and training (the first ``--n`` frames of the rest).

Methods: streamq ``LBG(k)`` and ``MiniBatchLloyd(k)`` (library defaults, fed the training array),
``faiss.Kmeans(d, k, niter=20, seed)`` (default subsampling: 256 points per centroid),
sklearn ``KMeans(init='k-means++', n_init=1, max_iter=20)`` and ``MiniBatchKMeans`` (k-means++,
batch ``--mbk-batch``, other parameters default). Everything runs with ``--threads`` (2) threads, in one
process, repeats interleaved; compile time is kept out (warm-up on a tiny input). Printed per method:
median wall seconds, median held-out MSE, wall time / faiss's, loss / sklearn k-means++'s.

Opt-in (``--methods``): ``streamq-lbg-custom``: LBG with ``--lbg-kw``;
``streamq-lloyd-long``: MiniBatchLloyd run for ``--long-steps`` steps (about LBG's frame budget) instead
of its default two passes.

Then the two claims: (1) "LBG reaches sklearn k-means++'s held-out loss in less wall time than faiss
takes"; (2) the seed's "LBG reaches a given loss ~10x faster than minibatch Lloyd", from the two
``history_`` records (wall_seconds, loss on streamq's evaluation sample, which both methods share).

    python scripts/bench_kmeans.py --data synthetic --n 1000000 --k 1024
    python scripts/bench_kmeans.py --data mfcc --store /tmp/bench_store_mfcc --n 1000000 --k 1024
"""

from __future__ import annotations

import os
import sys

_BAD_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(v in os.environ for v in _BAD_ENV) and not os.environ.get("_BENCH_KMEANS_REEXEC"):
    # these force a slow OpenBLAS kernel on this machine: re-run this script without them
    env = {k: v for k, v in os.environ.items() if k not in _BAD_ENV}
    env["_BENCH_KMEANS_REEXEC"] = "1"
    print(f"re-executing without {[v for v in _BAD_ENV if v in os.environ]}", flush=True)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def _threads_from_argv(default=2):
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return str(default)


# thread counts must be fixed before numba / BLAS / OpenMP load
_T = _threads_from_argv()
os.environ["NUMBA_NUM_THREADS"] = _T
os.environ.setdefault("OMP_NUM_THREADS", _T)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


# ----------------------------------------------------------------------------- data
def load_data(a):
    """(train float32 (n, D), heldout float32 (m, D), description)."""
    if a.data == "synthetic":
        from make_synthetic_store import synth_frames

        X = synth_frames(a.n, a.dim, a.components, seed=a.seed)
        H = synth_frames(a.heldout, a.dim, a.components, seed=a.seed, first_block=10 ** 6)
        return X, H, (f"synthetic: {a.components}-component anisotropic mixture, D={a.dim}, "
                      f"{len(X):,} train / {len(H):,} held-out frames (disjoint utterances)")
    from streamq.store import FrameStore

    s = FrameStore.open(a.store)
    off = s.offsets
    F = s.read(0, s.n_frames)
    order = np.random.default_rng([a.seed, 99]).permutation(s.n_utterances)
    lens = np.diff(off)[order]
    n_held_utts = int(np.searchsorted(np.cumsum(lens), a.heldout)) + 1
    held, train = order[:n_held_utts], order[n_held_utts:]
    H = np.concatenate([F[off[u]:off[u + 1]] for u in held])
    X = np.concatenate([F[off[u]:off[u + 1]] for u in train])
    short = len(X) < a.n
    X = np.ascontiguousarray(X[:a.n])
    desc = (f"mfcc: {s.path} ({s.n_frames:,} frames, {s.n_utterances:,} utterances); "
            f"{len(X):,} train frames ({len(train):,} utterances){' -- FEWER than --n' if short else ''} / "
            f"{len(H):,} held-out frames ({len(held):,} disjoint utterances)")
    return X, H, desc


# --------------------------------------------------------------------------- scoring
def heldout_mse(C, H, block=8192):
    """Exact mean squared distance to the nearest codeword, float64, blocked (independent of every peer)."""
    C = np.asarray(C, np.float64)
    cn = (C ** 2).sum(1)
    Ct2 = -2.0 * C.T
    tot, used = 0.0, np.zeros(len(C), bool)
    for i in range(0, len(H), block):
        x = H[i:i + block].astype(np.float64)
        d = x @ Ct2
        d += cn
        j = d.argmin(1)
        used[j] = True
        tot += np.maximum(d[np.arange(len(x)), j] + (x ** 2).sum(1), 0.0).sum()
    return tot / len(H), used.mean()


def first_time(history, target):
    """Wall seconds of the first history record whose loss <= target (None if never)."""
    for r in history:
        if r["loss"] <= target:
            return r["wall_seconds"]
    return None


# --------------------------------------------------------------------------- methods
def make_methods(a, d):
    import faiss
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from streamq.codebook import LBG, MiniBatchLloyd

    def lbg(X, k, seed):
        m = LBG(k, seed=seed).fit(X)
        return m.codebook_, m

    def lloyd(X, k, seed):
        m = MiniBatchLloyd(k, seed=seed).fit(X)
        return m.codebook_, m

    def lbg_custom(X, k, seed):
        m = LBG(k, seed=seed, **json.loads(a.lbg_kw)).fit(X)
        return m.codebook_, m

    def lloyd_long(X, k, seed):
        m = MiniBatchLloyd(k, seed=seed, max_steps=a.long_steps).fit(X)
        return m.codebook_, m

    def fk(X, k, seed):
        km = faiss.Kmeans(d, k, niter=20, seed=seed)
        km.train(X)
        return km.centroids.copy(), km

    def skm(X, k, seed):
        km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=20, random_state=seed).fit(X)
        return km.cluster_centers_.astype(np.float32), km

    def smbk(X, k, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            km = MiniBatchKMeans(n_clusters=k, init="k-means++", batch_size=a.mbk_batch, random_state=seed).fit(X)
        return km.cluster_centers_.astype(np.float32), km

    all_m = {"streamq-lbg": lbg, "streamq-lloyd": lloyd, "faiss": fk, "sklearn-kmeans++": skm,
             "sklearn-minibatch": smbk, "streamq-lbg-custom": lbg_custom,
             "streamq-lloyd-long": lloyd_long}
    want = a.methods.split(",")
    bad = [m for m in want if m not in all_m]
    if bad:
        sys.exit(f"unknown methods {bad}; choose from {list(all_m)}")
    return {m: all_m[m] for m in want}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["synthetic", "mfcc"], default="synthetic")
    ap.add_argument("--store", default="/tmp/bench_store_mfcc", help="frame store for --data mfcc")
    ap.add_argument("--n", type=int, default=1_000_000, help="training frames")
    ap.add_argument("--heldout", type=int, default=100_000, help="held-out frames (at least, for mfcc)")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=13, help="synthetic dimension")
    ap.add_argument("--components", type=int, default=4096, help="synthetic true components")
    ap.add_argument("--repeats", type=int, default=1, help="runs per method (seed + r), interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mbk-batch", type=int, default=8192, help="MiniBatchKMeans batch_size")
    ap.add_argument("--ref-loss", type=float, default=None,
                    help="sklearn k-means++ held-out loss from an earlier run on the same data, when not run here")
    ap.add_argument("--lbg-kw", default="{}", help='JSON keyword arguments of the opt-in streamq-lbg-custom, '
                    'e.g. \'{"tol": 0.01}\'')
    ap.add_argument("--long-steps", type=int, default=3000,
                    help="steps of the opt-in streamq-lloyd-long (3000 x 8192 ~ LBG's frame budget at K=1024)")
    ap.add_argument("--methods", default="streamq-lbg,streamq-lloyd,faiss,sklearn-kmeans++,sklearn-minibatch")
    a = ap.parse_args()
    T = a.threads

    import faiss
    import numba
    import sklearn
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(T)
    faiss.omp_set_num_threads(T)
    threadpool_limits(T)
    import streamq

    print(f"streamq {streamq.__version__}, faiss {faiss.__version__}, sklearn {sklearn.__version__}, "
          f"numba {numba.__version__} ({numba.get_num_threads()} threads), numpy {np.__version__}; "
          f"K={a.k}, repeats={a.repeats}, threads={T}")
    t = time.perf_counter()
    X, H, desc = load_data(a)
    print(f"data {desc}  [{time.perf_counter() - t:.1f} s to build]", flush=True)
    methods = make_methods(a, X.shape[1])

    # warm-up: Numba compile / cache load, thread pools, on a tiny input
    Xw = np.ascontiguousarray(X[:20000])
    for f in methods.values():
        f(Xw, 16, 0)
    heldout_mse(Xw[:100], Xw[:1000])

    times = {m: [] for m in methods}
    cpus = {m: [] for m in methods}
    losses = {m: [] for m in methods}
    util = {m: [] for m in methods}
    models = {m: [] for m in methods}
    for r in range(a.repeats):
        for m, f in methods.items():
            t, c = time.perf_counter(), time.process_time()
            C, model = f(X, a.k, a.seed + r)
            times[m].append(time.perf_counter() - t)
            cpus[m].append(time.process_time() - c)
            mse, u = heldout_mse(C, H)
            losses[m].append(mse)
            util[m].append(u)
            models[m].append(model)
            print(f"  [repeat {r}] {m:<22} {times[m][-1]:8.2f} s wall {cpus[m][-1]:8.2f} s CPU  "
                  f"held-out MSE {mse:.4f}", flush=True)

    med = {m: statistics.median(v) for m, v in times.items()}
    ml = {m: statistics.median(v) for m, v in losses.items()}
    tf = med.get("faiss")
    lref = ml.get("sklearn-kmeans++") or a.ref_loss
    if "sklearn-kmeans++" not in ml and a.ref_loss:
        print(f"  (sklearn k-means++ not run here: loss ratios use --ref-loss {a.ref_loss} from an earlier run "
              "on the same data)")
    print(f"\nK = {a.k}, {len(X):,} training frames, held-out {len(H):,} frames (medians of {a.repeats})")
    print(f"  {'method':<22} {'wall s':>8} {'CPU s':>8} {'held-out MSE':>13} {'used':>6} {'time/faiss':>11} "
          f"{'loss/skl-km++':>14}")
    for m in methods:
        rt = f"{med[m] / tf:11.2f}" if tf else f"{'-':>11}"
        rl = f"{ml[m] / lref:14.4f}" if lref else f"{'-':>14}"
        print(f"  {m:<22} {med[m]:8.2f} {statistics.median(cpus[m]):8.2f} {ml[m]:13.4f} {statistics.median(util[m]):6.3f} {rt} {rl}")

    # claim 1: LBG reaches sklearn k-means++'s held-out loss in less wall time than faiss
    for lb in ("streamq-lbg", "streamq-lbg-custom"):
        if lb in methods and tf and lref:
            ok_loss, ok_time = ml[lb] <= lref, med[lb] < tf
            print(f"\nclaim 1 ({lb}): held-out loss {ml[lb]:.4f} vs sklearn k-means++ {lref:.4f} "
                  f"(ratio {ml[lb] / lref:.4f}); wall time / faiss's = {med[lb] / tf:.2f} "
                  f"-> {'HOLDS' if ok_loss and ok_time else 'DOES NOT HOLD'}"
                  f" (loss {'ok' if ok_loss else 'worse'}, time {'ok' if ok_time else 'slower'})")
    if "faiss" in methods and lref:
        print(f"faiss held-out loss / sklearn k-means++'s = {ml['faiss'] / lref:.4f}")

    # claim 2: time to a given loss, LBG vs MiniBatchLloyd, from history_ (streamq's evaluation sample)
    lbgs = [m for m in ("streamq-lbg", "streamq-lbg-custom") if m in methods]
    lloyds = [m for m in ("streamq-lloyd", "streamq-lloyd-long") if m in methods]
    if lbgs and lloyds:
        print("\nclaim 2 (seed: LBG ~10x faster to a given loss than minibatch Lloyd), from history_ "
              "(loss on streamq's evaluation sample, shared by all streamq runs; wall_seconds inside fit):")
    for r in range(a.repeats if lbgs and lloyds else 0):
        for m in lbgs + lloyds:
            h = models[m][r].history_
            print(f"  [repeat {r}] {m:<22} final eval loss {h[-1]['loss']:.4f} at {h[-1]['wall_seconds']:7.1f} s "
                  f"({h[-1]['frames_seen']:,} frames seen)")
        for lb in lbgs:
            for ll in lloyds:
                hb, hl = models[lb][r].history_, models[ll][r].history_
                fb, fl = hb[-1]["loss"], hl[-1]["loss"]
                print(f"    {lb} vs {ll}:")
                for tgt, tag in sorted({(fl * 1.10, "Lloyd final +10%"), (fl * 1.02, "Lloyd final +2%"),
                                        (fl, "Lloyd final"), (fb, "LBG final")}, reverse=True):
                    tb, tl = first_time(hb, tgt), first_time(hl, tgt)
                    ratio = f"{tl / tb:6.2f}x" if tb and tl else "   n/a"
                    sb = f"{tb:7.1f} s" if tb is not None else "  never"
                    sl = f"{tl:7.1f} s" if tl is not None else "  never"
                    print(f"      loss <= {tgt:.4f} ({tag:<16}) LBG {sb}   Lloyd {sl}   Lloyd time / LBG time {ratio}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Full passes on Dask against the in-process pass, and a projection to 10^10 frames, measured in one run.

On one store (default: the 11 M-frame synthetic store of scripts/make_synthetic_store.py):

1. one exact Lloyd pass (LBG's ``_full_pass`` statistics) and one GMM E-step pass, both at K = ``--k``:
   in-process (Numba over all cores), on a LocalCluster of 1 worker x 2 threads and of 2 workers x 1 thread
   (:mod:`streamq.distributed`: one task per range, fixed-order tree reduction);
2. the per-pass overhead on each cluster: the same tasks over empty ranges (scheduling, shipping the model,
   the reduction), which is what every pass pays whatever the data;
3. one LBG EMA step (batch 16K) in-process: the sequential phase that stays on the client;
4. a projection, from the measured per-worker rate and overhead, of one pass and of the LBG -> GMM recipe
   (3 Lloyd passes + 1 GMM init pass + ``--em-iters`` EM passes + the EMA stages) over 10^10 frames at 16,
   64 and 256 workers, with the store-bandwidth and reduction terms printed beside it.

Usage::

    python scripts/make_synthetic_store.py /tmp/synth_11M --n 11000000 --seed 0
    python scripts/bench_dask.py --store /tmp/synth_11M --k 1024

Prints medians over ``--repeats``. The machine may be shared: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np


def lloyd_local(store, C, batch=65536):
    from streamq.kernels.assign import assign, cluster_stats

    K, D = C.shape
    counts, sums, sse = np.zeros(K), np.zeros((K, D)), np.zeros(K)
    for X in store.iter_minibatches(batch, shuffle=False):
        lab, d2 = assign(X, C)
        st = cluster_stats(X, lab, K, d2=d2, second_order=False)
        counts += st.counts
        sums += st.sums
        sse += st.sse
    return counts, sums, sse


def empty_pass(client, store, kind, C, gmm):
    """The tasks of a full pass over empty ranges (one per range of the real pass), reduced the same way."""
    from streamq import distributed as dd

    budget = dd.thread_budget(client)
    if kind == "lloyd":
        ranges = dd.partition(store.n_frames, store.chunk_frames)
        parts = [client.submit(dd._lloyd_part, store.url, store.n_frames, a, a, C, None, 65536, budget, pure=False)
                 for a, _ in ranges]
    else:
        import numba

        from streamq.kernels import gmm as _k

        shift, const, W = gmm._prepared()
        ranges = dd.partition(store.n_frames, gmm.batch_size)
        model = dd._model(client, (_k.diag_gmm_stats, (shift, const, W, numba.get_num_threads(), gmm._tile(),
                                                       gmm._log_prune(), 0)))
        parts = [client.submit(dd._gmm_part, store.url, store.n_frames, a, a, model, gmm.batch_size, budget,
                               pure=False) for a, _ in ranges]
    dd.tree_reduce(client, parts)
    return len(ranges)


def warm(url, n, C, gmm):
    """Run both kernels once on a few frames in this (worker) process, so no timed pass pays for imports,
    loading the Numba caches or opening the store."""
    import numba

    from streamq import distributed as dd
    from streamq.kernels import gmm as _k

    dd._lloyd_part(url, n, 0, 4096, C, None, 65536, {})
    shift, const, W = gmm._prepared()
    dd._gmm_part(url, n, 0, 4096, (_k.diag_gmm_stats, (shift, const, W, numba.get_num_threads(), gmm._tile(),
                                                       gmm._log_prune(), 0)), 4096, {})


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="/tmp/synth_11M", help="frame store (default /tmp/synth_11M)")
    ap.add_argument("--em-store", default=None,
                    help="store for the EM pass, e.g. a 2M-frame prefix store made with the same seed: the E-step "
                    "at K = 1024 is ~20x slower per frame than a Lloyd pass (default: --store)")
    ap.add_argument("--k", type=int, default=1024, help="codewords / components (default 1024)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per configuration (default 1)")
    ap.add_argument("--em-iters", type=int, default=10, help="EM passes in the projected recipe (default 10)")
    ap.add_argument("--bandwidth", type=float, default=1.0,
                    help="aggregate store read bandwidth in GB/s assumed by the projection (default 1.0)")
    a = ap.parse_args()

    from distributed import Client, LocalCluster

    from streamq import distributed as dd
    from streamq.artifacts import Gaussians
    from streamq.codebook import LBG
    from streamq.gmm import DiagGMM
    from streamq.store import FrameStore

    store = FrameStore.open(a.store)
    em_store = FrameStore.open(a.em_store or a.store)
    N, D, K = store.n_frames, store.dim, a.k
    NE = em_store.n_frames
    print(f"store {a.store}: {N:,} x {D} frames, chunks of {store.chunk_frames:,}; K = {K}; EM pass over "
          f"{a.em_store or a.store} ({NE:,} frames)")
    C = store.sample(K, seed=1)
    H = store.sample(200_000, seed=2).astype(np.float64)
    gmm = DiagGMM.from_gaussians(Gaussians(np.full(K, 1.0 / K), C.astype(np.float64),
                                           np.tile(H.var(0), (K, 1))), batch_size=65536)

    rows, over = {}, {}
    rows["in-process"] = (timed(lambda: lloyd_local(store, C), a.repeats),
                          timed(lambda: gmm.accumulate(em_store), a.repeats))
    print(f"in-process: Lloyd {rows['in-process'][0]:.1f} s, EM {rows['in-process'][1]:.1f} s")
    for name, nw, nt in (("LocalCluster 1 worker x 2 threads", 1, 2), ("LocalCluster 2 workers x 1 thread", 2, 1)):
        with LocalCluster(n_workers=nw, threads_per_worker=nt, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            client.run(warm, store.url, store.n_frames, C, gmm)  # every worker: imports, Numba caches, the store
            client.run(warm, em_store.url, em_store.n_frames, C, gmm)
            over[name] = (timed(lambda: empty_pass(client, store, "lloyd", C, gmm), 3),
                          timed(lambda: empty_pass(client, em_store, "em", C, gmm), 3))
            g = DiagGMM.from_gaussians(gmm.gaussians_, batch_size=65536, client=client)
            rows[name] = (timed(lambda: dd.lloyd_stats(client, store, C, batch_size=65536), a.repeats),
                          timed(lambda: g.accumulate(em_store), a.repeats))
            print(f"{name}: Lloyd {rows[name][0]:.1f} s, EM {rows[name][1]:.1f} s; empty-range pass "
                  f"{over[name][0]:.2f} / {over[name][1]:.2f} s")

    base = rows["in-process"]
    n_tasks = (len(dd.partition(N, store.chunk_frames)), len(dd.partition(NE, 65536)))
    print(f"\none full pass at K = {K} (median of {a.repeats}): Lloyd over {N:,} frames ({n_tasks[0]} tasks), EM "
          f"over {NE:,} frames ({n_tasks[1]} tasks)")
    print(f"{'configuration':36s} {'Lloyd s':>8s} {'x in-proc':>9s} {'EM s':>8s} {'x in-proc':>9s} "
          f"{'overhead L/EM s':>16s}")
    for name, (tl, te) in rows.items():
        o = over.get(name)
        ov = f"{o[0]:7.2f} / {o[1]:5.2f}" if o else ""
        print(f"{name:36s} {tl:8.1f} {base[0] / tl:8.2f}x {te:8.1f} {base[1] / te:8.2f}x {ov:>16s}")

    # ---------------------------------------------------------------- the sequential phase (client only)
    lbg = LBG(K, batch_size=16384)
    lbg._B, lbg._exclude = 16384, None
    X = store.read(0, 16384)
    lbg._init_state(C)
    lbg._sigma, lbg._eps = H.std(0).astype(np.float32), 0.01
    lbg.step_, lbg.frames_seen_, lbg.n_repaired_ = 0, 0, 0
    lbg._step(X)
    t_step = timed(lambda: lbg._step(X), 5)

    # ---------------------------------------------------------------- projection
    name2 = "LocalCluster 2 workers x 1 thread"
    tl2, te2 = rows[name2]
    ol, oe = over[name2]
    rate_l = N / max(tl2 - ol, 1e-9) / 2  # frames / s per worker (1 core each)
    rate_e = NE / max(te2 - oe, 1e-9) / 2
    stages = int(np.ceil(np.log2(K))) + 1
    ema_frames = stages * 200 * 16384  # at most max_stage_steps (200) steps of 16K frames per stage
    t_ema = stages * 200 * t_step
    big = 1e10
    bytes_pass = big * D * 4
    stat_bytes_l, stat_bytes_e = K * (D + 2) * 8, K * (2 * D + 1) * 8
    print(f"\nper-worker rate (2 x 1 cluster, overhead removed): Lloyd {rate_l / 1e6:.2f} Mframes/s, "
          f"EM {rate_e / 1e6:.2f} Mframes/s; empty-range pass {ol:.2f} s (Lloyd, {n_tasks[0]} tasks), "
          f"{oe:.2f} s (EM, {n_tasks[1]} tasks)")
    print(f"sequential EMA phase (client): {t_step * 1e3:.1f} ms per 16K-frame step at K = {K}; at most "
          f"{stages} stages x 200 steps = {ema_frames / 1e6:.0f} M frames, {t_ema / 60:.1f} min, whatever N is")
    print(f"\nprojection to {big:.0e} frames: workers of one core at the measured rate; the store read at "
          f"{a.bandwidth:g} GB/s aggregate ({bytes_pass / 1e9:.0f} GB per pass); the measured per-task "
          f"scheduling cost times the task count (one central scheduler: not divided by the workers); a "
          f"reduction tree of fan-in {dd.SPLIT_EVERY} over {stat_bytes_l / 1e3:.0f} kB (Lloyd) / "
          f"{stat_bytes_e / 1e3:.0f} kB (EM) statistics per task, 5 ms and 1 GB/s per level")
    print(f"{'workers':>8s} {'Lloyd pass':>11s} {'EM pass':>9s} {'read bound':>11s} {'overhead':>9s} {'recipe':>9s}"
          f"  (recipe: 3 Lloyd + 1 init + {a.em_iters} EM passes + the EMA stages)")
    for W in (16, 64, 256):
        tasks = max(dd.MIN_PARTS, int(np.ceil(big / dd.PART_FRAMES)))
        depth = int(np.ceil(np.log(tasks) / np.log(dd.SPLIT_EVERY)))
        o_l = ol * tasks / n_tasks[0] + depth * (0.005 + dd.SPLIT_EVERY * stat_bytes_l / 1e9)
        o_e = oe * tasks / n_tasks[1] + depth * (0.005 + dd.SPLIT_EVERY * stat_bytes_e / 1e9)
        read = bytes_pass / (a.bandwidth * 1e9)
        p_l = max(big / (W * rate_l), read) + o_l
        p_e = max(big / (W * rate_e), read) + o_e
        recipe = 4 * p_l + a.em_iters * p_e + t_ema  # the init pass costs about one Lloyd pass (assign + stats)
        print(f"{W:8d} {p_l / 60:7.1f} min {p_e / 60:5.1f} min {read / 60:7.1f} min {o_e:7.1f} s "
              f"{recipe / 3600:7.1f} h")


if __name__ == "__main__":
    main()

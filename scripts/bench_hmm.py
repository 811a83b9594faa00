#!/usr/bin/env python3
"""Benchmark the chain-HMM kernels against hmmlearn's lattice functions, and `streamq align` throughput.

Usage::

    python scripts/bench_hmm.py                       # kernels: S = 200, T = 5000
    python scripts/bench_hmm.py --store S --model M   # + aligner throughput on a store (audio h / wall min)

Kernel part: the same frame log-likelihoods (T, S) and the same linear-chain transition matrix go to
streamq's forward_backward (O(T S), scaled) and to hmmlearn's ``forward_log + backward_log`` and
``forward_scaling + backward_scaling`` (dense, O(T S^2)); posteriors are checked to agree to 1e-6.
Emissions are realistic for an aligner (a true path with ~T/S frames per state, a few nats of
contrast per frame) so the scaled pass does not need its log-domain fallback; the fallback
(``forward_backward_log``) is timed too. Medians of ``--repeats`` runs, compile time excluded;
the figures to quote are the ratios, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def chain_problem(T, S, seed=0):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, T), S - 1, replace=False))
    path = np.zeros(T, np.int64)
    path[cuts] = 1
    path = np.cumsum(path)
    le = -0.5 * (rng.normal(size=(T, 1)) + (path[:, None] - np.arange(S)[None, :]) * 0.8) ** 2 - 10.0
    p = 1 - S / T
    stay, nxt, skip = np.full(S, p), np.full(S, 1 - p), np.zeros(S)
    stay[-1], nxt[-1] = 1.0, 0.0
    return le, stay, nxt, skip


def bench_kernels(T, S, repeats, hmm_repeats):
    from hmmlearn import _hmmc

    from streamq.kernels.lattice import forward_backward, forward_backward_log, viterbi

    le, stay, nxt, skip = chain_problem(T, S)
    su = np.arange(S, dtype=np.int64)
    A = np.diag(stay) + np.diag(nxt[:-1], 1)
    start = np.eye(S)[0]
    fp = np.exp(le - le.max(1, keepdims=True))  # hmmlearn's scaled variant needs probabilities

    g, ll, xi, used_log = forward_backward(le, su, stay, nxt, skip)  # compile / warm up
    forward_backward_log(le, su, stay, nxt, skip)
    viterbi(le, su, stay, nxt, skip)

    le_end = le.copy()
    le_end[-1, :-1] = -np.inf  # hmmlearn has no end state: impose it through the last frame

    def hl_log():
        ll_h, fw = _hmmc.forward_log(start, A, le_end)
        bw = _hmmc.backward_log(start, A, le_end)
        return ll_h, fw, bw

    def hl_scaling():
        _, fw, sc = _hmmc.forward_scaling(start, A, fp * np.exp(le_end - le))
        bw = _hmmc.backward_scaling(start, A, fp * np.exp(le_end - le), sc)
        return fw, bw

    ll_h, fw, bw = hl_log()
    err = float(np.abs(np.exp(fw + bw - ll_h) - g).max())
    fws, bws = hl_scaling()
    err_s = float(np.abs(fws * bws / (fws * bws).sum(1, keepdims=True) - g).max())
    res = {"T": T, "S": S, "used_log_fallback": bool(used_log), "max_abs_posterior_diff_log": err,
           "max_abs_posterior_diff_scaling": err_s, "loglik_diff": float(abs(ll - ll_h))}
    res["streamq_fb_s"] = median_time(lambda: forward_backward(le, su, stay, nxt, skip), repeats)
    res["streamq_fb_logdomain_s"] = median_time(lambda: forward_backward_log(le, su, stay, nxt, skip), repeats)
    res["streamq_viterbi_s"] = median_time(lambda: viterbi(le, su, stay, nxt, skip), repeats)
    res["hmmlearn_log_s"] = median_time(hl_log, hmm_repeats)
    res["hmmlearn_scaling_s"] = median_time(hl_scaling, hmm_repeats)
    res["speedup_vs_hmmlearn_log"] = res["hmmlearn_log_s"] / res["streamq_fb_s"]
    res["speedup_vs_hmmlearn_scaling"] = res["hmmlearn_scaling_s"] / res["streamq_fb_s"]
    res["logdomain_speedup_vs_hmmlearn_log"] = res["hmmlearn_log_s"] / res["streamq_fb_logdomain_s"]
    return res


def bench_align(store, model, iters, jobs, repeats):
    import tempfile

    from streamq.pipelines import run_align
    from streamq.store import FrameStore

    hours = float(FrameStore.open(store).durations.sum()) / 3600
    with tempfile.TemporaryDirectory() as d:
        run_align(store, model, d + "/warm", iters=1, jobs=jobs, verbose=0)  # compile caches
        walls = []
        for r in range(repeats):
            t0 = time.perf_counter()
            s = run_align(store, model, f"{d}/run{r}", iters=iters, jobs=jobs, verbose=0)
            walls.append(time.perf_counter() - t0)
    wall = float(np.median(walls))
    return {"store": str(store), "audio_hours": hours, "iters": iters, "jobs": jobs, "wall_s": wall,
            "aligned": s["aligned"], "utterances": s["utterances"],
            "audio_hours_per_wall_minute": hours / (wall / 60),
            "audio_hours_per_wall_minute_per_iter": hours * iters / (wall / 60)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=5000)
    ap.add_argument("--S", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hmm-repeats", type=int, default=3)
    ap.add_argument("--store", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--align-repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    out = {"kernels": bench_kernels(a.T, a.S, a.repeats, a.hmm_repeats)}
    k = out["kernels"]
    print(f"forward-backward T={a.T} S={a.S}: streamq {k['streamq_fb_s'] * 1e3:.1f} ms "
          f"(log-domain fallback {k['streamq_fb_logdomain_s'] * 1e3:.1f} ms, Viterbi "
          f"{k['streamq_viterbi_s'] * 1e3:.1f} ms); hmmlearn log {k['hmmlearn_log_s'] * 1e3:.0f} ms, "
          f"scaling {k['hmmlearn_scaling_s'] * 1e3:.0f} ms")
    print(f"  speed-up vs hmmlearn forward_log+backward_log: {k['speedup_vs_hmmlearn_log']:.0f}x (goal 100x); "
          f"vs forward_scaling+backward_scaling: {k['speedup_vs_hmmlearn_scaling']:.0f}x (goal 10x); "
          f"log-domain fallback vs hmmlearn log: {k['logdomain_speedup_vs_hmmlearn_log']:.0f}x")
    print(f"  max |posterior diff| vs hmmlearn: {k['max_abs_posterior_diff_log']:.1e} (log), "
          f"{k['max_abs_posterior_diff_scaling']:.1e} (scaling); fallback used: {k['used_log_fallback']}")
    if a.store:
        if not a.model:
            ap.error("--store needs --model")
        r = out["align"] = bench_align(a.store, a.model, a.iters, a.jobs, a.align_repeats)
        print(f"streamq align ({r['iters']} EM iterations, jobs={r['jobs']}): {r['audio_hours']:.3f} h of audio in "
              f"{r['wall_s']:.1f} s -> {r['audio_hours_per_wall_minute']:.3f} audio hours per wall minute "
              f"({r['audio_hours_per_wall_minute_per_iter']:.2f} per minute per EM iteration)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Benchmark the chain-HMM kernels against hmmlearn's lattice functions, and `streamq align` throughput.

Usage::

    python scripts/bench_hmm.py                       # kernels: S = 200, T = 5000
    python scripts/bench_hmm.py --store S --model M   # + aligner throughput on a store (audio h / wall min)
    python scripts/bench_hmm.py --align-bench DIR --jobs 2 --eval   # sparse vs dense at K = 1024 and 16384

``--align-bench DIR`` makes (or reuses) in DIR: the bundled Common Voice demo ingested (``demo``), a corpus of
``--copies`` copies of it with seeded per-copy noise on the MFCCs (``corpus``, so fixed costs are amortised
as on a real corpus), an LBG K = 1024 codebook + 5 GMM iterations (``k1024``) and an LBG K = 16384 codebook
with per-cluster variances (``k16384``), all trained on the demo. Then ``streamq align`` (run_align, 30 EM
iterations, ``--jobs``) on the corpus with sparse cached emissions (``gselect``) and with dense ones
(``gselect=None``), printing audio hours per wall minute for the whole command and for its EM iterations
alone. Dense at K = 16384 costs T K U per iteration (hours here): it runs ``--dense-iters-16384``
iterations and its 30-iteration figure is extrapolated from their mean (marked so). ``--eval`` scores word
boundaries of sparse vs dense on the demo (K = 1024, scripts/eval_alignment.py).

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


def _cli(*args):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "import sys; from streamq.cli import main; sys.exit(main(sys.argv[1:]))",
                    *map(str, args), "--quiet"], check=True)


def prepare_align_bench(d, copies, seed=0):
    """Demo store, replicated corpus and the K = 1024 / 16384 models in ``d`` (reused when present)."""
    from pathlib import Path

    from streamq.align import gaussians_from_codebook
    from streamq.artifacts import load_codebook, save_gmm
    from streamq.store import FrameStore, UtteranceSource

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    demo, corpus = d / "demo", d / f"corpus_x{copies}"
    root = Path(__file__).resolve().parents[1]
    if not (demo / "zarr.json").exists():
        _cli("ingest", root / "data" / "commonvoice_demo", demo)
    if not (corpus / "zarr.json").exists():
        src = FrameStore.open(demo)
        out = FrameStore.create(corpus, src.dim)
        rng = np.random.default_rng(seed)
        for c in range(copies):
            batch = []
            for i in range(src.n_utterances):
                X, tr = src.utterance(i)
                noise = rng.normal(scale=0.05, size=X.shape) if c else 0.0
                batch.append({"id": f"{src.ids[i]}_c{c}", "frames": (X + noise).astype(np.float32), "transcript": tr,
                              "duration": float(src.durations[i])})
            out.append(batch)
    if not (d / "k1024" / "gmm.npz").exists():
        _cli("fit", demo, d / "cb1024", "--k", 1024, "--method", "lbg")
        _cli("gmm", demo, d / "cb1024", d / "k1024", "--iters", 5)
    if not (d / "k16384" / "gmm.npz").exists():
        if not (d / "cb16384" / "codebook.npy").exists():
            _cli("fit", demo, d / "cb16384", "--k", 16384, "--method", "lbg")
        C = load_codebook(d / "cb16384" / "codebook.npy")
        g = gaussians_from_codebook(C, UtteranceSource.from_store(FrameStore.open(demo)))
        (d / "k16384").mkdir(exist_ok=True)
        save_gmm(d / "k16384", g)
    return demo, corpus


def time_align(store, model, out, iters, jobs, **kw):
    from streamq.artifacts import read_records
    from streamq.pipelines import run_align
    from streamq.store import FrameStore

    hours = float(FrameStore.open(store).durations.sum()) / 3600
    t0, c0 = time.perf_counter(), time.process_time()
    s = run_align(store, model, out, iters=iters, jobs=jobs, verbose=0, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0  # cpu: every thread of this process
    em = [float(r["seconds"]) for r in read_records(f"{out}/align_history.csv")]
    return {"audio_hours": hours, "iters": iters, "wall_s": wall, "cpu_s": cpu, "em_s": float(np.sum(em)),
            "em_iter_s": float(np.mean(em)), "aligned": s["aligned"], "utterances": s["utterances"]}


def bench_align_modes(d, copies, jobs, gselect, dense_iters_16384, ks, iters=30, modes=("sparse", "dense"),
                      sparse_kw=None):
    import tempfile

    demo, corpus = prepare_align_bench(d, copies)
    rows = []
    todo = [(name, g) for name, g in (("sparse", gselect), ("dense", None)) if name in modes]
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        # compile caches once (a 1-iteration run on the demo for each mode)
        for _, mode in todo:
            time_align(demo, f"{d}/k1024", f"{tmp}/warm{mode}", 1, jobs, gselect=mode)
        skw = dict(sparse_kw or {})
        for K in ks:
            for name, g in todo:
                n = dense_iters_16384 if (K == 16384 and g is None) else iters
                r = time_align(corpus, f"{d}/k{K}", f"{tmp}/{name}{K}", n, jobs, gselect=g,
                               **(skw if g is not None else {}))
                fixed = r["wall_s"] - r["em_s"]
                wall30 = fixed + r["em_iter_s"] * iters
                r.update(K=K, mode=name, gselect=g, extrapolated=n != iters, wall_30_s=wall30,
                         **({k: v for k, v in skw.items()} if g is not None else {}),
                         hours_per_min=r["audio_hours"] / (wall30 / 60),
                         em_hours_per_min=r["audio_hours"] / (r["em_iter_s"] * iters / 60))
                rows.append(r)
                extra = "".join(f", {k}={v}" for k, v in skw.items()) if g is not None else ""
                print(f"K={K:5d} {name:6s} (gselect={g}{extra}): {r['audio_hours']:.3f} h, {iters} EM iterations, jobs={jobs}: "
                      f"wall {wall30:.1f} s{' (extrapolated from %d iterations)' % n if n != iters else ''}, "
                      f"EM {r['em_iter_s']:.3f} s/iter -> {r['hours_per_min']:.2f} audio h / wall min "
                      f"(EM alone {r['em_hours_per_min']:.2f}); CPU {r['cpu_s']:.1f} s"
                      f"{' (of %d iterations)' % n if n != iters else ''}", flush=True)
    return rows


def eval_modes(d, jobs, gselect, iters=30, sparse_kw=None):
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    demo, _ = prepare_align_bench(d, 1)
    root = Path(__file__).resolve().parents[1]
    out = {}
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        for name, g in (("sparse", gselect), ("dense", None)):
            time_align(demo, f"{d}/k1024", f"{tmp}/{name}", iters, jobs, gselect=g,
                       **(dict(sparse_kw or {}) if g is not None else {}))
            r = subprocess.run([sys.executable, str(root / "scripts" / "eval_alignment.py"), "--json", str(demo),
                                f"{tmp}/{name}", str(root / "data" / "commonvoice_demo" / "word_times.tsv")],
                               capture_output=True, text=True, check=True)
            e = json.loads(r.stdout)
            out[name] = {k: v for k, v in e.items() if k.startswith("within") or k.startswith("median")}
            print(f"word boundaries, Common Voice demo, K=1024, {name} (gselect={g}"
                  f"{', ' + str(sparse_kw) if g is not None and sparse_kw else ''}): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in out[name].items()), flush=True)
    return out


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
    ap.add_argument("--align-bench", default=None, metavar="DIR",
                    help="sparse vs dense aligner throughput (and --eval accuracy) in DIR (see the module docstring)")
    ap.add_argument("--copies", type=int, default=5, help="copies of the demo in the --align-bench corpus")
    ap.add_argument("--gselect", type=int, default=16)
    ap.add_argument("--ks", default="1024,16384")
    ap.add_argument("--dense-iters-16384", type=int, default=2)
    ap.add_argument("--modes", default="sparse,dense", help="with --align-bench: the emission modes to time")
    ap.add_argument("--sparse-beam", type=float, default=None,
                    help="with --align-bench: the sparse runs' lattice beam (default: the aligner's; dense keeps it)")
    ap.add_argument("--eval", action="store_true", help="with --align-bench: word-boundary accuracy, sparse vs dense")
    ap.add_argument("--skip-kernels", action="store_true")
    a = ap.parse_args(argv)
    out = {}
    if a.align_bench:
        ks = [int(k) for k in a.ks.split(",") if k]
        skw = {"beam": a.sparse_beam} if a.sparse_beam is not None else {}
        out["align_modes"] = bench_align_modes(a.align_bench, a.copies, a.jobs, a.gselect, a.dense_iters_16384, ks,
                                               a.iters, tuple(m for m in a.modes.split(",") if m), skw)
        if a.eval:
            out["accuracy"] = eval_modes(a.align_bench, a.jobs, a.gselect, a.iters, skw)
    if a.skip_kernels or a.align_bench:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2, default=str)
        return 0
    out["kernels"] = bench_kernels(a.T, a.S, a.repeats, a.hmm_repeats)
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

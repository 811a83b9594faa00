#!/usr/bin/env python
"""Aligner levers measured through the library: for each K and seed, an LBG codebook and a 5-iteration GMM
(cached under WORK), then ``run_align`` with each variant's Aligner settings and the word-boundary scoring
of scripts/eval_alignment.py; one JSON line per (K, seed, variant).

    python scripts/tune_aligner.py STORE WORD_TIMES WORK '[["base", {}], ["wp100", {"weight_prior": 100}]]' 256,1024 0,1,2

A variant's dict holds Aligner parameters (weight_prior, states_per_symbol, char_skip, gselect, beam, ...),
``iters`` (EM iterations, default 30) and ``offset`` (seconds added to t * step for the boundary before frame t,
overriding the convention of streamq.formats.frame_time_offset). This is how the lever table of issue 12 was
measured; scripts/eval_alignment.py --pipeline measures the same through the command line.
"""
import sys, json, time
from pathlib import Path
sys.path.insert(0, __import__("os").path.dirname(__file__))
import eval_alignment as ev
from streamq.pipelines import run_fit, run_gmm, run_align
store = Path(sys.argv[1]); wt = Path(sys.argv[2]); work = Path(sys.argv[3])
variants = json.loads(sys.argv[4])  # list of [name, {kw}]
ks = [int(k) for k in sys.argv[5].split(",")]
seeds = [int(s) for s in sys.argv[6].split(",")]
for K in ks:
    for seed in seeds:
        base = work / f"K{K}_s{seed}"
        if not (base / "codebook" / "fit_config.json").exists():
            run_fit(store, base / "codebook", n_clusters=K, seed=seed, verbose=0)
        if not (base / "gmm" / "gmm_config.json").exists():
            run_gmm(store, base / "codebook", base / "gmm", iters=5, seed=seed, verbose=0)
        for name, kw in variants:
            out = base / f"al_{name}"
            t0 = time.time()
            kw = dict(kw)
            import streamq.pipelines as P
            from streamq.formats import frame_time_offset as fto
            off = kw.pop("offset", None)
            P.frame_time_offset = (lambda cfg, o=off: o) if off is not None else fto
            run_align(store, base / "gmm", out, iters=kw.pop("iters", 30), jobs=2, verbose=0, **kw)
            r = ev.evaluate(out, wt, store)
            print(json.dumps({"K": K, "seed": seed, "variant": name, "w20": round(r["within_20ms"], 4),
                              "w50": round(r["within_50ms"], 4), "median_ms": round(r["median_ms"], 1),
                              "signed_ms": round(r["signed_median_ms"], 1), "mbrola50": round(r["by_family"].get("mbrola", {}).get("within_50ms", 0), 4),
                              "espeak50": round(r["by_family"].get("espeak", {}).get("within_50ms", 0), 4),
                              "compared": r["utterances"]["compared"], "s": round(time.time() - t0, 1)}), flush=True)

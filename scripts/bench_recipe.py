#!/usr/bin/env python
"""The seed's recipe end to end on one machine: LBG to K = 16384, then 10 EM iterations of a 16384-component
diagonal GMM with hierarchical Gaussian selection, over an 11 M-frame speech-like store (made by
scripts/make_synthetic_store.py when missing). Prints wall time, CPU time and peak RSS of each step,
measured in one run as separate ``streamq`` processes, and the total against the goal (< 10 min, < 2 GB).

    .venv/bin/python scripts/bench_recipe.py                       # 11 M frames, K = 16384, gselect 8
    .venv/bin/python scripts/bench_recipe.py --n 2000000 --iters 3 # a quicker look

Numba's compile time is included in each step's wall time (a first run compiles and caches; run twice to
see warm figures; the second line per step is then what a user sees every time after the first).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=11_000_000, help="frames in the synthetic store (default 11,000,000)")
    ap.add_argument("--k", type=int, default=16384, help="codewords and Gaussians (default 16384)")
    ap.add_argument("--iters", type=int, default=10, help="GMM EM iterations (default 10)")
    ap.add_argument("--gselect", type=int, default=8, help="top-n Gaussians per frame (default 8; 0: exact)")
    ap.add_argument("--threads", type=int, default=2, help="Numba threads (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    ap.add_argument("--store-dir", default="/tmp", help="where the store lives / is made (default /tmp)")
    ap.add_argument("--out", default="/tmp/bench_recipe", help="fit and gmm outputs (default /tmp/bench_recipe)")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_scale import run_streamq
    from make_synthetic_store import write_store

    n = a.n
    store = Path(a.store_dir) / (f"streamq_synth_{n // 1_000_000}M" if n % 1_000_000 == 0 else f"streamq_synth_{n}")
    if not (store / "zarr.json").exists():
        print(f"making {store} ({n:,} frames) ...", flush=True)
        write_store(store, n, seed=a.seed, quiet=True)
    out = Path(a.out)
    steps = [("lbg", ["fit", store, out / "codebook", "--k", a.k, "--method", "lbg", "--quiet"]),
             ("gmm", ["gmm", store, out / "codebook", out / "gmm", "--iters", a.iters, "--quiet",
                      *(["--gselect", a.gselect] if a.gselect else [])])]
    print(f"store {store}: {n:,} frames; K = {a.k}; {a.iters} EM iterations, "
          f"{'gselect ' + str(a.gselect) if a.gselect else 'exact E-step'}; {a.threads} threads")
    print(f"{'step':6s} {'wall s':>9s} {'cpu s':>9s} {'peak RSS MB':>12s}  result")
    total, peak = 0.0, 0
    for name, args in steps:
        import shutil

        shutil.rmtree(args[2] if name == "lbg" else args[3], ignore_errors=True)
        r = run_streamq(args, a.threads)
        if r["rc"] != 0:
            raise SystemExit(f"{name} failed ({r['rc']}): {r['stderr'][-2000:]}")
        rss = max(r["maxrss"], r["polled_peak"])
        total += r["wall"]
        peak = max(peak, rss)
        print(f"{name:6s} {r['wall']:9.1f} {r['cpu']:9.1f} {rss / 2**20:12.0f}  {r['stdout'][-160:]}", flush=True)
    hist = list(csv.DictReader(open(out / "gmm" / "gmm_history.csv")))
    em = [float(h["em_seconds"]) for h in hist[1:]]
    if em:
        em_sorted = sorted(em)
        print(f"EM pass: median {em_sorted[len(em) // 2]:.1f} s (min {em_sorted[0]:.1f}, max {em_sorted[-1]:.1f}); "
              f"held-out log-likelihood {float(hist[-1]['heldout_loglik']):.3f} nats/frame")
    print(f"recipe total {total:.0f} s ({total / 60:.1f} min; goal < 10 min), peak RSS {peak / 2**20:.0f} MB "
          f"(goal < 2048)")


if __name__ == "__main__":
    main()

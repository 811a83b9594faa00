#!/usr/bin/env python3
"""Word-boundary accuracy of the aligner on a corpus with known word timings.

Usage::

    python scripts/make_corpus.py --out /tmp/cv --n-clips 200 --seed 5
    streamq ingest /tmp/cv /tmp/store && streamq fit /tmp/store /tmp/cb --k 256 --method lbg
    python scripts/eval_alignment.py /tmp/store /tmp/cb /tmp/cv/word_times.tsv --iters 30

For every word the aligned start and end are compared with the true ones (``start``/``end`` of
``word_times.tsv``: first and last audible sample). Reported: median absolute boundary error (ms),
share of boundaries within 20 ms and 50 ms, after every EM iteration (the self-training curve)
unless ``--final-only``. Times use the same convention as ``run_align``: frame boundary k is at
``k * step + (winlen - step) / 2``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict

import numpy as np

from streamq.align import Aligner, _Corpus, frame_time_offset, load_model, normalise


def read_truth(path):
    by_id = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            by_id[r["id"]].append((int(r["word_index"]), r["word"], float(r["start"]), float(r["end"])))
    out = {}
    for k, rows in by_id.items():
        rows.sort()
        words = []
        for _, w, a, b in rows:
            parts = normalise(w)
            if len(parts) != 1:  # a token that is not one word after normalisation: keep it unmatched
                words.append((None, a, b))
            else:
                words.append((parts[0], a, b))
        out[k] = words
    return out


def boundary_errors(aligner, truth, step, off):
    """Absolute errors (s) of all word starts and ends; utterances whose words do not match are skipped."""
    errs, skipped = [], 0
    for i, a in aligner.align_corpus():
        uid = aligner.corpus_.ids[i]
        tw = truth.get(uid)
        if a is None or tw is None or [w for _, _, w in a.words] != [w for w, _, _ in tw]:
            skipped += 1
            continue
        for (s, e, _), (_, ts, te) in zip(a.words, tw):
            errs.append(abs(s * step + off - ts))
            errs.append(abs(e * step + off - te))
    return np.array(errs), skipped


def summarise(errs):
    if len(errs) == 0:
        return {"boundaries": 0}
    return {"boundaries": int(len(errs)), "median_ms": float(np.median(errs) * 1000),
            "within_20ms": float((errs <= 0.020).mean()), "within_50ms": float((errs <= 0.050).mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("model", help="dir with gmm.npz or codebook.npy")
    ap.add_argument("word_times", help="word_times.tsv from scripts/make_corpus.py")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--states-per-symbol", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--pause-prob", type=float, default=0.5)
    ap.add_argument("--weight-prior", type=float, default=1.0)
    ap.add_argument("--update-transitions", action="store_true")
    ap.add_argument("--self-loop", type=float, default=None, help="fixed self-loop (default: 1 - S/T)")
    ap.add_argument("--offset", type=float, default=None, help="frame time offset in s (default: from config)")
    ap.add_argument("--final-only", action="store_true", help="evaluate only after the last iteration")
    ap.add_argument("--json", default=None, help="write the curve and final figures here")
    a = ap.parse_args(argv)

    truth = read_truth(a.word_times)
    corpus = _Corpus(a.store)
    step = corpus.frame_step
    off = frame_time_offset(corpus.feature_config) if a.offset is None else a.offset
    curve = []
    t0 = time.perf_counter()

    def cb(it, al):
        if a.final_only and it != a.iters:
            return
        errs, skipped = boundary_errors(al, truth, step, off)
        row = {"iteration": it, **summarise(errs), "skipped_utterances": skipped,
               "loglik_per_frame": al.history_[-1]["loglik_per_frame"] if it else None}
        curve.append(row)
        print(f"iter {it:3d}  median {row.get('median_ms', float('nan')):6.1f} ms  "
              f"<=20ms {row.get('within_20ms', 0):6.1%}  <=50ms {row.get('within_50ms', 0):6.1%}  "
              f"({row['boundaries']} boundaries, {skipped} utts skipped)", flush=True)

    al = Aligner(load_model(a.model), states_per_symbol=a.states_per_symbol, n_iter=a.iters, jobs=a.jobs,
                 pause_prob=a.pause_prob, weight_prior=a.weight_prior, update_transitions=a.update_transitions,
                 self_loop=a.self_loop)
    al.fit(corpus, callback=cb)
    final = curve[-1]
    final["seconds"] = time.perf_counter() - t0
    print(json.dumps({"final": final, "config": vars(a)}, indent=None))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"curve": curve, "final": final, "config": vars(a)}, f, indent=2)
    return 0 if final.get("within_50ms", 0) >= 0.90 else 1


if __name__ == "__main__":
    sys.exit(main())

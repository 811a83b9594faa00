#!/usr/bin/env python3
"""Ingest and streaming throughput, against plain loops, measured in one run.

1. Ingest: audio seconds per wall second of ``streamq ingest`` with ``--jobs 1`` and ``--jobs 2`` against a
   plain loop of soundfile + soxr + python_speech_features over the same files (no store).
2. Streaming: frames per second of shuffled ``iter_minibatches`` against plain in-order reads of the same
   Zarr chunks and against slicing the frames held in RAM.

Usage::

    python scripts/bench_ingest.py                       # synthesises a corpus of --clips clips in a temp dir
    python scripts/bench_ingest.py --corpus DIR          # any streamq ingest SRC
    python scripts/bench_ingest.py --stream-frames 5000000 --repeats 3
    python scripts/bench_ingest.py --corpus DIR --no-stream      # only the ingest part (--no-ingest: the other)

Prints medians over ``--repeats`` and ratios, and the load average before and after. The plain loop and the
two ingests alternate within each repeat, so a change of load hits all three. The machine may be shared:
compare ratios, not seconds. Under load the wall ratio of ``--jobs 2`` overstates it (two processes get a larger
share of a busy machine than one); the CPU columns (every process an ingest starts, against the loop's own
CPU time) say what the work costs whatever the load.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(items, rate=16000):
    import soundfile as sf
    import soxr
    from python_speech_features import mfcc

    audio = 0.0
    for it in items:
        x, sr = sf.read(it.path, dtype="float32", always_2d=True)
        x = x.mean(1)
        if sr != rate:
            x = soxr.resample(x, sr, rate, quality="HQ")
        mfcc(x.astype(np.float64), samplerate=rate)
        audio += len(x) / rate
    return audio


def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_ingest(corpus, jobs, tmp):
    """(audio seconds, wall seconds, CPU seconds of the ingest and every process it started)."""
    out = Path(tmp) / f"store_j{jobs}_{time.perf_counter_ns()}"
    c = _children_cpu()
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "streamq.cli", "ingest", str(corpus), str(out), "--jobs", str(jobs),
                        "--quiet"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    cpu = _children_cpu() - c
    if r.returncode != 0:
        raise SystemExit(f"ingest failed: {r.stderr}")
    from streamq.store import FrameStore

    audio = float(FrameStore.open(out).durations.sum())
    shutil.rmtree(out)
    return audio, wall, cpu


def bench_stream(n, dim, batch, repeats, tmp):
    from streamq.store import FrameStore

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    st = FrameStore.create(Path(tmp) / "stream_store", dim)
    step = 500_000
    for a in range(0, n, step):  # utterance-sized appends are irrelevant here: big pieces
        st.append([{"id": f"u{a}", "frames": X[a:a + step]}])
    res = {"shuffled iter_minibatches": [], "in-order chunk reads": [], "RAM slicing": []}
    sink = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for b in st.iter_minibatches(batch, seed=1):
            sink += float(b[0, 0])
        res["shuffled iter_minibatches"].append(time.perf_counter() - t)
        t = time.perf_counter()
        z = st.group["frames"]
        for a, b_ in st.chunk_ranges():
            blk = np.asarray(z[a:b_])
            for s in range(0, len(blk), batch):
                sink += float(blk[s, 0])
        res["in-order chunk reads"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for s in range(0, n, batch):
            sink += float(np.ascontiguousarray(X[s:s + batch])[0, 0])
        res["RAM slicing"].append(time.perf_counter() - t)
    return {k: n / float(np.median(v)) for k, v in res.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", help="an ingest SRC (default: synthesise one with scripts/make_corpus.py)")
    ap.add_argument("--clips", type=int, default=150, help="clips to synthesise when --corpus is not given")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-frames", type=int, default=3_000_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--no-ingest", action="store_true", help="skip the ingest part")
    ap.add_argument("--no-stream", action="store_true", help="skip the streaming part")
    a = ap.parse_args()
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_ingest:
            bench_ingest_part(a, tmp)
        if not a.no_stream:
            s = bench_stream(a.stream_frames, 13, a.batch, a.repeats, tmp)
            base = s["in-order chunk reads"]
            print(f"\nstreaming: {a.stream_frames:,} x 13 float32 frames, batch {a.batch}, median of {a.repeats}")
            print(f"{'method':28s} {'Mframes/s':>10s} {'vs in-order reads':>18s}")
            for k, v in s.items():
                print(f"{k:28s} {v / 1e6:10.2f} {v / base:17.2f}x")
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


def bench_ingest_part(a, tmp):
    corpus = a.corpus
    if corpus is None:
        corpus = Path(tmp) / "corpus"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(corpus),
                        "--n-clips", str(a.clips), "--jobs", "2", "--random-sentences"], check=True,
                       capture_output=True)
    from streamq.ingest import discover

    items = discover(corpus)
    plain, j1, j2 = [], [], []  # (audio s / wall s, audio s / CPU s) per run
    for _ in range(a.repeats):
        t, c = time.perf_counter(), time.process_time()
        audio = plain_loop(items)
        plain.append((audio / (time.perf_counter() - t), audio / (time.process_time() - c)))
        for jobs, acc in ((1, j1), (2, j2)):
            au, wall, cpu = time_ingest(corpus, jobs, tmp)
            acc.append((au / wall, au / cpu))
    print(f"\ningest: {len(items)} clips, {audio / 60:.1f} min of audio, median of {a.repeats} runs")
    print(f"{'method':34s} {'audio s / wall s':>16s} {'vs plain loop':>14s} {'per-run ratios':>22s} "
          f"{'audio s / CPU s':>16s} {'vs plain':>9s}")
    p = float(np.median([r[0] for r in plain]))
    pc = float(np.median([r[1] for r in plain]))
    for name, runs in (("plain loop (sf+soxr+psf, no store)", plain), ("streamq ingest --jobs 1", j1),
                       ("streamq ingest --jobs 2", j2)):
        v, vc = float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs]))
        per = " ".join(f"{x[0] / y[0]:.2f}" for x, y in zip(runs, plain))
        print(f"{name:34s} {v:16.1f} {v / p:13.2f}x {per:>22s} {vc:16.1f} {vc / pc:8.2f}x")


if __name__ == "__main__":
    main()

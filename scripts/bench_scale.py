#!/usr/bin/env python
"""Scale benchmark: LBG to K = 16384 streamed from an N-frame store, in a subprocess whose memory is measured.

For each N in ``--ns`` (default 11,000,000): make the synthetic speech-like store if it is missing
(scripts/make_synthetic_store.py, ``--store-dir``/streamq_synth_<N>), then run the CLI

    streamq fit STORE OUT --k 16384 --method lbg --quiet

as a child process with ``--threads`` Numba threads, and report: wall time (goal < 10 min), peak resident
memory (goal < 2 GB: psutil polling of the child's process tree every 0.1 s, and the child's exact
ru_maxrss from wait4), dead codewords at the end (goal 0), repairs and utility shifts (from OUT/history.csv
and the fit's summary line), and a per-stage time table. Running two sizes (e.g. ``--ns 2000000,11000000``)
shows whether time or memory grow with N; the ratios are printed.

    python scripts/bench_scale.py --ns 2000000,11000000
    python scripts/bench_scale.py --ns 200000 --k 1024          # quick check
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_BAD_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

def run_fit(store, out, k, threads, extra):
    return run_streamq(["fit", str(store), str(out), "--k", str(k), "--method", "lbg", "--quiet", *extra], threads)


def run_streamq(args, threads):
    """Run ``streamq ARGS`` with ``threads`` Numba/OpenMP threads: wall, peak RSS (wait4 ru_maxrss and a
    0.1 s poll of the process tree), CPU seconds, output."""
    env = {k_: v for k_, v in os.environ.items() if k_ not in _BAD_ENV}
    env["NUMBA_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [str(Path(sys.executable).parent / "streamq"), *map(str, args)]
    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0}
    done = threading.Event()

    def poll():
        try:
            proc = psutil.Process(p.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                peak["rss"] = max(peak["rss"], rss)
            except psutil.Error:
                pass
            done.wait(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    # wait4 on this child gives its own exact peak RSS (ru_maxrss, KiB on Linux)
    out_s = p.stdout.read()
    err_s = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "rc": p.returncode, "polled_peak": peak["rss"], "maxrss": ru.ru_maxrss * 1024,
            "cpu": ru.ru_utime + ru.ru_stime, "stdout": out_s.strip(), "stderr": err_s.strip()}


def read_history(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for c in ("stage", "step", "k", "frames_seen", "dead", "repaired", "shifted"):
            r[c] = int(float(r[c]))
        for c in ("wall_seconds", "loss", "entropy", "log_k", "utilisation"):
            r[c] = float(r[c])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="11000000", help="comma-separated store sizes (frames)")
    ap.add_argument("--n", type=int, default=None, help="a single size (overrides --ns)")
    ap.add_argument("--k", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="data seed of the synthetic store")
    ap.add_argument("--store-dir", default="/tmp", help="where streamq_synth_<N> stores live / are made")
    ap.add_argument("--out-dir", default="/tmp/bench_scale", help="fit outputs go to OUT-DIR/n<N>_k<K>")
    ap.add_argument("--dead-sample", type=int, default=1_000_000,
                    help="frames sampled from the store after the fit to count codewords no frame picks (0: skip)")
    ap.add_argument("fit_args", nargs="*", help="extra `streamq fit` arguments after --, e.g. -- --steps 100")
    a = ap.parse_args()
    ns = [a.n] if a.n else [int(x) for x in a.ns.split(",")]
    sys.path.insert(0, str(HERE))
    from make_synthetic_store import write_store

    import psutil  # noqa: F401  (fail early if missing)

    os.environ["NUMBA_NUM_THREADS"] = str(a.threads)  # for the post-fit dead-codeword count in this process

    results = {}
    for n in ns:
        store = Path(a.store_dir) / (f"streamq_synth_{n // 1_000_000}M" if n % 1_000_000 == 0
                                     else f"streamq_synth_{n}")
        if not (store / "zarr.json").exists():
            print(f"making {store} ({n:,} frames) ...", flush=True)
            s = write_store(store, n, seed=a.seed, quiet=True)
            print(f"  {s['frames']:,} frames, {s['utterances']:,} utterances in {s['seconds']:.1f} s", flush=True)
        out = Path(a.out_dir) / f"n{n}_k{a.k}"
        out.mkdir(parents=True, exist_ok=True)
        print(f"N = {n:,}: streamq fit {store} {out} --k {a.k} --method lbg --quiet"
              f"{' ' + ' '.join(a.fit_args) if a.fit_args else ''}", flush=True)
        r = run_fit(store, out, a.k, a.threads, a.fit_args)
        if r["rc"] != 0:
            print(f"  FAILED rc={r['rc']}\n{r['stderr'][-3000:]}")
            continue
        h = read_history(out / "history.csv")
        last = h[-1]
        r.update(last=last, history=h)
        results[n] = r
        print(f"  {r['stdout']}")
        print(f"  wall {r['wall']:.1f} s (goal < 600; fit's own clock {last['wall_seconds']:.1f} s), "
              f"CPU {r['cpu']:.1f} s, peak RSS {r['maxrss'] / 2**20:.0f} MiB (ru_maxrss; polled tree peak "
              f"{r['polled_peak'] / 2**20:.0f} MiB; goal < 2048)")
        unused = round(last["k"] * (1 - last["utilisation"]))
        import numpy as np

        counts = np.load(out / "counts.npy")
        zero = int((counts == 0).sum())
        print(f"  end: K={last['k']}, dead (usage EMA) {last['dead']} (goal 0), unused on the evaluation sample "
              f"{unused}, zero training counts in the last stage (counts.npy) {zero}, repaired {last['repaired']}, shifted {last['shifted']}, eval loss {last['loss']:.4f}, "
              f"entropy {last['entropy']:.3f} / log K {last['log_k']:.3f}, frames seen {last['frames_seen']:,}, "
              f"steps {last['step']}")
        if a.dead_sample:
            from streamq.kernels.assign import assign
            from streamq.store import FrameStore

            C = np.load(out / "codebook.npy")
            S = FrameStore.open(store).sample(a.dead_sample, seed=12345)
            hits = np.bincount(assign(S, C)[0], minlength=len(C))
            print(f"  after the fit, {len(S):,} frames sampled from the store ({len(S) / len(C):.0f} per codeword): "
                  f"{int((hits == 0).sum())} codewords with no frame, {int((hits < 3).sum())} with < 3 frames")
        print(f"  {'stage':>5} {'K':>6} {'steps':>6} {'seconds':>8} {'loss':>9} {'dead':>5} {'repaired':>8} {'shifted':>7}")
        t_prev, s_prev = 0.0, 0
        for st in sorted({x["stage"] for x in h}):
            rows = [x for x in h if x["stage"] == st]
            e = rows[-1]
            print(f"  {st:5d} {e['k']:6d} {e['step'] - s_prev:6d} {e['wall_seconds'] - t_prev:8.1f} "
                  f"{e['loss']:9.4f} {e['dead']:5d} {e['repaired']:8d} {e['shifted']:7d}")
            t_prev, s_prev = e["wall_seconds"], e["step"]
        print(flush=True)
    if len(results) >= 2:
        lo, hi = min(results), max(results)
        a_, b_ = results[lo], results[hi]
        print(f"N {hi:,} vs {lo:,} ({hi / lo:.1f}x the frames): peak RSS ratio {b_['maxrss'] / a_['maxrss']:.3f} "
              f"({b_['maxrss'] / 2**20:.0f} vs {a_['maxrss'] / 2**20:.0f} MiB), wall ratio {b_['wall'] / a_['wall']:.2f}, "
              f"frames seen ratio {b_['last']['frames_seen'] / a_['last']['frames_seen']:.2f}")


if __name__ == "__main__":
    main()

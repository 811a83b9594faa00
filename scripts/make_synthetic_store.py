#!/usr/bin/env python
"""Write a synthetic, speech-like N x D frame store (streamq FrameStore), deterministic by seed.

The frames come from a fixed mixture of many anisotropic Gaussians ("phone states"):

- ``--components`` components (default 4096) whose means sit around ``--classes`` (48) "phone class"
  centres, with per-dimension spreads that fall off with the cepstral index like MFCCs do;
- each component has its own random rotation and log-uniform axis lengths (anisotropic, strongly
  correlated dimensions) times a log-normal overall scale (varied scales), and a Zipf-like weight;
- utterances (150-600 frames) are runs of segments: a component held for 1 + Geometric(1/8) frames
  (speech-like persistence), plus a small per-utterance channel offset.

Frames are generated in fixed blocks of 64 utterances, block b drawing from ``default_rng([seed, 1, b])``,
so the output depends only on (seed, N, D, components, classes): the first M frames of a store with N > M
frames equal a store made with N = M (up to the last, truncated utterance). Memory is bounded by one
append group (a few hundred thousand frames), whatever N is.

    python scripts/make_synthetic_store.py /tmp/synth_11M --n 11000000 --seed 0
    python scripts/make_synthetic_store.py /tmp/synth_2M --n 2000000 --seed 0

``synth_frames(n, ...)`` is importable (scripts/bench_kmeans.py uses it for in-memory data).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

BLOCK_UTTS = 64  # utterances per RNG block (fixed: changing it changes the data)


def mixture(dim: int = 13, components: int = 4096, classes: int = 48, seed: int = 0) -> dict:
    """The fixed mixture: means (M, D), factors L (M, D, D) with covariance L Lᵀ, weights (M,)."""
    rng = np.random.default_rng([seed, 0])
    d = np.arange(dim)
    spread = 10.0 / (1.0 + 0.35 * d)  # cepstrum-like fall-off of the per-dimension spread
    spread[0] = 6.0  # energy-like c0
    centres = rng.standard_normal((classes, dim)) * spread
    cls = rng.integers(classes, size=components)
    means = centres[cls] + rng.standard_normal((components, dim)) * spread * 0.35
    Q, _ = np.linalg.qr(rng.standard_normal((components, dim, dim)))  # random rotations (stacked QR)
    axes = np.exp(rng.uniform(np.log(0.05), np.log(1.0), (components, dim)))  # anisotropy up to 20:1
    overall = np.exp(rng.normal(0.0, 0.5, components))  # varied scales (log-normal, sd 0.5)
    # rotate in the whitened space (divide by spread), then scale back: correlated, cepstrum-shaped
    L = spread[None, :, None] * (Q * (axes * overall[:, None] * 0.3)[:, None, :])
    w = (1.0 + rng.permutation(components)) ** -0.8
    return {"means": means.astype(np.float32), "L": L.astype(np.float32), "weights": w / w.sum(),
            "spread": spread}


def _block(mix: dict, seed: int, b: int):
    """Utterances of RNG block ``b``: list of float32 (T, D) arrays."""
    rng = np.random.default_rng([seed, 1, b])
    M, dim = mix["means"].shape
    cdf = np.cumsum(mix["weights"])
    utts = []
    for _ in range(BLOCK_UTTS):
        T = int(rng.integers(150, 601))
        n_seg = T // 4 + 2
        dur = 1 + rng.geometric(1 / 8, n_seg)
        comp = np.minimum(np.searchsorted(cdf, rng.random(n_seg)), M - 1)
        lab = np.repeat(comp, dur)[:T]
        if len(lab) < T:  # vanishingly rare: pad with the last component
            lab = np.concatenate([lab, np.full(T - len(lab), comp[-1])])
        z = rng.standard_normal((T, dim)).astype(np.float32)
        x = mix["means"][lab] + np.einsum("tij,tj->ti", mix["L"][lab], z)
        x += (rng.standard_normal(dim) * mix["spread"] * 0.05).astype(np.float32)  # channel offset
        utts.append(np.ascontiguousarray(x, dtype=np.float32))
    return utts


def iter_utterances(n: int, dim: int = 13, components: int = 4096, classes: int = 48, seed: int = 0,
                    first_block: int = 0):
    """Yield float32 (T, D) utterances totalling exactly ``n`` frames (the last one truncated)."""
    mix = mixture(dim, components, classes, seed)
    left, b = int(n), first_block
    while left > 0:
        for x in _block(mix, seed, b):
            x = x[:left]
            left -= len(x)
            yield x
            if left == 0:
                return
        b += 1


def synth_frames(n: int, dim: int = 13, components: int = 4096, classes: int = 48, seed: int = 0,
                 first_block: int = 0) -> np.ndarray:
    """``n`` frames as one float32 (n, D) array. Different ``first_block`` ranges give disjoint utterances
    from the same mixture (e.g. a held-out set at ``first_block=10**6``)."""
    out = np.empty((n, dim), np.float32)
    i = 0
    for x in iter_utterances(n, dim, components, classes, seed, first_block):
        out[i:i + len(x)] = x
        i += len(x)
    return out


def write_store(path, n: int, dim: int = 13, components: int = 4096, classes: int = 48, seed: int = 0,
                group_frames: int = 200_000, quiet: bool = False) -> dict:
    from streamq.store import FrameStore

    t0 = time.perf_counter()
    cfg = {"synthetic": "anisotropic Gaussian mixture", "components": components, "classes": classes,
           "seed": seed, "generator": "scripts/make_synthetic_store.py"}
    store = FrameStore.create(path, dim, feature_config=cfg)
    pending, n_pending, u = [], 0, 0
    with store.writer_lock():
        for x in iter_utterances(n, dim, components, classes, seed):
            pending.append({"id": f"synth_{u:08d}", "frames": x, "duration": len(x) / 100.0})
            n_pending += len(x)
            u += 1
            if n_pending >= group_frames:
                store.append(pending)
                pending, n_pending = [], 0
                if not quiet:
                    print(f"\r{store.n_frames:,} / {n:,} frames", end="", file=sys.stderr, flush=True)
        store.append(pending)
    if not quiet:
        print(file=sys.stderr)
    return {"store": str(path), "frames": store.n_frames, "utterances": store.n_utterances,
            "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="output directory (must not exist, or be empty)")
    ap.add_argument("--n", type=int, default=11_000_000, help="frames (default 11,000,000)")
    ap.add_argument("--dim", type=int, default=13)
    ap.add_argument("--components", type=int, default=4096, help="Gaussians in the mixture")
    ap.add_argument("--classes", type=int, default=48, help="'phone classes' the component means cluster around")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    if Path(a.store).exists() and any(Path(a.store).iterdir()):
        sys.exit(f"{a.store}: exists and is not empty")
    s = write_store(a.store, a.n, a.dim, a.components, a.classes, a.seed, quiet=a.quiet)
    print(f"{s['store']}: {s['frames']:,} frames, {s['utterances']:,} utterances in {s['seconds']:.1f} s")


if __name__ == "__main__":
    main()

"""Nearest-codeword assignment and hard-assignment cluster statistics (Numba kernels).

Distances use ``||x'||^2 - 2 x'.c' + ||c'||^2`` on *centred and scaled* copies
``x' = (x - s) 2^-e``, ``c' = (c - s) 2^-e``, fused with a running argmin and
computed tile by tile, so no ``B x K`` matrix is ever formed.  The shift ``s``
is the codebook's mean and ``2^-e`` a power of two that brings the centred
codebook to unit size, so the expansion does not cancel on uncentred data
(offset 1e4) and cannot overflow float32 for large values (1e19, 1e30).  The
winner's squared distance is then recomputed directly, ``sum_d (x_d - c_d)^2``
with float64 accumulation from the original float32 values: ``d2`` has no
cancellation at all.

Design of :func:`assign`
------------------------
Points are processed in tiles of ``_P = 48`` points, centred, scaled and
transposed into a small ``(D, 48)`` buffer so that one row holds dimension
``d`` of 48 points, i.e. three 16-lane float32 vectors.  The inner loop
(:func:`_scan_tile`, emitted directly as LLVM IR with explicit ``<16 x float>``
vectors, because Numba's auto-vectoriser prefers 256-bit vectors and keeps
accumulators in memory) walks the codebook four codewords at a time and, for
every dimension, issues one broadcast of ``-2 c'[k, d]`` and one fused
multiply-add per 16 points into twelve register accumulators initialised with
``||c'_k||^2``.  A branch-free compare/select keeps, for every point, the
smallest value seen so far and its codeword index.  Codewords are visited in
increasing index order with a strict ``<``, so **on exact ties the lowest
codeword index wins**.  A point whose best fused value is not finite (its
scaled coordinates overflow float32, or it holds a NaN) is redone by an exact
float64 scan.

Parallelism is over groups of point tiles (``prange``); inside a group the
codebook is walked in blocks that stay in L2 so that large codebooks
(K = 65536) are not re-streamed from memory for every tile.

:func:`cluster_stats` is the one hard-assignment statistics kernel (counts,
sums, per-dimension sums of squares about a shift, summed squared distances)
used by the codebook trainers, the GMM initialisation and the aligner.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
import numba
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import parallel_njit

__all__ = ["assign", "cluster_stats", "ClusterStats", "grouped_layout", "GroupedCodebook"]

# Tile shape of the inner kernel (IR-generation constants, not read by @njit code):
# 48 points = three 16-lane vectors, times 4 codewords = 12 zmm accumulators.
# Measured on the 2-core AVX-512 box: (3, 4) ~ (2, 6) > (2, 4) > (1, 8).
_NV = 3
_P = 16 * _NV  # points per tile
_NC = 4  # codewords per inner step; K is padded to a multiple of this
_F32_MAX = float(np.finfo(np.float32).max)
_FAR = 4096.0  # grouped search: scaled coordinates beyond this go to the fused scan


@intrinsic
def _scan_tile(typingctx, xt, cb, cn, k0, k1, bv, bi):
    """Running argmin of one 48-point tile over codewords ``k0 .. k1-1``.

    Parameters (inside ``@njit`` code)
    ----------
    xt : float32 (D, 48) C-contiguous, IN. Transposed point tile.
    cb : float32 (Kp, D) C-contiguous, IN. ``-2 * C`` (padded rows are 0).
    cn : float32 (Kp,), IN. ``||c_k||^2`` (padded rows are +inf).
    k0, k1 : int64. Codeword range; ``k1 - k0`` is a multiple of 4.
    bv : float32 (48,), INOUT. Best ``||c||^2 - 2 x.c`` so far per point.
    bi : int32 (48,), INOUT. Index of that codeword (lowest index on ties).
    """
    sig = types.void(xt, cb, cn, k0, k1, bv, bi)

    def codegen(context, builder, signature, args):
        xt_v, cb_v, cn_v, k0_v, k1_v, bv_v, bi_v = args
        xta = context.make_array(signature.args[0])(context, builder, xt_v)
        cba = context.make_array(signature.args[1])(context, builder, cb_v)
        cna = context.make_array(signature.args[2])(context, builder, cn_v)
        bva = context.make_array(signature.args[5])(context, builder, bv_v)
        bia = context.make_array(signature.args[6])(context, builder, bi_v)
        f32 = ir.FloatType()
        i32 = ir.IntType(32)
        i64 = ir.IntType(64)
        v16f = ir.VectorType(f32, 16)
        v16i = ir.VectorType(i32, 16)
        zero16 = ir.Constant(ir.VectorType(i32, 16), [0] * 16)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16f, [v16f, v16f, v16f]), "llvm.fma.v16f32")

        def splat(val, vty):
            undef = ir.Constant(vty, ir.Undefined)
            v = builder.insert_element(undef, val, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, undef, zero16)

        def vload(ptr, idx, vty):
            p = builder.gep(ptr, [idx])
            p = builder.bitcast(p, vty.as_pointer())
            return builder.load(p, align=4)

        def vstore(val, ptr, idx, vty):
            p = builder.gep(ptr, [idx])
            p = builder.bitcast(p, vty.as_pointer())
            builder.store(val, p, align=4)

        xt_p = xta.data
        cb_p = cba.data
        cn_p = cna.data
        D = builder.extract_value(cba.shape, 1)
        bvs = [cgutils.alloca_once_value(builder, vload(bva.data, ir.Constant(i64, 16 * r), v16f))
               for r in range(_NV)]
        bis = [cgutils.alloca_once_value(builder, vload(bia.data, ir.Constant(i64, 16 * r), v16i))
               for r in range(_NV)]
        accs = [[cgutils.alloca_once(builder, v16f) for _ in range(_NV)] for _ in range(_NC)]
        n_steps = builder.sdiv(builder.sub(k1_v, k0_v), ir.Constant(i64, _NC))
        with cgutils.for_range(builder, n_steps) as kloop:
            k = builder.add(k0_v, builder.mul(kloop.index, ir.Constant(i64, _NC)))
            rows = []
            for j in range(_NC):
                kj = builder.add(k, ir.Constant(i64, j))
                cnj = builder.load(builder.gep(cn_p, [kj]))
                s = splat(cnj, v16f)
                for r in range(_NV):
                    builder.store(s, accs[j][r])
                rows.append(builder.gep(cb_p, [builder.mul(kj, D)]))
            with cgutils.for_range(builder, D) as dloop:
                d = dloop.index
                xrow = builder.mul(d, ir.Constant(i64, _P))
                xv = [vload(xt_p, builder.add(xrow, ir.Constant(i64, 16 * r)), v16f)
                      for r in range(_NV)]
                for j in range(_NC):
                    c = splat(builder.load(builder.gep(rows[j], [d])), v16f)
                    for r in range(_NV):
                        a = builder.load(accs[j][r])
                        builder.store(builder.call(fma, [xv[r], c, a]), accs[j][r])
            for j in range(_NC):
                kj = builder.trunc(builder.add(k, ir.Constant(i64, j)), i32)
                ks = splat(kj, v16i)
                for r in range(_NV):
                    a = builder.load(accs[j][r])
                    b = builder.load(bvs[r])
                    m = builder.fcmp_ordered("<", a, b)
                    builder.store(builder.select(m, a, b), bvs[r])
                    builder.store(builder.select(m, ks, builder.load(bis[r])), bis[r])
        for r in range(_NV):
            vstore(builder.load(bvs[r]), bva.data, ir.Constant(i64, 16 * r), v16f)
            vstore(builder.load(bis[r]), bia.data, ir.Constant(i64, 16 * r), v16i)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _exact_nearest(X, C, i):
    """Exact float64 scan for point ``i`` (fallback when its fused values are not finite).

    X : float32 (B, D), IN. C : float32 (K, D), IN. Returns the lowest k minimising
    ``sum_d (x_d - c_kd)^2`` in float64 (0 if every distance is NaN).
    """
    K, D = C.shape
    best = np.inf
    arg = 0
    for k in range(K):
        acc = 0.0
        for d in range(D):
            diff = np.float64(X[i, d]) - np.float64(C[k, d])
            acc += diff * diff
        if acc < best:
            best = acc
            arg = k
    return arg


@njit(cache=True, nogil=True)
def _exact_d2(X, C, i, k):
    """``sum_d (X[i, d] - C[k, d])^2`` accumulated in float64 from the float32 values, rounded once to float32."""
    acc = 0.0
    for d in range(X.shape[1]):
        diff = np.float64(X[i, d]) - np.float64(C[k, d])
        acc += diff * diff
    return np.float32(acc)


@parallel_njit(cache=True, nogil=True)
def _assign_kernel(X, C, shift, scale, cb, cn, P, kblock, tiles_per_group, out_labels, out_d2):
    """Fused nearest-codeword search on centred, scaled points, parallel over groups of point tiles.

    Parameters
    ----------
    X : float32 (B, D) C-contiguous, IN. Original points.
    C : float32 (K, D) C-contiguous, IN. Original codebook (for the exact ``d2`` and the fallback).
    shift : float64 (D,), IN. Centring offset ``s``.
    scale : float64. Power of two ``2^-e``; the kernel scans ``x' = float32((x - s) * scale)``.
    cb : float32 (Kp, D) C-contiguous, IN. ``-2 c'``, padded with zero rows to a multiple of 4.
    cn : float32 (Kp,), IN. ``||c'||^2``; +inf on padded rows (never chosen).
    P : int64. Points per tile; must equal ``_P`` (the inner kernel's tile width).
    kblock : int64. Codewords per cache block (multiple of 4).
    tiles_per_group : int64. Tiles that share one pass over each codebook block.
    out_labels : int64 (B,), OUT. Nearest codeword (lowest index on exact ties).
    out_d2 : float32 (B,), OUT. Its squared distance ``sum_d (x_d - c_d)^2``, float64 accumulation,
        rounded once to float32 (inf where that overflows, NaN for a NaN point).
    """
    B, D = X.shape
    Kp = cb.shape[0]
    gpts = P * tiles_per_group
    n_groups = (B + gpts - 1) // gpts
    for g in prange(n_groups):
        p0 = g * gpts
        p1 = min(B, p0 + gpts)
        nt = (p1 - p0 + P - 1) // P
        xt = np.zeros((nt, D, P), dtype=np.float32)
        bv = np.full((nt, P), np.inf, dtype=np.float32)
        bi = np.zeros((nt, P), dtype=np.int32)
        for t in range(nt):
            for p in range(min(P, p1 - p0 - t * P)):
                i = p0 + t * P + p
                for d in range(D):
                    xt[t, d, p] = np.float32((np.float64(X[i, d]) - shift[d]) * scale)
        for kb0 in range(0, Kp, kblock):
            kb1 = min(Kp, kb0 + kblock)
            for t in range(nt):
                _scan_tile(xt[t], cb, cn, kb0, kb1, bv[t], bi[t])
        for t in range(nt):
            for p in range(min(P, p1 - p0 - t * P)):
                i = p0 + t * P + p
                k = np.int64(bi[t, p])
                v = bv[t, p]
                if not (v < np.inf and v > -np.inf):  # fused values overflowed (or NaN): exact scan
                    k = _exact_nearest(X, C, i)
                out_d2[i] = _exact_d2(X, C, i, k)
                out_labels[i] = k


def _prepare_codebook(C, shift, scale):
    """``-2 c'`` padded to a multiple of ``_NC`` rows, and ``||c'||^2`` (+inf on padding), with
    ``c' = float32((C - shift) * scale)`` rounded exactly as the kernel rounds the points."""
    K, D = C.shape
    Kp = (K + _NC - 1) // _NC * _NC
    Cs = ((C.astype(np.float64) - shift) * scale).astype(np.float32)
    cb = np.zeros((Kp, D), dtype=np.float32)
    cb[:K] = -2.0 * Cs
    cn = np.full(Kp, np.inf, dtype=np.float32)
    C64 = Cs.astype(np.float64)
    cn[:K] = np.einsum("kd,kd->k", C64, C64)
    return cb, cn


def _centre(C):
    """Shift (the codebook's mean, float64 (D,)) and power-of-two scale bringing ``C - shift`` to ~1."""
    C64 = C.astype(np.float64)
    shift = C64.mean(axis=0)
    amax = float(np.abs(C64 - shift).max())
    if not amax > 0.0:  # every codeword equal: nothing to rank
        return shift, 1.0
    e = int(np.clip(np.frexp(amax)[1], -120, 120))
    return shift, float(np.ldexp(1.0, -e))


def _check(X, C):
    X = np.asarray(X)
    C = np.asarray(C)
    if X.dtype != np.float32 or C.dtype != np.float32:
        raise TypeError(
            f"expected float32 X and C, got {X.dtype} and {C.dtype}; pass .astype(np.float32)")
    if X.ndim != 2 or C.ndim != 2 or X.shape[1] != C.shape[1]:
        raise ValueError(f"expected X (B, D) and C (K, D) with the same D, got {X.shape} and {C.shape}")
    if C.shape[0] < 1 or C.shape[1] < 1:
        raise ValueError(f"codebook must have K >= 1 and D >= 1, got {C.shape}")
    if not np.isfinite(C).all():
        bad = np.argwhere(~np.isfinite(C))[0]
        raise ValueError(f"codebook C holds NaN or inf (first at row {bad[0]}, dim {bad[1]})")
    return np.ascontiguousarray(X), np.ascontiguousarray(C)


def _raise_nonfinite(X, d2, what="X"):
    """One-line ValueError for the first point whose squared distance is not finite."""
    i = int(np.flatnonzero(~np.isfinite(d2))[0])
    if not np.isfinite(X[i]).all():
        raise ValueError(f"{what} row {i} holds NaN or inf; remove or repair non-finite frames")
    raise ValueError(f"{what} row {i}: squared distance to its nearest codeword overflows float32 "
                     f"(|values| up to {float(np.abs(X[i]).max()):.3g}); rescale the features")


def assign(X, C, out_labels=None, out_d2=None, *, kblock=None, tiles_per_group=None, group_of=None):
    """Nearest codeword of every point (fused L2 distance + running argmin on centred data).

    Parameters
    ----------
    X : float32 (B, D). Points (copied to C order if needed). B >= 0. Must be finite.
    C : float32 (K, D). Codebook; K >= 1 (tested to 65536), D >= 1 (tested to 128). Must be finite.
    out_labels : int64 (B,), optional OUT buffer.
    out_d2 : float32 (B,), optional OUT buffer.
    kblock : int, optional. Codewords per cache block (default: about 256 KiB of ``-2C``).
    tiles_per_group : int, optional. 48-point tiles per parallel work item (default:
        up to 8, fewer for small batches so that every thread gets work).
    group_of : int (K,), optional. A partition of the codewords into groups (any partition is correct;
        compact groups are fast: :func:`streamq.selection.group_codewords`). The search is then by group
        bounds (``_grouped_kernel``): per point the G group centres, then only the groups that the
        triangle inequality cannot rule out, nearest first. Same result, ranked on float32
        ``||x' - c'||^2`` directly (no expansion; so it may break a near-tie the other way than the fused
        scan). Pays from K ~ 2048 on structured data (speech frames, K = 16384, G = 271: ~400 codewords
        scanned per point, ~6x faster). Where the bounds do not pay (an unstructured cloud) the batch
        falls back to the fused scan after a 1024-point probe. The layout is rebuilt from ``C`` on every
        call (O(K D)): a stale partition costs speed, never correctness.

    Returns
    -------
    labels : int64 (B,). ``argmin_k ||x - c_k||^2``; **on exact ties the lowest k wins**.
        Ranking uses float32 ``||c'||^2 - 2 x'.c'`` (fused multiply-adds) on ``x' = (x - s) 2^-e``,
        ``c' = (c - s) 2^-e`` with ``s`` the codebook mean: two codewords whose float64 distances
        differ by less than ~1e-6 of ``||x - s||^2 + ||c - s||^2`` may be ranked either way. The
        bound is relative to the *centred* norms, so an offset of the data (1e4) costs nothing.
    d2 : float32 (B,). ``sum_d (x_d - c_d)^2`` for the chosen codeword, accumulated in float64
        from the float32 inputs and rounded once (relative error <= 2^-24, no cancellation).

    Raises
    ------
    TypeError if X or C is not float32. ValueError (one line) for shape mismatches, a NaN / inf in
    C or X (naming the first bad row), or a squared distance that overflows float32.
    """
    X, C = _check(X, C)
    B = X.shape[0]
    if out_labels is None:
        out_labels = np.empty(B, dtype=np.int64)
    if out_d2 is None:
        out_d2 = np.empty(B, dtype=np.float32)
    if B == 0:
        return out_labels, out_d2
    if group_of is not None:
        _assign_grouped(X, C, group_of, out_labels, out_d2)
    else:
        _assign_fused(X, C, out_labels, out_d2, kblock, tiles_per_group)
    if not float(out_d2.max()) < np.inf:  # NaN propagates through max: one reduction, no B-sized temporary
        _raise_nonfinite(X, out_d2)
    return out_labels, out_d2


def _assign_fused(X, C, out_labels, out_d2, kblock=None, tiles_per_group=None):
    """:func:`assign`'s fused scan on checked, non-empty inputs (no check of the result)."""
    B, D = X.shape
    shift, scale = _centre(C)
    cb, cn = _prepare_codebook(C, shift, scale)
    if kblock is None:
        kblock = (65536 // D) // _NC * _NC
    kblock = int(max(_NC, min(cb.shape[0], (int(kblock) + _NC - 1) // _NC * _NC)))
    if tiles_per_group is None:
        n_tiles = (B + _P - 1) // _P
        tiles_per_group = max(1, min(8, n_tiles // (4 * numba.get_num_threads())))
    _assign_kernel(X, C, shift, scale, cb, cn, _P, kblock, int(tiles_per_group), out_labels, out_d2)


# ------------------------------------------------------------------ exact search by group bounds
@njit(cache=True, nogil=True)
def _sq_dists(x, M, p0, p1, out):
    """``out[m] = sum_d (x[d] - M[d, p0 + m])^2`` for m < p1 - p0 (float32; vectorised over m).

    x : float32 (D,), IN. M : float32 (D, n) C-contiguous, IN (columns are points). out : float32, OUT."""
    n = p1 - p0
    for m in range(n):
        out[m] = 0.0
    for d in range(x.shape[0]):
        xd = x[d]
        row = M[d, p0:p1]
        for m in range(n):
            t = xd - row[m]
            out[m] += t * t


@njit(cache=True, nogil=True)
def _best_of(acc, n, ids, p0, best, bk):
    """Running minimum over ``acc[:n]`` (ids ``ids[p0 + m]``), lowest id on exact ties."""
    for m in range(n):
        v = acc[m]
        if v < best or (v == best and ids[p0 + m] < bk):
            best = v
            bk = ids[p0 + m]
    return best, bk


@parallel_njit(cache=True, nogil=True)
def _grouped_kernel(X, C, shift, scale, centT, rad, gptr, memT, ids, eps, block, out_labels, out_d2,
                    out_scanned):
    """Exact nearest codeword by group bounds, parallel over blocks of ``block`` points.

    X : float32 (B, D), IN: points. C : float32 (K, D), IN: codebook (exact ``d2``, the fallback).
    shift : float64 (D,), scale : float64, IN: the search is on ``x' = float32((x - shift) * scale)`` and the
    codewords likewise. centT : float32 (D, G), IN: group centres (scaled). rad : float32 (G,), IN: upper
    bounds of ``||c'_k - centre_g||`` over the members of g. gptr : int64 (G + 1,), memT : float32 (D, K),
    ids : int64 (K,), IN: group g's members are columns ``gptr[g] .. gptr[g + 1]`` of memT (scaled codewords),
    with codeword ids ``ids[...]``, increasing inside a group. eps : float32, IN: relative margin on every
    comparison (several times float32 summation error for this D). out_labels int64 (B,), out_d2 float32
    (B,), out_scanned int64 (B,) (codewords scanned, centres not counted): OUT. A point with a scaled
    coordinate beyond ``_FAR`` (or NaN) gets label -1: float32 ``x' - c'`` cannot rank codewords there, so
    the caller hands it to the fused scan.

    Per point: squared distances to the G centres; the group of the nearest centre is scanned; every other
    group whose bound ``||x' - centre_g|| - rad_g`` could still beat the best distance is a candidate;
    candidates are scanned nearest centre first, each re-tested against the best found so far. A group is
    skipped only when none of its members can be as near as the best (the triangle inequality, with the
    margin), so the label is the exact argmin of the float32 distances, lowest id on exact ties.
    """
    B, D = X.shape
    G = rad.shape[0]
    max_size = 1
    for g in range(G):
        max_size = max(max_size, gptr[g + 1] - gptr[g])
    lo_f = np.float32(1.0) - 2 * eps
    hi_f = np.float32(1.0) + eps
    n_blocks = (B + block - 1) // block
    for blk in prange(n_blocks):
        x = np.empty(D, np.float32)
        dc = np.empty(G, np.float32)
        acc = np.empty(max_size, np.float32)
        cand = np.empty(G, np.int64)
        for i in range(blk * block, min(B, (blk + 1) * block)):
            far = False
            for d in range(D):
                v = (np.float64(X[i, d]) - shift[d]) * scale
                x[d] = np.float32(v)
                far = far or not (abs(v) <= _FAR)
            if far:  # beyond the codebook's scale by 2^12 (or NaN): left to the fused scan (its expansion)
                out_labels[i] = -1
                out_d2[i] = np.nan
                out_scanned[i] = 0
                continue
            _sq_dists(x, centT, 0, G, dc)
            g0 = 0
            for g in range(1, G):
                if dc[g] < dc[g0]:
                    g0 = g
            p0, p1 = gptr[g0], gptr[g0 + 1]
            _sq_dists(x, memT, p0, p1, acc)
            best, bk = _best_of(acc, p1 - p0, ids, p0, np.float32(np.inf), np.int64(-1))
            scanned = p1 - p0
            sb = np.sqrt(best) * hi_f
            nc = 0
            for g in range(G):  # candidates, kept sorted by centre distance (there are a handful)
                t = sb + rad[g]
                if g != g0 and not (dc[g] * lo_f > t * t):
                    j = nc
                    while j > 0 and dc[cand[j - 1]] > dc[g]:
                        cand[j] = cand[j - 1]
                        j -= 1
                    cand[j] = g
                    nc += 1
            for c in range(nc):
                g = cand[c]
                t = sb + rad[g]
                if dc[g] * lo_f > t * t:
                    continue
                p0, p1 = gptr[g], gptr[g + 1]
                _sq_dists(x, memT, p0, p1, acc)
                best, bk = _best_of(acc, p1 - p0, ids, p0, best, bk)
                scanned += p1 - p0
                sb = np.sqrt(best) * hi_f
            out_d2[i] = _exact_d2(X, C, i, bk)
            out_labels[i] = bk
            out_scanned[i] = scanned


class GroupedCodebook(NamedTuple):
    """Kernel layout of a codebook under a partition into groups (built by :func:`grouped_layout`)."""

    shift: np.ndarray  #: float64 (D,), centring offset (as :func:`assign`)
    scale: float  #: power of two
    centT: np.ndarray  #: float32 (D, G), scaled group centres (the members' means)
    rad: np.ndarray  #: float32 (G,), scaled radii, rounded up
    gptr: np.ndarray  #: int64 (G + 1,), member column ranges
    memT: np.ndarray  #: float32 (D, K), scaled codewords in group order
    ids: np.ndarray  #: int64 (K,), codeword id of each column


def grouped_layout(C, group_of) -> GroupedCodebook:
    """The layout :func:`assign` searches with ``group_of``: codebook ``C`` (float32 (K, D), finite) under the
    partition ``group_of`` (int (K,), any ids; empty groups are dropped). O(K D)."""
    K, D = C.shape
    g = np.asarray(group_of).ravel()
    if g.shape != (K,):
        raise ValueError(f"group_of must hold one group id per codeword ({K}), got shape {g.shape}")
    _, g = np.unique(g, return_inverse=True)
    G = int(g.max()) + 1
    order = np.argsort(g, kind="stable")  # stable: ids increase inside a group
    sizes = np.bincount(g, minlength=G)
    gptr = np.zeros(G + 1, np.int64)
    gptr[1:] = np.cumsum(sizes)
    shift, scale = _centre(C)
    Cs = ((C.astype(np.float64) - shift) * scale).astype(np.float32)
    C64 = Cs.astype(np.float64)
    cent = np.stack([np.bincount(g, weights=C64[:, d], minlength=G) for d in range(D)], 1) / sizes[:, None]
    cent32 = cent.astype(np.float32)
    dist = np.sqrt(((C64 - cent32.astype(np.float64)[g]) ** 2).sum(1))
    rad = np.zeros(G)
    np.maximum.at(rad, g, dist)
    rad = np.nextafter((rad * (1 + 1e-7)).astype(np.float32), np.float32(np.inf))
    return GroupedCodebook(shift, scale, np.ascontiguousarray(cent32.T), rad, gptr,
                           np.ascontiguousarray(Cs[order].T), order.astype(np.int64))


_PROBE = 1024  # points searched by group bounds before deciding whether the bounds pay on this batch
_GROUPED_WORTH = 6.0  # the bounds pay while (centres + codewords scanned) per point < K / this (a scan by
# bounds costs ~5x the fused kernel per codeword: one point against one group's columns, not 48 x 4 tiles)


def _assign_grouped(X, C, group_of, out_labels, out_d2):
    """:func:`assign` by group bounds; returns the codewords scanned per point (int64 (B,); K where the fused
    scan did the work). The first ``_PROBE`` points go by the bounds; if they scanned too many codewords for
    the bounds to pay (unstructured data: an isotropic cloud in 13 dimensions scans most of K) the rest of the
    batch takes the fused scan, so a partition never costs more than a probe."""
    lay = grouped_layout(C, group_of)
    B, D = X.shape
    K, G = C.shape[0], lay.rad.shape[0]
    scanned = np.empty(B, np.int64)
    eps = np.float32((D + 8) * 2.0 ** -23)  # > 2x the worst-case relative error of a D-term float32 sum

    def run(a, b):
        block = int(max(16, min(256, (b - a) // (8 * numba.get_num_threads()) or 16)))
        _grouped_kernel(X[a:b], C, lay.shift, lay.scale, lay.centT, lay.rad, lay.gptr, lay.memT, lay.ids, eps,
                        block, out_labels[a:b], out_d2[a:b], scanned[a:b])

    p = min(B, _PROBE)
    run(0, p)
    if p < B:
        probe = scanned[:p][out_labels[:p] >= 0]
        if len(probe) and (G + probe.mean()) * _GROUPED_WORTH < K:
            run(p, B)
        else:
            _assign_fused(X[p:], C, out_labels[p:], out_d2[p:])
            scanned[p:] = K
    far = np.flatnonzero(out_labels < 0)
    if len(far):
        lab, d2 = np.empty(len(far), np.int64), np.empty(len(far), np.float32)
        _assign_fused(np.ascontiguousarray(X[far]), C, lab, d2)
        out_labels[far], out_d2[far] = lab, d2  # a NaN or overflow stays in d2 for assign's one-line error
        scanned[far] = C.shape[0]
    return scanned


# ------------------------------------------------------------------------------ cluster statistics
class ClusterStats(NamedTuple):
    """Hard-assignment statistics of :func:`cluster_stats` (float64 sums, exact int64 counts)."""

    counts: np.ndarray  #: int64 (K,)
    sums: np.ndarray  #: float64 (K, D): sum of x - shift
    sq: np.ndarray | None  #: float64 (K, D): sum of (x - shift)^2, or None without second_order
    sse: np.ndarray | None  #: float64 (K,): sum of d2, or None without d2


@njit(cache=True, nogil=True)
def _stats_slice(X, labels, a, b, shift, d2, counts, sums, sq, sse):
    """Accumulate points ``a .. b-1`` into one set of buffers (the single kernel body).

    X : float32 (B, D), IN. labels : int64 (B,), IN, in [0, K). shift : float64 (D,), IN.
    d2 : float32 (B,) or (0,), IN (empty: no sse). counts : int64 (K,), INOUT. sums : float64 (K, D),
    INOUT. sq : float64 (K, D) or (K, 0), INOUT (width 0: no second order). sse : float64 (K,), INOUT.
    """
    D = X.shape[1]
    want_sq = sq.shape[1] == D and D > 0
    want_sse = d2.shape[0] > 0
    for i in range(a, b):
        k = labels[i]
        counts[k] += 1
        if want_sse:
            sse[k] += d2[i]
        if want_sq:
            for d in range(D):
                v = np.float64(X[i, d]) - shift[d]
                sums[k, d] += v
                sq[k, d] += v * v
        else:
            for d in range(D):
                sums[k, d] += np.float64(X[i, d]) - shift[d]


@njit(cache=True, nogil=True)
def _stats_serial(X, labels, K, shift, d2, sq_width):
    """Single-threaded statistics (small batches: a parallel region costs more than the work).

    Returns counts int64 (K,), sums float64 (K, D), sq float64 (K, sq_width), sse float64 (K,).
    """
    B, D = X.shape
    counts = np.zeros(K, np.int64)
    sums = np.zeros((K, D), np.float64)
    sq = np.zeros((K, sq_width), np.float64)
    sse = np.zeros(K, np.float64)
    _stats_slice(X, labels, 0, B, shift, d2, counts, sums, sq, sse)
    return counts, sums, sq, sse


@njit(cache=True, parallel=True, nogil=True)
def _stats_parallel(X, labels, K, shift, d2, sq_width, n_slices):
    """Statistics over ``n_slices`` contiguous slices, one private buffer set each, reduced afterwards
    (serial merge in slice order, so results do not depend on thread scheduling).

    Returns counts int64 (K,), sums float64 (K, D), sq float64 (K, sq_width), sse float64 (K,).
    """
    B, D = X.shape
    pc = np.zeros((n_slices, K), np.int64)
    ps = np.zeros((n_slices, K, D), np.float64)
    pq = np.zeros((n_slices, K, sq_width), np.float64)
    pe = np.zeros((n_slices, K), np.float64)
    step = (B + n_slices - 1) // n_slices
    for s in prange(n_slices):
        _stats_slice(X, labels, s * step, min(B, (s + 1) * step), shift, d2, pc[s], ps[s], pq[s], pe[s])
    counts = np.zeros(K, np.int64)
    sums = np.zeros((K, D), np.float64)
    sq = np.zeros((K, sq_width), np.float64)
    sse = np.zeros(K, np.float64)
    for s in range(n_slices):
        for k in range(K):
            counts[k] += pc[s, k]
            sse[k] += pe[s, k]
            for d in range(D):
                sums[k, d] += ps[s, k, d]
            for d in range(sq_width):
                sq[k, d] += pq[s, k, d]
    return counts, sums, sq, sse


_SERIAL_BELOW = 65536  # points per slice below which the parallel region costs more than it saves


def cluster_stats(X, labels, K, *, shift=None, d2=None, second_order=True, n_slices=None):
    """Per-cluster statistics of a hard-assigned batch: the one statistics kernel of streamq.

    Parameters
    ----------
    X : float32 (B, D). Points (must be finite; checked through the sums).
    labels : int (B,). Cluster of each point, in ``[0, K)`` (e.g. from :func:`assign`).
    K : int >= 1. Number of clusters (clusters with no point get zeros).
    shift : float (D,), optional. Sums are of ``x - shift`` (default 0). Pass a point near the data
        (the codebook mean) when second-order sums are used for variances: float64 keeps ~16 digits,
        so ``sq / n - mean^2`` about a far origin loses ``log10(offset^2 / var)`` of them.
    d2 : float (B,), optional. Squared distance of each point to its codeword (from :func:`assign`);
        its per-cluster sum is ``sse``.
    second_order : bool. Also return per-dimension sums of squares (default True).
    n_slices : int, optional. Private per-thread buffer sets (default: Numba's thread count, 1 for
        batches under 65536 points per slice, which take the serial path). Results depend on it only
        through float64 rounding.

    Returns
    -------
    ClusterStats(counts int64 (K,), sums float64 (K, D), sq float64 (K, D) or None,
    sse float64 (K,) or None). Accumulation in float64 (relative error ~1e-16 * points per cluster).
    """
    X = np.ascontiguousarray(X)
    if X.dtype != np.float32:
        raise TypeError(f"expected float32 X, got {X.dtype}; pass X.astype(np.float32)")
    if X.ndim != 2:
        raise ValueError(f"expected X (B, D), got shape {X.shape}")
    B, D = X.shape
    K = int(K)
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},), got {labels.shape}")
    if B and (labels.min() < 0 or labels.max() >= K):
        raise ValueError(f"labels must lie in [0, {K}), got [{labels.min()}, {labels.max()}]")
    if shift is None:
        sh = np.zeros(D, np.float64)
    else:
        sh = np.ascontiguousarray(shift, dtype=np.float64).reshape(-1)
        if sh.shape != (D,) or not np.isfinite(sh).all():
            raise ValueError(f"shift must be finite with shape ({D},), got shape {np.shape(shift)}")
    if d2 is None:
        dd = np.zeros(0, np.float32)
    else:
        dd = np.ascontiguousarray(d2, dtype=np.float32)
        if dd.shape != (B,):
            raise ValueError(f"d2 must have shape ({B},), got {dd.shape}")
        if B == 0:
            dd = np.zeros(0, np.float32)
    width = D if second_order else 0
    if n_slices is None:
        n_slices = max(1, min(numba.get_num_threads(), B // _SERIAL_BELOW))
    n_slices = int(max(1, min(int(n_slices), max(B, 1))))
    if n_slices == 1:
        counts, sums, sq, sse = _stats_serial(X, labels, K, sh, dd, width)
    else:
        counts, sums, sq, sse = _stats_parallel(X, labels, K, sh, dd, width, n_slices)
    if not np.isfinite(sums.sum()) or (d2 is not None and not np.isfinite(sse.sum())):
        raise ValueError("X (or d2) holds NaN or inf: cluster statistics would not be finite")
    return ClusterStats(counts, sums, sq if second_order else None, sse if d2 is not None else None)

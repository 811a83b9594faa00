"""Files streamq writes and reads back: codebooks, GMMs, aligner models, checkpoints, histories, locks.

One atomic writer (:func:`atomic_write`: a temporary file in the same directory, then ``os.replace``),
one validation per kind of model, and no pickle anywhere (``np.load(..., allow_pickle=False)``).
Every error is a :class:`ArtifactError` (a ``ValueError``) whose one-line message names the file.

File names, per command, so that two commands can share an output directory::

    fit      codebook.npy, codebook_counts.npy, codebook_stages.npz, fit_history.csv, fit_config.json,
             fit_checkpoint.npz
    compare  compare_history.csv, codebook_{random,lloyd,lbg}.npy, loss_vs_steps.png, loss_vs_wall.png
    gmm      gmm.npz, gmm_history.csv, gmm_history.png, gmm_config.json
    align    aligner.npz, align_history.csv, align_summary.json, alignment_analysis.csv, words.ctm,
             chars.ctm, unaligned.tsv, textgrids/, traces/, plots/
    quantise OUT (a Zarr group: labels int32 (N,), d2 float32 (N,))

A directory is locked (``.streamq.lock``, ``flock``) while a command writes into it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CODEBOOK = "codebook.npy"
CODEBOOK_COUNTS = "codebook_counts.npy"
CODEBOOK_STAGES = "codebook_stages.npz"
GMM = "gmm.npz"
ALIGNER = "aligner.npz"
LOCK = ".streamq.lock"


class ArtifactError(ValueError):
    """A model, checkpoint or output file that cannot be read or written as asked; the message names it."""


# ------------------------------------------------------------------ writing
def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path``: readers see the old file or
    the whole new one, never a part. The temporary name keeps the suffix (``np.savez`` appends ``.npz``
    to names without it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path, text: str) -> Path:
    def w(tmp):
        Path(tmp).write_text(text, encoding="utf-8")

    return atomic_write(path, w)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_npz(path, **arrays) -> Path:
    """``np.savez`` of plain arrays (str arrays as unicode, never objects), atomically."""
    def w(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})

    return atomic_write(path, w)


def save_npy(path, array) -> Path:
    def w(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array))

    return atomic_write(path, w)


def write_records(records, path, columns, extras=True) -> Path:
    """Metric records (dicts) as a CSV, atomically. ``columns`` first; with ``extras`` any other keys
    follow, sorted. Missing values and NaN are written empty."""
    cols = list(columns)
    if extras:
        cols += sorted({k for r in records for k in r} - set(cols))

    def w(tmp):
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            wr.writeheader()
            for r in records:
                wr.writerow({c: "" if isinstance(r.get(c), float) and math.isnan(r[c]) else r.get(c, "")
                             for c in cols})

    return atomic_write(path, w)


def read_records(path) -> list[dict]:
    """Records from a CSV written by :func:`write_records`: ints stay ints, other numbers become float,
    empty cells NaN, anything else stays a string."""
    def conv(v):
        if v == "":
            return float("nan")
        for t in (int, float):
            try:
                return t(v)
            except ValueError:
                pass
        return v

    try:
        with open(path, newline="") as fh:
            return [{k: conv(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e})") from None


# ------------------------------------------------------------------ reading
def load_npz(path, required=()) -> dict:
    """All arrays of an ``.npz`` (no pickle) as a dict; a missing, truncated or foreign file, or a missing
    ``required`` field, is an :class:`ArtifactError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ArtifactError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "the file is damaged or not a streamq file") from None
    missing = [k for k in required if k not in out]
    if missing:
        raise ArtifactError(f"{path}: missing field '{missing[0]}' (has {', '.join(sorted(out)) or 'nothing'})")
    return out


def load_npy(path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            "the file is damaged or not a .npy array") from None


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


# ------------------------------------------------------------------ models
def check_codebook(C, name="codebook") -> np.ndarray:
    """A finite float (K, D) codebook as float32 C-contiguous; ArtifactError otherwise."""
    C = np.asarray(C)
    if C.ndim != 2 or C.shape[0] == 0 or C.shape[1] == 0 or not np.issubdtype(C.dtype, np.floating):
        raise ArtifactError(f"{name}: expected a float (K, D) codebook, got {C.dtype} {C.shape}")
    C32 = np.ascontiguousarray(C, np.float32)
    if not np.isfinite(C32).all():
        raise ArtifactError(f"{name}: codebook holds NaN or inf (or values beyond float32 range)")
    return C32


@dataclass
class Gaussians:
    """K diagonal Gaussians: weights float64 (K,) summing to 1, means and variances float64 (K, D)."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def checked(cls, weights, means, variances, name="model") -> "Gaussians":
        """Validated copies; ArtifactError naming ``name`` and the field otherwise. Weights are normalised
        (unless they already sum to 1 within 1e-9)."""
        m = np.asarray(means, np.float64)
        v = np.asarray(variances, np.float64)
        w = np.asarray(weights, np.float64)
        if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
            raise ArtifactError(f"{name}: field 'means' must be (K, D), got shape {m.shape}")
        K, D = m.shape
        if v.shape != (K, D):
            raise ArtifactError(f"{name}: field 'variances' must have the means' shape {(K, D)}, got {v.shape}")
        if w.shape != (K,):
            raise ArtifactError(f"{name}: field 'weights' must be ({K},), got {w.shape}")
        for field, a in (("weights", w), ("means", m), ("variances", v)):
            if not np.isfinite(a).all():
                raise ArtifactError(f"{name}: field '{field}' holds NaN or inf")
        if (v <= 0).any():
            raise ArtifactError(f"{name}: field 'variances' must be > 0 ({int((v <= 0).sum())} are not)")
        if (w < 0).any() or w.sum() <= 0:
            raise ArtifactError(f"{name}: field 'weights' must be >= 0 and not all zero")
        s = w.sum()
        # weights that already sum to 1 are kept bit for bit (a saved and reloaded model is the same model)
        return cls(w.copy() if abs(s - 1.0) <= 1e-9 else w / s, m.copy(), v.copy())

    @classmethod
    def of(cls, model, name="model") -> "Gaussians":
        """From Gaussians, a fitted DiagGMM-like object (``weights_``, ``means_``, ``variances_``), a dict
        with those keys, or a model path (:func:`load_model`, which must hold a GMM)."""
        if isinstance(model, Gaussians):
            return model
        if isinstance(model, (str, os.PathLike)):
            m = load_model(model)
            if not isinstance(m, Gaussians):
                raise ArtifactError(f"{model}: holds a codebook, not Gaussians; train a GMM with `streamq gmm`")
            return m
        get = (lambda k: model[k]) if isinstance(model, dict) else (lambda k: getattr(model, k + "_"))
        try:
            w, m, v = get("weights"), get("means"), get("variances")
        except (KeyError, AttributeError) as e:
            raise ArtifactError(f"{name}: needs weights, means and variances ({e})") from None
        return cls.checked(w, m, v, name)


def save_codebook(out_dir, codebook, counts=None, stages=None) -> list[Path]:
    """``codebook.npy`` (K, D) float32, ``codebook_counts.npy`` and ``codebook_stages.npz`` (LBG: ``ks`` int64
    (S,) and ``codebooks`` float32 (sum ks, D), stage s in rows [cumsum(ks)[s]-ks[s], cumsum(ks)[s]))."""
    out = Path(out_dir)
    files = [save_npy(out / CODEBOOK, np.asarray(codebook, np.float32))]
    if counts is not None:
        files.append(save_npy(out / CODEBOOK_COUNTS, np.asarray(counts, np.float64)))
    if stages:
        files.append(save_npz(out / CODEBOOK_STAGES, ks=np.array([len(c) for c in stages], np.int64),
                              codebooks=np.concatenate(stages).astype(np.float32)))
    return files


def load_codebook(path) -> np.ndarray:
    """A validated float32 (K, D) codebook from ``codebook.npy`` or a directory holding it."""
    p = Path(path)
    f = p if p.suffix == ".npy" else p / CODEBOOK
    if not f.exists():
        raise ArtifactError(f"{f}: not found (train a codebook with `streamq fit`)")
    return check_codebook(load_npy(f), str(f))


def load_stages(path) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(ks, [codebook of each stage])`` from ``codebook_stages.npz`` or a directory holding it."""
    p = Path(path)
    f = p if p.suffix == ".npz" else p / CODEBOOK_STAGES
    z = load_npz(f, required=("ks", "codebooks"))
    ks, C = z["ks"].astype(np.int64), z["codebooks"]
    if ks.ndim != 1 or C.ndim != 2 or ks.sum() != len(C):
        raise ArtifactError(f"{f}: 'ks' (sum {int(ks.sum())}) does not match 'codebooks' ({C.shape})")
    ends = np.cumsum(ks)
    return ks, [C[e - k:e] for k, e in zip(ks, ends)]


def save_gmm(path, model, **meta) -> Path:
    """``gmm.npz`` (weights, means, variances + scalar ``meta`` such as iteration) atomically.
    ``path`` is the file or a directory."""
    p = Path(path)
    f = p / GMM if p.suffix != ".npz" else p
    g = Gaussians.of(model)
    return save_npz(f, weights=g.weights, means=g.means, variances=g.variances, **meta)


def load_gmm(path) -> tuple[Gaussians, dict]:
    """``(Gaussians, meta)`` from ``gmm.npz`` or a directory holding it; ``meta``: the other scalar fields."""
    p = Path(path)
    f = p if p.suffix == ".npz" else p / GMM
    if not f.exists():
        raise ArtifactError(f"{f}: not found (train a model with `streamq gmm`)")
    z = load_npz(f, required=("weights", "means", "variances"))
    g = Gaussians.checked(z["weights"], z["means"], z["variances"], str(f))
    meta = {k: v.item() for k, v in z.items() if k not in ("weights", "means", "variances") and v.ndim == 0}
    return g, meta


def load_model(path) -> Gaussians | np.ndarray:
    """The shared Gaussians of ``gmm.npz`` or, failing that, the codebook of ``codebook.npy`` (float32
    (K, D)), from a model directory or either file."""
    d = Path(path)
    if d.is_file():
        return load_gmm(d)[0] if d.suffix == ".npz" else load_codebook(d)
    if not d.is_dir():
        raise ArtifactError(f"{d}: model directory not found")
    if (d / GMM).exists():
        return load_gmm(d)[0]
    if (d / CODEBOOK).exists():
        return load_codebook(d)
    raise ArtifactError(f"{d}: no {GMM} or {CODEBOOK} (train one with `streamq gmm` or `streamq fit`)")


# ------------------------------------------------------------------ locks
@contextlib.contextmanager
def locked_dir(out_dir, command: str):
    """Create ``out_dir`` if needed and hold its lock while ``command`` writes into it; a second command
    into the same directory gets a one-line error. A killed holder releases the lock (``flock``); the
    temporary files it left (:func:`atomic_write`) are removed by the next holder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another streamq command"
        f.close()
        raise ArtifactError(f"{out}: {who} is writing into this directory; wait for it or use another OUT") \
            from None
    for litter in out.glob(".*.tmp*"):  # temporary files of writers killed mid-write (we hold the lock)
        if litter.is_file():
            litter.unlink()
    try:
        f.seek(0)
        f.truncate()
        f.write(f"streamq {command} (pid {os.getpid()})\n")
        f.flush()
        yield out
    finally:
        f.seek(0)
        f.truncate()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()

"""Diagonal-covariance Gaussian mixtures learned by streaming EM (Kaldi-style per-batch statistics).

Nothing of size N x K is ever built: each EM iteration streams the source in batches through the fused
E-step kernel (:func:`streamq.kernels.gmm.diag_gmm_stats`), which returns zeroth / first / second order
statistics in float64; the M-step then works on (K, D) arrays only. Memory is bounded by the batch and K.

- Initialisation from a codebook (:meth:`DiagGMM.init_from_codebook`): means = codewords, variances = the
  per-cluster variances (floored), weights = usage counts, in one pass assigning frames to the nearest
  codeword. Without a codebook, :meth:`DiagGMM.fit` first learns one with :class:`streamq.codebook.LBG`.
- M-step with a variance floor (a clamp, ``var_floor``) and optionally scikit-learn's additive
  ``reg_covar``. A component whose occupancy falls below ``min_count`` frames is re-seeded by splitting
  the heaviest component into mu +/- split_eps * sigma (Kaldi's mixing-up idea); the history counts it.
- Gaussian selection (``gselect=n``, Kaldi ``gselect``): only each frame's n best components get a
  posterior; speeds up the posterior and statistics part of the E-step.
- ``history_``: one record (dict) per iteration, with the average log-likelihood per frame of the
  training pass (under the parameters *before* that iteration's M-step) and of a fixed held-out sample
  (after it). The "held-out" sample is a fixed uniform sample of the source, the same at every iteration
  (so curves are comparable); it is not removed from the training pass.

:func:`run_gmm` is the entry point of ``streamq gmm``; :func:`load_gmm` reads its ``gmm.npz``.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numba
import numpy as np

from .kernels import gmm as _k
from .kernels.assign import assign
from .progress import bar, log, write_records



def _blas_single_thread():
    """Keep BLAS single-threaded while the Numba threads call it (no oversubscription)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _as_frames(X, dim=None, name="X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (N, D) array of frames, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        raise TypeError(f"{name}: expected float frames, got {X.dtype}; pass X.astype(np.float32)")
    if dim is not None and X.shape[1] != dim:
        raise ValueError(f"{name}: frames have dim {X.shape[1]}, the model has dim {dim}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name}: frames hold NaN or inf; clean or drop them first")
    return np.ascontiguousarray(X, dtype=np.float32)


class DiagGMM:
    """Diagonal-covariance Gaussian mixture, fitted by streaming EM.

    Parameters
    ----------
    n_components : int. K.
    var_floor : float. Variances are clamped to at least this (absolute) value. Default 1e-3.
    reg_covar : float. Added to every variance before the floor (scikit-learn's ``reg_covar``). Default 0.
    max_iter : int. EM iterations of :meth:`fit`.
    batch_size : int. Frames per E-step batch.
    gselect : int or None. Only the top-n components of each frame get a posterior (E-step and scoring
        during fit); None = all components.
    min_count : float. Components with less occupancy (frames) are re-seeded by splitting the heaviest.
    split_eps : float. Re-seeding offset in standard deviations (mu +/- split_eps * sigma).
    reseed : bool. Re-seed low-occupancy components (True) or leave them with weight 0 and old parameters.
    subsample : int or None. Use a fixed subsample of this many frames per iteration instead of a full pass.
    n_heldout : int. Size of the fixed held-out sample scored at every iteration (0 = none).
    dot_dtype : 'float32' or 'float64'. Precision of the quadratic-form GEMM in the E-step (constants,
        log-sum-exp and statistics are always float64). float32 is about 2x faster, error ~1e-6 relative.
    prune_tol : float. Per frame, components further than log(K) - log(prune_tol) nats below the best one
        are skipped in the log-sum-exp and the statistics: together they hold less than ``prune_tol`` of
        the frame's likelihood (default 1e-10, far below the float32 GEMM's ~1e-6). In D dimensions the
        number of components within a margin grows like margin^(D/2), so this is where the time goes.
    seed : int. quiet : bool (no progress bar).

    Attributes
    ----------
    weights_ : float64 (K,). means_ : float64 (K, D). variances_ : float64 (K, D).
    history_ : list of dict, one record per EM iteration (see module docstring).
    n_iter_ : int. reseeded_ : int, total components re-seeded.
    """

    def __init__(self, n_components, var_floor=1e-3, reg_covar=0.0, max_iter=10, batch_size=65536, gselect=None,
                 min_count=10.0, split_eps=0.2, reseed=True, subsample=None, n_heldout=20000, dot_dtype="float32",
                 prune_tol=1e-10, seed=0, quiet=True):
        if int(n_components) < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        if var_floor < 0 or reg_covar < 0 or (var_floor == 0 and reg_covar == 0):
            raise ValueError("var_floor and reg_covar must be >= 0 and not both 0")
        if dot_dtype not in ("float32", "float64"):
            raise ValueError(f"dot_dtype must be 'float32' or 'float64', got {dot_dtype!r}")
        if not 0 < prune_tol < 1:
            raise ValueError(f"prune_tol must be in (0, 1), got {prune_tol}")
        if gselect is not None and int(gselect) < 1:
            raise ValueError(f"gselect must be None or >= 1, got {gselect}")
        self.n_components = int(n_components)
        self.var_floor, self.reg_covar, self.max_iter, self.batch_size = var_floor, reg_covar, max_iter, batch_size
        self.gselect, self.min_count, self.split_eps, self.subsample = gselect, min_count, split_eps, subsample
        self.reseed, self.prune_tol = reseed, prune_tol
        self.n_heldout, self.dot_dtype, self.seed, self.quiet = n_heldout, dot_dtype, seed, quiet
        self.history_ = []
        self.n_iter_ = 0
        self.reseeded_ = 0
        self._heldout = None

    # ----------------------------------------------------------- parameters
    def set_params_(self, weights, means, variances):
        """Set the model parameters (validated); returns self."""
        w = np.asarray(weights, np.float64).ravel()
        m = np.atleast_2d(np.asarray(means, np.float64))
        v = np.atleast_2d(np.asarray(variances, np.float64))
        K = self.n_components
        if m.shape[0] != K or v.shape != m.shape or w.shape != (K,):
            raise ValueError(f"expected weights ({K},), means and variances ({K}, D); got {w.shape}, {m.shape}, "
                             f"{v.shape}")
        if not (np.isfinite(w).all() and np.isfinite(m).all() and np.isfinite(v).all()):
            raise ValueError("weights, means and variances must be finite")
        if (v <= 0).any():
            raise ValueError(f"variances must be > 0 ({int((v <= 0).sum())} are not)")
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be >= 0 and not all zero")
        self.weights_, self.means_, self.variances_ = w / w.sum(), m.copy(), v.copy()
        return self

    def _check_fitted(self):
        if not hasattr(self, "means_"):
            raise RuntimeError("this DiagGMM has no parameters yet: call fit(), init_from_codebook() or set_params_()")

    @property
    def dim(self) -> int:
        self._check_fitted()
        return self.means_.shape[1]

    def _shift(self):
        return np.ascontiguousarray(self.weights_ @ self.means_)

    def _prepared(self):
        shift = self._shift()
        const, W = _k.gmm_precompute(self.weights_, self.means_, self.variances_, shift)
        return shift, const, np.ascontiguousarray(W, dtype=np.dtype(self.dot_dtype))

    def _log_prune(self):
        return float(min(np.log(self.n_components) - np.log(self.prune_tol), 700.0))

    def _tile(self):
        return int(np.clip(2 ** 18 // self.n_components, 8, 256))

    def _g(self, gselect):
        g = self.gselect if gselect == "default" else gselect
        return 0 if g is None else int(g)

    # -------------------------------------------------------------- scoring
    def score_samples(self, X, gselect=None) -> np.ndarray:
        """Per-frame log-likelihood log p(x), float64 (N,). ``gselect``: top-n approximation (None = exact)."""
        self._check_fitted()
        X = _as_frames(X, self.dim)
        shift, const, W = self._prepared()
        with _blas_single_thread():
            return _k.diag_gmm_loglik(X, shift, const, W, numba.get_num_threads(), self._tile(),
                                      self._log_prune(), self._g(gselect))

    def predict_proba(self, X, gselect=None) -> np.ndarray:
        """Posteriors float64 (N, K) for a small X (N x K must fit in memory; stream with score_samples)."""
        self._check_fitted()
        X = _as_frames(X, self.dim)
        if X.shape[0] * self.n_components > 2 ** 27:
            raise ValueError(f"predict_proba would build a {X.shape[0]} x {self.n_components} matrix; "
                             "pass fewer frames")
        shift, const, W = self._prepared()
        with _blas_single_thread():
            return _k.diag_gmm_posteriors(X, shift, const, W, numba.get_num_threads(), self._tile(),
                                          self._log_prune(), self._g(gselect))[1]

    def predict(self, X) -> np.ndarray:
        """Most probable component of each frame, int64 (N,)."""
        return np.argmax(self.predict_proba(X), axis=1)

    def score(self, source, batch_size=None, gselect=None) -> float:
        """Average log-likelihood per frame over a whole source (streamed) or an (N, D) array."""
        from .store import as_source

        self._check_fitted()
        src = as_source(source)
        tot, n = 0.0, 0
        for X in src.iter_minibatches(batch_size or self.batch_size, shuffle=False):
            tot += float(self.score_samples(X, gselect=gselect).sum())
            n += len(X)
        return tot / n

    # ------------------------------------------------------- initialisation
    def init_from_codebook(self, source, codebook):
        """Means = codewords, variances = per-cluster variances (floored), weights = usage counts.

        One pass over ``source`` assigning each frame to its nearest codeword. Empty clusters get the
        global variance and are re-seeded by splitting the heaviest component (counted in ``reseeded_``).
        """
        from .store import as_source

        src = as_source(source)
        C = np.ascontiguousarray(codebook, dtype=np.float32)
        if C.ndim != 2 or C.shape[0] != self.n_components:
            raise ValueError(f"codebook: expected ({self.n_components}, D), got {C.shape}")
        if C.shape[1] != src.dim:
            raise ValueError(f"codebook has dim {C.shape[1]} but {src.name} has dim {src.dim}")
        shift = C.astype(np.float64).mean(axis=0)
        K, D = C.shape
        n, f, s = np.zeros(K), np.zeros((K, D)), np.zeros((K, D))
        with bar(src.n_frames, "GMM init (assign)", "frame", self.quiet) as pb:
            for X in src.iter_minibatches(self.batch_size, shuffle=False):
                labels, _ = assign(X, C)
                bn, bf, bs = _k.cluster_stats(X, labels, K, shift, numba.get_num_threads())
                n += bn
                f += bf
                s += bs
                pb.update(len(X))
        N = n.sum()
        gmean = f.sum(0) / N
        gvar = np.maximum(s.sum(0) / N - gmean ** 2, 0.0)
        ok = n > 0
        cm = np.divide(f, n[:, None], out=np.zeros_like(f), where=ok[:, None])
        var = np.divide(s, n[:, None], out=np.zeros_like(s), where=ok[:, None]) - cm ** 2
        var = np.where(ok[:, None], var, gvar[None, :])
        var = np.maximum(var + self.reg_covar, self.var_floor)
        self.weights_ = n / N
        self.means_ = C.astype(np.float64)
        self.variances_ = var
        self.init_reseeded_ = self._reseed(~ok)
        self.reseeded_ += self.init_reseeded_
        return self

    def _reseed(self, low) -> int:
        """Split the heaviest component into each component flagged in ``low`` (bool (K,)); returns the count."""
        low = np.flatnonzero(low)
        if len(low) == 0 or len(low) == self.n_components:
            return 0
        w, m, v = self.weights_, self.means_, self.variances_
        w[low] = 0.0
        for j in low:
            h = int(np.argmax(w))
            d = self.split_eps * np.sqrt(v[h])
            w[h] *= 0.5
            w[j] = w[h]
            m[j] = m[h] + d
            m[h] = m[h] - d
            v[j] = v[h]
        self.weights_ = w / w.sum()
        return len(low)

    # ------------------------------------------------------------------ EM
    def _batches(self, src, it):
        if self.subsample is None or self.subsample >= src.n_frames:
            yield from src.iter_minibatches(self.batch_size, shuffle=False)
            return
        left = int(self.subsample)  # the same fixed subsample every iteration (fixed seed)
        for X in src.iter_minibatches(self.batch_size, seed=self.seed, shuffle=True):
            yield X[:left]
            left -= len(X)
            if left <= 0:
                return

    def accumulate(self, source, it=0):
        """One E-step pass. Returns (avg log-lik per frame, frames, n (K,), f (K, D), s (K, D), shift (D,))."""
        from .store import as_source

        src = as_source(source)
        if src.dim != self.dim:
            raise ValueError(f"{src.name} has dim {src.dim}, the model has dim {self.dim}")
        shift, const, W = self._prepared()
        K, D = self.means_.shape
        n, f, s = np.zeros(K), np.zeros((K, D)), np.zeros((K, D))
        tot, frames = 0.0, 0
        total = src.n_frames if self.subsample is None else min(src.n_frames, int(self.subsample))
        with bar(total, f"EM iteration {it}", "frame", self.quiet) as pb, _blas_single_thread():
            for X in self._batches(src, it):
                t, bn, bf, bs = _k.diag_gmm_stats(X, shift, const, W, numba.get_num_threads(), self._tile(),
                                                  self._log_prune(), self._g("default"))
                tot += t
                n += bn
                f += bf
                s += bs
                frames += len(X)
                pb.update(len(X))
        return tot / max(frames, 1), frames, n, f, s, shift

    def m_step(self, n, f, s, shift) -> int:
        """Maximisation from statistics (about ``shift``); returns the number of re-seeded components."""
        ok = (n > 0) & (n >= self.min_count)
        if not ok.any():  # every component under min_count (tiny data): update whatever has occupancy
            ok = n > 0
        nn = n[:, None]
        mu = np.divide(f, nn, out=np.zeros_like(f), where=ok[:, None])
        var = np.divide(s, nn, out=np.zeros_like(s), where=ok[:, None]) - mu ** 2 + self.reg_covar
        var = np.maximum(var, self.var_floor)
        self.means_ = np.where(ok[:, None], mu + shift, self.means_)
        self.variances_ = np.where(ok[:, None], var, self.variances_)
        self.weights_ = np.where(ok, n, 0.0) / n[ok].sum()
        return self._reseed(~ok) if self.reseed else 0

    def em_step(self, source) -> dict:
        """One EM iteration (E-step pass + M-step); appends and returns its history record."""
        t0 = time.perf_counter()
        it = self.n_iter_ + 1
        avg, frames, n, f, s, shift = self.accumulate(source, it)
        reseeded = self.m_step(n, f, s, shift)
        t_em = time.perf_counter() - t0
        self.n_iter_ = it
        self.reseeded_ += reseeded
        rec = {"iteration": it, "frames": frames, "train_loglik": avg,
               "heldout_loglik": self._heldout_loglik(), "reseeded": reseeded,
               "min_occupancy": float(n.min()), "em_seconds": t_em, "seconds": time.perf_counter() - t0}
        self.history_.append(rec)
        log.info("GMM iteration %d: train %.4f held-out %.4f nats/frame, %d re-seeded, %.1f s", it, avg,
                 rec["heldout_loglik"], reseeded, rec["seconds"])
        return rec

    def _heldout_loglik(self) -> float:
        if self._heldout is None or len(self._heldout) == 0:
            return float("nan")
        return float(self.score_samples(self._heldout).mean())  # exact, also when the E-step uses gselect

    def set_heldout(self, source):
        """Draw the fixed held-out sample (``n_heldout`` frames, seeded) from ``source``."""
        from .store import as_source

        src = as_source(source)
        self._heldout = src.sample(self.n_heldout, seed=self.seed + 1) if self.n_heldout else None
        return self

    def fit(self, source, codebook=None, warm_start=False):
        """Initialise (from ``codebook``, else LBG) unless ``warm_start``, then ``max_iter`` EM iterations."""
        from .store import as_source

        src = as_source(source)
        if self.n_components > src.n_frames:
            raise ValueError(f"n_components = {self.n_components} > {src.n_frames} frames in {src.name}")
        self.set_heldout(src)
        if not (warm_start and hasattr(self, "means_")):
            if codebook is None:
                codebook = self._lbg(src)
            self.init_from_codebook(src, codebook)
            self.history_ = [{"iteration": 0, "frames": 0, "train_loglik": float("nan"),
                              "heldout_loglik": self._heldout_loglik(), "reseeded": self.reseeded_,
                              "min_occupancy": float("nan"), "em_seconds": 0.0, "seconds": 0.0}]
        for _ in range(self.max_iter):
            self.em_step(src)
        return self

    def _lbg(self, src):
        from .codebook import LBG

        return LBG(self.n_components, seed=self.seed, quiet=self.quiet).fit(src).codebook_


# ------------------------------------------------------------------ files
HISTORY_FIELDS = ["iteration", "frames", "train_loglik", "heldout_loglik", "reseeded", "min_occupancy", "em_seconds",
                  "seconds"]


def _atomic(path: Path, write):
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    write(tmp)
    os.replace(tmp, path)


def save_gmm(gmm: DiagGMM, out_dir) -> Path:
    """Write ``out_dir/gmm.npz`` (weights, means, variances, iteration, var_floor) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def w(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, weights=gmm.weights_, means=gmm.means_, variances=gmm.variances_,
                     iteration=np.int64(gmm.n_iter_), reseeded=np.int64(gmm.reseeded_),
                     var_floor=np.float64(gmm.var_floor))

    _atomic(out / "gmm.npz", w)
    return out / "gmm.npz"


def load_gmm(path, **kw) -> DiagGMM:
    """A :class:`DiagGMM` from a directory holding ``gmm.npz`` (or the file itself). ``kw`` go to DiagGMM."""
    p = Path(path)
    f = p if p.suffix == ".npz" else p / "gmm.npz"
    if not f.exists():
        raise ValueError(f"{f}: not found (train a model with `streamq gmm`)")
    try:
        z = np.load(f)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"{f}: cannot read ({e})") from None
    for key in ("weights", "means", "variances"):
        if key not in z.files:
            raise ValueError(f"{f}: missing field '{key}' (has {', '.join(z.files)})")
    m = z["means"]
    if m.ndim != 2:
        raise ValueError(f"{f}: field 'means' must be (K, D), got {m.shape}")
    if "var_floor" in z.files:
        kw.setdefault("var_floor", float(z["var_floor"]))
    g = DiagGMM(m.shape[0], **kw)
    try:
        g.set_params_(z["weights"], m, z["variances"])
    except ValueError as e:
        raise ValueError(f"{f}: {e}") from None
    g.n_iter_ = int(z["iteration"]) if "iteration" in z.files else 0
    g.reseeded_ = int(z["reseeded"]) if "reseeded" in z.files else 0
    return g


def write_history(records, path) -> None:
    """Write history records to CSV atomically."""
    write_records(records, path, HISTORY_FIELDS, extras=False)


def read_history(path) -> list[dict]:
    """History records from a CSV written by :func:`write_history` (missing values become NaN)."""
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rec = {}
            for k in HISTORY_FIELDS:
                v = row.get(k, "")
                if k in ("iteration", "frames", "reseeded"):
                    rec[k] = int(v) if v not in ("", None) else 0
                else:
                    rec[k] = float(v) if v not in ("", None) else float("nan")
            out.append(rec)
    return out


def _load_codebook(codebook_dir) -> np.ndarray:
    d = Path(codebook_dir)
    f = d / "codebook.npy" if d.suffix != ".npy" else d
    if not f.exists():
        raise ValueError(f"{f}: codebook.npy not found (train one with `streamq fit`)")
    try:
        C = np.load(f)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{f}: cannot read ({e})") from None
    if C.ndim != 2 or C.shape[0] == 0 or not np.issubdtype(C.dtype, np.floating):
        raise ValueError(f"{f}: expected a float (K, D) codebook, got {C.dtype} {C.shape}")
    if not np.isfinite(C).all():
        raise ValueError(f"{f}: codebook holds NaN or inf")
    return np.ascontiguousarray(C, np.float32)


def run_gmm(store_path, codebook_dir, out_dir, iters=10, resume=False, batch_size=65536, gselect=None, seed=0,
            quiet=False, **gmm_kw) -> dict:
    """Fit a DiagGMM on a store, initialised from ``codebook_dir/codebook.npy``; the ``streamq gmm`` command.

    Writes ``out_dir/gmm.npz``, ``history.csv`` and ``history.png`` after every iteration (atomic
    writes). ``resume=True`` continues from ``out_dir/gmm.npz`` up to ``iters`` iterations in total.
    ``gmm_kw`` go to :class:`DiagGMM` (var_floor, min_count, subsample, n_heldout, ...).

    Raises
    ------
    ValueError
        Missing/unreadable codebook, codebook dim != store dim, K > frames, checkpoint mismatch (the
        message names the file or field).
    """
    from .store import as_source

    t0 = time.perf_counter()
    src = as_source(store_path)
    C = _load_codebook(codebook_dir)
    K, D = C.shape
    if D != src.dim:
        raise ValueError(f"{Path(codebook_dir) / 'codebook.npy'}: codebook dim {D} != store dim {src.dim} "
                         f"({src.name})")
    if K > src.n_frames:
        raise ValueError(f"{Path(codebook_dir) / 'codebook.npy'}: K = {K} components > {src.n_frames} frames "
                         f"in {src.name}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = DiagGMM(K, batch_size=batch_size, gselect=gselect, seed=seed, quiet=quiet, **gmm_kw)
    g.set_heldout(src)
    ckpt = out / "gmm.npz"
    if resume and ckpt.exists():
        prev = load_gmm(ckpt)
        if prev.means_.shape != (K, D):
            raise ValueError(f"{ckpt}: checkpoint has means {prev.means_.shape}, codebook is ({K}, {D}); "
                             "use a new OUT or drop --resume")
        g.set_params_(prev.weights_, prev.means_, prev.variances_)
        g.n_iter_, g.reseeded_ = prev.n_iter_, prev.reseeded_
        g.history_ = read_history(out / "history.csv") if (out / "history.csv").exists() else []
        g.history_ = [r for r in g.history_ if r["iteration"] <= g.n_iter_]
        log.info("resuming from %s at iteration %d", ckpt, g.n_iter_)
    else:
        if resume:
            log.info("no checkpoint in %s: starting from the codebook", out)
        g.init_from_codebook(src, C)
        g.history_ = [{"iteration": 0, "frames": 0, "train_loglik": float("nan"),
                       "heldout_loglik": g._heldout_loglik(), "reseeded": g.reseeded_,
                       "min_occupancy": float("nan"), "em_seconds": 0.0, "seconds": 0.0}]
        _checkpoint(g, out)
    while g.n_iter_ < iters:
        g.em_step(src)
        _checkpoint(g, out)
    last = g.history_[-1] if g.history_ else {}
    return {"out": str(out), "n_components": K, "dim": D, "frames": src.n_frames, "iterations": g.n_iter_,
            "train_loglik": last.get("train_loglik"), "heldout_loglik": last.get("heldout_loglik"),
            "reseeded": g.reseeded_, "gselect": gselect, "seconds": time.perf_counter() - t0,
            "files": [str(out / n) for n in ("gmm.npz", "history.csv", "history.png")]}


def _checkpoint(g: DiagGMM, out: Path):
    save_gmm(g, out)
    write_history(g.history_, out / "history.csv")
    try:
        from .plots import plot_gmm_history
    except ImportError:
        return
    try:
        _atomic(out / "history.png", lambda tmp: plot_gmm_history(g.history_, tmp))
    except RuntimeError as e:  # matplotlib missing: the picture is optional
        log.warning("history.png not written: %s", e)

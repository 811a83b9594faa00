"""Diagonal-covariance Gaussian mixtures learned by streaming EM (Kaldi-style per-batch statistics).

Nothing of size N x K is ever built: each EM iteration streams the source in batches through the fused
E-step kernel (:func:`streamq.kernels.gmm.diag_gmm_stats`), which returns zeroth / first / second order
statistics in float64; the M-step then works on (K, D) arrays only. Memory is bounded by the batch and K.

- Initialisation from a codebook (``means_init`` or :meth:`DiagGMM.init_from_codebook`): means =
  codewords, variances = the per-cluster variances (floored), weights = usage counts, in one pass
  assigning frames to the nearest codeword. Without one, :meth:`DiagGMM.fit` first learns a codebook
  with :class:`streamq.codebook.LBG`.
- M-step with a variance floor (a clamp, ``var_floor``) and optionally scikit-learn's additive
  ``reg_covar``. A component whose occupancy falls below ``min_count`` frames is re-seeded by splitting
  the heaviest component into mu +/- split_eps * sigma (Kaldi's mixing-up idea); the history counts it.
- Hierarchical Gaussian selection (``gselect=n``, Kaldi's ``gmm-gselect``; :mod:`streamq.selection`): the K
  components are grouped by clustering their means; per frame only the group representatives are scored,
  then the members of the best groups exactly, keeping the top n. The E-step, ``score_samples`` and
  ``score`` then cost O(groups + searched members) per frame instead of O(K). The grouping is built on
  first use and kept while the model moves little (its representatives are refreshed every iteration,
  O(K D)); it is rebuilt when the means moved by more than ``gselect_rebuild`` standard deviations on
  average since it was built. ``history_`` records which happened (``selection``: built / refreshed) and
  how many groups were searched. ``gselect=None`` is exact (every component scored).
- ``history_``: one record (dict) per iteration, with the average log-likelihood per frame of the
  training pass (under the parameters *before* that iteration's M-step) and of a fixed held-out sample
  (after it). The "held-out" sample is a fixed uniform sample of the source, the same at every iteration
  (so curves are comparable); it is not removed from the training pass.

Conventions are scikit-learn's ``GaussianMixture``: ``fit(X)`` returns self, ``score`` is the mean
log-likelihood per frame (greater is better), ``score_samples``, ``predict``, ``predict_proba``.
Files are written by :mod:`streamq.artifacts` and :func:`streamq.pipelines.run_gmm`.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils.validation import check_is_fitted

from .artifacts import Gaussians, check_codebook
from .kernels import gmm as _k
from .kernels.assign import assign, cluster_stats
from .kernels.lloyd import dead_codewords
from .inputs import frames, training_source
from .progress import bar, log
from .selection import codeword_groups
from .store import FrameSource

HISTORY_FIELDS = ["iteration", "frames", "train_loglik", "heldout_loglik", "reseeded", "min_occupancy", "em_seconds",
                  "seconds", "selection", "selection_seconds", "n_search", "n_groups"]


def _blas_single_thread():
    """Keep BLAS single-threaded while the Numba threads call it (no oversubscription)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


class DiagGMM(DensityMixin, BaseEstimator):
    """Diagonal-covariance Gaussian mixture, fitted by streaming EM.

    Parameters
    ----------
    n_components : int. K.
    var_floor : float. Variances are clamped to at least this (absolute) value. Default 1e-3.
    reg_covar : float. Added to every variance before the floor (scikit-learn's ``reg_covar``). Default 0.
    max_iter : int. EM iterations of :meth:`fit`.
    batch_size : int. Frames per E-step batch.
    gselect : int or None. Hierarchical Gaussian selection: only each frame's top-n components (found
        without scoring all K) get a posterior in the E-step and in ``score_samples`` / ``score``; None =
        exact, all components.
    gselect_groups : int or None. Groups of the selection structure (None: 2 sqrt(K)).
    gselect_search : int or None. Groups searched per frame (None: calibrated when the structure is built,
        the fewest that recover 98 % of the exact top-n on frames sampled from the model).
    gselect_rebuild : float. Regroup when the means moved by more than this many standard deviations
        (mean over components) since the grouping was built.
    min_count : float. Components with less occupancy (frames) are re-seeded by splitting the heaviest.
    split_eps : float. Re-seeding offset in standard deviations (mu +/- split_eps * sigma).
    reseed : bool. Re-seed low-occupancy components (True) or leave them with weight 0 and old parameters.
    subsample : int or None. Use a fixed subsample of this many frames per iteration instead of a full pass.
    n_heldout : int. Size of the fixed held-out sample scored at every iteration (0 = none).
    dot_dtype : 'float32' or 'float64'. Precision of the quadratic-form GEMM in the E-step (constants,
        log-sum-exp and statistics are always float64). float32 is about 2x faster, error ~1e-6 relative.
    prune_tol : float. Per frame, components further than log(K) - log(prune_tol) nats below the best one
        are skipped in the log-sum-exp and the statistics: together they hold less than ``prune_tol`` of
        the frame's likelihood (default 1e-10, far below the float32 GEMM's ~1e-6).
    means_init : (K, D) array or None. Initial means (a codebook); None: learn one with LBG.
    warm_start : bool. ``fit`` continues from the current parameters when there are any.
    seed : int.  verbose : int, 0 silent, 1 progress bars.
    client : a ``dask.distributed.Client`` or None. When set, the full passes (the initialisation's assignment
        pass and every E-step without ``subsample``) are map-reduced over the store on the cluster
        (:mod:`streamq.distributed`); results equal the local pass's to float64 rounding.

    Attributes
    ----------
    weights_ : float64 (K,). means_ : float64 (K, D). variances_ : float64 (K, D). n_features_in_ : int.
    history_ : list of dict, one record per EM iteration (see module docstring).
    n_iter_ : int. reseeded_ : int, total components re-seeded.
    """

    def __init__(self, n_components=1, var_floor=1e-3, reg_covar=0.0, max_iter=10, batch_size=65536, gselect=None,
                 gselect_groups=None, gselect_search=None, gselect_rebuild=0.5, min_count=10.0, split_eps=0.2,
                 reseed=True, subsample=None, n_heldout=20000, dot_dtype="float32", prune_tol=1e-10,
                 means_init=None, warm_start=False, seed=0, verbose=0, client=None):
        self.client = client
        self.n_components, self.var_floor, self.reg_covar, self.max_iter = n_components, var_floor, reg_covar, max_iter
        self.batch_size, self.gselect, self.min_count, self.split_eps = batch_size, gselect, min_count, split_eps
        self.reseed, self.subsample, self.n_heldout, self.dot_dtype = reseed, subsample, n_heldout, dot_dtype
        self.prune_tol, self.means_init, self.warm_start = prune_tol, means_init, warm_start
        self.seed, self.verbose = seed, verbose
        self.gselect_groups, self.gselect_search, self.gselect_rebuild = gselect_groups, gselect_search, gselect_rebuild

    # ----------------------------------------------------------- parameters
    def _check_params(self):
        if int(self.n_components) != self.n_components or self.n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {self.n_components!r}")
        if not (self.var_floor >= 0 and self.reg_covar >= 0) or (self.var_floor == 0 and self.reg_covar == 0):
            raise ValueError("var_floor and reg_covar must be >= 0 and not both 0")
        if self.dot_dtype not in ("float32", "float64"):
            raise ValueError(f"dot_dtype must be 'float32' or 'float64', got {self.dot_dtype!r}")
        if not 0 < self.prune_tol < 1:
            raise ValueError(f"prune_tol must be in (0, 1), got {self.prune_tol}")
        if self.gselect is not None and int(self.gselect) < 1:
            raise ValueError(f"gselect must be None or >= 1, got {self.gselect}")
        if int(self.max_iter) < 0 or int(self.batch_size) < 1:
            raise ValueError(f"max_iter must be >= 0 and batch_size >= 1, got {self.max_iter}, {self.batch_size}")

    @classmethod
    def from_gaussians(cls, model, **params) -> "DiagGMM":
        """A fitted DiagGMM with the parameters of ``model`` (Gaussians, a dict or a fitted DiagGMM-like
        object, validated); ``params`` are constructor parameters."""
        g = Gaussians.of(model)
        est = cls(n_components=g.n_components, **params)
        est._set_gaussians(g)
        return est

    def _set_gaussians(self, g: Gaussians):
        self.weights_, self.means_, self.variances_ = g.weights.copy(), g.means.copy(), g.variances.copy()
        self.n_features_in_ = g.dim
        if not hasattr(self, "history_"):
            self.history_, self.n_iter_, self.reseeded_ = [], 0, 0

    @property
    def gaussians_(self) -> Gaussians:
        check_is_fitted(self, "means_")
        return Gaussians(self.weights_, self.means_, self.variances_)

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

    def _selection(self):
        """The selection structure for the current parameters: built on first use (or after the means moved
        more than ``gselect_rebuild`` sd on average), otherwise the kept grouping with refreshed
        representatives. Returns (Selection, "built" | "refreshed" | "cached")."""
        from .selection import build_selection, refresh_selection

        key = (self.weights_.tobytes(), self.means_.tobytes(), self.variances_.tobytes())
        cached = getattr(self, "_sel", None)
        if cached is not None and cached[0] == key:
            return cached[1], "cached"
        base = getattr(self, "_sel_base", None)
        moved = np.inf
        if base is not None and base[0].shape == self.means_.shape:
            moved = float(np.mean(np.sqrt((((self.means_ - base[0]) ** 2) / self.variances_).sum(1))))
        if moved > self.gselect_rebuild:
            sel = build_selection(self.weights_, self.means_, self.variances_, n_groups=self.gselect_groups,
                                  seed=self.seed, dot_dtype=self.dot_dtype, calibrate_n=int(self.gselect))
            self._sel_base, how = (self.means_.copy(),), "built"
        else:
            sel = refresh_selection(cached[1] if cached is not None else base[1], self.weights_, self.means_,
                                    self.variances_, calibrate_n=int(self.gselect), seed=self.seed)
            how = "refreshed"
        self._sel_base = (self._sel_base[0], sel)
        self._sel = (key, sel)
        return sel, how

    def _n_search(self, sel):
        return None if self.gselect_search is None else int(self.gselect_search)

    def _frames(self, X) -> np.ndarray:
        return frames(self, X, "means_")

    def _source(self, X, reset):
        """A FrameSource over ``X`` (streamed when it is a store, path, memmap or chunked array)."""
        return training_source(self, X, reset=reset)

    # -------------------------------------------------------------- scoring
    def score_samples(self, X, gselect="default") -> np.ndarray:
        """Per-frame log-likelihood log p(x), float64 (N,). ``gselect``: top-n by hierarchical selection
        (default: the estimator's ``gselect``; None = exact, every component scored)."""
        return self._loglik(self._frames(X), self.gselect if gselect == "default" else gselect)

    def _loglik(self, X, gselect):
        if gselect:
            from .selection import selected_score_samples

            sel, _ = self._selection()
            return selected_score_samples(X, sel, int(gselect), self._n_search(sel))
        shift, const, W = self._prepared()
        with _blas_single_thread():
            return _k.diag_gmm_loglik(X, shift, const, W, numba.get_num_threads(), self._tile(),
                                      self._log_prune(), 0)

    def predict_proba(self, X) -> np.ndarray:
        """Exact posteriors float64 (N, K) for a small X (N x K must fit in memory; stream with score_samples)."""
        X = self._frames(X)
        if X.shape[0] * self.n_components > 2 ** 27:
            raise ValueError(f"predict_proba would build a {X.shape[0]} x {self.n_components} matrix; "
                             "pass fewer frames")
        shift, const, W = self._prepared()
        with _blas_single_thread():
            return _k.diag_gmm_posteriors(X, shift, const, W, numba.get_num_threads(), self._tile(),
                                          self._log_prune(), 0)[1]

    def predict(self, X) -> np.ndarray:
        """Most probable component of each frame, int64 (N,)."""
        return np.argmax(self.predict_proba(X), axis=1)

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).predict(X)

    def score(self, X, y=None, gselect="default") -> float:
        """Average log-likelihood per frame of ``X`` (an array, or a whole store streamed); greater is better."""
        check_is_fitted(self, "means_")
        src = self._source(X, reset=False)
        g = self.gselect if gselect == "default" else gselect
        tot, n = 0.0, 0
        for B in src.iter_minibatches(self.batch_size, shuffle=False):
            tot += float(self._loglik(B, g).sum())
            n += len(B)
        return tot / n

    # ------------------------------------------------------- initialisation
    def init_from_codebook(self, X, codebook):
        """Means = codewords, variances = per-cluster variances (floored), weights = usage counts.

        One pass over ``X`` (array or store) assigning each frame to its nearest codeword. Empty clusters
        get the global variance and are re-seeded by splitting the heaviest component (``reseeded_``).
        """
        src = X if isinstance(X, FrameSource) else self._source(X, reset=True)
        C = check_codebook(codebook, "codebook")
        if C.shape[0] != self.n_components:
            raise ValueError(f"codebook: expected ({self.n_components}, D), got {C.shape}")
        if C.shape[1] != src.dim:
            raise ValueError(f"codebook has dim {C.shape[1]} but {src.name} has dim {src.dim}")
        self.n_features_in_ = src.dim
        shift = C.astype(np.float64).mean(axis=0)
        K, D = C.shape
        n, f, s = np.zeros(K), np.zeros((K, D)), np.zeros((K, D))
        stats = None
        if self.client is not None:  # the same pass, map-reduced over the store on Dask
            from .distributed import codebook_stats

            stats = codebook_stats(self.client, src, C, shift, self.batch_size, self.verbose)
        if stats is not None:
            n, f, s = stats
        with bar(src.n_frames, "GMM init (assign)", "frame", not self.verbose or stats is not None) as pb:
            group_of = codeword_groups(C)
            for B in (() if stats is not None else src.iter_minibatches(self.batch_size, shuffle=False)):
                labels, _ = assign(B, C, group_of=group_of)
                st = cluster_stats(B, labels, K, shift=shift)
                n += st.counts
                f += st.sums
                s += st.sq
                pb.update(len(B))
        N = n.sum()
        gmean = f.sum(0) / N
        gvar = np.maximum(s.sum(0) / N - gmean ** 2, 0.0)
        ok = ~dead_codewords(None, None, None, None, None, None, pass_counts=n)
        cm = np.divide(f, n[:, None], out=np.zeros_like(f), where=ok[:, None])
        var = np.divide(s, n[:, None], out=np.zeros_like(s), where=ok[:, None]) - cm ** 2
        var = np.where(ok[:, None], var, gvar[None, :])
        var = np.maximum(var + self.reg_covar, self.var_floor)
        self.weights_ = n / N
        self.means_ = C.astype(np.float64)
        self.variances_ = var
        self.history_, self.n_iter_, self.reseeded_ = [], 0, 0
        self.init_reseeded_ = self._reseed(~ok)
        self.reseeded_ += self.init_reseeded_
        return self

    def _reseed(self, low) -> int:
        """Repair the dead components flagged in ``low`` (bool (K,), from :func:`dead_codewords`): each takes
        half of the currently heaviest component, split into mu +/- split_eps * sigma (the GMM's form of
        :func:`streamq.kernels.lloyd.repair_dead`, which splits the most distorted codeword). Returns the count."""
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
    def _batches(self, src):
        if self.subsample is None or self.subsample >= src.n_frames:
            yield from src.iter_minibatches(self.batch_size, shuffle=False)
            return
        left = int(self.subsample)  # the same fixed subsample every iteration (fixed seed)
        for X in src.iter_minibatches(self.batch_size, seed=self.seed, shuffle=True):
            yield X[:left]
            left -= len(X)
            if left <= 0:
                return

    def accumulate(self, X, it=0):
        """One E-step pass over ``X`` (array or store). Returns (avg log-lik per frame, frames, n (K,),
        f (K, D), s (K, D), shift (D,)): the sufficient statistics about ``shift``, float64."""
        src = X if isinstance(X, FrameSource) else self._source(X, reset=False)
        if src.dim != self.means_.shape[1]:
            raise ValueError(f"{src.name} has dim {src.dim}, the model has dim {self.means_.shape[1]}")
        K, D = self.means_.shape
        if self.gselect:
            from .selection import selected_accumulate

            t0 = time.perf_counter()
            sel, how = self._selection()
            self.last_selection_ = {"selection": how, "selection_seconds": time.perf_counter() - t0,
                                    "n_search": sel.n_search if self.gselect_search is None else self.gselect_search,
                                    "n_groups": sel.n_groups}
            shift = sel.shift

            def stats(B):
                return selected_accumulate(B, sel, int(self.gselect), self._n_search(sel))
        else:
            shift, const, W = self._prepared()
            self.last_selection_ = {}

            def stats(B):
                return _k.diag_gmm_stats(B, shift, const, W, numba.get_num_threads(), self._tile(),
                                         self._log_prune(), 0)
        if self.client is not None and self.subsample is None:  # the same pass, map-reduced on Dask
            from .distributed import gmm_stats

            fn, args = ((selected_accumulate, (sel, int(self.gselect), self._n_search(sel))) if self.gselect else
                        (_k.diag_gmm_stats, (shift, const, W, numba.get_num_threads(), self._tile(),
                                             self._log_prune(), 0)))
            res = gmm_stats(self.client, src, fn, args, self.batch_size, self.verbose, f"EM iteration {it} (dask)")
            if res is not None:
                tot, frames, n, f, s = res
                return tot / max(frames, 1), frames, n, f, s, shift
        n, f, s = np.zeros(K), np.zeros((K, D)), np.zeros((K, D))
        tot, frames = 0.0, 0
        total = src.n_frames if self.subsample is None else min(src.n_frames, int(self.subsample))
        with bar(total, f"EM iteration {it}", "frame", not self.verbose) as pb, _blas_single_thread():
            for B in self._batches(src):
                t, bn, bf, bs = stats(B)
                tot += t
                n += bn
                f += bf
                s += bs
                frames += len(B)
                pb.update(len(B))
        return tot / max(frames, 1), frames, n, f, s, shift

    def m_step(self, n, f, s, shift) -> int:
        """Maximisation from statistics (about ``shift``); returns the number of re-seeded components."""
        ok = ~dead_codewords(None, None, None, None, None, None, pass_counts=n, min_count=self.min_count)
        nn = n[:, None]
        mu = np.divide(f, nn, out=np.zeros_like(f), where=ok[:, None])
        var = np.divide(s, nn, out=np.zeros_like(s), where=ok[:, None]) - mu ** 2 + self.reg_covar
        var = np.maximum(var, self.var_floor)
        self.means_ = np.where(ok[:, None], mu + shift, self.means_)
        self.variances_ = np.where(ok[:, None], var, self.variances_)
        self.weights_ = np.where(ok, n, 0.0) / n[ok].sum()
        return self._reseed(~ok) if self.reseed else 0

    def em_step(self, X) -> dict:
        """One EM iteration (E-step pass + M-step) over ``X``; appends and returns its history record."""
        t0 = time.perf_counter()
        it = self.n_iter_ + 1
        avg, frames, n, f, s, shift = self.accumulate(X, it)
        reseeded = self.m_step(n, f, s, shift)
        t_em = time.perf_counter() - t0
        self.n_iter_ = it
        self.reseeded_ += reseeded
        rec = {"iteration": it, "frames": frames, "train_loglik": avg,
               "heldout_loglik": self._heldout_loglik(), "reseeded": reseeded,
               "min_occupancy": float(n.min()), "em_seconds": t_em, "seconds": time.perf_counter() - t0,
               **self.last_selection_}
        self.history_.append(rec)
        log.info("GMM iteration %d: train %.4f held-out %.4f nats/frame, %d re-seeded, %.1f s", it, avg,
                 rec["heldout_loglik"], reseeded, rec["seconds"])
        return rec

    def _heldout_loglik(self) -> float:
        H = getattr(self, "_heldout", None)
        if H is None or len(H) == 0:
            return float("nan")
        return float(self._loglik(H, None).mean())  # exact, also when the E-step uses gselect

    def set_heldout(self, X):
        """Draw the fixed held-out sample (``n_heldout`` frames, seeded) from ``X`` (array or store)."""
        src = X if isinstance(X, FrameSource) else self._source(X, reset=not hasattr(self, "n_features_in_"))
        self._heldout = src.sample(self.n_heldout, seed=self.seed + 1) if self.n_heldout else None
        return self

    def initial_record(self) -> dict:
        """The history record of iteration 0 (the initialised model, before any EM)."""
        return {"iteration": 0, "frames": 0, "train_loglik": float("nan"), "heldout_loglik": self._heldout_loglik(),
                "reseeded": self.reseeded_, "min_occupancy": float("nan"), "em_seconds": 0.0, "seconds": 0.0}

    def fit(self, X, y=None):
        """Initialise (from ``means_init``, else LBG) unless ``warm_start``, then ``max_iter`` EM iterations.

        ``X``: an (N, D) array, or a store / path / memmap (streamed). Returns self.
        """
        self._check_params()
        warm = self.warm_start and hasattr(self, "means_")
        src = self._source(X, reset=not warm)
        if self.n_components > src.n_frames:
            raise ValueError(f"{src.name}: n_samples={src.n_frames} should be >= n_components={self.n_components}")
        self.n_features_in_ = src.dim
        self.set_heldout(src)
        if not warm:
            codebook = self.means_init
            if codebook is None:
                from .codebook import LBG

                codebook = LBG(self.n_components, seed=self.seed, verbose=self.verbose, client=self.client).fit(src).codebook_
            self.init_from_codebook(src, codebook)
            self.history_ = [self.initial_record()]
        for _ in range(int(self.max_iter)):
            self.em_step(src)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags

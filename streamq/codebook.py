"""Codebook training: RandomSample, MiniBatchLloyd and LBG, streaming from any frame source.

All three share one loop (:class:`_Trainer`): minibatches from ``source.iter_minibatches`` go through the
fused ``assign`` kernel, ``accumulate`` and ``ema_update``; dead codewords are repaired; metrics are
measured on one fixed evaluation sample so curves compare across methods.

EMA Lloyd (the seed's update, decay λ = 0.9)::

    c_k ← λ·c_k + (1 − λ)·mean(batch frames assigned to k)      for codewords the batch hits
    u_k ← μ·u_k + (1 − μ)·n_k / B                                usage EMA; dead when u_k < θ / K

LBG (Linde, Buzo & Gray 1980): start from the mean (K = 1), split every codeword into c ± ε·σ, refine by
EMA Lloyd until the evaluation loss stops improving, repeat. A K that is not a power of two is reached
by splitting only the codewords with the largest distortion at the last stage.

Dead-codeword repair (faiss's empty-centroid trick): a dead codeword is moved next to the codeword with
the largest distortion, and the two are perturbed apart.

Determinism: every random choice derives from ``seed`` and the (stage, epoch, step) position, so the
same seed and source give the same codebook, and a resumed run continues the same stream.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from .artifacts import ArtifactError, check_codebook, load_npz, save_npz
from .kernels.assign import assign, cluster_stats
from .kernels.lloyd import dead_codewords, ema_update, repair_dead, split
from .inputs import float32, frames, training_source
from .selection import GROUPED_FROM_K, codeword_groups, regroup_codewords
from .progress import bar, log

METRIC_COLUMNS = ["method", "stage", "step", "k", "frames_seen", "wall_seconds", "loss", "entropy", "log_k",
                  "utilisation", "dead", "repaired", "shifted", "imbalance"]


def _derive(*keys) -> int:
    """A 63-bit seed derived from integers (seed, stage, epoch, ...)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def evaluate(C: np.ndarray, X: np.ndarray, group_of=None) -> dict:
    """Quantisation metrics of codebook ``C`` (K, D) on frames ``X`` (n, D) (``group_of``: as :func:`assign`).

    loss: mean squared error per frame; entropy: usage entropy in nats (max log K); utilisation: share of
    codewords used; imbalance: K·Σn_k²/n² (1 = perfectly balanced).
    """
    K = len(C)
    labels, d2 = assign(X, C, group_of=group_of)
    n = np.bincount(labels, minlength=K).astype(np.float64)
    p = n / n.sum()
    nz = p[p > 0]
    return {"loss": float(np.mean(d2, dtype=np.float64)), "entropy": float(-(nz * np.log(nz)).sum()),
            "log_k": math.log(K), "utilisation": float((n > 0).mean()),
            "imbalance": float(K * (n ** 2).sum() / n.sum() ** 2)}


def nearest_other(C: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each codeword, its nearest *other* codeword and the squared distance (blocked BLAS, K×block memory)."""
    C64 = C.astype(np.float64)
    K = len(C)
    nn, dist = np.zeros(K, np.int64), np.full(K, np.inf)
    if K < 2:
        return nn, dist
    sq = (C64 ** 2).sum(1)
    for a in range(0, K, block):
        d = sq[a:a + block, None] - 2 * C64[a:a + block] @ C64.T + sq[None, :]
        d[np.arange(len(d)), np.arange(a, a + len(d))] = np.inf
        nn[a:a + block] = d.argmin(1)
        dist[a:a + block] = np.maximum(d[np.arange(len(d)), nn[a:a + block]], 0.0)
    return nn, dist


def plan_shifts(C: np.ndarray, n: np.ndarray, sse: np.ndarray, max_moves: int, gain: float = 0.3):
    """ELBG-style utility shifts (Patanè & Russo 2001, simplified): pairs (i, j) where moving codeword ``i``
    next to codeword ``j`` should lower the distortion.

    Removing ``i`` merges its frames into its nearest neighbour ``m``, costing about
    n_i·n_m/(n_i+n_m)·‖c_i − c_m‖²; splitting ``j`` is credited ``gain``·sse_j. The cheapest removals are paired
    with the most distorted codewords while the credit exceeds the cost; each codeword is used once.
    Returns (movers, targets), int64 arrays. Callers verify the result and undo it if the loss rose.
    """
    nn, d = nearest_other(C)
    m = n[nn]
    cost = np.where(n + m > 0, n * m / np.maximum(n + m, 1) * d, 0.0)
    movers = np.argsort(cost, kind="stable")
    targets = np.argsort(-sse, kind="stable")
    used = np.zeros(len(C), bool)
    out_i, out_j = [], []
    ti = 0
    for i in movers:
        if len(out_i) >= max_moves:
            break
        if used[i] or used[nn[i]]:
            continue
        while ti < len(targets) and (used[targets[ti]] or targets[ti] == i):
            ti += 1
        if ti >= len(targets):
            break
        j = targets[ti]
        if gain * sse[j] <= cost[i]:
            break
        used[[i, j, nn[i]]] = True
        out_i.append(i)
        out_j.append(j)
    return np.array(out_i, np.int64), np.array(out_j, np.int64)


def held_out(source, k: int, eval_size: int, seed: int):
    """The fixed evaluation sample and the frame indices to keep out of training.

    max(eval_size, 8·K) frames, at most a tenth of the source, held out of training when that is at least
    2·K frames and what remains has at least 4·K; otherwise (tiny data) the sample is drawn from the training
    frames and the returned exclusion is None.
    """
    n = min(max(eval_size, 8 * k), source.n_frames // 10)
    if n >= 2 * k and source.n_frames - n >= 4 * k:
        idx = source.sample_indices(n, seed=_derive(seed, 7))
        return source.take(idx), idx
    return source.sample(min(source.n_frames, max(eval_size, 8 * k)), seed=_derive(seed, 7)), None


def _check_k(k, source):
    if int(k) != k or k < 1:
        raise ValueError(f"n_clusters must be an integer >= 1, got {k!r}")
    if k > source.n_frames:
        raise ValueError(f"{source.name}: n_samples={source.n_frames} should be >= n_clusters={k} "
                         "(fewer frames than codewords)")


def _sample_excluding(source, n, seed, exclude):
    """``n`` distinct frames of ``source`` drawn uniformly from those not in ``exclude`` (sorted indices)."""
    if exclude is None:
        return source.sample(n, seed=seed)
    keep = source.n_frames - len(exclude)
    pos = np.sort(np.random.default_rng(seed).choice(keep, size=n, replace=False))
    # map positions among kept frames to frame indices: skip over the excluded ones
    idx = pos + np.searchsorted(exclude - np.arange(len(exclude)), pos, side="right")
    return source.take(idx)


class _Codebook(TransformerMixin, BaseEstimator):
    """What every codebook estimator shares once fitted: ``predict``, ``transform``, ``score``.

    Fitted attributes: ``codebook_`` float32 (K, D) (``cluster_centers_`` is the same array, scikit-learn's
    name), ``n_features_in_``, ``history_`` (list of dict, one per logged step: METRIC_COLUMNS),
    ``counts_`` float64 (K,), ``heldout_`` (bool: the metrics' sample was held out of training).
    """

    @property
    def cluster_centers_(self) -> np.ndarray:
        check_is_fitted(self, "codebook_")
        return self.codebook_

    def _frames(self, X) -> np.ndarray:
        return frames(self, X, "codebook_")

    def _groups(self):
        """The codeword partition of the grouped exact search (None for small codebooks)."""
        return codeword_groups(self.codebook_)

    def predict(self, X) -> np.ndarray:
        """Index of the nearest codeword of each row of ``X`` (n, D): int64 (n,). Ties: lowest index."""
        return assign(self._frames(X), self.codebook_, group_of=self._groups())[0].astype(np.int64)

    def transform(self, X) -> np.ndarray:
        """Euclidean distance of each row of ``X`` to every codeword: float64 (n, K) (as ``KMeans.transform``)."""
        X = self._frames(X).astype(np.float64)
        C = self.codebook_.astype(np.float64)
        d2 = ((X[:, None, :] - C[None, :, :]) ** 2).sum(-1) if X.shape[0] * C.size <= 2 ** 24 else None
        if d2 is None:  # large inputs: blocked, centred, exact in float64
            mu = C.mean(0)
            Xc, Cc = X - mu, C - mu
            d2 = np.maximum((Xc ** 2).sum(1)[:, None] - 2 * Xc @ Cc.T + (Cc ** 2).sum(1)[None, :], 0.0)
        return np.sqrt(d2)

    def fit_predict(self, X, y=None) -> np.ndarray:
        """``fit(X)`` then ``predict(X)`` (X must then be an in-memory array)."""
        return self.fit(X).predict(X)

    def score(self, X, y=None) -> float:
        """Negative mean squared quantisation error per frame (greater is better, as ``KMeans.score``)."""
        return -evaluate(self.codebook_, self._frames(X), self._groups())["loss"]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


class RandomSample(_Codebook):
    """K distinct frames drawn uniformly from the source: the no-hyper-parameter baseline and default init.

    Parameters
    ----------
    n_clusters : int, K.   seed : int.   eval_size : int, frames in the metrics' evaluation sample.
    """

    def __init__(self, n_clusters=8, seed=0, eval_size=20000):
        self.n_clusters, self.seed, self.eval_size = n_clusters, seed, eval_size

    def fit(self, X, y=None):
        """Draw the codebook from ``X`` (an (N, D) array, a store, a path); returns self."""
        t0 = time.perf_counter()
        source = training_source(self, X)
        _check_k(self.n_clusters, source)
        K = int(self.n_clusters)
        H, exclude = held_out(source, K, self.eval_size, self.seed)
        self.heldout_ = exclude is not None
        self.codebook_ = _sample_excluding(source, K, _derive(self.seed, 1), exclude)
        m = evaluate(self.codebook_, H)
        labels = assign(H, self.codebook_, group_of=self._groups())[0]
        self.counts_ = np.bincount(labels, minlength=K).astype(np.float64)
        self.n_repaired_ = 0
        self.history_ = [{"method": "random", "stage": 0, "step": 0, "k": K, "frames_seen": K,
                          "wall_seconds": time.perf_counter() - t0, "dead": int((self.counts_ == 0).sum()),
                          "repaired": 0, **m}]
        return self


class _Trainer(_Codebook):
    """The EMA-Lloyd machinery shared by MiniBatchLloyd and LBG (subclasses declare the parameters)."""

    method = "?"

    # ------------------------------------------------------------ state
    def _init_state(self, C, stage=0):
        K = len(C)
        self.codebook_ = np.ascontiguousarray(C, dtype=np.float32)
        self.usage_ = np.full(K, 1.0 / K)
        self.distortion_ = np.zeros(K)  # EMA of each codeword's summed squared error per batch
        self.age_ = np.zeros(K, np.int64)  # steps since the codeword was born or repaired
        self.idle_ = np.zeros(K, np.int64)  # steps since the codeword last won a frame (or was born)
        self.counts_ = np.zeros(K)
        self.stage_, self.step_in_stage_ = stage, 0

    def _config(self) -> dict:
        """What a checkpoint must agree with to be resumed: the parameters that change the result."""
        skip = {"checkpoint", "checkpoint_seconds", "resume", "verbose", "log_every", "client"}
        return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                for k, v in self.get_params().items() if k not in skip}

    def _state(self):
        return {"codebook": self.codebook_, "usage": self.usage_, "distortion": self.distortion_, "age": self.age_,
                "idle": self.idle_, "counts": self.counts_, "stage": self.stage_,
                "step_in_stage": self.step_in_stage_, "step": self.step_, "frames_seen": self.frames_seen_,
                "n_repaired": self.n_repaired_, "n_shifted": self.n_shifted_, "wall_offset": self._wall(),
                "extra": json.dumps(self._extra_state()), "history": json.dumps(self.history_),
                "config": json.dumps({"method": self.method, "dim": self.n_features_in_, **self._config()})}

    def _extra_state(self):
        return {}

    def _load_state(self, z, path):
        saved = json.loads(str(z["config"])) if "config" in z else None
        want = {"method": self.method, "dim": self.n_features_in_, **self._config()}
        if saved != want:
            diff = {k: (None if saved is None else saved.get(k), want[k]) for k in want
                    if saved is None or saved.get(k) != want[k]}
            raise ArtifactError(f"{path}: checkpoint was made with other settings {diff}; "
                                "use the same settings or start without resume")
        self.codebook_, self.usage_ = z["codebook"].astype(np.float32), z["usage"]
        self.distortion_, self.age_, self.counts_, self.idle_ = z["distortion"], z["age"], z["counts"], z["idle"]
        self.stage_, self.step_in_stage_ = int(z["stage"]), int(z["step_in_stage"])
        self.step_, self.frames_seen_, self.n_repaired_ = int(z["step"]), int(z["frames_seen"]), int(z["n_repaired"])
        self.n_shifted_ = int(z["n_shifted"])
        self._t0 = time.perf_counter() - float(z["wall_offset"])
        self.history_ = json.loads(str(z["history"]))
        return json.loads(str(z["extra"])), z

    def _save(self):
        if not self.checkpoint:
            return
        save_npz(self.checkpoint, **self._state())
        self._last_ckpt = time.perf_counter()

    def _wall(self):
        return time.perf_counter() - self._t0

    # ------------------------------------------------------------ stream
    def _batches(self, source, stage, start, sub=0):
        """Endless batches of stream (stage, sub) from batch number ``start`` on (epochs reseeded, full batches)."""
        n_train = source.n_frames - (0 if self._exclude is None else len(self._exclude))
        B = min(self._B, n_train)
        per_epoch = n_train // B
        epoch, skip = divmod(start, per_epoch)
        while True:
            it = source.iter_minibatches(B, seed=_derive(self.seed, 11, stage, sub, epoch), drop_last=True,
                                         exclude=self._exclude)
            for i, X in enumerate(it):
                if i >= skip:
                    yield X
            epoch, skip = epoch + 1, 0

    # ------------------------------------------------------------ one step
    def _groups(self):
        """The partition for the grouped exact search of the codebook being trained (None while K <
        GROUPED_FROM_K): grouped afresh when K changes, then one regrouping step every 10 uses as the codewords
        drift, and at once after codewords jumped (repairs, shifts: ``_moved``). Only the speed depends on it,
        never a label."""
        C = self.codebook_
        if len(C) < GROUPED_FROM_K:
            return None
        g, uses = getattr(self, "_group_state", (None, 0))
        if g is None or len(g) != len(C):
            g, uses = codeword_groups(C), 0
        elif uses >= 10 or getattr(self, "_moved", False):  # a moved codeword would inflate its old group
            g, uses = regroup_codewords(C, g), 0
        self._group_state, self._moved = (g, uses + 1), False
        return g

    def _step(self, X):
        C = self.codebook_
        K = len(C)
        labels, d2 = assign(X, C, group_of=self._groups())
        st = cluster_stats(X, labels, K, d2=d2, second_order=False)
        counts, sums, sse = st.counts, st.sums, st.sse
        self.codebook_, self.usage_ = ema_update(C, sums, counts, self.decay, self.usage_, self.usage_decay)
        self.distortion_ = self.usage_decay * self.distortion_ + (1 - self.usage_decay) * sse
        self.counts_ += counts
        self.age_ += 1
        self.idle_ += 1
        self.idle_[counts > 0] = 0
        self.step_ += 1
        self.step_in_stage_ += 1
        self.frames_seen_ += len(X)
        if self.repair and K > 1 and self.step_ % self.repair_every == 0:
            self._repair(self._dead(), _derive(self.seed, 13, self.stage_, self.step_))

    def _maybe_save(self):
        """Time-based checkpoint; called only between steps, after any logging of that step."""
        if self.checkpoint and time.perf_counter() - self._last_ckpt > self.checkpoint_seconds:
            self._save()

    def _dead(self):
        """The dead-codeword policy (:func:`streamq.kernels.lloyd.dead_codewords`) on the current state."""
        return dead_codewords(self.idle_, self.age_, self.usage_, self._B, self.usage_decay, self.dead_threshold)

    def _repair(self, dead, seed):
        """Move the ``dead`` codewords next to the most distorted ones (:func:`repair_dead`); they and their
        donors start a fresh life."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        K = len(self.codebook_)
        noise = (np.random.default_rng(seed).standard_normal((n_dead, self.codebook_.shape[1]))
                 * self._sigma).astype(np.float32)
        self.codebook_, n = repair_dead(self.codebook_, dead, self.distortion_, self.counts_, self._eps, noise)
        self._moved = True
        self.usage_[dead] = 1.0 / K
        self.distortion_[dead] = 0.0
        self.age_[dead] = 0
        self.idle_[dead] = 0
        self.n_repaired_ += int(n)

    def _log(self, H, **extra):
        m = evaluate(self.codebook_, H, self._groups())
        K = len(self.codebook_)
        rec = {"method": self.method, "stage": self.stage_, "step": self.step_, "k": K,
               "frames_seen": self.frames_seen_, "wall_seconds": round(self._wall(), 4),
               "dead": int(self._dead().sum()), "repaired": self.n_repaired_,
               "shifted": self.n_shifted_, **m, **extra}
        self.history_.append(rec)
        return rec

    # ------------------------------------------------------------ setup
    def _check_params(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.eps is not None and not (np.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume=True needs a checkpoint path")

    def _setup(self, X):
        self._check_params()
        source = training_source(self, X)
        _check_k(self.n_clusters, source)
        self._B = int(self.batch_size or self._default_batch())
        self._t0 = time.perf_counter()
        self._last_ckpt = self._t0
        self.history_, self.step_, self.frames_seen_, self.n_repaired_, self.n_shifted_ = [], 0, 0, 0, 0
        H, self._exclude = held_out(source, self.n_clusters, self.eval_size, self.seed)
        self.heldout_ = self._exclude is not None
        self._sigma = H.std(axis=0).astype(np.float32) + np.float32(1e-12)
        self._eps = float(self.eps if self.eps is not None else 0.01)
        resumed = None
        if self.resume and Path(self.checkpoint).exists():
            resumed = self._load_state(load_npz(self.checkpoint), self.checkpoint)
            log.info("resumed from %s at step %d (K=%d)", self.checkpoint, self.step_, len(self.codebook_))
        return source, H, resumed

    def _default_batch(self):
        return 4096


class MiniBatchLloyd(_Trainer):
    """Minibatch k-means with EMA codeword updates (decay λ, the seed's 0.9) and dead-codeword repair.

    Parameters
    ----------
    n_clusters : int, K.
    decay : float, λ in c ← λc + (1−λ)·batch mean.
    batch_size : int or None, frames per step (default clip(8K, 4096, 65536)).
    max_steps : int or None, minibatch steps (default: two passes over the data, at least 100).
    init : 'random' (K distinct frames, seeded) or a (K, D) array.
    repair : bool, repair dead codewords every ``repair_every`` steps.
    usage_decay : float, decay of the per-codeword usage EMA that detects dead codewords.
    dead_threshold : float, a codeword whose usage EMA falls under this share of the fair 1/K is dead.
    eps : float or None, offset of a repaired codeword in per-dimension standard deviations (default 0.01).
    eval_size : int, frames in the fixed evaluation sample behind ``history_``.
    log_every : int, steps between history records.
    seed : int.
    checkpoint : str or None, a ``.npz`` path to checkpoint to (every ``checkpoint_seconds`` and at the end).
    resume : bool, continue from ``checkpoint`` when it exists (it must have the same settings): the
        resumed run ends with the same codebook as an uninterrupted one.
    verbose : int, 0 silent, 1 progress bars.
    """

    method = "lloyd"

    def __init__(self, n_clusters=8, decay=0.9, batch_size=None, max_steps=None, init="random", repair=True,
                 usage_decay=0.99, dead_threshold=0.02, repair_every=10, eps=None, eval_size=20000, log_every=10,
                 seed=0, checkpoint=None, checkpoint_seconds=120.0, resume=False, verbose=0):
        self.n_clusters, self.decay, self.batch_size, self.max_steps, self.init = (n_clusters, decay, batch_size,
                                                                                  max_steps, init)
        self.repair, self.usage_decay, self.dead_threshold = repair, usage_decay, dead_threshold
        self.repair_every, self.eps, self.eval_size, self.log_every = repair_every, eps, eval_size, log_every
        self.seed, self.checkpoint, self.checkpoint_seconds = seed, checkpoint, checkpoint_seconds
        self.resume, self.verbose = resume, verbose

    def _default_batch(self):
        return int(np.clip(8 * self.n_clusters, 4096, 65536))

    def _config(self):
        cfg = super()._config()
        if not isinstance(self.init, str):  # an init array: its checksum, not its repr
            cfg["init"] = hashlib.sha1(np.ascontiguousarray(self.init, np.float32).tobytes()).hexdigest()
        return cfg

    def _init_codebook(self, source):
        if isinstance(self.init, str):
            if self.init != "random":
                raise ValueError(f"init must be 'random' or a (K, D) array, got {self.init!r}")
            return _sample_excluding(source, self.n_clusters, _derive(self.seed, 1), self._exclude)
        C = check_codebook(self.init, "init")
        if C.shape != (self.n_clusters, source.dim):
            raise ValueError(f"init codebook has shape {C.shape}, expected ({self.n_clusters}, {source.dim})")
        return C

    def fit(self, X, y=None):
        """Train on ``X`` (an (N, D) array, a store, a path), streaming minibatches; returns self."""
        source, H, resumed = self._setup(X)
        if resumed is None:
            self._init_state(self._init_codebook(source))
            self._log(H)
        steps = self.max_steps or max(100, 2 * math.ceil(source.n_frames / self._B))
        stream = self._batches(source, 0, self.step_)
        with bar(steps, desc=f"lloyd K={self.n_clusters}", unit="step", quiet=not self.verbose,
                 initial=self.step_) as pb:
            while self.step_ < steps:
                self._step(next(stream))
                pb.update(1)
                if self.step_ % self.log_every == 0 or self.step_ == steps:
                    rec = self._log(H)
                    pb.set_postfix_str(f"loss {rec['loss']:.4g} dead {rec['dead']}", refresh=False)
                self._maybe_save()
        self._save()
        return self

    def partial_fit(self, X, y=None):
        """One EMA step on batch ``X`` (B, D); the first call initialises from K distinct rows of ``X``."""
        first = not hasattr(self, "codebook_")
        X = float32(validate_data(self, X, dtype=[np.float32, np.float64], reset=first))
        if first:
            self._check_params()
            if isinstance(self.init, str):
                if len(X) < self.n_clusters:
                    raise ValueError(f"n_samples={len(X)} should be >= n_clusters={self.n_clusters} in the "
                                     "first batch")
                rng = np.random.default_rng(_derive(self.seed, 1))
                C = X[np.sort(rng.choice(len(X), self.n_clusters, replace=False))]
            else:
                C = check_codebook(self.init, "init")
            self._init_state(C)
            self._t0, self._last_ckpt = time.perf_counter(), time.perf_counter()
            self.history_, self.step_, self.frames_seen_, self.n_repaired_, self.n_shifted_ = [], 0, 0, 0, 0
            self._sigma = X.std(axis=0).astype(np.float32) + np.float32(1e-12)
            self._eps = float(self.eps if self.eps is not None else 0.01)
            self._B, self._exclude, self.heldout_ = len(X), None, False
        self._step(X)
        return self


class LBG(_Trainer):
    """Linde–Buzo–Gray: grow the codebook by splitting from K = 1, refining each stage with EMA Lloyd.

    Parameters
    ----------
    n_clusters : int, the final K (any integer; the last stage splits the worst codewords only).
    eps : float, split perturbation in per-dimension standard deviations (c ± eps·σ).
    max_stage_steps : int, EMA-Lloyd steps per stage at most (a stage stops earlier when the evaluation loss
        improves by less than ``tol`` (relative) over ``check_every`` steps, after ``min_steps``).
    final_stage_steps : int or None, the same for the last stage (default ``max_stage_steps``).
    decay : λ of the EMA update (0.9).
    rebalance, rebalance_rounds : ELBG-style utility shifts after each stage (kept only if the loss falls).
    n_passes : exact Lloyd iterations over all training frames after the last stage (default 3). Each one
        sets every codeword to the mean of the frames it wins, removing the EMA's minibatch noise; a codeword
        that wins no frame in a whole pass is dead and is repaired.
    batch_size : int or None (default clip(16K, 8192, 65536)).
    client : a ``dask.distributed.Client`` or None. When set, the exact passes (``n_passes``) are map-reduced
        over the store on the cluster (:func:`streamq.distributed.lloyd_stats`); the EMA stages stay here.
    The other parameters are as in :class:`MiniBatchLloyd`.

    Attributes
    ----------
    stage_codebooks_ : list of float32 (K_s, D), the codebook at the end of each stage (1, 2, 4, ..., K); the
        last one is ``codebook_`` (after the exact passes).
    """

    method = "lbg"

    def __init__(self, n_clusters=8, eps=0.01, max_stage_steps=200, decay=0.9, tol=5e-3, check_every=10,
                 min_steps=20, final_stage_steps=None, rebalance=True, rebalance_rounds=4, n_passes=3,
                 batch_size=None, repair=True, usage_decay=0.99, dead_threshold=0.02, repair_every=10,
                 eval_size=20000, log_every=10, seed=0, checkpoint=None, checkpoint_seconds=120.0, resume=False,
                 verbose=0, client=None):
        self.client = client
        self.n_clusters, self.eps, self.max_stage_steps, self.decay = n_clusters, eps, max_stage_steps, decay
        self.tol, self.check_every, self.min_steps = tol, check_every, min_steps
        self.final_stage_steps, self.rebalance, self.rebalance_rounds = final_stage_steps, rebalance, rebalance_rounds
        self.n_passes, self.batch_size, self.repair, self.usage_decay = n_passes, batch_size, repair, usage_decay
        self.dead_threshold, self.repair_every, self.eval_size = dead_threshold, repair_every, eval_size
        self.log_every, self.seed, self.checkpoint = log_every, seed, checkpoint
        self.checkpoint_seconds, self.resume, self.verbose = checkpoint_seconds, resume, verbose

    def _default_batch(self):
        return int(np.clip(16 * self.n_clusters, 8192, 65536))

    def stages(self):
        """Codebook size after each stage: 1, 2, 4, ..., n_clusters."""
        ks = [1]
        while ks[-1] < self.n_clusters:
            ks.append(min(2 * ks[-1], self.n_clusters))
        return ks

    def fit(self, X, y=None):
        """Grow and refine the codebook on ``X`` (an (N, D) array, a store, a path); returns self."""
        source, H, resumed = self._setup(X)
        if resumed is None:
            mean = H.mean(axis=0, dtype=np.float64).astype(np.float32)[None, :]
            self._init_state(mean, stage=0)
            self._stage_done, self._last_loss, self._phase, self._passes_done = -1, None, "refine", 0
            self.stage_codebooks_ = []
            self._log(H)
        else:
            extra, z = resumed
            self._stage_done, self._last_loss, self._phase = extra["stage_done"], extra["last_loss"], extra["phase"]
            self._passes_done = extra["passes_done"]
            ends = np.cumsum(z["stage_ks"])
            self.stage_codebooks_ = [z["stage_codebooks"][e - k:e].copy() for k, e in zip(z["stage_ks"], ends)]
        ks = self.stages()
        with bar(len(ks), desc=f"lbg K={self.n_clusters}", unit="stage", quiet=not self.verbose,
                 initial=self._stage_done + 1) as pb:
            for stage in range(len(ks)):
                if stage <= self._stage_done:
                    continue
                if self.stage_ != stage:  # a new stage (not resuming inside this one): split
                    self._split_to(ks[stage], stage)
                if self._phase == "refine":
                    self._refine_stage(source, H, final=stage == len(ks) - 1)
                    self._phase = "rebalance"
                    self._save()
                if self.rebalance and len(self.codebook_) >= 4:
                    self._rebalance(source, H)
                self._stage_done, self._last_loss, self._phase = stage, None, "refine"
                self.stage_codebooks_.append(self.codebook_.copy())
                self._save()
                pb.update(1)
                rec = self.history_[-1]
                pb.set_postfix_str(f"K={rec['k']} loss {rec['loss']:.4g} dead {rec['dead']}", refresh=False)
        with bar(self.n_passes, desc=f"lloyd passes K={self.n_clusters}", unit="pass", quiet=not self.verbose,
                 initial=self._passes_done) as pb:
            while self._passes_done < self.n_passes:
                self._full_pass(source, H)
                self._passes_done += 1
                self._save()
                pb.update(1)
        if self.stage_codebooks_:  # the last stage is the final codebook, after the exact passes
            self.stage_codebooks_[-1] = self.codebook_.copy()
        return self

    def _state(self):
        st = super()._state()
        cbs = self.stage_codebooks_
        st["stage_ks"] = np.array([len(c) for c in cbs], np.int64)
        st["stage_codebooks"] = (np.concatenate(cbs) if cbs else np.zeros((0, self.codebook_.shape[1]), np.float32))
        return st

    def _full_pass(self, source, H):
        """One exact Lloyd iteration over every training frame (storage order, bounded memory). A codeword
        that wins no frame in the whole pass is dead (the policy's full-pass case) and is repaired."""
        C = self.codebook_
        K, D = C.shape
        counts, sums, sse = np.zeros(K), np.zeros((K, D)), np.zeros(K)
        stats = None
        if self.client is not None:  # the same statistics, map-reduced over the store's ranges on Dask
            from .distributed import lloyd_stats

            stats = lloyd_stats(self.client, source, C, self._exclude, max(self._B, 65536), self.verbose)
        if stats is not None:
            counts, sums, sse, n_pass = stats
            self.frames_seen_ += n_pass
        group_of = self._groups()
        for X in (() if stats is not None else
                  source.iter_minibatches(max(self._B, 65536), shuffle=False, exclude=self._exclude)):
            labels, d2 = assign(X, C, group_of=group_of)
            st = cluster_stats(X, labels, K, d2=d2, second_order=False)
            counts += st.counts
            sums += st.sums
            sse += st.sse
            self.frames_seen_ += len(X)
        hit = counts > 0
        C = C.copy()
        C[hit] = (sums[hit] / counts[hit, None]).astype(np.float32)
        self.codebook_, self.counts_, self.distortion_ = C, counts, sse
        self.usage_ = counts / max(counts.sum(), 1)
        dead = dead_codewords(None, None, None, None, None, None, pass_counts=counts)
        self.idle_[hit] = 0
        self.step_ += 1
        n_dead = int(dead.sum())
        self._repair(dead, _derive(self.seed, 19, self._passes_done))
        self._log(H, **{"pass": self._passes_done + 1, "dead": n_dead})

    def _extra_state(self):
        return {"stage_done": self._stage_done, "last_loss": self._last_loss, "phase": self._phase,
                "passes_done": self._passes_done}

    def _split_to(self, k_new, stage):
        C, K = self.codebook_, len(self.codebook_)
        if k_new == 2 * K:
            C2 = split(C, self._eps, sigma=self._sigma)
        else:  # the last stage of a K that is not a power of two: split the worst codewords only
            idx = np.sort(np.argsort(-self.distortion_, kind="stable")[:k_new - K]).astype(np.int64)
            C2 = split(C, self._eps, sigma=self._sigma, idx=idx)
        self._init_state(C2, stage=stage)

    def _rebalance(self, source, H):
        """Utility shifts after a stage: move redundant codewords into the most distorted cells, refine
        briefly, keep the result only if the evaluation loss fell. Fixes LBG's equal-split allocation
        (a power-of-two split gives every half of the data the same number of codewords)."""
        K = len(self.codebook_)
        max_moves = max(1, K // 8)
        for rnd in range(self.rebalance_rounds):
            labels, d2 = assign(H, self.codebook_, group_of=self._groups())
            n = np.bincount(labels, minlength=K).astype(np.float64)
            sse = np.bincount(labels, weights=d2, minlength=K)
            before = float(sse.sum() / len(H))
            movers, targets = plan_shifts(self.codebook_, n, sse, max_moves=max_moves)
            if len(movers) == 0:
                return
            model = ("codebook_", "usage_", "distortion_", "age_", "counts_", "idle_")
            saved = {k: getattr(self, k).copy() for k in model}
            rng = np.random.default_rng(_derive(self.seed, 17, self.stage_, rnd))
            noise = (rng.standard_normal((len(movers), H.shape[1])) * self._sigma * self._eps).astype(np.float32)
            C = self.codebook_.copy()
            C[movers] = C[targets] + noise
            C[targets] = C[targets] - noise
            self.codebook_, self._moved = C, True
            self.usage_[movers] = self.usage_[targets] = (self.usage_[targets]) / 2
            self.distortion_[movers] = self.distortion_[targets] = self.distortion_[targets] / 2
            self.age_[movers] = self.idle_[movers] = 0
            stream = self._batches(source, self.stage_, 0, sub=1 + rnd)
            last = None
            for i in range(1, self.max_stage_steps + 1):  # refine until the loss settles, as a stage does
                self._step(next(stream))
                if i % self.check_every == 0:
                    after = self._log(H)["loss"]
                    if last is not None and i >= self.min_steps and last - after < self.tol * last:
                        break
                    last = after
            after = self._log(H)["loss"] if self.history_[-1]["step"] != self.step_ else self.history_[-1]["loss"]
            if after > before * (1 - self.tol):  # no real gain: undo (the steps spent stay counted), fewer moves
                for k, v in saved.items():
                    setattr(self, k, v)
                self._moved = True
                if max_moves == 1:
                    return
                max_moves //= 2
                continue
            self.n_shifted_ += len(movers)

    def _refine_stage(self, source, H, final):
        max_steps = (self.final_stage_steps or self.max_stage_steps) if final else self.max_stage_steps
        stream = self._batches(source, self.stage_, self.step_in_stage_)
        while self.step_in_stage_ < max_steps:
            self._step(next(stream))
            if self.step_in_stage_ % self.check_every == 0:
                loss, last = self._log(H)["loss"], self._last_loss
                self._last_loss = loss
                if last is not None and self.step_in_stage_ >= self.min_steps and last - loss < self.tol * last:
                    break
            self._maybe_save()
        if not self.history_ or self.history_[-1]["step"] != self.step_:
            self._log(H)

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

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from .kernels.assign import accumulate, assign
from .kernels.lloyd import ema_update, repair_dead, split
from .progress import bar, log, write_records
from .store import as_source

METRIC_COLUMNS = ["method", "stage", "step", "k", "frames_seen", "wall_seconds", "loss", "entropy", "log_k",
                  "utilisation", "dead", "repaired", "shifted", "imbalance"]


def _derive(*keys) -> int:
    """A 63-bit seed derived from integers (seed, stage, epoch, ...)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def evaluate(C: np.ndarray, X: np.ndarray) -> dict:
    """Quantisation metrics of codebook ``C`` (K, D) on frames ``X`` (n, D).

    loss: mean squared error per frame; entropy: usage entropy in nats (max log K); utilisation: share of
    codewords used; imbalance: K·Σn_k²/n² (1 = perfectly balanced).
    """
    K = len(C)
    labels, d2 = assign(X, C)
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
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > source.n_frames:
        raise ValueError(f"k={k} is larger than the number of frames ({source.n_frames}) in {source.name}")


def _sample_excluding(source, n, seed, exclude):
    """``n`` distinct frames of ``source`` drawn uniformly from those not in ``exclude`` (sorted indices)."""
    if exclude is None:
        return source.sample(n, seed=seed)
    keep = source.n_frames - len(exclude)
    pos = np.sort(np.random.default_rng(seed).choice(keep, size=n, replace=False))
    # map positions among kept frames to frame indices: skip over the excluded ones
    idx = pos + np.searchsorted(exclude - np.arange(len(exclude)), pos, side="right")
    return source.take(idx)


class _Estimator:
    """Shared fitted attributes and ``predict``."""

    codebook_: np.ndarray
    history_: list

    def predict(self, X) -> np.ndarray:
        """Index of the nearest codeword for each row of ``X`` (n, D) -> int64 (n,)."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.codebook_.shape[1]:
            raise ValueError(f"X has shape {X.shape}, codebook dim is {self.codebook_.shape[1]}")
        return assign(X, self.codebook_)[0]

    def score(self, X) -> float:
        """Mean squared quantisation error per frame on ``X``."""
        return evaluate(self.codebook_, np.ascontiguousarray(X, dtype=np.float32))["loss"]


class RandomSample(_Estimator):
    """K distinct frames drawn uniformly from the source: the no-hyper-parameter baseline and default init."""

    def __init__(self, k: int, seed: int = 0, eval_size: int = 20000):
        self.k, self.seed, self.eval_size = k, seed, eval_size

    def fit(self, source):
        t0 = time.perf_counter()
        source = as_source(source)
        _check_k(self.k, source)
        H, exclude = held_out(source, self.k, self.eval_size, self.seed)
        self.heldout_ = exclude is not None
        self.codebook_ = _sample_excluding(source, self.k, _derive(self.seed, 1), exclude)
        m = evaluate(self.codebook_, H)
        self.counts_ = np.bincount(assign(H, self.codebook_)[0], minlength=self.k).astype(np.float64)
        self.n_repaired_ = 0
        self.history_ = [{"method": "random", "stage": 0, "step": 0, "k": self.k, "frames_seen": self.k,
                          "wall_seconds": time.perf_counter() - t0, "dead": int((self.counts_ == 0).sum()),
                          "repaired": 0, **m}]
        return self


class _Trainer(_Estimator):
    """The EMA-Lloyd machinery shared by MiniBatchLloyd and LBG."""

    method = "?"

    def __init__(self, k, decay=0.9, batch_size=None, seed=0, repair=True, usage_decay=0.99, dead_threshold=0.02,
                 repair_every=10, eps=None, eval_size=20000, log_every=10, checkpoint=None,
                 checkpoint_seconds=120.0, quiet=True):
        self.k, self.decay, self.batch_size, self.seed = k, decay, batch_size, seed
        self.repair, self.usage_decay, self.dead_threshold, self.repair_every = repair, usage_decay, dead_threshold, repair_every
        self.eps, self.eval_size, self.log_every = eps, eval_size, log_every
        self.checkpoint, self.checkpoint_seconds, self.quiet = checkpoint, checkpoint_seconds, quiet

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

    def _state(self):
        return {"codebook": self.codebook_, "usage": self.usage_, "distortion": self.distortion_, "age": self.age_,
                "idle": self.idle_,
                "counts": self.counts_, "stage": self.stage_, "step_in_stage": self.step_in_stage_,
                "step": self.step_, "frames_seen": self.frames_seen_, "n_repaired": self.n_repaired_,
                "n_shifted": self.n_shifted_,
                "wall_offset": self._wall(), "extra": json.dumps(self._extra_state()),
                "history": json.dumps(self.history_)}

    def _extra_state(self):
        return {}

    def _load_state(self, z):
        self.codebook_, self.usage_ = z["codebook"].astype(np.float32), z["usage"]
        self.distortion_, self.age_, self.counts_, self.idle_ = z["distortion"], z["age"], z["counts"], z["idle"]
        self.stage_, self.step_in_stage_ = int(z["stage"]), int(z["step_in_stage"])
        self.step_, self.frames_seen_, self.n_repaired_ = int(z["step"]), int(z["frames_seen"]), int(z["n_repaired"])
        self.n_shifted_ = int(z["n_shifted"])
        self._t0 = time.perf_counter() - float(z["wall_offset"])
        self.history_ = json.loads(str(z["history"]))
        return json.loads(str(z["extra"]))

    def _save(self):
        if not self.checkpoint:
            return
        path = Path(self.checkpoint)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **self._state())
        os.replace(tmp, path)
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
    def _step(self, X):
        C = self.codebook_
        K = len(C)
        labels, d2 = assign(X, C)
        sums, counts, sse = accumulate(X, labels, d2, K)
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
            self._repair()

    def _maybe_save(self):
        """Time-based checkpoint; called only between steps, after any logging of that step."""
        if self.checkpoint and time.perf_counter() - self._last_ckpt > self.checkpoint_seconds:
            self._save()

    def _dead(self):
        """Dead codewords: no frame won in the last W = max(20, 50·K/B) steps (about 50 frames' worth at a
        fair share), or a usage EMA under ``dead_threshold`` of the fair share once the EMA has settled."""
        K = len(self.codebook_)
        window = max(20, math.ceil(50 * K / self._B))
        mature = self.age_ >= 1.0 / (1.0 - self.usage_decay)
        return (self.idle_ >= window) | (mature & (self.usage_ < self.dead_threshold / K))

    def _repair(self):
        K = len(self.codebook_)
        dead = self._dead()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        rng = np.random.default_rng(_derive(self.seed, 13, self.stage_, self.step_))
        noise = (rng.standard_normal((n_dead, self.codebook_.shape[1])) * self._sigma).astype(np.float32)
        self.codebook_, n = repair_dead(self.codebook_, dead, self.distortion_, self.counts_, self._eps, noise)
        # the moved codewords and their donors start a fresh life, sharing the donor's usage
        self.usage_[dead] = 1.0 / K
        self.distortion_[dead] = 0.0
        self.age_[dead] = 0
        self.idle_[dead] = 0
        self.n_repaired_ += int(n)

    def _log(self, H, extra=None):
        m = evaluate(self.codebook_, H)
        K = len(self.codebook_)
        rec = {"method": self.method, "stage": self.stage_, "step": self.step_, "k": K,
               "frames_seen": self.frames_seen_, "wall_seconds": round(self._wall(), 4),
               "dead": int(self._dead().sum()), "repaired": self.n_repaired_,
               "shifted": self.n_shifted_, **m}
        self.history_.append(rec)
        return rec

    # ------------------------------------------------------------ setup
    def _setup(self, source, resume):
        source = as_source(source)
        _check_k(self.k, source)
        self._B = int(self.batch_size or self._default_batch())
        self._t0 = time.perf_counter()
        self._last_ckpt = self._t0
        self.history_, self.step_, self.frames_seen_, self.n_repaired_, self.n_shifted_ = [], 0, 0, 0, 0
        H, self._exclude = held_out(source, self.k, self.eval_size, self.seed)
        self.heldout_ = self._exclude is not None
        self._sigma = H.std(axis=0).astype(np.float32) + np.float32(1e-12)
        self._eps = float(self.eps if self.eps is not None else 0.01)
        extra = None
        if resume and self.checkpoint and Path(self.checkpoint).exists():
            with np.load(self.checkpoint) as z:
                extra = self._load_state(z)
            log.info("resumed from %s at step %d (K=%d)", self.checkpoint, self.step_, len(self.codebook_))
        return source, H, extra

    def _default_batch(self):
        return 4096


class MiniBatchLloyd(_Trainer):
    """Minibatch k-means with EMA codeword updates (decay λ, the seed's 0.9) and dead-codeword repair.

    Parameters
    ----------
    k : number of codewords.  decay : λ in c ← λc + (1−λ)·batch mean.  batch_size : frames per step.
    steps : number of minibatch steps (default: two passes over the data, at least 100).
    init : 'random' (K distinct frames, seeded) or a (K, D) array.
    """

    method = "lloyd"

    def __init__(self, k, decay=0.9, batch_size=None, steps=None, init="random", **kw):
        super().__init__(k, decay=decay, batch_size=batch_size, **kw)
        self.steps, self.init = steps, init

    def _default_batch(self):
        return int(np.clip(8 * self.k, 4096, 65536))

    def _init_codebook(self, source):
        if isinstance(self.init, str):
            if self.init != "random":
                raise ValueError(f"init must be 'random' or a (K, D) array, got {self.init!r}")
            return _sample_excluding(source, self.k, _derive(self.seed, 1), self._exclude)
        C = np.ascontiguousarray(self.init, dtype=np.float32)
        if C.shape != (self.k, source.dim):
            raise ValueError(f"init codebook has shape {C.shape}, expected ({self.k}, {source.dim})")
        return C

    def fit(self, source, resume=False):
        source, H, extra = self._setup(source, resume)
        if extra is None:
            self._init_state(self._init_codebook(source))
            self._log(H)
        steps = self.steps or max(100, 2 * math.ceil(source.n_frames / self._B))
        stream = self._batches(source, 0, self.step_)
        with bar(steps, desc=f"lloyd K={self.k}", unit="step", quiet=self.quiet, initial=self.step_) as pb:
            while self.step_ < steps:
                self._step(next(stream))
                pb.update(1)
                if self.step_ % self.log_every == 0 or self.step_ == steps:
                    rec = self._log(H)
                    pb.set_postfix_str(f"loss {rec['loss']:.4g} dead {rec['dead']}", refresh=False)
                self._maybe_save()
        self._save()
        return self

    def partial_fit(self, X):
        """One EMA step on batch ``X`` (B, D); the first call initialises from K distinct rows of ``X``."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if not hasattr(self, "codebook_"):
            if isinstance(self.init, str):
                if len(X) < self.k:
                    raise ValueError(f"k={self.k} is larger than the first batch ({len(X)} frames)")
                rng = np.random.default_rng(_derive(self.seed, 1))
                C = X[np.sort(rng.choice(len(X), self.k, replace=False))]
            else:
                C = np.asarray(self.init, np.float32)
            self._init_state(C)
            self._t0, self._last_ckpt = time.perf_counter(), time.perf_counter()
            self.history_, self.step_, self.frames_seen_, self.n_repaired_, self.n_shifted_ = [], 0, 0, 0, 0
            self._sigma = X.std(axis=0).astype(np.float32) + np.float32(1e-12)
            self._eps = float(self.eps if self.eps is not None else 0.01)
            self._B, self._exclude = len(X), None
        if X.ndim != 2 or X.shape[1] != self.codebook_.shape[1]:
            raise ValueError(f"batch has shape {X.shape}, codebook dim is {self.codebook_.shape[1]}")
        if not np.isfinite(X).all():
            raise ValueError(f"batch holds {int((~np.isfinite(X)).any(axis=1).sum())} frames with NaN or inf")
        self._step(X)
        return self


class LBG(_Trainer):
    """Linde–Buzo–Gray: grow the codebook by splitting from K = 1, refining each stage with EMA Lloyd.

    Parameters
    ----------
    k : final number of codewords (any integer; the last stage splits the worst codewords only).
    eps : split perturbation, in units of the per-dimension standard deviation (c ± eps·σ); default 0.01.
    refine : maximum EMA-Lloyd steps per stage (a stage stops earlier when the evaluation loss improves by
        less than ``tol`` (relative) over ``check_every`` steps).
    decay : λ of the EMA update (0.9).
    passes : exact Lloyd iterations over all training frames after the last stage (default 3). Each one
        sets every codeword to the mean of the frames it wins, removing the EMA's minibatch noise, and
        moves any codeword that won no frame at all next to the most distorted one.
    """

    method = "lbg"

    def __init__(self, k, eps=0.01, refine=200, decay=0.9, tol=5e-3, check_every=10, min_steps=20,
                 final_refine=None, rebalance=True, rebalance_rounds=4, passes=3, **kw):
        super().__init__(k, decay=decay, eps=eps, **kw)
        self.refine, self.tol, self.check_every, self.min_steps = refine, tol, check_every, min_steps
        self.final_refine, self.rebalance, self.rebalance_rounds = final_refine, rebalance, rebalance_rounds
        self.passes = passes

    def _default_batch(self):
        return int(np.clip(16 * self.k, 8192, 65536))

    def stages(self):
        """Codebook size after each stage: 1, 2, 4, ..., k."""
        ks = [1]
        while ks[-1] < self.k:
            ks.append(min(2 * ks[-1], self.k))
        return ks

    def fit(self, source, resume=False):
        source, H, extra = self._setup(source, resume)
        if extra is None:
            mean = H.mean(axis=0, dtype=np.float64).astype(np.float32)[None, :]
            self._init_state(mean, stage=0)
            self._stage_done, self._last_loss, self._phase, self._passes_done = -1, None, "refine", 0
            self._log(H)
        else:
            self._stage_done, self._last_loss, self._phase = extra["stage_done"], extra["last_loss"], extra["phase"]
            self._passes_done = extra["passes_done"]
        ks = self.stages()
        with bar(len(ks), desc=f"lbg K={self.k}", unit="stage", quiet=self.quiet,
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
                self._save()
                pb.update(1)
                rec = self.history_[-1]
                pb.set_postfix_str(f"K={rec['k']} loss {rec['loss']:.4g} dead {rec['dead']}", refresh=False)
        with bar(self.passes, desc=f"lloyd passes K={self.k}", unit="pass", quiet=self.quiet,
                 initial=self._passes_done) as pb:
            while self._passes_done < self.passes:
                self._full_pass(source, H)
                self._passes_done += 1
                self._save()
                pb.update(1)
        return self

    def _full_pass(self, source, H):
        """One exact Lloyd iteration over every training frame (storage order, bounded memory)."""
        C = self.codebook_
        K, D = C.shape
        sums, counts, sse = np.zeros((K, D)), np.zeros(K, np.int64), np.zeros(K)
        for X in source.iter_minibatches(max(self._B, 65536), shuffle=False, exclude=self._exclude):
            labels, d2 = assign(X, C)
            s, c, e = accumulate(X, labels, d2, K)
            sums += s
            counts += c
            sse += e
            self.frames_seen_ += len(X)
        hit = counts > 0
        C = C.copy()
        C[hit] = (sums[hit] / counts[hit, None]).astype(np.float32)
        self.codebook_, self.counts_, self.distortion_ = C, counts.astype(np.float64), sse
        self.idle_[:] = np.where(hit, 0, self.idle_)
        dead = ~hit
        if dead.any():  # won nothing in a whole pass: move next to the most distorted codewords
            rng = np.random.default_rng(_derive(self.seed, 19, self._passes_done))
            noise = (rng.standard_normal((int(dead.sum()), D)) * self._sigma).astype(np.float32)
            self.codebook_, n = repair_dead(self.codebook_, dead, sse, counts, self._eps, noise)
            self.n_repaired_ += int(n)
            self.idle_[dead] = 0
        self.usage_ = counts / max(counts.sum(), 1)
        self.step_ += 1
        rec = self._log(H)
        rec["pass"] = self._passes_done + 1
        rec["dead"] = int(dead.sum())

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
            labels, d2 = assign(H, self.codebook_)
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
            self.codebook_ = C
            self.usage_[movers] = self.usage_[targets] = (self.usage_[targets]) / 2
            self.distortion_[movers] = self.distortion_[targets] = self.distortion_[targets] / 2
            self.age_[movers] = self.idle_[movers] = 0
            stream = self._batches(source, self.stage_, 0, sub=1 + rnd)
            last = None
            for i in range(1, self.refine + 1):  # refine until the loss settles, as a stage does
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
                if max_moves == 1:
                    return
                max_moves //= 2
                continue
            self.n_shifted_ += len(movers)

    def _refine_stage(self, source, H, final):
        max_steps = (self.final_refine or self.refine) if final else self.refine
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


# ---------------------------------------------------------------- files and CLI entry points
def write_history(records, path):
    """Write metric records as CSV (columns: METRIC_COLUMNS, then any others)."""
    write_records(records, path, METRIC_COLUMNS)


def make_estimator(method, k, batch_size=None, steps=None, decay=0.9, eps=None, seed=0, repair=True,
                   checkpoint=None, quiet=True):
    """The estimator behind ``streamq fit --method``."""
    if method == "random":
        return RandomSample(k, seed=seed)
    common = dict(batch_size=batch_size, seed=seed, repair=repair, checkpoint=checkpoint, quiet=quiet)
    if method == "lloyd":
        return MiniBatchLloyd(k, decay=decay, steps=steps, eps=eps, **common)
    if method == "lbg":
        kw = {"refine": steps} if steps else {}
        return LBG(k, eps=0.01 if eps is None else eps, decay=decay, **kw, **common)
    raise ValueError(f"unknown method {method!r}: choose lbg, lloyd or random")


def run_fit(store, out, k, method="lbg", batch_size=None, steps=None, decay=0.9, eps=None, seed=0, resume=False,
            repair=True, quiet=False) -> dict:
    """``streamq fit``: train one codebook and write OUT/codebook.npy, history.csv, config.json."""
    source = as_source(store)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"store": str(store), "k": k, "method": method, "batch_size": batch_size, "steps": steps,
              "decay": decay, "eps": eps, "seed": seed, "repair": repair, "dim": source.dim,
              "n_frames": source.n_frames}
    cfg_path = out / "config.json"
    if resume and cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        diff = {c: (old.get(c), config[c]) for c in config if c != "store" and old.get(c) != config[c]}
        if diff:
            raise ValueError(f"{cfg_path}: cannot resume with different settings {diff}")
    ckpt = out / "checkpoint.npz"
    if not resume and ckpt.exists():
        ckpt.unlink()
    est = make_estimator(method, k, batch_size, steps, decay, eps, seed, repair, checkpoint=str(ckpt), quiet=quiet)
    cfg_path.write_text(json.dumps(config, indent=2))
    est.fit(source, resume=resume) if method != "random" else est.fit(source)
    np.save(out / "codebook.npy", est.codebook_)
    np.save(out / "counts.npy", est.counts_)
    write_history(est.history_, out / "history.csv")
    last = est.history_[-1]
    return {"k": k, "method": method, "loss": last["loss"], "entropy": last["entropy"], "log_k": last["log_k"],
            "dead": last["dead"], "repaired": est.n_repaired_, "wall_seconds": last["wall_seconds"],
            "heldout": est.heldout_}


def run_compare(store, out, k=256, batch_size=None, seed=0, quiet=False) -> dict:
    """``streamq compare``: the seed's experiment. LBG runs to K; MiniBatchLloyd gets the same number of
    frames; RandomSample is the baseline. Writes OUT/history.csv and the two pictures."""
    from . import plots

    source = as_source(store)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lbg = LBG(k, batch_size=batch_size, seed=seed, quiet=quiet).fit(source)
    budget = lbg.frames_seen_
    B = batch_size or MiniBatchLloyd(k)._default_batch()
    B = min(B, source.n_frames)
    lloyd = MiniBatchLloyd(k, batch_size=B, steps=max(1, budget // B), seed=seed, quiet=quiet).fit(source)
    rnd = RandomSample(k, seed=seed).fit(source)
    records = rnd.history_ + lloyd.history_ + lbg.history_
    write_history(records, out / "history.csv")
    for name, est in (("random", rnd), ("lloyd", lloyd), ("lbg", lbg)):
        np.save(out / f"codebook_{name}.npy", est.codebook_)
    files = [str(out / "history.csv")] + plots.plot_compare(records, out)
    summary = {m: dict(e.history_[-1]) for m, e in (("random", rnd), ("lloyd", lloyd), ("lbg", lbg))}
    return {"methods": summary, "files": files, "budget_frames": budget}

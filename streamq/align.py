"""Forced alignment of transcripts to frames with a tied-mixture chain HMM, trained by EM on the corpus.

Model
-----
- **States.** A transcript is normalised to words of symbols (lower-case letters of any script,
  digits, the apostrophe inside a word; punctuation dropped). The chain is::

      <sil>  w1c1 ... w1cn  [<sil>]  w2c1 ... w2cm  [<sil>] ...  <sil>

  with ``states_per_symbol`` states per character, a silence state at both ends (paths start in the
  first and end in the last) and an optional silence between words: a word-final state goes to
  itself, to the pause, or skips it to the next word (the kernel's ``skip`` transition).
- **Emissions.** K shared diagonal Gaussians (a GMM, or a codebook with per-cluster variances)
  and one weight vector per *unit* (a symbol's sub-state, or silence), tied across utterances.
  Per frame the K Gaussian log-likelihoods are computed once; a unit's log-emission is
  ``logsumexp_k(log w_uk + log N_k(x))``. EM re-estimates only the weights (and, optionally, each
  utterance's self-loop probability).
- **Durations.** Self-loop ``p = 1 - S/T`` per utterance (E[d] = 1/(1-p) = T/S), floored.

Entry points: :func:`run_align` (the ``streamq align`` command) and :class:`Aligner` (notebooks).
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .kernels.hmm import (diag_gauss_loglik, forward_backward, frame_normalise, mixture_counts,
                          mixture_likelihoods, nearest_stats, occupancy_by_unit, viterbi)
from .progress import bar, log, write_records

SIL = "<sil>"
_APOSTROPHES = set("'’ʼ‘`´")

# --------------------------------------------------------------------------- transcripts


def normalise(text: str) -> list[str]:
    """Words of a transcript: NFC, lower case, letters / digits / in-word apostrophes kept.

    Any other character (punctuation, spaces, hyphens) ends a word. Every apostrophe variant
    (’ ʼ ‘ ` ´) becomes ``'``; apostrophes at a word's edge are dropped.

    >>> normalise("Ім’я — «М'ята», 2 рази!")
    ["ім'я", "м'ята", '2', 'рази']
    """
    text = unicodedata.normalize("NFC", text).lower()
    words, cur = [], []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in _APOSTROPHES:  # before the letter test: U+02BC is a modifier *letter*
            if cur:
                cur.append("'")
        elif cat[0] == "L" or cat == "Nd" or (cat[0] == "M" and cur):
            cur.append(ch)
        elif cur:
            words.append("".join(cur).strip("'"))
            cur = []
    if cur:
        words.append("".join(cur).strip("'"))
    return [w for w in words if w]


@dataclass
class Chain:
    """The state chain of one utterance.

    ``units`` (S,) global unit id of each state; ``stay_scale`` etc. are built per self-loop p by
    :meth:`transitions`. ``char_of`` (S,) index of the character a state belongs to (-1: silence),
    ``chars`` list of (label, word index), ``words`` list of labels, ``pre_pause`` (S,) bool: the
    state is followed by an optional pause.
    """

    units: np.ndarray
    char_of: np.ndarray
    pre_pause: np.ndarray
    chars: list
    words: list
    n_required: int
    n_optional: int

    @property
    def n_states(self) -> int:
        return len(self.units)

    def expected_states(self, pause_prob: float) -> float:
        return self.n_required + pause_prob * self.n_optional

    def transitions(self, p: float, pause_prob: float):
        """(stay, nxt, skip) float64 (S,) for self-loop probability ``p``; the last state absorbs."""
        S = self.n_states
        stay = np.full(S, p)
        nxt = np.full(S, 1.0 - p)
        skip = np.zeros(S)
        nxt[self.pre_pause] = (1.0 - p) * pause_prob
        skip[self.pre_pause] = (1.0 - p) * (1.0 - pause_prob)
        stay[-1], nxt[-1] = 1.0, 0.0  # the final state absorbs (paths end there)
        return stay, nxt, skip


class Inventory:
    """Symbols and emission units: unit 0 is silence, then ``states_per_symbol`` units per symbol."""

    def __init__(self, symbols, states_per_symbol: int):
        self.symbols = sorted(set(symbols))
        self.states_per_symbol = int(states_per_symbol)
        self.index = {c: i for i, c in enumerate(self.symbols)}
        self.n_units = 1 + len(self.symbols) * self.states_per_symbol

    @classmethod
    def from_transcripts(cls, transcripts, states_per_symbol):
        syms = set()
        for t in transcripts:
            for w in normalise(t):
                syms.update(w)
        return cls(syms, states_per_symbol)

    def unit_labels(self) -> list[str]:
        out = [SIL]
        for c in self.symbols:
            out += [c if self.states_per_symbol == 1 else f"{c}{j}" for j in range(self.states_per_symbol)]
        return out

    def chain(self, transcript: str) -> Chain:
        """The chain of ``transcript``; raises ValueError for a symbol not in the inventory."""
        words = normalise(transcript)
        k = self.states_per_symbol
        units, char_of, pre_pause, chars = [0], [-1], [False], []
        n_opt = 0
        for wi, w in enumerate(words):
            if wi > 0:  # optional pause between words
                pre_pause[-1] = True
                units.append(0)
                char_of.append(-1)
                pre_pause.append(False)
                n_opt += 1
            for ch in w:
                if ch not in self.index:
                    raise ValueError(f"symbol {ch!r} (in {w!r}) is not in the trained inventory")
                base = 1 + self.index[ch] * k
                for j in range(k):
                    units.append(base + j)
                    char_of.append(len(chars))
                    pre_pause.append(False)
                chars.append((ch, wi))
        units.append(0)
        char_of.append(-1)
        pre_pause.append(False)
        return Chain(np.array(units, np.int64), np.array(char_of, np.int64), np.array(pre_pause, bool),
                     chars, words, len(units) - n_opt, n_opt)


# --------------------------------------------------------------------------- emission model


@dataclass
class GaussianSet:
    """K shared diagonal Gaussians: weights (K,), means (K, D), variances (K, D)."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    @property
    def n_components(self):
        return self.means.shape[0]

    @property
    def dim(self):
        return self.means.shape[1]

    @classmethod
    def from_any(cls, model, name="model"):
        """From a DiagGMM-like object (``weights_``, ``means_``, ``variances_``), a dict, or a model dir."""
        if isinstance(model, GaussianSet):
            return model
        if isinstance(model, (str, Path)):
            return load_model(model)
        get = (lambda k: model[k]) if isinstance(model, dict) else (lambda k: getattr(model, k + "_"))
        try:
            w, m, v = get("weights"), get("means"), get("variances")
        except (KeyError, AttributeError) as e:
            raise ValueError(f"{name}: needs weights, means and variances ({e})") from None
        return cls.validated(w, m, v, name)

    @classmethod
    def validated(cls, w, m, v, name):
        m = np.asarray(m, np.float64)
        v = np.asarray(v, np.float64)
        w = np.asarray(w, np.float64)
        if m.ndim != 2 or m.shape[0] == 0:
            raise ValueError(f"{name}: means must be (K, D), got shape {m.shape}")
        K, D = m.shape
        if v.shape != (K, D):
            raise ValueError(f"{name}: variances must have the means' shape {(K, D)}, got {v.shape}")
        if w.shape != (K,):
            raise ValueError(f"{name}: weights must be ({K},), got {w.shape}")
        if not (np.isfinite(m).all() and np.isfinite(v).all() and np.isfinite(w).all()):
            raise ValueError(f"{name}: weights, means and variances must be finite")
        if (v <= 0).any():
            raise ValueError(f"{name}: variances must be > 0 ({int((v <= 0).sum())} are not)")
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"{name}: weights must be >= 0 and not all zero")
        return cls(w / w.sum(), m, v)


def load_model(model_dir) -> GaussianSet | np.ndarray:
    """``gmm.npz`` (a GaussianSet) or ``codebook.npy`` (a float32 (K, D) array) from a model dir."""
    d = Path(model_dir)
    if d.is_file() and d.suffix in (".npz", ".npy"):
        d, files = d.parent, [d]
    else:
        if not d.is_dir():
            raise ValueError(f"{d}: model directory not found")
        files = [d / "gmm.npz", d / "codebook.npy"]
    for f in files:
        if not f.exists():
            continue
        if f.suffix == ".npz":
            try:
                z = np.load(f)
            except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
                raise ValueError(f"{f}: cannot read ({e})") from None
            for key in ("weights", "means", "variances"):
                if key not in z.files:
                    raise ValueError(f"{f}: missing field '{key}' (has {', '.join(z.files)})")
            return GaussianSet.validated(z["weights"], z["means"], z["variances"], str(f))
        try:
            c = np.load(f)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{f}: cannot read ({e})") from None
        if c.ndim != 2 or c.shape[0] == 0 or not np.issubdtype(c.dtype, np.floating) or not np.isfinite(c).all():
            raise ValueError(f"{f}: expected a finite float (K, D) codebook, got {c.dtype} {c.shape}")
        return np.ascontiguousarray(c, np.float32)
    raise ValueError(f"{d}: no gmm.npz or codebook.npy (train one with `streamq gmm` or `streamq fit`)")


def gaussians_from_codebook(codebook, corpus, var_floor=1e-3, quiet=True) -> GaussianSet:
    """Diagonal Gaussians centred on the codewords, variance per cluster, in one pass over ``corpus``.

    ``var_floor`` is relative to the global per-dimension variance; clusters with fewer than 2
    frames get the global variance. Weights are the cluster shares.
    """
    C = np.ascontiguousarray(codebook, np.float32)
    K, D = C.shape
    counts, sums, sq = np.zeros(K), np.zeros((K, D)), np.zeros((K, D))
    with bar(corpus.n_frames, "codebook variances", "frame", quiet) as pb:
        for X in corpus.iter_frame_blocks():
            c, s, q = nearest_stats(X, C)
            counts += c
            sums += s
            sq += q
            pb.update(len(X))
    n = counts.sum()
    gmean = sums.sum(0) / n
    gvar = np.maximum(sq.sum(0) / n - gmean ** 2, 1e-8)
    Cd = C.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (sq - 2 * Cd * sums) / counts[:, None] + Cd ** 2
    var = np.where(counts[:, None] >= 2, var, gvar)
    var = np.maximum(var, var_floor * gvar)
    w = np.maximum(counts, 0.5)
    return GaussianSet(w / w.sum(), Cd, var)


# --------------------------------------------------------------------------- corpora


class _Corpus:
    """Utterances from a FrameStore (streamed in blocks of consecutive utterances) or from lists."""

    def __init__(self, utterances, transcripts=None, ids=None, block_frames=1 << 18):
        from .store import FrameStore

        self.store = None
        if isinstance(utterances, (str, Path)):
            utterances = FrameStore.open(utterances)
        if isinstance(utterances, FrameStore):
            s = self.store = utterances
            self.ids, self.transcripts = list(s.ids), list(s.transcripts)
            self.offsets = np.asarray(s.offsets, np.int64)
            self.dim, self.frame_step = s.dim, s.frame_step
            self.feature_config = s.feature_config
            self.durations = np.asarray(s.durations, np.float64)
        else:
            self.arrays = [np.ascontiguousarray(a, np.float32) for a in utterances]
            if transcripts is None or len(transcripts) != len(self.arrays):
                raise ValueError("transcripts: need one transcript per utterance")
            for i, a in enumerate(self.arrays):
                if a.ndim != 2:
                    raise ValueError(f"utterance {i}: frames must be (T, D), got shape {a.shape}")
                if not np.isfinite(a).all():
                    raise ValueError(f"utterance {i}: frames hold NaN or inf")
            self.transcripts = list(transcripts)
            self.ids = list(ids) if ids is not None else [f"utt{i:06d}" for i in range(len(self.arrays))]
            self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])]).astype(np.int64)
            self.dim = self.arrays[0].shape[1] if self.arrays else 0
            self.frame_step, self.feature_config = 0.01, {}
            self.durations = np.diff(self.offsets) * self.frame_step
        self.block_frames = block_frames
        self.n = len(self.ids)
        self.lengths = np.diff(self.offsets)
        self.n_frames = int(self.offsets[-1])

    def iter_blocks(self, indices):
        """Yield lists of (i, frames) over ``indices`` (sorted), reading consecutive utterances together."""
        indices = list(indices)
        if self.store is None:
            for a in range(0, len(indices), 64):
                yield [(i, self.arrays[i]) for i in indices[a:a + 64]]
            return
        off, j = self.offsets, 0
        while j < len(indices):
            k = j + 1
            while (k < len(indices) and indices[k] == indices[k - 1] + 1
                   and off[indices[k] + 1] - off[indices[j]] <= self.block_frames):
                k += 1
            lo, hi = off[indices[j]], off[indices[k - 1] + 1]
            X = self.store.read(lo, hi)
            yield [(i, X[off[i] - lo:off[i + 1] - lo]) for i in indices[j:k]]
            j = k

    def iter_frame_blocks(self):
        for blk in self.iter_blocks(range(self.n)):
            for _, X in blk:
                yield X


# --------------------------------------------------------------------------- the aligner


@dataclass
class Alignment:
    """One utterance's alignment. Frame ranges are [start, stop)."""

    utt_id: str
    path: np.ndarray                      # int64 (T,) state per frame
    loglik: float                         # Viterbi path log-probability
    chars: list                           # (start, stop, label)
    words: list                           # (start, stop, label)
    state_labels: list = field(default_factory=list)
    posteriors: np.ndarray | None = None  # float64 (T, S), when asked for


def _segments(chain: Chain, path: np.ndarray):
    """Character and word segments, (start_frame, stop_frame, label), from a state path."""
    cof = chain.char_of[path]
    chars, word_of = [], []
    T, t = len(path), 0
    while t < T:
        c, u = cof[t], t
        while u < T and cof[u] == c:
            u += 1
        if c >= 0:
            chars.append((t, u, chain.chars[c][0]))
            word_of.append(chain.chars[c][1])
        t = u
    words = []
    for k, (a, b, _) in enumerate(chars):
        w = word_of[k]
        if words and word_of[k - 1] == w:
            words[-1] = (words[-1][0], b, words[-1][2])
        else:
            words.append((a, b, chain.words[w]))
    return chars, words


class Aligner:
    """Tied-mixture chain-HMM forced aligner, trained by EM over a corpus (scikit-learn style).

    Parameters
    ----------
    model : DiagGMM-like (``weights_``, ``means_``, ``variances_``), dict, GaussianSet or model dir.
        The shared Gaussians. A codebook dir needs a corpus to estimate variances (see ``fit``).
    states_per_symbol : int, states (and weight vectors) per character. 3 measured best on the espeak
        corpus (50 ms accuracy 90.9 % with 1, 95.4 % with 2, 96.1 % with 3; scripts/eval_alignment.py).
    n_iter : int, EM iterations.
    pause_prob : float, probability of taking the optional pause between words.
    self_loop_floor : float, lower bound of the self-loop probability (upper bound 0.999).
    self_loop : float or None, a fixed self-loop probability for every utterance; None (default):
        ``1 - S/T`` per utterance (a fixed 0.75 on long utterances makes Viterbi put one frame in
        each early state and the rest in the last, as the seed notes found).
    update_transitions : bool, re-estimate each utterance's self-loop probability in the M-step.
    weight_prior : float, Dirichlet pseudo-count (in frames) pulling each unit's weights towards
        the model's global weights; 0 gives plain maximum-likelihood EM.
    jobs : int, threads over utterances (kernels release the GIL).
    cache_mb : float, keep per-frame Gaussian likelihoods in memory between iterations up to this size.

    Attributes
    ----------
    inventory_ : Inventory; unit_weights_ : float64 (n_units, K); self_loops_ : float64 (U,);
    history_ : list of dict (iteration, loglik, loglik_per_frame, aligned, log_fallbacks, seconds);
    unaligned_ : dict utterance index -> reason.
    """

    def __init__(self, model, states_per_symbol=3, n_iter=30, pause_prob=0.5, self_loop_floor=0.1,
                 self_loop=None, update_transitions=False, weight_prior=1.0, jobs=1, quiet=True, cache_mb=512.0):
        self.model = model
        self.states_per_symbol = states_per_symbol
        self.n_iter = n_iter
        self.pause_prob = pause_prob
        self.self_loop_floor = self_loop_floor
        self.self_loop = self_loop
        self.update_transitions = update_transitions
        self.weight_prior = weight_prior
        self.jobs = jobs
        self.quiet = quiet
        self.cache_mb = cache_mb

    # ------------------------------------------------------------------ setup
    def _check_params(self):
        if int(self.states_per_symbol) < 1:
            raise ValueError(f"states_per_symbol must be >= 1, got {self.states_per_symbol}")
        if int(self.n_iter) < 0:
            raise ValueError(f"iters must be >= 0, got {self.n_iter}")
        if not 0.0 < self.pause_prob < 1.0:
            raise ValueError(f"pause_prob must be in (0, 1), got {self.pause_prob}")
        if not 0.0 <= self.self_loop_floor < 1.0:
            raise ValueError(f"self_loop_floor must be in [0, 1), got {self.self_loop_floor}")
        if self.self_loop is not None and not 0.0 <= self.self_loop < 1.0:
            raise ValueError(f"self_loop must be in [0, 1), got {self.self_loop}")
        if self.weight_prior < 0:
            raise ValueError(f"weight_prior must be >= 0, got {self.weight_prior}")
        if int(self.jobs) < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")

    def _prepare(self, corpus: _Corpus):
        self._check_params()
        m = self.model
        if isinstance(m, (str, Path)):
            m = load_model(m)
        if isinstance(m, np.ndarray):
            m = gaussians_from_codebook(m, corpus, quiet=self.quiet)
        self.gaussians_ = GaussianSet.from_any(m)
        if self.gaussians_.dim != corpus.dim:
            raise ValueError(f"model has dimension {self.gaussians_.dim}, frames have {corpus.dim}")
        self.inventory_ = Inventory.from_transcripts(corpus.transcripts, self.states_per_symbol)
        g = self.gaussians_
        self._prec = None
        self.unit_weights_ = np.tile(g.weights, (self.inventory_.n_units, 1))
        self.chains_, self.unaligned_ = [None] * corpus.n, {}
        self.self_loops_ = np.full(corpus.n, np.nan)
        for i, tr in enumerate(corpus.transcripts):
            ch = self.inventory_.chain(tr)
            T = int(corpus.lengths[i])
            if not ch.words:
                self.unaligned_[i] = "empty transcript after normalisation"
            elif ch.n_required > T:
                self.unaligned_[i] = f"more states than frames ({ch.n_required} states, {T} frames)"
            else:
                self.chains_[i] = ch
                self.self_loops_[i] = self._init_loop(ch, T)
        self._cache = {}
        self._cache_budget = self.cache_mb * 2 ** 20

    def _init_loop(self, ch: Chain, T: int) -> float:
        if self.self_loop is not None:
            return float(self.self_loop)
        p = 1.0 - ch.expected_states(self.pause_prob) / T
        return float(min(max(p, self.self_loop_floor), 0.999))

    # ------------------------------------------------------------------ per utterance
    def _frame_gauss(self, i, X):
        """exp(G - max) (T, K) and the shift (T,), cached between iterations while the budget allows."""
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        g = self.gaussians_
        G = np.empty((len(X), g.n_components))
        diag_gauss_loglik(X, g.means, g.variances, G)
        shift = frame_normalise(G)
        if G.nbytes <= self._cache_budget:
            self._cache_budget -= G.nbytes
            self._cache[i] = (G, shift)
        return G, shift

    def _emissions(self, i, X, ch: Chain):
        """Local units, log-emissions (T, n_local), Gexp, per-unit likelihoods (T, n_local)."""
        Gx, shift = self._frame_gauss(i, X)
        units, local = np.unique(ch.units, return_inverse=True)
        W = np.ascontiguousarray(self.unit_weights_[units])
        P = mixture_likelihoods(Gx, W)
        with np.errstate(divide="ignore"):
            log_emit = np.log(P) + shift[:, None]
        return units, local.astype(np.int64), log_emit, Gx, P, W

    def _e_step(self, i, X):
        ch = self.chains_[i]
        units, local, log_emit, Gx, P, W = self._emissions(i, X, ch)
        stay, nxt, skip = ch.transitions(self.self_loops_[i], self.pause_prob)
        gamma, ll, xi, used_log = forward_backward(log_emit, local, stay, nxt, skip)
        if not np.isfinite(ll):
            return i, ll, None, None, None, used_log
        occ = occupancy_by_unit(gamma, local, len(units))
        counts = mixture_counts(Gx, occ, P, W)
        tot = xi.sum()
        loop = xi[:, 0].sum() / tot if tot > 0 else np.nan
        return i, ll, units, counts, loop, used_log

    def _map(self, fn, corpus, indices):
        """fn(i, X) over utterances in order; threads when jobs > 1 (results come back in order)."""
        indices = [i for i in indices]
        if self.jobs <= 1:
            for blk in corpus.iter_blocks(indices):
                for i, X in blk:
                    yield fn(i, X)
            return
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            for blk in corpus.iter_blocks(indices):
                yield from pool.map(lambda a: fn(*a), blk)

    # ------------------------------------------------------------------ training
    def fit(self, utterances, transcripts=None, ids=None, callback=None):
        """Train the unit weights by EM.

        Parameters
        ----------
        utterances : FrameStore, store path, or list of float32 (T_i, D) arrays (then ``transcripts``).
        callback : callable(iteration, aligner), optional, called after each M-step (and once
            before the first E-step with iteration 0).
        """
        corpus = utterances if isinstance(utterances, _Corpus) else _Corpus(utterances, transcripts, ids)
        self._prepare(corpus)
        self.corpus_ = corpus
        self.history_ = []
        todo = [i for i in range(corpus.n) if self.chains_[i] is not None]
        if callback is not None:
            callback(0, self)
        K = self.gaussians_.n_components
        prior = self.weight_prior * self.gaussians_.weights
        with bar(self.n_iter, "align EM", "iter", self.quiet) as pb:
            for it in range(1, self.n_iter + 1):
                t0 = time.perf_counter()
                acc = np.zeros((self.inventory_.n_units, K))
                total, frames, fallbacks, aligned = 0.0, 0, 0, 0
                new_loops = {}
                for i, ll, units, counts, loop, used_log in self._map(self._e_step, corpus, todo):
                    fallbacks += used_log
                    if units is None:
                        continue
                    aligned += 1
                    total += ll
                    frames += int(corpus.lengths[i])
                    acc[units] += counts
                    new_loops[i] = loop
                bad = [i for i in todo if i not in new_loops]
                for i in bad:
                    self.unaligned_[i] = "no finite path (every state sequence has zero probability)"
                todo = [i for i in todo if i in new_loops]
                # M-step: tied weights (MAP with a Dirichlet prior towards the global weights)
                num = acc + prior
                den = num.sum(1, keepdims=True)
                upd = den[:, 0] > 0
                self.unit_weights_[upd] = num[upd] / den[upd]
                if self.update_transitions:
                    for i, p in new_loops.items():
                        if np.isfinite(p):
                            self.self_loops_[i] = float(min(max(p, self.self_loop_floor), 0.999))
                rec = {"iteration": it, "loglik": total, "loglik_per_frame": total / max(frames, 1),
                       "aligned": aligned, "log_fallbacks": fallbacks, "seconds": time.perf_counter() - t0}
                self.history_.append(rec)
                log.info("align EM %d: loglik/frame %.4f, %d aligned", it, rec["loglik_per_frame"], aligned)
                pb.update(1)
                pb.set_postfix(ll=f"{rec['loglik_per_frame']:.3f}")
                if callback is not None:
                    callback(it, self)
        return self

    # ------------------------------------------------------------------ decoding
    def _decode(self, i, X, posteriors=False):
        ch = self.chains_[i]
        if ch is None:
            return i, None
        units, local, log_emit, Gx, P, W = self._emissions(i, X, ch)
        stay, nxt, skip = ch.transitions(self.self_loops_[i], self.pause_prob)
        path, score = viterbi(log_emit, local, stay, nxt, skip)
        if not np.isfinite(score):
            return i, None
        chars, words = _segments(ch, path)
        gamma = forward_backward(log_emit, local, stay, nxt, skip)[0] if posteriors else None
        labels = self.inventory_.unit_labels()
        return i, Alignment(self.corpus_.ids[i], path, float(score), chars, words,
                            [labels[u] for u in ch.units], gamma)

    def align_corpus(self, indices=None, posteriors=()):
        """Yield (index, Alignment or None) for the fitted corpus, in order (None: see ``unaligned_``)."""
        corpus = self.corpus_
        indices = range(corpus.n) if indices is None else sorted(indices)
        post = set(posteriors)
        for i, a in self._map(lambda i, X: self._decode(i, X, i in post), corpus, indices):
            if a is None and i not in self.unaligned_:
                self.unaligned_[i] = "no finite path (every state sequence has zero probability)"
            yield i, a

    def align(self, frames, transcript, posteriors=False, update=False):
        """Align one utterance with the trained weights (``update=True``: EM on it alone first).

        Returns an :class:`Alignment`; raises ValueError when it cannot be aligned.
        """
        if update or not hasattr(self, "unit_weights_"):
            self.fit([frames], [transcript])
            i, a = self._decode(0, np.ascontiguousarray(frames, np.float32), posteriors)
        else:
            X = np.ascontiguousarray(frames, np.float32)
            ch = self.inventory_.chain(transcript)
            if ch.n_required > len(X):
                raise ValueError(f"more states than frames ({ch.n_required} states, {len(X)} frames)")
            saved = (self.chains_, self.self_loops_, self._cache, self.corpus_)
            try:
                self.chains_, self._cache = [ch], {}
                self.self_loops_ = np.array([self._init_loop(ch, len(X))])
                self.corpus_ = _Corpus([X], [transcript])
                i, a = self._decode(0, X, posteriors)
            finally:
                self.chains_, self.self_loops_, self._cache, self.corpus_ = saved
        if a is None:
            raise ValueError(self.unaligned_.get(0, "no finite path"))
        return a


# --------------------------------------------------------------------------- writers


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def textgrid(tiers, xmax: float) -> str:
    """A long-form Praat TextGrid. ``tiers``: list of (name, [(start_s, stop_s, label)]); gaps are filled."""
    out = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {xmax:.4f}",
           "tiers? <exists>", f"size = {len(tiers)}", "item []:"]
    for n, (name, segs) in enumerate(tiers, 1):
        ivs, t = [], 0.0
        for a, b, lab in segs:
            a, b = max(a, t), min(b, xmax)
            if a > t + 1e-9:
                ivs.append((t, a, ""))
            if b > a:
                ivs.append((a, b, lab))
                t = b
        if t < xmax - 1e-9 or not ivs:
            ivs.append((t, xmax, ""))
        out += [f"    item [{n}]:", '        class = "IntervalTier"', f'        name = "{name}"',
                "        xmin = 0", f"        xmax = {xmax:.4f}", f"        intervals: size = {len(ivs)}"]
        for k, (a, b, lab) in enumerate(ivs, 1):
            lab = lab.replace('"', '""')
            out += [f"        intervals [{k}]:", f"            xmin = {a:.4f}", f"            xmax = {b:.4f}",
                    f'            text = "{lab}"']
    return "\n".join(out) + "\n"


def _safe_name(s: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", s).strip("._") or "utt"


def frame_time_offset(feature_config: dict) -> float:
    """Seconds to add to ``t * step`` to get the boundary before frame t: half of (window - step)."""
    win = feature_config.get("winlen")
    step = feature_config.get("winstep", 0.01)
    return max(0.0, (float(win) - float(step)) / 2) if win else 0.0


# --------------------------------------------------------------------------- the CLI entry point


def run_align(store_path, model_dir, out_dir, iters=30, jobs=1, plots=0, states_per_symbol=3, seed=0,
              quiet=False, **aligner_kw) -> dict:
    """Train the aligner on a store and write alignments (``streamq align STORE MODEL OUT``).

    Writes into ``out_dir``: ``history.csv`` (log-likelihood per EM iteration), ``textgrids/ID.TextGrid``
    (tiers ``chars`` and ``words``), ``words.ctm`` and ``chars.ctm`` (``id 1 start duration label``,
    seconds), ``unaligned.tsv`` (``id<TAB>reason``), ``aligner.npz`` (symbols, unit weights),
    ``summary.json`` and, when ``plots`` > 0, ``plots/ID.png`` for the first ``plots`` alignable
    utterances: posteriors over states x frames with the Viterbi path, above the MFCC image.

    ``seed`` is accepted for symmetry with the other commands: the flat start (every unit begins
    with the model's global weights) and EM are deterministic, so it changes nothing today.

    Raises
    ------
    ValueError
        One line naming the file or field: a missing / malformed store or model, a model whose
        dimension differs from the store's, a store without transcripts, bad parameters.
    """
    from .store import FrameStore, StoreError

    t_start = time.perf_counter()
    try:
        store = FrameStore.open(store_path)
    except StoreError as e:
        raise ValueError(str(e)) from None
    if store.n_utterances == 0:
        raise ValueError(f"{store_path}: store holds no utterances")
    if not any(t.strip() for t in store.transcripts):
        raise ValueError(f"{store_path}: field 'transcripts' is empty for every utterance; ingest with transcripts")
    if int(plots) < 0:
        raise ValueError(f"plots must be >= 0, got {plots}")
    model = load_model(model_dir)
    if isinstance(model, GaussianSet) and model.dim != store.dim:
        raise ValueError(f"{model_dir}: model dimension {model.dim} differs from the store's {store.dim}")
    if isinstance(model, np.ndarray) and model.shape[1] != store.dim:
        raise ValueError(f"{model_dir}/codebook.npy: dimension {model.shape[1]} differs from the store's {store.dim}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = _Corpus(store)
    al = Aligner(model, states_per_symbol=states_per_symbol, n_iter=iters, jobs=jobs, quiet=quiet, **aligner_kw)
    al.fit(corpus)

    write_records(al.history_, out / "history.csv",
                  ["iteration", "loglik", "loglik_per_frame", "aligned", "log_fallbacks", "seconds"], extras=False)

    plot_set = set([i for i in range(corpus.n) if al.chains_[i] is not None][:int(plots)])
    step = corpus.frame_step
    off = frame_time_offset(corpus.feature_config)
    tg_dir = out / "textgrids"
    tg_dir.mkdir(exist_ok=True)
    if plot_set:
        (out / "plots").mkdir(exist_ok=True)
    n_ok, frames_ok = 0, 0
    with open(out / "words.ctm", "w") as fw, open(out / "chars.ctm", "w") as fc, \
            bar(corpus.n, "align decode", "utt", quiet) as pb:
        for i, a in al.align_corpus(posteriors=plot_set):
            pb.update(1)
            if a is None:
                continue
            n_ok += 1
            T = len(a.path)
            frames_ok += T
            xmax = max(T * step + 2 * off, float(corpus.durations[i]))
            uid = corpus.ids[i]

            def secs(segs):
                return [(0.0 if s == 0 else s * step + off, xmax if e == T else e * step + off, lab)
                        for s, e, lab in segs]

            cs, ws = secs(a.chars), secs(a.words)
            for fh, segs in ((fc, cs), (fw, ws)):
                for s, e, lab in segs:
                    fh.write(f"{uid} 1 {_fmt(s)} {_fmt(e - s)} {lab}\n")
            (tg_dir / f"{_safe_name(uid)}.TextGrid").write_text(textgrid([("chars", cs), ("words", ws)], xmax),
                                                                encoding="utf-8")
            if i in plot_set:
                from .plots import plot_alignment

                X, _ = store.utterance(i)
                plot_alignment(a.posteriors, a.path, X, a.state_labels, out / "plots" / f"{_safe_name(uid)}.png",
                               frame_step=step, title=f"{uid}: {' '.join(al.chains_[i].words)}")
    with open(out / "unaligned.tsv", "w") as f:
        f.write("utterance_id\treason\n")
        for i in sorted(al.unaligned_):
            f.write(f"{corpus.ids[i]}\t{al.unaligned_[i]}\n")
    np.savez(out / "aligner.npz", units=np.array(al.inventory_.unit_labels()), unit_weights=al.unit_weights_,
             states_per_symbol=al.states_per_symbol)
    hist = al.history_
    summary = {"utterances": corpus.n, "aligned": n_ok, "unaligned": len(al.unaligned_), "iterations": len(hist),
               "loglik_per_frame": hist[-1]["loglik_per_frame"] if hist else None,
               "aligned_hours": frames_ok * step / 3600, "seconds": time.perf_counter() - t_start,
               "symbols": len(al.inventory_.symbols), "units": al.inventory_.n_units,
               "components": al.gaussians_.n_components, "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

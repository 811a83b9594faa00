"""Forced alignment of transcripts to frames with a tied-mixture chain HMM, trained by EM on the corpus.

Model
-----
- **States.** :mod:`streamq.transcripts` turns a transcript into a chain of states: silence, then
  ``states_per_symbol`` states per character with an optional pause between words, then silence.
- **Emissions.** K shared diagonal Gaussians (a GMM, or a codebook with per-cluster variances from one
  pass over the corpus, :meth:`streamq.gmm.DiagGMM.init_from_codebook`) and one weight vector per *unit*
  (a symbol's sub-state, or silence), tied across utterances. Per frame the Gaussian log-likelihoods are
  computed once and cached: each frame's top-``gselect`` Gaussians by hierarchical selection
  (:mod:`streamq.selection`), or all K (``gselect=None``); a unit's log-emission is
  ``logsumexp_k(log w_uk + log N_k(x))`` over them (:mod:`streamq.kernels.tied`). EM
  (:mod:`streamq.kernels.lattice`: scaled forward-backward on a beam-pruned, checkpointed lattice, so
  long recordings fit in memory) re-estimates only the weights (and, optionally, each utterance's
  self-loop probability). With selection the cache holds linear likelihoods relative to each frame's best
  (``exp(log N_k(x_t) - shift_t)``, float32), so an iteration is exp/log-free arithmetic, and it runs as one
  parallel kernel call per batch of utterances (:func:`streamq.kernels.lattice.sparse_e_steps`: emissions,
  lattice and counts fused; the same bits for every ``n_jobs``).
- **Durations.** Self-loop ``p = 1 - S/T`` per utterance (E[d] = 1/(1-p) = T/S), floored.

:class:`Aligner` follows scikit-learn's conventions: ``fit(X, y)`` with X the utterances (a FrameStore,
a store path, an :class:`streamq.store.UtteranceSource` or a list of (T_i, D) arrays) and y their
transcripts (None for a store). Files are written by :func:`streamq.pipelines.run_align`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from .artifacts import Gaussians, load_model
from .kernels.lattice import (forward_backward, forward_backward_pruned, sparse_counts, sparse_e_step, sparse_e_steps,
                              sparse_emissions, viterbi, viterbi_pruned)
from .kernels.tied import (diag_gauss_loglik, frame_normalise, mixture_counts, mixture_likelihoods, occupancy_by_unit,
                           add_counts, gather_weights, sparse_frame_normalise)
from .selection import build_selection, default_n_search, select
from .progress import bar, log
from .store import UtteranceSource, as_utterances
from .transcripts import SIL, Chain, Inventory

HISTORY_FIELDS = ["iteration", "loglik", "loglik_per_frame", "aligned", "log_fallbacks", "seconds"]

DEFAULT_BEAM = 100.0        # nats; see Aligner(beam=...)
DEFAULT_RETRY_BEAM = 400.0  # nats (exp(-400) is still a normal float64: the scaled lattice can prune at it)
DENSE_FALLBACK_CELLS = 2 ** 24  # T x S of the log-domain fallback on underflow (three float64 T x S arrays)
NO_PATH = "no finite path (every state sequence has zero probability)"
OCC_FLOOR = 1e-12  # sparse M-step statistics skip unit occupancies below this (sum to 1 per frame)
PACK_COUNTS = 2 ** 22  # float64 counts (32 MiB) per batch of utterances of the parallel sparse E-step


@contextlib.contextmanager
def _numba_threads(n):
    """Numba parallel regions in this thread use ``n`` threads (at most the configured number)."""
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def gaussians_from_codebook(codebook, utterances: UtteranceSource, verbose=0, client=None) -> Gaussians:
    """Diagonal Gaussians centred on the codewords with per-cluster variances: one pass over the corpus,
    the same statistics as the GMM's initialisation (:meth:`streamq.gmm.DiagGMM.init_from_codebook`)."""
    from .gmm import DiagGMM

    C = np.asarray(codebook)
    g = DiagGMM(len(C), verbose=verbose, client=client).init_from_codebook(utterances.frames(), C)
    return g.gaussians_


@dataclass
class Alignment:
    """One utterance's alignment. Frame ranges are [start, stop).

    ``char_confidence`` / ``word_confidence``: the mean, over a segment's frames, of the posterior of the
    Viterbi state at that frame (1: forward-backward agrees with the path everywhere). ``loglik_per_frame``:
    the forward (total) log-likelihood of the utterance under its chain, per frame.
    """

    utt_id: str
    path: np.ndarray                      # int64 (T,) state per frame
    loglik: float                         # Viterbi path log-probability
    chars: list                           # (start, stop, label)
    words: list                           # (start, stop, label)
    state_labels: list = field(default_factory=list)
    posteriors: np.ndarray | None = None  # float64 (T, S), when asked for
    char_confidence: list = field(default_factory=list)
    word_confidence: list = field(default_factory=list)
    loglik_per_frame: float = float("nan")
    word_states: list = field(default_factory=list)  # HMM states of each word (its shortest possible frames)
    n_frames: int = 0


ANALYSIS_FIELDS = ["id", "speaker", "frames", "seconds", "loglik_per_frame", "loglik_z", "silence_share",
                   "shortest_char_s", "shortest_char_z", "longest_char_s", "longest_char_z", "squeezed_words",
                   "mean_word_confidence", "min_word_confidence", "flagged", "reasons"]


def analyse_alignments(alignments, speakers=None, frame_step=0.01, squeeze_margin=0, z_flag=4.0) -> list[dict]:
    """A per-utterance quality report (the columns of MFA's ``alignment_analysis.csv`` and more).

    Corpus norms: the median and MAD-based spread of the per-frame log-likelihood over utterances, and the
    mean and standard deviation of log character durations over every character of the corpus. An
    utterance is flagged when a word got no more frames than its states + ``squeeze_margin`` (a word squeezed
    into the minimum the HMM allows: a sign the transcript does not match the audio; flagged for a word of 4 or
    more characters or for 3 or more words, since short words at their minimum are ordinary fast speech), its
    log-likelihood is
    more than ``z_flag`` robust standard deviations below the corpus median, a character is longer than
    ``z_flag`` standard deviations above the norm, or more than 90 % of it is silence. Returns one dict per
    alignment (ANALYSIS_FIELDS), in order.
    """
    alignments = list(alignments)
    if not alignments:
        return []
    ll = np.array([a.loglik_per_frame for a in alignments])
    med = float(np.median(ll))
    mad = float(np.median(np.abs(ll - med))) * 1.4826 or 1e-9
    durs = np.concatenate([[b - s for s, b, _ in a.chars] for a in alignments] or [[1]]).astype(np.float64)
    logd = np.log(np.maximum(durs, 1))
    mu, sd = float(logd.mean()), float(logd.std()) or 1e-9
    rows = []
    for k, a in enumerate(alignments):
        T = a.n_frames
        cd = np.array([b - s for s, b, _ in a.chars], np.float64)
        sil = T - int(cd.sum())
        sq = [w for (s, b, w), n in zip(a.words, a.word_states) if b - s <= n + squeeze_margin]
        squeezed = len(sq)
        long_sq = [w for w in sq if len(w) >= 4]  # short words (a, the) at their minimum are ordinary fast speech
        lz = (a.loglik_per_frame - med) / mad
        zmin = (np.log(max(cd.min(), 1)) - mu) / sd if len(cd) else 0.0
        zmax = (np.log(max(cd.max(), 1)) - mu) / sd if len(cd) else 0.0
        reasons = []
        if long_sq or squeezed >= 3:
            reasons.append(f"{squeezed} word(s) squeezed into their minimum frames ({', '.join((long_sq or sq)[:3])})")
        if lz < -z_flag:
            reasons.append(f"log-likelihood {lz:.1f} robust sd below the corpus median")
        if zmax > z_flag:
            reasons.append(f"a character {zmax:.1f} sd longer than the corpus norm")
        if sil > 0.9 * T:
            reasons.append("over 90 % silence")
        conf = a.word_confidence or [float("nan")]
        rows.append({"id": a.utt_id, "speaker": (speakers[k] if speakers is not None else ""), "frames": T,
                     "seconds": T * frame_step, "loglik_per_frame": a.loglik_per_frame, "loglik_z": lz,
                     "silence_share": sil / T, "shortest_char_s": (cd.min() if len(cd) else 0) * frame_step,
                     "shortest_char_z": zmin, "longest_char_s": (cd.max() if len(cd) else 0) * frame_step,
                     "longest_char_z": zmax, "squeezed_words": squeezed,
                     "mean_word_confidence": float(np.mean(conf)), "min_word_confidence": float(np.min(conf)),
                     "flagged": int(bool(reasons)), "reasons": "; ".join(reasons)})
    return rows


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


def _beams(est):
    b = getattr(est, "beam", DEFAULT_BEAM)
    if b is None:
        return [np.inf]
    r = getattr(est, "retry_beam", None)
    return [float(b)] + ([float(r)] if r is not None and float(r) > float(b) else [])


def _note(est, kind, info):
    """Keep the largest working set (bytes) and window (states) of each lattice kernel in ``lattice_stats_``."""
    st = getattr(est, "lattice_stats_", None)
    if st is None:
        return
    with getattr(est, "_cache_lock", None) or contextlib.nullcontext():
        st[kind + "_max_bytes"] = max(st.get(kind + "_max_bytes", 0), int(info[0]))
        st[kind + "_max_width"] = max(st.get(kind + "_max_width", 0), int(info[1]))


def _accumulate(acc, rows, counts):
    """``acc[rows] += counts`` for what :meth:`Aligner._e_step` returns (rows = units, or np.ix_(units, comps)
    with counts (U, C): scattered by a kernel instead of NumPy's slower fancy indexing)."""
    if isinstance(rows, tuple):
        add_counts(acc, rows[0].ravel(), rows[1].ravel(), counts.T)
    else:
        acc[rows] += counts


def sum_e_steps(results, shape, lengths):
    """Sum per-utterance E-step results ``(i, loglik, units, counts, self_loop, used_log)`` in their order:
    ``(acc float64 shape, loglik, frames, log fallbacks, aligned, {i: self_loop})``. The one summation of the
    aligner's EM statistics, locally and in each Dask task (the same order gives the same bits)."""
    acc = np.zeros(shape)
    total, frames, fallbacks, aligned, loops = 0.0, 0, 0, 0, {}
    for i, ll, units, counts, loop, used_log in results:
        fallbacks += used_log
        if units is None:
            continue
        aligned += 1
        total += ll
        frames += int(lengths[i])
        _accumulate(acc, units, counts)
        loops[i] = loop
    return acc, total, frames, fallbacks, aligned, loops


def _fail(est, i, reason):
    r = getattr(est, "_fail_reasons", None)
    if r is not None:
        r[i] = reason


def _beam_reason(beams):
    if beams[-1] == np.inf:
        return NO_PATH
    more = f" or retry-beam {beams[-1]:g}" if len(beams) > 1 else ""
    return (f"no path inside beam {beams[0]:g}{more} (the transcript probably does not match the audio; "
            f"try a wider --retry-beam)")


def _lattice_posteriors(est, P, shift, local, n_units, stay, nxt, skip, path=None):
    """Forward-backward on the pruned, checkpointed lattice (retried at ``retry_beam``; the exact log-domain
    kernel on numerical underflow when T x S is small enough). Returns (occ (T, U), loglik, xi, posterior of
    ``path`` per frame, used_log) or (None, reason, used_log)."""
    T, S = P.shape[0], len(local)
    pth = np.zeros(0, np.int64) if path is None else np.ascontiguousarray(path, np.int64)
    beams = _beams(est)
    status = 1
    for b in beams:
        occ, ll, xi, status, pp, info = forward_backward_pruned(P, local, stay, nxt, skip, n_units, b, 0, pth)
        _note(est, "forward_backward", info)
        if status == 0:
            return occ, ll + float(shift.sum()), xi, pp, False
        if status == 2:
            break
    if status == 2:
        if T * S > DENSE_FALLBACK_CELLS:
            return None, (f"numerical underflow in forward-backward ({T} frames x {S} states: too large for the "
                          f"log-domain fallback)"), False
        with np.errstate(divide="ignore"):
            log_emit = np.log(P) + shift[:, None]
        gamma, ll, xi, _ = forward_backward(log_emit, local, stay, nxt, skip)
        if not np.isfinite(ll):
            return None, NO_PATH, True
        pp = gamma[np.arange(T), pth] if path is not None else np.zeros(T)
        return occupancy_by_unit(gamma, local, n_units), ll, xi, pp, True
    return None, _beam_reason(beams), False


def _lattice_viterbi(est, P, shift, local, stay, nxt, skip):
    """Best path on the pruned lattice (retried at ``retry_beam``): (path, score, None) or (None, -inf, reason)."""
    with np.errstate(divide="ignore"):
        log_emit = np.log(P) + shift[:, None]
    beams = _beams(est)
    for b in beams:
        path, score, status, info = viterbi_pruned(log_emit, local, stay, nxt, skip, b)
        _note(est, "viterbi", info)
        if status == 0:
            return path, score, None
    return None, -np.inf, _beam_reason(beams)


class Aligner(BaseEstimator):
    """Tied-mixture chain-HMM forced aligner, trained by EM over a corpus (scikit-learn style).

    Parameters
    ----------
    model : a fitted DiagGMM, Gaussians, a dict of weights / means / variances, a (K, D) codebook, or a
        model directory / file (``gmm.npz`` or ``codebook.npy``). The shared Gaussians; a codebook gets
        per-cluster variances from one pass over the corpus at ``fit``.
    states_per_symbol : int, states (and weight vectors) per character. 3 measured best on the espeak
        corpus (50 ms accuracy 90.9 % with 1, 95.4 % with 2, 96.1 % with 3; scripts/eval_alignment.py).
    max_iter : int, EM iterations.
    pause_prob : float, probability of taking the optional pause between words.
    self_loop_floor : float, lower bound of the self-loop probability (upper bound 0.999).
    self_loop : float or None, a fixed self-loop probability for every utterance; None (default):
        ``1 - S/T`` per utterance (a fixed 0.75 on long utterances makes Viterbi put one frame in
        each early state and the rest in the last, as the seed notes found).
    update_transitions : bool, re-estimate each utterance's self-loop probability in the M-step.
    char_skip : float in [0, 1), probability that a character's first state skips its second (3 or more
        states per symbol): a character may then take states_per_symbol - 1 frames (silent letters).
    weight_prior : float or "auto", Dirichlet pseudo-count (in frames) pulling each unit's weights towards
        the model's global weights; 0 gives plain maximum-likelihood EM. "auto" (default): K / 4, so that
        each Gaussian gets the same smoothing whatever K is (a unit's K weights share the pseudo-count).
        Measured on a 203-clip corpus of 19 espeak and MBROLA voices (48 kHz MP3, noise floor), 3 seeds,
        share of word boundaries within 50 ms: K = 1024: 93.0 % with 1, 94.0 % with 100, 94.6 % with
        300; K = 256: 94.5 % with 1, 94.6 % with 25, 94.5 % with 100 (scripts/eval_alignment.py).
    n_jobs : int, threads over utterances (kernels release the GIL; with selection, the Numba threads of the
        batched E-step, at most the configured number).
    cache_mb : float, keep per-frame Gaussian likelihoods in memory between iterations up to this size
        (MiB); utterances that do not fit are recomputed every iteration. Sparse entries take
        T (8 gselect + 8) bytes, dense ones T K 8.
    gselect : int or None, Gaussian selection: each frame's top-``gselect`` Gaussians and their
        log-likelihoods are found once (hierarchical selection, :mod:`streamq.selection`, built once from
        the model: the Gaussians do not change during alignment EM; ranked by likelihood alone, searching
        :func:`streamq.selection.default_n_search` groups) and reused by every iteration, whose cost
        becomes frames x gselect x units instead of frames x K. None: every Gaussian (exact, dense).
        ``gselect >= K`` lists every Gaussian (the sparse path, exact). 16 (default) measured on the
        Common Voice demo at K = 1024, 30 iterations: 87.0 % of word boundaries within 50 ms, exact
        emissions 86.8 % (gselect 8: 87.0 %).
    beam : float or None, lattice pruning in nats (Kaldi's ``--beam``): per frame only the states whose
        scaled forward probability (Viterbi: partial score) is within ``beam`` of the frame's best are
        kept, and forward-backward keeps checkpoints only (memory O(T U + sqrt(T) width), not T x S: long
        recordings). None: no pruning (exact). 100 (default) gave the exact lattice's word boundaries on the
        Common Voice demo (K = 1024) with ~17 states per frame instead of all, 3-4x faster.
    retry_beam : float or None, a wider beam for utterances with no path inside ``beam``; those still
        without one are listed in ``unaligned_`` with the reason.
    trace : tuple of utterance indices whose state posteriors and Viterbi path are recorded after every
        EM iteration (``traces_``; the pictures of ``streamq plot align``).
    verbose : int, 0 silent, 1 progress bars.
    client : a ``dask.distributed.Client`` or None. When set, each EM iteration's statistics and the decoding
        are computed over groups of utterances on the cluster (:mod:`streamq.distributed`); the corpus must
        then be a store the workers can open. Results equal the local ones to float64 rounding.

    Attributes
    ----------
    inventory_ : Inventory; unit_weights_ : float64 (n_units, K); self_loops_ : float64 (U,);
    history_ : list of dict (iteration, loglik, loglik_per_frame, aligned, log_fallbacks, seconds);
    unaligned_ : dict utterance index -> reason; gaussians_ : Gaussians;
    traces_ : dict utterance index -> {"posteriors": [float16 (T, S)], "paths": [int32 (T,)], "loglik": [float]}.
    """

    def __init__(self, model=None, states_per_symbol=3, max_iter=30, pause_prob=0.5, self_loop_floor=0.1,
                 self_loop=None, update_transitions=False, weight_prior="auto", char_skip=0.0, n_jobs=1, cache_mb=512.0,
                 gselect=16, beam=DEFAULT_BEAM, retry_beam=DEFAULT_RETRY_BEAM, trace=(),
                 verbose=0, client=None):
        self.client = client
        self.model = model
        self.states_per_symbol = states_per_symbol
        self.max_iter = max_iter
        self.pause_prob = pause_prob
        self.self_loop_floor = self_loop_floor
        self.self_loop = self_loop
        self.update_transitions = update_transitions
        self.weight_prior = weight_prior
        self.char_skip = char_skip
        self.n_jobs = n_jobs
        self.cache_mb = cache_mb
        self.gselect = gselect
        self.beam = beam
        self.retry_beam = retry_beam
        self.trace = trace
        self.verbose = verbose

    # ------------------------------------------------------------------ setup
    def _check_params(self):
        if self.model is None:
            raise ValueError("Aligner needs model= (a fitted DiagGMM, Gaussians, a codebook or a model directory)")
        if int(self.states_per_symbol) < 1:
            raise ValueError(f"states_per_symbol must be >= 1, got {self.states_per_symbol}")
        if int(self.max_iter) < 0:
            raise ValueError(f"max_iter must be >= 0, got {self.max_iter}")
        if not 0.0 < self.pause_prob < 1.0:
            raise ValueError(f"pause_prob must be in (0, 1), got {self.pause_prob}")
        if not 0.0 <= self.self_loop_floor < 1.0:
            raise ValueError(f"self_loop_floor must be in [0, 1), got {self.self_loop_floor}")
        if self.self_loop is not None and not 0.0 <= self.self_loop < 1.0:
            raise ValueError(f"self_loop must be in [0, 1), got {self.self_loop}")
        if not 0.0 <= self.char_skip < 1.0:
            raise ValueError(f"char_skip must be in [0, 1), got {self.char_skip}")
        if self.weight_prior != "auto" and not (isinstance(self.weight_prior, (int, float))
                                                 and np.isfinite(self.weight_prior) and self.weight_prior >= 0):
            raise ValueError(f"weight_prior must be 'auto' or a number >= 0, got {self.weight_prior!r}")
        if int(self.n_jobs) < 1:
            raise ValueError(f"n_jobs must be >= 1, got {self.n_jobs}")
        if self.gselect is not None and int(self.gselect) < 1:
            raise ValueError(f"gselect must be >= 1 or None, got {self.gselect}")
        for name in ("beam", "retry_beam"):
            v = getattr(self, name)
            if v is not None and not (float(v) > 0):
                raise ValueError(f"{name} must be > 0 or None, got {v}")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")

    def _prepare(self, corpus: UtteranceSource):
        self._check_params()
        m = self.model
        if isinstance(m, (str, Path)):
            m = load_model(m)
        if isinstance(m, np.ndarray):
            m = gaussians_from_codebook(m, corpus, verbose=self.verbose, client=self.client)
        self.gaussians_ = Gaussians.of(m)
        K = self.gaussians_.n_components
        self.prior_strength_ = K / 4.0 if self.weight_prior == "auto" else float(self.weight_prior)
        if self.gaussians_.dim != corpus.dim:
            raise ValueError(f"model has dimension {self.gaussians_.dim}, frames have {corpus.dim}")
        self.inventory_ = Inventory.from_transcripts(corpus.transcripts, self.states_per_symbol)
        g = self.gaussians_
        self.unit_weights_ = np.tile(g.weights, (self.inventory_.n_units, 1))
        self.chains_, self.unaligned_ = [None] * corpus.n, {}
        self.self_loops_ = np.full(corpus.n, np.nan)
        for i, tr in enumerate(corpus.transcripts):
            ch = self.inventory_.chain(tr, self.char_skip)
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
        self._cache_lock = threading.Lock()
        self._select_lock = threading.Lock()
        self._fail_reasons = {}
        self._local_units = {}
        self.lattice_stats_ = {}
        self._packs, self._wt = None, None
        self._selection = None
        if self.gselect is not None:  # ranked by N_k(x) alone (uniform weights): the unit weights replace w_k
            K = g.n_components
            self._selection = build_selection(np.ones(K), g.means, g.variances, seed=0, calibrate_n=0)

    def _init_loop(self, ch: Chain, T: int) -> float:
        if self.self_loop is not None:
            return float(self.self_loop)
        p = 1.0 - ch.expected_states(self.pause_prob) / T
        return float(min(max(p, self.self_loop_floor), 0.999))

    # ------------------------------------------------------------------ per utterance
    def _frame_gauss(self, i, X):
        """Each frame's Gaussian log-likelihoods, computed once and cached between EM iterations while the
        ``cache_mb`` budget allows (recomputed each time otherwise).

        Dense (``gselect=None``): ``(None, exp(G - shift) float64 (T, K), shift float64 (T,))``.
        Sparse: ``(comps int32 (C,), (cidx int32 (T, n), ex float32 (T, n)), shift float64 (T,))``: each
        frame's top-n Gaussians by hierarchical selection, numbered among the C distinct ones the utterance
        uses (component ``comps[cidx[t, j]]``; -1 = empty slot), and their likelihoods relative to the
        frame's best, ``ex = exp(log N_k(x_t) - shift[t])`` in [0, 1] (linear: no exp per EM iteration; a
        component over 103 nats below the frame's best is 0 in float32). Never a T x K matrix.
        """
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        g = self.gaussians_
        sel = getattr(self, "_selection", None)
        if sel is None:
            G = np.empty((len(X), g.n_components))
            diag_gauss_loglik(X, g.means, g.variances, G)
            shift = frame_normalise(G)
            entry, nbytes = (None, G, shift), G.nbytes + shift.nbytes
        else:
            K = g.n_components
            n = min(int(self.gselect), K)
            with getattr(self, "_select_lock", None) or contextlib.nullcontext():
                idx, ll = select(X, sel, n, sel.n_groups if n >= K else default_n_search(sel.n_groups, n))
            rel, shift = sparse_frame_normalise(ll)
            shift += np.log(K)  # the selection's weights are 1 / K: back to log N_k(x)
            ex = np.exp(rel)  # float32 (exp(-inf) = 0 in the empty slots)
            comps = np.unique(idx[idx >= 0]).astype(np.int32)
            cidx = np.where(idx >= 0, np.searchsorted(comps, idx), -1).astype(np.int32)
            entry = (comps, (cidx, ex), shift)
            nbytes = cidx.nbytes + ex.nbytes + shift.nbytes + comps.nbytes
        with getattr(self, "_cache_lock", None) or contextlib.nullcontext():
            if nbytes <= self._cache_budget:
                self._cache_budget -= nbytes
                self._cache[i] = entry
        return entry

    def _emissions(self, i, X, ch: Chain):
        """Local units (U,), state -> local unit int64 (S,), emission likelihoods P float64 (T, U) relative
        to ``shift`` (T,) (log-emission = shift + log P), and (comps, G, W) for the M-step statistics
        (dense: W (U, K); sparse: W float64 (C, U), the weights of the utterance's components, transposed)."""
        comps, G, shift = self._frame_gauss(i, X)
        units, local = self._local(i, ch)
        if comps is None:
            W = np.ascontiguousarray(self.unit_weights_[units])
            P = mixture_likelihoods(G, W)
        else:
            W = gather_weights(self.unit_weights_, units, comps)
            P = sparse_emissions(G[0], G[1], W)
        return units, local, P, shift, (comps, G, W)

    def _e_step(self, i, X):
        """(i, loglik, rows, counts, self-loop estimate, used_log): ``acc[rows] += counts`` adds the
        utterance's statistics (rows = its units, or its units x its selected components). Sparse emissions:
        :func:`streamq.kernels.lattice.sparse_e_step`, the per-utterance twin of the batched E-step of
        :meth:`fit` (the same counts; summed in another order, so equal to float64 rounding)."""
        ch = self.chains_[i]
        if getattr(self, "_selection", None) is not None:
            comps, (cidx, ex), shift = self._frame_gauss(i, X)
            units, local = self._local(i, ch)
            stay, nxt, skip = ch.transitions(self.self_loops_[i], self.pause_prob)
            counts, res = sparse_e_step(cidx, ex, comps, units, local, stay, nxt, skip, self._weights_t(),
                                        np.array(_beams(self)), OCC_FLOOR)
            _note(self, "forward_backward", res[4:6])
            if res[1] == 0:
                loop = res[2] / res[3] if res[3] > 0 else np.nan
                return i, res[0] + float(shift.sum()), np.ix_(units, comps), counts.T, loop, False
            if res[1] == 1:
                _fail(self, i, _beam_reason(_beams(self)))
                return i, -np.inf, None, None, None, False
            return self._e_step_log(i, X)
        return self._e_step_log(i, X)

    def _e_step_log(self, i, X):
        """:meth:`_e_step` through :func:`_lattice_posteriors` (dense emissions, or the log-domain fallback)."""
        ch = self.chains_[i]
        units, local, P, shift, (comps, G, W) = self._emissions(i, X, ch)
        stay, nxt, skip = ch.transitions(self.self_loops_[i], self.pause_prob)
        res = _lattice_posteriors(self, P, shift, local, len(units), stay, nxt, skip)
        if res[0] is None:
            _fail(self, i, res[1])
            return i, -np.inf, None, None, None, res[2]
        occ, ll, xi, _, used_log = res
        if comps is None:
            rows, counts = units, mixture_counts(G, occ, P, W)
        else:
            rows, counts = np.ix_(units, comps), sparse_counts(G[0], G[1], occ, P, W, OCC_FLOOR).T
        tot = xi.sum()
        loop = xi[:, 0].sum() / tot if tot > 0 else np.nan
        return i, ll, rows, counts, loop, used_log

    def _weights_t(self):
        """The unit weights transposed, float64 (K, n_units), C-contiguous (kept until the M-step changes them:
        ``fit`` resets ``_wt``)."""
        wt = getattr(self, "_wt", None)
        if wt is None or wt[0] is not self.unit_weights_:
            wt = (self.unit_weights_, np.ascontiguousarray(self.unit_weights_.T))
            self._wt = wt
        return wt[1]

    # ------------------------------------------------------------------ batched sparse E-step
    def _fill_cache(self, corpus, todo):
        """Find every utterance's sparse lists before the first iteration when they all fit in the cache, so
        that each iteration runs from memory; False when they do not (each iteration finds them again)."""
        n = min(int(self.gselect), self.gaussians_.n_components)
        need = sum(int(corpus.lengths[i]) * (8 * n + 8 + 4 * n) for i in todo)  # lists, shift, comps (at most)
        if need > self._cache_budget:
            return False
        for _ in self._map(self._frame_gauss, corpus, todo):
            pass
        return all(i in self._cache for i in todo)

    def _build_packs(self, todo):
        """Batches of cached utterances for :func:`streamq.kernels.lattice.sparse_e_steps`, at most PACK_COUNTS
        counts each; the cache then holds views into them."""
        packs, cur, size = [], [], 0
        for i in todo:
            units, _ = self._local(i, self.chains_[i])
            k = len(units) * len(self._cache[i][0])
            if cur and size + k > PACK_COUNTS:
                packs.append(self._pack(cur, [self._cache[i] for i in cur], True))
                cur, size = [], 0
            cur.append(i)
            size += k
        if cur:
            packs.append(self._pack(cur, [self._cache[i] for i in cur], True))
        return packs

    def _pack(self, idx, ents, views=False):
        """The utterances ``idx`` with their sparse entries ``ents`` (:meth:`_frame_gauss`) concatenated; with
        ``views`` the cache entries become views into the pack (no second copy)."""
        locs = [self._local(i, self.chains_[i]) for i in idx]

        def ptr(arrays):
            return np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)

        pk = {"idx": list(idx), "t_ptr": ptr([e[2] for e in ents]), "c_ptr": ptr([e[0] for e in ents]),
              "u_ptr": ptr([u for u, _ in locs]), "s_ptr": ptr([loc for _, loc in locs]),
              "cidx": np.concatenate([e[1][0] for e in ents]), "ex": np.concatenate([e[1][1] for e in ents]),
              "comps": np.concatenate([e[0] for e in ents]).astype(np.int32),
              "units": np.concatenate([u for u, _ in locs]).astype(np.int64),
              "state_unit": np.concatenate([loc for _, loc in locs]).astype(np.int64),
              "shift_sum": [float(e[2].sum()) for e in ents], "trans": None, "loops": None}
        if views:
            t, c = pk["t_ptr"], pk["c_ptr"]
            for k, i in enumerate(idx):
                self._cache[i] = (pk["comps"][c[k]:c[k + 1]],
                                  (pk["cidx"][t[k]:t[k + 1]], pk["ex"][t[k]:t[k + 1]]), ents[k][2])
        return pk

    def _iter_packs(self, corpus, todo):
        """The packs of one iteration: the cached ones, or one per block of frames read (lists found again)."""
        if self._packs is not None:
            yield from self._packs
            return
        for blk in corpus.iter_blocks(todo):
            idx = [i for i, _ in blk]
            yield self._pack(idx, [self._frame_gauss(i, X) for i, X in blk])

    def _lanes(self):
        """Accumulator lanes of the batched E-step: one per configured thread (not n_jobs, so that every n_jobs
        gives the same bits), at most 64 MiB of them."""
        import numba

        per = 8 * self.inventory_.n_units * self.gaussians_.n_components
        return int(max(1, min(numba.config.NUMBA_NUM_THREADS, 2 ** 26 // per)))

    def _batched_statistics(self, corpus, todo):
        """What :func:`sum_e_steps` over :meth:`_e_step` returns (equal to float64 rounding), computed by
        :func:`streamq.kernels.lattice.sparse_e_steps` in parallel: utterance i adds its counts to lane
        i mod L, the lanes are summed in order (the same bits for every n_jobs, cached or not). Utterances whose
        scaled lattice under/overflows are redone by :meth:`_e_step_log` (the log domain) and added last."""
        L = self._lanes()
        lanes = np.zeros((L, self.gaussians_.n_components, self.inventory_.n_units))
        WT = self._weights_t()
        beams = np.array(_beams(self), np.float64)
        live = set(todo)
        out = {}
        for pk in self._iter_packs(corpus, todo):
            idx = pk["idx"]
            lane = np.array([i % L if i in live else -1 for i in idx], np.int64)
            if not (lane >= 0).any():
                continue
            loops = [float(self.self_loops_[i]) for i in idx]
            if pk["trans"] is None or loops != pk["loops"]:
                tr = [self.chains_[i].transitions(p, self.pause_prob) for i, p in zip(idx, loops)]
                pk["trans"] = tuple(np.concatenate([x[k] for x in tr]).astype(np.float64) for k in range(3))
                pk["loops"] = loops
            stay, nxt, skip = pk["trans"]
            with _numba_threads(self.n_jobs):
                res = sparse_e_steps(pk["cidx"], pk["ex"], pk["t_ptr"], pk["comps"], pk["c_ptr"], pk["units"],
                                     pk["u_ptr"], pk["state_unit"], stay, nxt, skip, pk["s_ptr"], lane, WT, beams,
                                     OCC_FLOOR, lanes)
            ran = res[lane >= 0]
            _note(self, "forward_backward", ran[:, 4:6].max(0))
            for k, i in enumerate(idx):
                if lane[k] >= 0:
                    out[i] = (res[k], pk["shift_sum"][k], int(pk["t_ptr"][k + 1] - pk["t_ptr"][k]))
        acc_t = lanes[0]
        for lane_acc in lanes[1:]:
            acc_t += lane_acc
        acc = np.ascontiguousarray(acc_t.T)
        total, frames, fallbacks, aligned, loops = 0.0, 0, 0, 0, {}
        for i in todo:
            r, shift_sum, T = out[i]
            if r[1] == 0:
                aligned += 1
                total += r[0] + shift_sum
                frames += T
                loops[i] = r[2] / r[3] if r[3] > 0 else np.nan
            elif r[1] == 1:
                _fail(self, i, _beam_reason(list(beams)))
            else:
                _, ll, rows, counts, loop, used_log = self._e_step_log(i, corpus.utterance(i))
                fallbacks += used_log
                if rows is not None:
                    aligned += 1
                    total += ll
                    frames += T
                    _accumulate(acc, rows, counts)
                    loops[i] = loop
        return acc, total, frames, fallbacks, aligned, loops

    def _local(self, i, ch):
        """The utterance's distinct units int64 (U,) and each state's local unit int64 (S,)."""
        loc = getattr(self, "_local_units", None)
        hit = loc.get(i) if loc is not None else None
        if hit is None or hit[2] is not ch:
            units, local = np.unique(ch.units, return_inverse=True)
            hit = (units.astype(np.int64), local.astype(np.int64), ch)
            if loc is not None:
                loc[i] = hit
        return hit[0], hit[1]

    def _map(self, fn, corpus, indices):
        """fn(i, X) over utterances in order; threads when jobs > 1 (results come back in order). When every
        utterance's Gaussian likelihoods are cached, no frames are read (X is None: fn uses the cache)."""
        indices = [i for i in indices]
        cache = getattr(self, "_cache", None) or {}
        if indices and all(i in cache for i in indices):
            blocks = [[(i, None) for i in indices]]
        else:
            blocks = corpus.iter_blocks(indices)
        if self.n_jobs <= 1:
            for blk in blocks:
                for i, X in blk:
                    yield fn(i, X)
            return
        with concurrent.futures.ThreadPoolExecutor(self.n_jobs) as pool:
            for blk in blocks:
                yield from pool.map(lambda a: fn(*a), blk)

    # ------------------------------------------------------------------ training
    def fit(self, X, y=None, ids=None, callback=None):
        """Train the unit weights by EM; returns self.

        Parameters
        ----------
        X : FrameStore, store path, UtteranceSource, or list of float (T_i, D) arrays (then ``y``).
        y : list of str, the transcripts of a list of arrays (a store has its own).
        ids : list of str, optional utterance ids for a list of arrays.
        callback : callable(iteration, aligner), optional, called after each M-step (and once
            before the first E-step with iteration 0).
        """
        corpus = as_utterances(X, transcripts=y, ids=ids)
        self._prepare(corpus)
        self.corpus_ = corpus
        self.history_ = []
        todo = [i for i in range(corpus.n) if self.chains_[i] is not None]
        if callback is not None:
            callback(0, self)
        K = self.gaussians_.n_components
        prior = self.prior_strength_ * self.gaussians_.weights
        self.traces_ = {i: {"posteriors": [], "paths": [], "loglik": []} for i in self.trace
                        if 0 <= i < corpus.n and self.chains_[i] is not None}
        with bar(self.max_iter, "align EM", "iter", not self.verbose) as pb:
            for it in range(1, self.max_iter + 1):
                t0 = time.perf_counter()
                dist = None
                if self.client is not None:  # the same statistics over utterance groups on Dask
                    from .distributed import align_statistics

                    dist = align_statistics(self.client, self, corpus, todo, self.verbose)
                elif self._selection is not None and todo:  # sparse: the batched E-step
                    if it == 1 and self._fill_cache(corpus, todo):
                        self._packs = self._build_packs(todo)
                    dist = self._batched_statistics(corpus, todo)
                if dist is None:
                    dist = sum_e_steps(self._map(self._e_step, corpus, todo), (self.inventory_.n_units, K),
                                       corpus.lengths)
                acc, total, frames, fallbacks, aligned, new_loops = dist
                bad = [i for i in todo if i not in new_loops]
                for i in bad:
                    self.unaligned_[i] = self._fail_reasons.get(i, NO_PATH)
                todo = [i for i in todo if i in new_loops]
                # M-step: tied weights (MAP with a Dirichlet prior towards the global weights)
                num = acc + prior
                den = num.sum(1, keepdims=True)
                upd = den[:, 0] > 0
                self.unit_weights_[upd] = num[upd] / den[upd]
                self._wt = None
                if self.update_transitions:
                    for i, p in new_loops.items():
                        if np.isfinite(p):
                            self.self_loops_[i] = float(min(max(p, self.self_loop_floor), 0.999))
                self._record_traces()
                rec = {"iteration": it, "loglik": total, "loglik_per_frame": total / max(frames, 1),
                       "aligned": aligned, "log_fallbacks": fallbacks, "seconds": time.perf_counter() - t0}
                self.history_.append(rec)
                log.info("align EM %d: loglik/frame %.4f, %d aligned", it, rec["loglik_per_frame"], aligned)
                pb.update(1)
                pb.set_postfix(ll=f"{rec['loglik_per_frame']:.3f}")
                if callback is not None:
                    callback(it, self)
        self._packs, self._wt = None, None  # the cache keeps its views into the packs for decoding
        return self

    def _record_traces(self):
        """Posteriors and Viterbi path of the traced utterances under the current weights (exact, dense
        lattices: T x S each; utterances over DENSE_FALLBACK_CELLS state-frames are not traced)."""
        for i, tr in list(self.traces_.items()):
            if i in self.unaligned_:
                continue
            ch = self.chains_[i]
            if int(self.corpus_.lengths[i]) * ch.n_states > DENSE_FALLBACK_CELLS:
                log.warning("align: utterance %d too long to trace (%d frames x %d states)", i,
                            int(self.corpus_.lengths[i]), ch.n_states)
                del self.traces_[i]
                continue
            X = self.corpus_.utterance(i)
            units, local, P, shift, _ = self._emissions(i, X, ch)
            stay, nxt, skip = ch.transitions(self.self_loops_[i], self.pause_prob)
            with np.errstate(divide="ignore"):
                log_emit = np.log(P) + shift[:, None]
            gamma, ll = forward_backward(log_emit, local, stay, nxt, skip)[:2]
            path, _ = viterbi(log_emit, local, stay, nxt, skip)
            tr["posteriors"].append(gamma.astype(np.float16))
            tr["paths"].append(path.astype(np.int32))
            tr["loglik"].append(float(ll) / len(X))

    # ------------------------------------------------------------------ decoding
    def _decode(self, i, X, posteriors=False):
        ch = self.chains_[i]
        if ch is None:
            return i, None
        units, local, P, shift, _ = self._emissions(i, X, ch)
        stay, nxt, skip = ch.transitions(self.self_loops_[i], self.pause_prob)
        path, score, reason = _lattice_viterbi(self, P, shift, local, stay, nxt, skip)
        if path is None:
            _fail(self, i, reason)
            return i, None
        chars, words = _segments(ch, path)
        gamma = None
        if posteriors and len(path) * len(local) > DENSE_FALLBACK_CELLS:
            log.warning("align: utterance %d too long for its full posteriors (%d frames x %d states)", i,
                        len(path), len(local))
            posteriors = False
        if posteriors:  # the full T x S posteriors were asked for: exact dense lattice
            with np.errstate(divide="ignore"):
                log_emit = np.log(P) + shift[:, None]
            gamma, ll = forward_backward(log_emit, local, stay, nxt, skip)[:2]
            on_path = gamma[np.arange(len(path)), path]
        else:
            res = _lattice_posteriors(self, P, shift, local, len(units), stay, nxt, skip, path)
            if res[0] is None:  # Viterbi found a path the forward pass pruned: no confidences
                on_path, ll = np.full(len(path), np.nan), np.nan
            else:
                on_path, ll = res[3], res[1]
        labels = self.inventory_.unit_labels()
        k = self.states_per_symbol
        return i, Alignment(self.corpus_.ids[i], path, float(score), chars, words,
                            [labels[u] for u in ch.units], gamma,
                            [float(on_path[a:b].mean()) for a, b, _ in chars],
                            [float(on_path[a:b].mean()) for a, b, _ in words], float(ll) / len(path),
                            [k * len(w) for w in ch.words], len(path))

    def align_corpus(self, indices=None, posteriors=()):
        """An iterator of (index, Alignment or None) over the fitted corpus, in order (None: see
        ``unaligned_``). Raises NotFittedError before ``fit``."""
        check_is_fitted(self, "unit_weights_")
        corpus = self.corpus_
        indices = range(corpus.n) if indices is None else sorted(indices)
        return self._decoded(corpus, indices, set(posteriors))

    def _decoded(self, corpus, indices, post):
        dist = None
        if self.client is not None:  # Viterbi on the workers, results in order
            from .distributed import align_decode

            dist = align_decode(self.client, self, corpus, indices, post)
        for i, a in dist if dist is not None else self._map(lambda i, X: self._decode(i, X, i in post), corpus,
                                                             indices):
            if a is None and i not in self.unaligned_:
                self.unaligned_[i] = self._fail_reasons.get(i, NO_PATH)
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
            ch = self.inventory_.chain(transcript, self.char_skip)
            if ch.n_required > len(X):
                raise ValueError(f"more states than frames ({ch.n_required} states, {len(X)} frames)")
            saved = (self.chains_, self.self_loops_, self._cache, self.corpus_, getattr(self, "_fail_reasons", {}))
            try:
                self.chains_, self._cache, self._fail_reasons = [ch], {}, {}
                self.self_loops_ = np.array([self._init_loop(ch, len(X))])
                self.corpus_ = as_utterances([X], [transcript])
                i, a = self._decode(0, X, posteriors)
                if a is None:
                    raise ValueError(self._fail_reasons.get(0, NO_PATH))
            finally:
                self.chains_, self.self_loops_, self._cache, self.corpus_, self._fail_reasons = saved
        if a is None:
            raise ValueError(self.unaligned_.get(0) or self._fail_reasons.get(0, NO_PATH))
        return a

"""Cepstral mean and variance normalisation (Kaldi's ``compute-cmvn-stats`` + ``apply-cmvn``).

Each frame x of an utterance in group g becomes (x - mean_g) / std_g, per dimension, where the group is the
utterance itself (``per="utterance"``) or its speaker (``per="speaker"``; utterances without a speaker
form their own group). Statistics are float64 sums over the group's frames, so memory is (groups, D).
With ``variance=False`` only the mean is removed. A dimension whose spread is zero in a group keeps
std 1 (it becomes 0, not NaN).
"""

from __future__ import annotations

import numpy as np

PER = ("utterance", "speaker")


def groups_of(n_utterances: int, speakers, per: str) -> np.ndarray:
    """Group index (int64 (U,)) of each utterance: its own for ``per="utterance"``, its speaker's otherwise."""
    if per not in PER:
        raise ValueError(f"cmvn per must be one of {', '.join(PER)}, got {per!r}")
    if per == "utterance":
        return np.arange(n_utterances, dtype=np.int64)
    keys = [s if s else f"\0utt{i}" for i, s in enumerate(speakers)]
    index = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], np.int64)


def cmvn_stats(blocks, groups: np.ndarray, dim: int):
    """Mean and standard deviation (float64 (G, D)) of each group, from ``blocks``: an iterable of lists of
    (utterance index, frames (T, D)) (e.g. :meth:`streamq.store.UtteranceSource.iter_blocks`)."""
    G = int(groups.max()) + 1 if len(groups) else 0
    n, s, q = np.zeros(G), np.zeros((G, dim)), np.zeros((G, dim))
    ref = np.zeros((G, dim))  # first frame of the group: sums about it stay exact on uncentred data
    seen = np.zeros(G, bool)
    for blk in blocks:
        for i, X in blk:
            g = groups[i]
            X = np.asarray(X, np.float64)
            if not seen[g]:
                ref[g], seen[g] = X[0], True
            Y = X - ref[g]
            n[g] += len(X)
            s[g] += Y.sum(0)
            q[g] += (Y * Y).sum(0)
    mean_c = s / np.maximum(n, 1)[:, None]
    var = np.maximum(q / np.maximum(n, 1)[:, None] - mean_c ** 2, 0.0)
    std = np.sqrt(var)
    return mean_c + ref, np.where(std > 0, std, 1.0)


def apply_cmvn(X, mean, std, variance: bool = True) -> np.ndarray:
    """Normalised float32 frames (x - mean) / std (or x - mean without ``variance``)."""
    Y = np.asarray(X, np.float64) - mean
    if variance:
        Y /= std
    return Y.astype(np.float32)

"""Transcripts: normalisation, the symbol inventory and each utterance's HMM state chain.

A transcript is normalised to words of symbols (lower-case letters of any script, digits, the apostrophe
inside a word; punctuation dropped). The chain of an utterance is::

    <sil>  w1c1 ... w1cn  [<sil>]  w2c1 ... w2cm  [<sil>] ...  <sil>

with ``states_per_symbol`` states per character, a silence state at both ends (paths start in the first
and end in the last) and an optional silence between words: a word-final state goes to itself, to the
pause, or skips it to the next word (the lattice kernel's ``skip`` transition).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np

SIL = "<sil>"
_APOSTROPHES = set("'’ʼ‘`´")

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
    state is followed by an optional pause; ``inner_skip`` (S,) bool: the state may skip the next one
    inside its character (the first state of a character of 3 or more states, with probability
    ``char_skip`` of leaving it), so a character takes at least ``states_per_symbol - 1`` frames.
    """

    units: np.ndarray
    char_of: np.ndarray
    pre_pause: np.ndarray
    chars: list
    words: list
    n_required: int
    n_optional: int
    inner_skip: np.ndarray = None
    char_skip: float = 0.0

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
        if self.char_skip > 0 and self.inner_skip is not None:
            nxt[self.inner_skip] = (1.0 - p) * (1.0 - self.char_skip)
            skip[self.inner_skip] = (1.0 - p) * self.char_skip
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

    def chain(self, transcript: str, char_skip: float = 0.0) -> Chain:
        """The chain of ``transcript``; raises ValueError for a symbol not in the inventory. ``char_skip``:
        probability that a character's first state skips its second (characters of >= 3 states)."""
        words = normalise(transcript)
        k = self.states_per_symbol
        units, char_of, pre_pause, chars, inner = [0], [-1], [False], [], [False]
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
                    inner.append(j == 0 and k >= 3 and char_skip > 0)
                chars.append((ch, wi))
            if wi > 0:
                inner.insert(len(inner) - k * len(w), False)  # the pause state before the word
        units.append(0)
        char_of.append(-1)
        pre_pause.append(False)
        inner.append(False)
        skips = sum(inner)
        return Chain(np.array(units, np.int64), np.array(char_of, np.int64), np.array(pre_pause, bool),
                     chars, words, len(units) - n_opt - skips, n_opt, np.array(inner, bool), float(char_skip))

#!/usr/bin/env python3
"""Synthesise a small Common-Voice-shaped English corpus with espeak-ng, with true word timings.

Layout written under OUT (same shape as a Common Voice release)::

    OUT/clips/common_voice_en_000001.mp3 ...   48 kHz mono MP3
    OUT/validated.tsv                          Common Voice columns; ``path`` = clip file name,
                                               ``sentence`` = transcript
    OUT/word_times.tsv                         id, word_index, word, start, end, event_start,
                                               event_end (seconds from the start of the clip
                                               file as written)

Usage::

    python scripts/make_corpus.py --out data/commonvoice_demo --n-clips 100 --seed 0  # bundled demo
    python scripts/make_corpus.py --out /tmp/cv_bench --n-clips 5000 --jobs 8          # benchmarks

How the audio and the timings are made
--------------------------------------
libespeak-ng is driven through ctypes in AUDIO_OUTPUT_SYNCHRONOUS mode. The synth callback receives
both the 16-bit samples (22050 Hz) and the ``espeak_EVENT`` list, so the audio and the word events
come from one and the same synthesis. Every ``espeakEVENT_WORD`` event carries the exact sample
index (``sample``; ``audio_position`` is the same in ms) at which espeak starts emitting that word's
phonemes, and ``text_position``/``length`` (1-based characters) tell which transcript token it is.
A zero-width space is put before every word but the first so that espeak does not merge function
words with the next word into one event ("of the", "at once"); a clip whose voice still loses a
word's event is synthesised again with other random settings, never given a guessed time.

Per word, with ``s_i`` = event sample of word i and ``s_{i+1}`` = that of the next word (or the end
of the synthesised audio for the last word):

* ``event_start, event_end`` = ``s_i, s_{i+1}``: the raw segment espeak spent on the word, pauses
  included (the pause of a comma or a word gap belongs to the word before it);
* ``start, end`` = the first and the last sample inside ``[s_i, s_{i+1})`` whose magnitude exceeds
  ``10**(-TRIM_DB/20)`` times the clip's peak (``TRIM_DB`` = 45 dB). espeak's pauses and stop
  closures are digital silence, so this trims the trailing pause (and any leading silence, e.g.
  the closure of a word-initial stop after a pause) without touching weak fricatives, which sit
  15-35 dB under the peak. ``start`` is therefore the first audible sample of the word and ``end``
  the last; gaps between words are silence.

Samples are converted to seconds as ``lead + sample / 22050`` where ``lead`` is the random silence
(100-400 ms) prepended to the clip, then the clip is resampled to 48 kHz with soxr (linear phase,
delay-compensated), a little Gaussian noise (about -70 dBFS) is added everywhere so no frame is
digital silence, and it is encoded as MP3. The MP3 encoder's delay is stored in the LAME header and
removed by the decoder (mpg123 inside libsndfile), so decoded clips line up with the timings; the
script's ``--verify`` option checks this and the word boundaries against the decoded energy.

Everything is deterministic given ``--seed``: each clip draws from ``default_rng([seed, index])``
and is synthesised in a freshly forked process (libespeak-ng carries state from one synthesis to
the next), so ``--jobs`` does not change a byte of the output. POSIX only (fork).

Texts: the Harvard sentences (IEEE Recommended Practice for Speech Quality Measurements, 1969,
lists 1-8) and sentences after George Fyler Townsend's 1867 translation of Aesop's Fables, both
public domain. See data/README.md.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import hashlib
import os
import re
import sys
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------
# Texts (public domain)
# --------------------------------------------------------------------------------------------

HARVARD = [
    # list 1
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "Large size in stockings is hard to sell.",
    # list 2
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    # list 3
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
    # list 4
    "Hoist the load to your left shoulder.",
    "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.",
    "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.",
    "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.",
    "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.",
    "What joy there is in living.",
    # list 5
    "A king ruled the state in the early days.",
    "The ship was torn apart on the sharp reef.",
    "Sickness kept him home the third week.",
    "The wide road shimmered in the hot sun.",
    "The lazy cow lay in the cool grass.",
    "Lift the square stone over the fence.",
    "The rope will bind the seven books at once.",
    "Hop over the fence and plunge in.",
    "The friendly gang left the drug store.",
    "Mesh wire keeps chicks inside.",
    # list 6
    "The frosty air passed through the coat.",
    "The crooked maze failed to fool the mouse.",
    "Adding fast leads to wrong sums.",
    "The show was a flop from the very start.",
    "A saw is a tool used for making boards.",
    "The wagon moved on well oiled wheels.",
    "March the soldiers past the next hill.",
    "A cup of sugar makes sweet fudge.",
    "Place a rosebush near the porch steps.",
    "Both lost their lives in the raging storm.",
    # list 7
    "We talked of the side show in the circus.",
    "Use a pencil to write the first draft.",
    "He ran half way to the hardware store.",
    "The clock struck to mark the third period.",
    "A small creek cut across the field.",
    "Cars and busses stalled in snow drifts.",
    "The set of china hit the floor with a crash.",
    "This is a grand season for hikes on the road.",
    "The dune rose from the edge of the water.",
    "Those words were the cue for the actor to leave.",
    # list 8
    "A yacht slid around the point into the bay.",
    "The two met while playing on the sand.",
    "The ink stain dried on the finished page.",
    "The walled town was seized without a fight.",
    "The lease ran out in sixteen weeks.",
    "A tame squirrel makes a nice pet.",
    "The horn of the car woke the sleeping cop.",
    "The heart beat strongly and with firm strokes.",
    "The pearl was worn in a thin silver ring.",
    "The fruit peel was cut in thick slices.",
]

AESOP = [  # after G. F. Townsend's translation (1867): sentences and morals, some shortened
    "A famished fox saw some clusters of ripe black grapes hanging from a trellised vine.",
    "The grapes are sour, and not ripe as I thought.",
    "A crow was sitting on a branch of a tree with a piece of cheese in her beak.",
    "A hare one day ridiculed the short feet and slow pace of the tortoise.",
    "Slow but steady wins the race.",
    "A lion was awakened from sleep by a mouse running over his face.",
    "Little friends may prove great friends.",
    "The wind and the sun were disputing which was the stronger.",
    "Persuasion is better than force.",
    "An ant went to the bank of a river to quench its thirst.",
    "There is no believing a liar, even when he speaks the truth.",
    "The tyrant will always find a pretext for his tyranny.",
    "A crow perishing with thirst saw a pitcher, and hoping to find water, "
    "flew to it with delight.",
    "Necessity is the mother of invention.",
    "Please all, and you will please none.",
    "Appearances are deceptive.",
    "Do not count your chickens before they are hatched.",
    "Self help is the best help.",
    "Union gives strength.",
    "It is easy to be brave from a safe distance.",
]

SENTENCES = HARVARD + AESOP

# espeak-ng's own (non-MBROLA) English voices, and voice variants (timbre / gender)
VOICES = ["en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
          "en-029", "en-us-nyc"]
VARIANTS = {"m1": "male_masculine", "m2": "male_masculine", "m3": "male_masculine",
            "m4": "male_masculine", "m5": "male_masculine", "m7": "male_masculine",
            "f1": "female_feminine", "f2": "female_feminine", "f3": "female_feminine",
            "f4": "female_feminine", "f5": "female_feminine"}
ACCENTS = {"en": "England English", "en-us": "United States English",
           "en-gb-x-rp": "England English", "en-gb-scotland": "Scottish English",
           "en-gb-x-gbclan": "England English", "en-gb-x-gbcwmd": "England English",
           "en-029": "West Indies and Bermuda (Bahamas, Bermuda, Jamaica, Trinidad)",
           "en-us-nyc": "United States English"}

CV_COLUMNS = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes",
              "down_votes", "age", "gender", "accents", "variant", "locale", "segment"]
WT_COLUMNS = ["id", "word_index", "word", "start", "end", "event_start", "event_end"]

OUT_SR = 48000
TRIM_DB = 45.0
NOISE_DBFS = -70.0

# --------------------------------------------------------------------------------------------
# libespeak-ng through ctypes (layout from /usr/include/espeak-ng/speak_lib.h, espeak-ng 1.51)
# --------------------------------------------------------------------------------------------

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
espeakCHARS_UTF8 = 1
EV_LIST_TERMINATED, EV_WORD, EV_SENTENCE, EV_MARK, EV_PLAY, EV_END, EV_MSG_TERMINATED = range(7)
espeakRATE, espeakVOLUME, espeakPITCH, espeakRANGE, espeakWORDGAP = 1, 2, 3, 4, 7


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),   # 1-based character position
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms within the generated speech
        ("sample", ctypes.c_int),          # sample index within the generated speech
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),         # union {int number; const char *name; char string[8]}
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_EspeakEvent))


class EspeakError(RuntimeError):
    pass


def load_library() -> ctypes.CDLL:
    names = [ctypes.util.find_library("espeak-ng"), "libespeak-ng.so.1", "libespeak-ng.so",
             "libespeak-ng.1.dylib", "libespeak-ng.dylib"]
    for name in names:
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    raise EspeakError("libespeak-ng not found: install espeak-ng (Debian/Ubuntu: "
                      "apt-get install espeak-ng, which pulls in libespeak-ng1; "
                      "macOS: brew install espeak-ng)")


class Espeak:
    """One libespeak-ng instance per process (the library is a singleton)."""

    _instance: "Espeak | None" = None

    @classmethod
    def get(cls) -> "Espeak":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        lib = load_library()
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        sr = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
        if sr <= 0:
            raise EspeakError("espeak_Initialize failed (espeak-ng-data missing?)")
        self.lib, self.sr = lib, sr
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, int]] = []
        self._cb = _CALLBACK(self._callback)  # keep a reference: the library holds a raw pointer
        lib.espeak_SetSynthCallback(self._cb)

    def _callback(self, wav, n, events):
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != EV_LIST_TERMINATED:
            e = events[i]
            self._events.append((e.type, e.text_position, e.length, e.audio_position, e.sample))
            i += 1
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int, prange: int, wordgap: int):
        """Returns (int16 samples, [(text_position0, length, sample)] for every WORD event)."""
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EspeakError(f"espeak-ng voice {voice!r} not available")
        for par, val in ((espeakRATE, rate), (espeakPITCH, pitch), (espeakRANGE, prange),
                         (espeakWORDGAP, wordgap), (espeakVOLUME, 100)):
            lib.espeak_SetParameter(par, int(val), 0)
        self._chunks, self._events = [], []
        data = text.encode("utf-8")
        err = lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, espeakCHARS_UTF8,
                               None, None)
        if err != 0:
            raise EspeakError(f"espeak_Synth returned {err}")
        lib.espeak_Synchronize()
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        words = []
        for typ, tpos, length, ms, sample in self._events:
            if typ != EV_WORD:
                continue
            # `sample` is the exact sample index; fall back on audio_position if it looks odd
            if abs(sample - ms * self.sr / 1000.0) > 2e-3 * self.sr:
                sample = int(round(ms * self.sr / 1000.0))
            words.append((tpos - 1, length, sample))
        return audio, words


# --------------------------------------------------------------------------------------------
# Word timings
# --------------------------------------------------------------------------------------------

_PUNCT = "\"'.,;:!?()[]-"


def tokens(sentence: str) -> list[tuple[int, int, str]]:
    """Whitespace tokens of ``sentence``: (char start, char end, word without outer punctuation)."""
    out = []
    for m in re.finditer(r"\S+", sentence):
        w = m.group().replace(ZWSP, "").strip(_PUNCT)
        if not w:
            raise ValueError(f"token {m.group()!r} in {sentence!r} has no letters")
        out.append((m.start(), m.end(), w))
    return out


# espeak-ng joins some function words with the next word ("of the", "on the", "at once", ...)
# into one phonological word with a single WORD event (CombineFlag in translate.c). It only does
# so when the next word starts with a letter, so a ZERO WIDTH SPACE before every word after the
# first keeps each transcript word separate; the ZWSP itself is silent.
ZWSP = "\u200b"


def synth_text(sentence: str) -> str:
    return (" " + ZWSP).join(sentence.split())


def word_segments(text: str, audio: np.ndarray, events, trim_db: float = TRIM_DB):
    """Map espeak WORD events onto the tokens of ``text`` (the text given to espeak) and trim
    silence.

    Returns a list (one per token) of (word, start, end, event_start, event_end) in samples of
    the synthesised audio. Raises ValueError if a token got no event of its own.
    """
    toks = tokens(text)
    first = [None] * len(toks)
    for pos, length, sample in events:
        if length == 0:  # espeak also emits empty "words" for pauses (e.g. at a comma); skip them
            continue
        idx = next((i for i, (a, b, _) in enumerate(toks) if a <= pos < b), None)
        if idx is None:
                raise ValueError(f"word event at char {pos} outside every token of {text!r}")
        if first[idx] is None or sample < first[idx]:
            first[idx] = sample
    missing = [toks[i][2] for i, f in enumerate(first) if f is None]
    if missing:
        raise ValueError(f"no espeak word event for {missing} in {text!r}")
    if any(b < a for a, b in zip(first, first[1:])):
        raise ValueError(f"word events out of order in {text!r}: {first}")
    x = np.abs(audio.astype(np.float64))
    thr = x.max() * 10.0 ** (-trim_db / 20.0)
    loud = x > thr
    bounds = first + [len(audio)]
    segs = []
    for i, (_, _, w) in enumerate(toks):
        s0, s1 = bounds[i], bounds[i + 1]
        nz = np.flatnonzero(loud[s0:s1])
        if len(nz) == 0:  # a word with no audible sample: keep the raw event segment
            start, end = s0, s1
        else:
            start, end = s0 + int(nz[0]), s0 + int(nz[-1]) + 1
        segs.append((w, start, end, s0, s1))
    return segs


# --------------------------------------------------------------------------------------------
# One clip
# --------------------------------------------------------------------------------------------

def clip_params(rng: np.random.Generator, sentence: str) -> dict:
    return dict(
        sentence=sentence,
        voice=VOICES[int(rng.integers(len(VOICES)))],
        variant=sorted(VARIANTS)[int(rng.integers(len(VARIANTS)))],
        rate=int(rng.integers(130, 211)),             # words per minute
        pitch=int(rng.integers(25, 76)),              # 0-100, 50 = normal
        prange=int(rng.integers(20, 81)),             # pitch range 0-100
        wordgap=int(rng.choice([0, 0, 0, 1, 2, 4])),  # extra pause between words, x10 ms
        lead=float(rng.uniform(0.1, 0.4)),            # s of silence before
        tail=float(rng.uniform(0.1, 0.4)),            # s of silence after
        gain=float(rng.uniform(0.3, 0.9)),            # peak level (full scale = 1)
        noise_seed=int(rng.integers(2**31)),
    )


MAX_TRIES = 20


def make_clip(seed: int, index: int, sentence_index: int | None, out_dir: Path,
              mp3_level: float) -> dict:
    import soundfile as sf
    import soxr

    rng = np.random.default_rng([seed, index])
    sentence = SENTENCES[sentence_index if sentence_index is not None
                         else int(rng.integers(len(SENTENCES)))]
    es = Espeak.get()
    text = synth_text(sentence)
    # A few voice/word combinations lose a word's event (e.g. en-us-nyc drops the /h/ of "huge"
    # and with it the event); never guess a timing: draw another voice and rate instead.
    for _ in range(MAX_TRIES):
        p = clip_params(rng, sentence)
        voice_name = f"{p['voice']}+{p['variant']}"
        audio, events = es.synth(text, voice_name, p["rate"], p["pitch"], p["prange"],
                                 p["wordgap"])
        if len(audio) == 0:
            continue
        try:
            segs = word_segments(text, audio, events)
            break
        except ValueError:
            continue
    else:
        raise EspeakError(f"no voice gave a word event per word for {sentence!r}")

    x = audio.astype(np.float64) / 32768.0
    x *= p["gain"] / max(np.abs(x).max(), 1e-9)
    y = soxr.resample(x, es.sr, OUT_SR, quality="VHQ")
    lead_n, tail_n = int(round(p["lead"] * OUT_SR)), int(round(p["tail"] * OUT_SR))
    y = np.concatenate([np.zeros(lead_n), y, np.zeros(tail_n)])
    noise = np.random.default_rng(p["noise_seed"]).standard_normal(len(y))
    y = np.clip(y + noise * 10.0 ** (NOISE_DBFS / 20.0), -1.0, 1.0).astype(np.float32)

    clip_id = f"common_voice_en_{index + 1:06d}"
    fname = clip_id + ".mp3"
    sf.write(out_dir / "clips" / fname, y, OUT_SR, format="MP3", subtype="MPEG_LAYER_III",
             compression_level=mp3_level, bitrate_mode="VARIABLE")
    # The timings assume the decoder strips the encoder delay (LAME/Xing gapless header). With
    # libsndfile 1.2.2 that holds for VBR but not e.g. for CBR at level 0.9 (+1105 samples).
    decoded = sf.info(str(out_dir / "clips" / fname)).frames
    if decoded != len(y):
        raise RuntimeError(f"{fname}: decodes to {decoded} samples, wrote {len(y)}; the MP3 "
                           "encoder delay is not removed, timings would be off (try --mp3-level)")

    lead_s = lead_n / OUT_SR

    def t(s):
        return round(lead_s + s / es.sr, 4)

    words = [dict(id=clip_id, word_index=i, word=w, start=t(a), end=t(b), event_start=t(c),
                  event_end=t(d)) for i, (w, a, b, c, d) in enumerate(segs)]
    row = dict(
        client_id=hashlib.sha256(f"streamq-espeak-{voice_name}".encode()).hexdigest() * 2,
        path=fname,
        sentence_id=hashlib.sha256(sentence.encode()).hexdigest(),
        sentence=sentence, sentence_domain="", up_votes=2, down_votes=0, age="",
        gender=VARIANTS[p["variant"]], accents=ACCENTS[p["voice"]], variant="", locale="en",
        segment="",
    )
    return dict(row=row, words=words, duration=len(y) / OUT_SR,
                params=dict(p, voice_name=voice_name))


def _work(args):
    return make_clip(*args)


# --------------------------------------------------------------------------------------------
# Verification against the decoded MP3
# --------------------------------------------------------------------------------------------

def verify(out: Path, n: int, tol: float = 0.020, show: int = 0) -> int:
    """Check the word boundaries of the first n clips against the decoded MP3's energy.

    Energy = RMS in 5 ms frames of the decoded clip, in dB. For every word the first and the
    last 10 ms of the word must be above the noise floor (+6 dB). Where the gap to the
    neighbouring word is longer than 2*tol, the boundary is measured independently of the
    synthesis: the detected onset is the first frame after the middle of the gap louder than
    max(floor + 6 dB, loudest frame of the clip - TRIM_DB), likewise the offset, and the error
    is detected - written. A boundary is off if |error| > tol. MP3 coding adds low-level
    pre-echo and noise near the threshold, so about 1 % of boundaries read off by more than
    20 ms in quiet clips; the check fails if more than 5 % do or the median |error| is over
    5 ms. Prints a summary; returns 0 when the check passes.
    """
    import soundfile as sf

    with open(out / "word_times.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    by_clip: dict[str, list[dict]] = {}
    for r in rows:
        by_clip.setdefault(r["id"], []).append(r)
    hop_s = 0.005
    bad, errs = 0, []
    clips = sorted(by_clip)[:n]
    for ci, cid in enumerate(clips):
        y, sr = sf.read(out / "clips" / f"{cid}.mp3", dtype="float64")
        hop = int(hop_s * sr)
        nfr = len(y) // hop
        edb = 10 * np.log10(np.mean(y[: nfr * hop].reshape(nfr, hop) ** 2, axis=1) + 1e-20)
        floor = float(np.percentile(edb[: int(0.09 / hop_s)], 90))  # lead silence is >= 100 ms
        silent = floor + 6.0
        clip_peak = float(edb.max())

        def fr(t):
            return min(nfr, max(0, int(round(t / hop_s))))

        def level(a, b):
            i0, i1 = fr(a), max(fr(a) + 1, fr(b))
            return float(edb[i0:i1].max()) if i1 <= nfr else -200.0

        ws = by_clip[cid]
        for k, w in enumerate(ws):
            s, en = float(w["start"]), float(w["end"])
            prev_end = float(ws[k - 1]["end"]) if k else 0.0
            next_start = float(ws[k + 1]["start"]) if k + 1 < len(ws) else len(y) / sr
            peak = level(s, en)
            thr = max(silent, clip_peak - TRIM_DB)
            checks = {"on_at_start": level(s, s + 0.010) > silent,
                      "on_at_end": level(en - 0.010, en) > silent}
            on_err = off_err = None
            if s - prev_end > 2 * tol:
                i0 = fr((prev_end + s) / 2)
                above = np.flatnonzero(edb[i0:fr(en)] > thr)
                on_err = (i0 + above[0]) * hop_s - s if len(above) else float("inf")
                checks["onset"] = abs(on_err) <= tol
                errs.append(on_err)
            if next_start - en > 2 * tol:
                i1 = fr((en + next_start) / 2)
                above = np.flatnonzero(edb[fr(s):i1] > thr)
                off_err = (fr(s) + above[-1] + 1) * hop_s - en if len(above) else float("inf")
                checks["offset"] = abs(off_err) <= tol
                errs.append(off_err)
            ok = all(checks.values())
            bad += not ok
            if ci < show or not ok:
                fmt = lambda e: "   -   " if e is None else f"{e * 1000:+6.1f}ms"  # noqa: E731
                print(f"{cid} {w['word']:>12s} {s:7.3f}-{en:7.3f}  peak {peak:6.1f} dB  "
                      f"onset err {fmt(on_err)}  offset err {fmt(off_err)}  "
                      f"{'ok' if ok else 'FAIL ' + str({k: bool(v) for k, v in checks.items()})}")
    e = np.abs(np.array(errs)) * 1000 if errs else np.zeros(1)
    share = float(np.mean(e > tol * 1000))
    failed = share > 0.05 or np.median(e) > 5.0
    print(f"verify: {len(clips)} clips, {sum(len(by_clip[c]) for c in clips)} words, "
          f"{len(errs)} boundaries next to a pause measured: |error| median {np.median(e):.1f} ms, "
          f"95% {np.percentile(e, 95):.1f} ms, max {e.max():.1f} ms (5 ms frames), "
          f"{100 * share:.1f}% over {tol * 1000:.0f} ms; words flagged: {bad}; "
          f"{'FAILED' if failed else 'passed'}")
    return int(failed)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path,
                    help="output directory (Common Voice layout)")
    ap.add_argument("--n-clips", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="worker processes (the output does not depend on it)")
    ap.add_argument("--mp3-level", type=float, default=0.7,
                    help="libsndfile MP3 compression level 0..<1 (VBR; 0.7 ~ 45 kbit/s on speech)")
    ap.add_argument("--random-sentences", action="store_true",
                    help="draw sentences at random instead of cycling through the list")
    ap.add_argument("--verify", type=int, default=0, metavar="K",
                    help="after writing, check the first K clips' word boundaries against the "
                         "decoded MP3 energy (exit 1 on failure); --show prints every word")
    ap.add_argument("--show", type=int, default=0, metavar="K",
                    help="with --verify, print every word of the first K clips")
    args = ap.parse_args(argv)
    if args.n_clips < 1:
        ap.error("--n-clips must be >= 1")

    out: Path = args.out
    (out / "clips").mkdir(parents=True, exist_ok=True)
    load_library()  # fail early and loudly if the library is missing (no espeak_Initialize here)

    order = np.random.default_rng([args.seed, 2**31]).permutation(len(SENTENCES))
    jobs = [(args.seed, i, None if args.random_sentences else int(order[i % len(SENTENCES)]),
             out, args.mp3_level) for i in range(args.n_clips)]
    # libespeak-ng keeps internal state between syntheses (the same text and settings give
    # slightly different samples after other clips), so every clip is made in a process of its
    # own, forked from this one, which has loaded but never initialised the library: the same
    # seed then gives byte-identical output whatever --jobs is.
    import multiprocessing as mp
    with mp.get_context("fork").Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
        results = pool.map(_work, jobs, chunksize=1)

    with open(out / "validated.tsv", "w", newline="") as f:
        w = csv.DictWriter(f, CV_COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in results:
            w.writerow(r["row"])
    with open(out / "word_times.tsv", "w", newline="") as f:
        w = csv.DictWriter(f, WT_COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in results:
            for row in r["words"]:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})

    total = sum(r["duration"] for r in results)
    nbytes = sum((out / "clips" / r["row"]["path"]).stat().st_size for r in results)
    stale = {p.name for p in (out / "clips").glob("*.mp3")} - {r["row"]["path"] for r in results}
    if stale:
        print(f"warning: {len(stale)} mp3 file(s) in {out / 'clips'} are not in validated.tsv",
              file=sys.stderr)
    print(f"wrote {len(results)} clips, {total:.1f} s of audio, {nbytes} bytes of mp3 to {out}")
    if args.verify:
        return verify(out, args.verify, show=args.show)
    return 0


if __name__ == "__main__":
    sys.exit(main())

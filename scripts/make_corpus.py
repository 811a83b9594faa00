#!/usr/bin/env python3
"""Synthesise a small Common-Voice-shaped English corpus with espeak-ng, with true word timings.

Layout written under OUT (same shape as a Common Voice release)::

    OUT/clips/common_voice_en_000001.mp3 ...   48 kHz mono MP3
    OUT/validated.tsv                          Common Voice columns; ``path`` = clip file name,
                                               ``sentence`` = transcript
    OUT/word_times.tsv                         id, word_index, word, start, end, event_start,
                                               event_end (seconds from the start of the clip
                                               file as written)

    OUT/clip_info.tsv                          (not with the defaults) per clip: voice, speaker,
                                               kind, silences, measured MP3 delay, ...
    OUT/broken.tsv                             (with --broken) path, kind, note, sentence

Usage::

    python scripts/make_corpus.py --out data/commonvoice_demo --n-clips 100 --seed 0  # bundled demo
    python scripts/make_corpus.py --out /tmp/cv_bench --n-clips 5000 --jobs 8          # benchmarks
    # the harder evaluation corpus (MBROLA voices: scripts/install_mbrola.sh; see data/README.md)
    python scripts/make_corpus.py --out /tmp/hard200 --n 200 --voices mbrola,espeak \
        --noise-dbfs -60 --lead-silence 0.3:1.0 --trail-silence 0.1:0.6 --long 3 --broken 4

Options beyond the demo's: ``--voices`` (espeak-ng voices, MBROLA ones ``mb-*`` among them, or
the shorthands ``espeak`` / ``mbrola``), ``--texts a|b|all`` (b = Harvard lists 9-16, for an
independent corpus), ``--rate``, ``--format mp3|wav|flac``, ``--noise-dbfs`` (white noise floor,
RMS), ``--lead-silence A:B`` / ``--trail-silence A:B`` (seconds, drawn per clip), ``--long N``
(clips of concatenated sentences, >= ``--long-seconds``), ``--broken N`` (damaged files, listed
in validated.tsv and broken.tsv, not in word_times.tsv). ``client_id`` is a hash of the clip's
speaker (voice + espeak variant). With the defaults the output is the bundled demo corpus, byte
for byte.

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

MBROLA voices time their words differently (the .pho file is the truth; see the section
"MBROLA voices" below), then the same trimming applies.

Samples are converted to seconds as ``lead + sample / 22050`` where ``lead`` is the random silence
(100-400 ms) prepended to the clip, then the clip is resampled to 48 kHz with soxr (linear phase,
delay-compensated), a little Gaussian noise (about -70 dBFS) is added everywhere so no frame is
digital silence, and it is encoded as MP3. The MP3 encoder's delay is stored in the LAME header and
removed by the decoder (mpg123 inside libsndfile), so decoded clips line up with the timings. That
is not assumed: every MP3 is decoded again and cross-correlated with the signal written, and the
timings are shifted by the lag found (0 with libsndfile's VBR writer; ``mp3_delay`` in
clip_info.tsv). The script's ``--verify`` option checks the word boundaries against the decoded
energy.

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

# Harvard lists 9-16: the text of a second, independent evaluation corpus (`--texts b`), so that
# nothing is tuned on the sentences it is measured on.
HARVARD_B = [
    # list 9
    "The sky that morning was clear and bright blue.",
    "Torn scraps littered the stone floor.",
    "Sunday is the best part of the week.",
    "Add the column and put the sum here.",
    "We admire and love a good cook.",
    "There the flood mark is ten inches.",
    "He carved a head from the round block of marble.",
    "She has a smart way of wearing clothes.",
    "The fruit of a fig tree is apple shaped.",
    "Corn cobs can be used to kindle a fire.",
    # list 10
    "Where were they when the noise started.",
    "The paper box is full of thumb tacks.",
    "Sell your gift to a buyer at a good gain.",
    "The tongs lay beside the ice pail.",
    "The petals fall with the next puff of wind.",
    "Bring your best compass to the third class.",
    "They could laugh although they were sad.",
    "Farmers came in to thresh the oat crop.",
    "The brown house was on fire to the attic.",
    "The lure is used to catch trout and flounder.",
    # list 11
    "Float the soap on top of the bath water.",
    "A blue crane is a tall wading bird.",
    "A fresh start will work such wonders.",
    "The club rented the rink for the fifth night.",
    "After the dance, they went straight home.",
    "The hostess taught the new maid to serve.",
    "He wrote his last novel there at the inn.",
    "Even the worst will beat his low score.",
    "The cement had dried when he moved it.",
    "The loss of the second ship was hard to take.",
    # list 12
    "The fly made its way along the wall.",
    "Do that with a wooden stick.",
    "Live wires should be kept covered.",
    "The large house had hot water taps.",
    "It is hard to erase blue or red ink.",
    "Write at once or you may forget it.",
    "The doorknob was made of bright clean brass.",
    "The wreck occurred by the bank on Main Street.",
    "A pencil with black lead writes best.",
    "Coax a young calf to drink from a bucket.",
    # list 13
    "Schools for ladies teach charm and grace.",
    "The lamp shone with a steady green flame.",
    "They took the axe and the saw to the forest.",
    "The ancient coin was quite dull and worn.",
    "The shaky barn fell with a loud crash.",
    "Jazz and swing fans like fast music.",
    "Rake the rubbish up and then burn it.",
    "Slash the gold cloth into fine ribbons.",
    "Try to have the court decide the case.",
    "They are pushed back each time they attack.",
    # list 14
    "He broke his ties with groups of former friends.",
    "They floated on the raft to sun their white backs.",
    "The map had an X that meant nothing.",
    "Whitings are small fish caught in nets.",
    "Some ads serve to cheat buyers.",
    "Jerk the rope and the bell rings weakly.",
    "A waxed floor makes us lose balance.",
    "Madam, this is the best brand of corn.",
    "On the islands the sea breeze is soft and mild.",
    "The play began as soon as we sat down.",
    # list 15
    "This will lead the world to more sound and fury.",
    "Add salt before you fry the egg.",
    "The rush for funds reached its peak Tuesday.",
    "The birch looked stark white and lonesome.",
    "The box is held by a bright red snapper.",
    "To make pure ice, you freeze water.",
    "The first worm gets snapped early.",
    "Jump the fence and hurry up the bank.",
    "Yell and clap as the curtain slides back.",
    "They are men who walk the middle of the road.",
    # list 16
    "Both brothers wear the same size.",
    "In some form or other we need fun.",
    "The prince ordered his head chopped off.",
    "The houses are built of red clay bricks.",
    "Ducks fly north but lack a compass.",
    "Fruit flavors are used in fizz drinks.",
    "These pills do less good than others.",
    "Canned pears lack full flavor.",
    "The dark pot hung in the front closet.",
    "Carry the pail to the wall and spill it.",
]

# `--texts`: which sentence list a corpus draws from
TEXTS = {"a": SENTENCES, "b": HARVARD_B, "all": SENTENCES + HARVARD_B}

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

# MBROLA diphone voices driven by espeak-ng (Debian `mbrola` + `mbrola-XX`, contrib/non-free;
# scripts/install_mbrola.sh installs these nine). The `-en` voices speak English through the
# German / French / Dutch diphone sets: English text with a foreign accent. Spanish has no `-en`
# voice in espeak-ng 1.51 (mb-es1/2 would read the text by Spanish rules).
# name -> (gender, accent, mbrola database)
MBROLA_VOICES = {
    "mb-us1": ("female_feminine", "United States English", "us1"),
    "mb-us2": ("male_masculine", "United States English", "us2"),
    "mb-us3": ("male_masculine", "United States English", "us3"),
    "mb-en1": ("male_masculine", "England English", "en1"),
    "mb-de1-en": ("female_feminine", "German accent", "de1"),
    "mb-de2-en": ("male_masculine", "German accent", "de2"),
    "mb-fr1-en": ("male_masculine", "French accent", "fr1"),
    "mb-fr4-en": ("female_feminine", "French accent", "fr4"),
    "mb-nl2-en": ("male_masculine", "Dutch accent", "nl2"),
}
# `--voices` shorthands
VOICE_SETS = {"espeak": VOICES, "mbrola": list(MBROLA_VOICES)}


def is_mbrola(voice: str) -> bool:
    return voice.startswith("mb-")


def parse_voices(spec: str) -> list[str]:
    """``--voices``: comma-separated espeak-ng voice names and the shorthands ``espeak`` (its
    eight English voices) and ``mbrola`` (MBROLA_VOICES). Duplicates are dropped, order kept."""
    out: list[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        for v in VOICE_SETS.get(tok, [tok]):
            if v not in out:
                out.append(v)
    if not out:
        raise ValueError(f"--voices {spec!r} names no voice")
    return out


def mbrola_database(voice: str) -> str | None:
    """The mbrola database a ``mb-*`` espeak-ng voice uses (from its voice file), or None."""
    if voice in MBROLA_VOICES:
        return MBROLA_VOICES[voice][2]
    for d in espeak_data_dirs():
        f = d / "voices" / "mb" / voice
        if f.is_file():
            for line in f.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "mbrola":
                    return parts[1]
    return None


def espeak_data_dirs() -> list[Path]:
    dirs = [Path(os.environ["ESPEAK_DATA_PATH"]) / "espeak-ng-data"] \
        if os.environ.get("ESPEAK_DATA_PATH") else []
    dirs += [Path(p) for p in ("/usr/lib/x86_64-linux-gnu/espeak-ng-data",
                               "/usr/lib/aarch64-linux-gnu/espeak-ng-data",
                               "/usr/share/espeak-ng-data", "/usr/local/share/espeak-ng-data")]
    return [d for d in dirs if d.is_dir()]


def check_mbrola(voices: list[str]) -> None:
    """Raise EspeakError (one line, with the install hint) unless the ``mbrola`` program and the
    database of every ``mb-*`` voice in ``voices`` are installed. Checked in the parent process,
    which must not initialise libespeak-ng (see main)."""
    import shutil

    mb = [v for v in voices if is_mbrola(v)]
    if not mb:
        return
    hint = "run scripts/install_mbrola.sh as root (Debian contrib/non-free packages)"
    if shutil.which("mbrola") is None:
        raise EspeakError(f"the mbrola program is not installed, needed by {','.join(mb)}: {hint}")
    roots = [Path(p) / "mbrola" for p in
             os.environ.get("XDG_DATA_DIRS", "/usr/local/share:/usr/share").split(":") if p]
    missing = []
    for v in mb:
        db = mbrola_database(v)
        if db is None or not any((r / db / db).is_file() or (r / db).is_file()
                                 or (r / "voices" / db).is_file() for r in roots):
            missing.append(f"{v} (mbrola database {db or '?'})")
    if missing:
        raise EspeakError(f"MBROLA voice(s) not installed: {', '.join(missing)}: {hint}")


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
EV_PHONEME, EV_SAMPLERATE = 7, 8
espeakRATE, espeakVOLUME, espeakPITCH, espeakRANGE, espeakWORDGAP = 1, 2, 3, 4, 7
espeakPHONEMES_MBROLA = 0x10  # espeak_SetPhonemeTrace: write a .pho file (--pho)


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
        try:  # the rate of the current voice (MBROLA voices: 16 kHz); espeak-ng >= 1.49
            lib.espeak_ng_GetSampleRate.restype = ctypes.c_int
            self._get_rate = lib.espeak_ng_GetSampleRate
        except AttributeError:
            self._get_rate = None
        self.lib, self.sr = lib, sr
        self.out_sr = sr  # sample rate of the last synth() call
        self.last_phonemes: list[tuple[str, int, int]] = []
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, int, str]] = []
        self._cb = _CALLBACK(self._callback)  # keep a reference: the library holds a raw pointer
        lib.espeak_SetSynthCallback(self._cb)

    def _callback(self, wav, n, events):
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != EV_LIST_TERMINATED:
            e = events[i]
            name = e.id.split(b"\0")[0].decode("ascii", "replace") if e.type == EV_PHONEME else ""
            self._events.append((e.type, e.text_position, e.length, e.audio_position, e.sample,
                                 name))
            i += 1
        return 0

    def pho(self, text: str, voice: str, rate: int, pitch: int, prange: int, wordgap: int) -> str:
        """The MBROLA .pho file espeak-ng writes for ``text`` (what ``espeak-ng --pho`` prints):
        one line per mbrola phone, ``name duration_ms [pitch points]``; no audio is made."""
        import tempfile

        libc = ctypes.CDLL(None)
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        self.lib.espeak_SetPhonemeTrace.argtypes = [ctypes.c_int, ctypes.c_void_p]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.pho")
            fp = libc.fopen(path.encode(), b"w")
            if not fp:
                raise EspeakError(f"cannot open {path} for the phoneme trace")
            try:
                self.lib.espeak_SetPhonemeTrace(espeakPHONEMES_MBROLA, fp)
                self.synth(text, voice, rate, pitch, prange, wordgap)
            finally:
                self.lib.espeak_SetPhonemeTrace(0, None)
                libc.fclose(fp)
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()

    def synth(self, text: str, voice: str, rate: int, pitch: int, prange: int, wordgap: int):
        """Returns (int16 samples, [(text_position0, length, sample)] for every word start).

        ``self.out_sr`` is set to the samples' rate. espeak's own voices give one WORD event per
        word, at the exact sample. MBROLA voices (``mb-*``) give a WORD event only at the start
        of a sentence, but a PHONEME event for every phoneme sent to mbrola, and the first
        phoneme of each word carries the word's text position: those are taken as the word
        starts. Their samples are only approximate (see synth_mbrola, which makes the MBROLA
        clips): espeak-ng adds a fixed ``mbrola_delay`` (1000 samples, synth_mbrola.c) to every
        event of an MBROLA voice, which is measured on the first event and taken off here, and
        it counts samples as it requests them from mbrola, not as mbrola returns them.
        """
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            hint = " (run scripts/install_mbrola.sh as root)" if is_mbrola(voice) else ""
            raise EspeakError(f"espeak-ng voice {voice!r} not available{hint}")
        sr = self._get_rate() if self._get_rate is not None else self.sr
        if sr <= 0:
            raise EspeakError(f"espeak-ng reports sample rate {sr} for voice {voice!r}")
        self.out_sr = sr
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
        mbrola = is_mbrola(voice)
        delay = self._events[0][4] if (mbrola and self._events) else 0
        if not 0 <= delay <= sr:
            raise EspeakError(f"voice {voice!r}: first event at sample {delay}, expected the "
                              "MBROLA synchronisation delay (1000)")
        if mbrola:
            # A phoneme event's position is (sourceix + clause_start_char): sourceix is set on a
            # word's first phoneme only, so inside a word (and at pauses) the position is the
            # clause start, the blank before the clause's first word (0 in the first clause).
            # Word starts are therefore the events positioned at a token's first character
            # (its ZWSP) or first letter, and not a pause phoneme ("_", "_:", "_!" ...).
            starts = set()
            for a, b, _ in tokens(text):
                k = a
                while k < b and not text[k].isalnum():
                    k += 1
                starts.update(range(a, k + 1))
        # every PHONEME event (MBROLA voices): (name, text position0, approximate sample)
        self.last_phonemes = [(name, tpos - 1, sample - delay)
                              for typ, tpos, _, _, sample, name in self._events
                              if mbrola and typ == EV_PHONEME]
        words = []
        for typ, tpos, length, ms, sample, name in self._events:
            if mbrola:
                if typ not in (EV_WORD, EV_PHONEME) or (tpos - 1) not in starts \
                        or name.startswith("_"):
                    continue
                length = max(length, 1)
            elif typ != EV_WORD:
                continue
            # `sample` is the exact sample index; fall back on audio_position if it looks odd
            if abs(sample - ms * sr / 1000.0) > 2e-3 * sr:
                sample = int(round(ms * sr / 1000.0))
            words.append((tpos - 1, length, sample - delay))
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
# MBROLA voices: the audio is mbrola's rendering of espeak-ng's .pho file
# --------------------------------------------------------------------------------------------
#
# Through libespeak-ng the MBROLA audio and its events drift apart: espeak counts the samples it
# asks mbrola for, not those mbrola returns (a 1-ms pause asked for and not returned shifts the
# rest by 16 samples), and it flushes mbrola at every clause end, which changes the audio there.
# So an MBROLA clip is made from the .pho file instead, whose durations are the truth:
#
# 1. the .pho file of the text (espeak_SetPhonemeTrace, i.e. `espeak-ng --pho`), one line per
#    mbrola phone with its duration in ms;
# 2. a normal synthesis of the same text with the same settings, only for its PHONEME events:
#    which phone starts which word, at an approximate sample;
# 3. the events are mapped in order onto the .pho lines by a dynamic programme that matches
#    the intervals between events with those between lines (place_on_pho); a word starts at
#    the line of its first phoneme. No consistent mapping, or a slip of the event clock over
#    PHO_TOL_MS, raises ValueError and the clip is drawn again;
# 4. the `mbrola` program renders the .pho file. Its output starts at the first phone (sample
#    0 = time 0 of the .pho file), so phone boundary k is at sr * (d_0 + ... + d_{k-1}) / 1000.
#    (mbrola realises a boundary at a pitch period, a few ms at most; the total length falls
#    short of the .pho total by up to ~8 ms, all of it in the final pause.)

PHO_TOL_MS = 40.0
MAX_STEP = 4


def parse_pho(pho: str) -> list[tuple[str, int]]:
    """(phone, duration ms) per line of a .pho file (comments ``;`` and blank lines skipped)."""
    out = []
    for line in pho.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith(";"):
            continue
        if len(parts) < 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f".pho line without a duration: {line!r}")
        out.append((parts[0], int(parts[1])))
    return out


def place_on_pho(text: str, phonemes, phones: list[tuple[str, int]], sr: int):
    """Put the word starts on .pho phone boundaries.

    ``phonemes``: every PHONEME event of the synthesis, (name, text position0, approximate
    sample). Each PHONEME event is written to the .pho file as 1 line, 2 (a phoneme split in two mbrola
    phones, e.g. [A@] -> A r) or one more (a pause after it), pauses (names ``_...``) as pause
    lines. A dynamic programme maps the events in order onto line starts, each event advancing
    1 to MAX_STEP lines, a pause event only onto a pause line and any other only onto a phone,
    minimising the summed |event interval - .pho interval|: exact intervals cost 0, so only
    where espeak's event clock slips (at pauses, clause ends) is anything paid. Returns (word
    events (text position0, 1, boundary sample), one per word found, and the largest slip in
    ms). Raises ValueError when no
    consistent mapping exists or a slip exceeds PHO_TOL_MS.
    """
    toks = tokens(text)
    N, M = len(phonemes), len(phones)
    if N == 0 or M == 0:
        raise ValueError(f"no phoneme events or .pho lines for {text!r}")
    B = np.round(np.cumsum([0] + [d for _, d in phones]) * sr / 1000.0)
    t = np.array([smp for _, _, smp in phonemes], np.float64)
    ev_pause = np.array([nm.startswith("_") for nm, _, _ in phonemes])
    ln_pause = np.array([nm.startswith("_") for nm, _ in phones])
    big, extra = 1e12, 1.0  # a class mismatch; a line skipped (prefer 1-line steps on ties)
    cost = np.full((N, M), np.inf)
    back = np.zeros((N, M), np.int8)
    k0 = min(MAX_STEP, M)
    cost[0, :k0] = np.abs(t[0] - B[:k0]) + np.arange(k0) * extra \
        + big * (ev_pause[0] != ln_pause[:k0])
    for i in range(1, N):
        dt = t[i] - t[i - 1]
        best = np.full(M, np.inf)
        arg = np.zeros(M, np.int8)
        for k in range(1, min(MAX_STEP, M - 1) + 1):
            c = cost[i - 1, :M - k] + np.abs(dt - (B[k:M] - B[:M - k])) + (k - 1) * extra
            upd = c < best[k:]
            best[k:][upd] = c[upd]
            arg[k:][upd] = k
        cost[i] = best + big * (ev_pause[i] != ln_pause)
        back[i] = arg
    j = int(np.argmin(cost[N - 1]))
    if not cost[N - 1, j] < big:
        raise ValueError(f"cannot map the {N} phoneme events onto the {M} .pho lines of {text!r}")
    line = np.zeros(N, np.int64)
    for i in range(N - 1, -1, -1):
        line[i] = j
        j -= int(back[i, j])
    slips = np.abs(np.diff(t) - np.diff(B[line])) if N > 1 else np.zeros(1)
    worst = float(slips.max()) * 1000.0 / sr if len(slips) else 0.0
    if worst > PHO_TOL_MS:
        raise ValueError(f"espeak's event clock slips {worst:.1f} ms against the .pho file of "
                         f"{text!r}")
    # a word starts at its first phoneme: the first non-pause event positioned on the token's
    # first character (its ZWSP) or first letter (see Espeak.synth)
    heads = {}
    for a, b, _ in toks:
        k = a
        while k < b and not text[k].isalnum():
            k += 1
        for q in range(a, k + 1):
            heads[q] = a
    first: dict[int, int] = {}
    for (nm, pos, _), ln in zip(phonemes, line):
        if not nm.startswith("_") and pos in heads and heads[pos] not in first:
            first[heads[pos]] = int(B[ln])
    out = [(a, 1, first[a]) for a in sorted(first)]
    return out, worst


def mbrola_db_path(db: str) -> Path:
    roots = [Path(p) / "mbrola" for p in
             os.environ.get("XDG_DATA_DIRS", "/usr/local/share:/usr/share").split(":") if p]
    for r in roots:
        for cand in (r / db / db, r / db, r / "voices" / db):
            if cand.is_file():
                return cand
    raise EspeakError(f"mbrola database {db!r} not found under {', '.join(map(str, roots))}: "
                      "run scripts/install_mbrola.sh as root")


def render_mbrola(pho: str, voice: str, volume: float = 0.5) -> tuple[np.ndarray, int, int]:
    """Render a .pho file with the ``mbrola`` program. Returns (int16 samples, rate, number of
    mbrola warnings: unknown diphones it replaced by silence, saturations)."""
    import subprocess
    import tempfile

    import soundfile as sf

    db = mbrola_database(voice)
    if db is None:
        raise EspeakError(f"cannot tell the mbrola database of voice {voice!r}")
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.pho"), os.path.join(d, "out.wav")
        with open(src, "w", encoding="utf-8") as f:
            f.write(pho)
        # -e: go on past unknown diphones (espeak-ng does the same: setNoError_MBR(1))
        proc = subprocess.run(["mbrola", "-e", "-v", str(volume), str(mbrola_db_path(db)), src,
                               dst], capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(dst):
            raise EspeakError(f"mbrola failed for voice {voice!r}: "
                              f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        y, sr = sf.read(dst, dtype="int16")
    warnings = sum(1 for line in proc.stderr.splitlines() if "Warning" in line
                   or "Saturation" in line)
    return y, int(sr), warnings


def synth_mbrola(es: "Espeak", text: str, voice: str, rate: int, pitch: int, prange: int,
                 wordgap: int):
    """An MBROLA clip (see above): (int16 audio, word events on .pho boundaries, sample rate,
    info dict with the .pho phones, mbrola warnings and the largest event placement error)."""
    # libespeak-ng runs an mbrola process (started when the voice is set) that prints its
    # warnings to the inherited stderr; render_mbrola counts them, so keep these passes quiet
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            pho = es.pho(text, voice, rate, pitch, prange, wordgap)
            es.synth(text, voice, rate, pitch, prange, wordgap)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    phones = parse_pho(pho)
    if not phones:
        raise ValueError(f"empty .pho file for {text!r}")
    audio, sr, warnings = render_mbrola(pho, voice)
    if sr != es.out_sr:
        raise EspeakError(f"voice {voice!r}: mbrola renders at {sr} Hz, espeak-ng reports "
                          f"{es.out_sr} Hz")
    placed, worst = place_on_pho(text, es.last_phonemes, phones, sr)
    return audio, placed, sr, dict(phones=len(phones), mbrola_warnings=warnings,
                                   placement_ms=round(worst, 2))


# --------------------------------------------------------------------------------------------
# One clip
# --------------------------------------------------------------------------------------------

# Defaults of the options that shape a clip: the bundled demo corpus (data/commonvoice_demo)
DEFAULTS = dict(voices=VOICES, rate=OUT_SR, format="mp3", mp3_level=0.7, noise_dbfs=NOISE_DBFS,
                lead=(0.1, 0.4), tail=(0.1, 0.4), texts="a", long_seconds=60.0)
FORMATS = {"mp3": ("MP3", "MPEG_LAYER_III"), "wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16")}
# --broken cycles through these, in this order
BROKEN_KINDS = ("truncated", "empty", "text", "garbage", "header_only")
CLIP_INFO_COLUMNS = ["id", "path", "kind", "voice", "variant", "speaker", "rate_wpm", "pitch",
                     "pitch_range", "wordgap", "lead", "tail", "gain", "synth_sr", "mp3_delay", "duration",
                     "mbrola_warnings", "placement_ms"]


def clip_params(rng: np.random.Generator, sentence: str, cfg: dict = DEFAULTS) -> dict:
    voices = cfg["voices"]
    return dict(
        sentence=sentence,
        voice=voices[int(rng.integers(len(voices)))],
        variant=sorted(VARIANTS)[int(rng.integers(len(VARIANTS)))],  # not used by MBROLA voices
        rate=int(rng.integers(130, 211)),             # words per minute
        pitch=int(rng.integers(25, 76)),              # 0-100, 50 = normal
        prange=int(rng.integers(20, 81)),             # pitch range 0-100
        wordgap=int(rng.choice([0, 0, 0, 1, 2, 4])),  # extra pause between words, x10 ms
        lead=float(rng.uniform(*cfg["lead"])),        # s of silence before (demo: 0.1-0.4)
        tail=float(rng.uniform(*cfg["tail"])),        # s of silence after
        gain=float(rng.uniform(0.3, 0.9)),            # peak level (full scale = 1)
        noise_seed=int(rng.integers(2**31)),
    )


MAX_TRIES = 20


def speaker_name(p: dict) -> str:
    """The synthetic speaker: the voice, plus espeak's variant (MBROLA voices have none)."""
    return p["voice"] if is_mbrola(p["voice"]) else f"{p['voice']}+{p['variant']}"


def encoder_delay(src: np.ndarray, decoded: np.ndarray, max_lag: int) -> tuple[int, float]:
    """The lag L (samples) at which ``decoded[t] ~ src[t - L]``, by FFT cross-correlation over
    the whole clip, searched in [-max_lag, max_lag]; and the normalised correlation there."""
    a = np.asarray(src, np.float64)
    b = np.asarray(decoded, np.float64)
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    c = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)
    lags = np.r_[np.arange(0, max_lag + 1), np.arange(-max_lag, 0)]
    vals = np.r_[c[: max_lag + 1], c[n - max_lag:]]
    k = int(np.argmax(vals))
    lag = int(lags[k])
    m = min(len(a), len(b) - lag) if lag >= 0 else min(len(a) + lag, len(b))
    x = a[max(0, -lag): max(0, -lag) + m]
    y = b[max(0, lag): max(0, lag) + m]
    rho = float(np.dot(x, y) / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-30))
    return lag, rho


def pick_sentences(rng: np.random.Generator, sentences: list[str], seconds: float) -> list[int]:
    """Sentence indices (no repeats until the list is used up) whose words last at least
    ``seconds`` even at the fastest rate drawn (210 words per minute)."""
    need = seconds * 210.0 / 60.0
    out: list[int] = []
    words = 0
    while words < need:
        for i in rng.permutation(len(sentences)):
            out.append(int(i))
            words += len(sentences[int(i)].split())
            if words >= need:
                break
    return out


def make_clip(seed: int, index: int, sentence_index: int | None, out_dir: Path,
              cfg: dict = DEFAULTS, kind: str = "clip") -> dict:
    """Synthesise, write and time clip ``index`` (``kind`` "clip", "long" or "broken": a
    broken clip is made like any other and damaged by main afterwards)."""
    import soundfile as sf
    import soxr

    rng = np.random.default_rng([seed, index])
    texts = TEXTS[cfg["texts"]]
    if kind == "long":
        sentence = " ".join(texts[i] for i in pick_sentences(rng, texts, cfg["long_seconds"]))
    else:
        sentence = texts[sentence_index if sentence_index is not None
                         else int(rng.integers(len(texts)))]
    es = Espeak.get()
    text = synth_text(sentence)
    # A few voice/word combinations lose a word's event (e.g. en-us-nyc drops the /h/ of "huge"
    # and with it the event); never guess a timing: draw another voice and rate instead.
    for _ in range(MAX_TRIES):
        p = clip_params(rng, sentence, cfg)
        voice_name = speaker_name(p)
        extra = {}
        try:
            if is_mbrola(p["voice"]):
                audio, events, synth_sr, extra = synth_mbrola(
                    es, text, voice_name, p["rate"], p["pitch"], p["prange"], p["wordgap"])
            else:
                audio, events = es.synth(text, voice_name, p["rate"], p["pitch"], p["prange"],
                                         p["wordgap"])
                synth_sr = es.out_sr
            if len(audio) == 0:
                continue
            segs = word_segments(text, audio, events)
            short = cfg["long_seconds"] - len(audio) / synth_sr
            if kind == "long" and short > 0:  # spoken faster than assumed: add sentences
                sentence += " " + " ".join(texts[i] for i in pick_sentences(rng, texts, 1.5 * short))
                text = synth_text(sentence)
                continue
            break
        except ValueError:
            continue
    else:
        raise EspeakError(f"no voice gave a word event per word for {sentence!r}")
    out_sr = int(cfg["rate"])

    x = audio.astype(np.float64) / 32768.0
    x *= p["gain"] / max(np.abs(x).max(), 1e-9)
    y = soxr.resample(x, synth_sr, out_sr, quality="VHQ")
    lead_n, tail_n = int(round(p["lead"] * out_sr)), int(round(p["tail"] * out_sr))
    y = np.concatenate([np.zeros(lead_n), y, np.zeros(tail_n)])
    noise = np.random.default_rng(p["noise_seed"]).standard_normal(len(y))
    y = np.clip(y + noise * 10.0 ** (cfg["noise_dbfs"] / 20.0), -1.0, 1.0).astype(np.float32)

    clip_id = f"common_voice_en_{index + 1:06d}"
    fmt = cfg["format"]
    fname = f"{clip_id}.{fmt}"
    path = out_dir / "clips" / fname
    container, subtype = FORMATS[fmt]
    delay = 0
    if fmt == "mp3":
        sf.write(path, y, out_sr, format=container, subtype=subtype,
                 compression_level=cfg["mp3_level"], bitrate_mode="VARIABLE")
        # The timings must hold for what a reader DECODES. libsndfile's writer stores the encoder
        # delay in the LAME/Xing header and its decoder (mpg123) strips it, for VBR; other
        # encoders (sox, lame) or CBR at high levels (+1105 samples with libsndfile 1.2.2) leave
        # it in. So the lag is measured, by cross-correlating the decoded clip with the signal
        # written, and the timings are shifted by it.
        decoded, dsr = sf.read(str(path), dtype="float64")
        if dsr != out_sr:
            raise RuntimeError(f"{fname}: decodes at {dsr} Hz, wrote {out_sr} Hz")
        delay, rho = encoder_delay(y, decoded, max_lag=min(4096, len(y) // 2))
        if rho < 0.9:
            raise RuntimeError(f"{fname}: decoded audio correlates only {rho:.2f} with the signal "
                               "written; cannot measure the MP3 delay (try --mp3-level)")
        n_decoded = len(decoded)
    else:
        sf.write(path, y, out_sr, format=container, subtype=subtype)
        n_decoded = len(y)

    lead_s = (lead_n + delay) / out_sr

    def t(s):
        return round(lead_s + s / synth_sr, 4)

    words = [dict(id=clip_id, word_index=i, word=w, start=t(a), end=t(b), event_start=t(c),
                  event_end=t(d)) for i, (w, a, b, c, d) in enumerate(segs)]
    if is_mbrola(p["voice"]):
        gender, accent, _ = MBROLA_VOICES.get(p["voice"], ("", "", ""))
    else:
        gender, accent = VARIANTS[p["variant"]], ACCENTS.get(p["voice"], "")
    row = dict(
        client_id=hashlib.sha256(f"streamq-espeak-{voice_name}".encode()).hexdigest() * 2,
        path=fname,
        sentence_id=hashlib.sha256(sentence.encode()).hexdigest(),
        sentence=sentence, sentence_domain="", up_votes=2, down_votes=0, age="",
        gender=gender, accents=accent, variant="", locale="en", segment="",
    )
    info = dict(id=clip_id, path=fname, kind=kind, voice=p["voice"],
                variant="" if is_mbrola(p["voice"]) else p["variant"], speaker=voice_name,
                rate_wpm=p["rate"], pitch=p["pitch"], pitch_range=p["prange"],
                wordgap=p["wordgap"], lead=round(lead_s, 4),
                tail=round(tail_n / out_sr, 4), gain=round(p["gain"], 4), synth_sr=synth_sr,
                mp3_delay=delay, duration=round(n_decoded / out_sr, 4),
                mbrola_warnings=extra.get("mbrola_warnings", ""),
                placement_ms=extra.get("placement_ms", ""))
    return dict(row=row, words=words, duration=n_decoded / out_sr, info=info, kind=kind,
                params=dict(p, voice_name=voice_name))


def _work(args):
    return make_clip(*args)


def damage(path: Path, kind: str, seed: int, index: int) -> str:
    """Turn a written clip into a broken file of ``kind`` (BROKEN_KINDS); returns a note."""
    rng = np.random.default_rng([seed, index, 17])
    data = path.read_bytes()
    if kind == "truncated":  # cut mid-stream, at an arbitrary byte (usually inside a frame)
        keep = int(len(data) * rng.uniform(0.3, 0.7))
        path.write_bytes(data[:keep])
        return f"first {keep} of {len(data)} bytes"
    if kind == "header_only":
        keep = min(len(data), int(rng.integers(40, 400)))
        path.write_bytes(data[:keep])
        return f"first {keep} of {len(data)} bytes"
    if kind == "empty":
        path.write_bytes(b"")
        return "0 bytes"
    if kind == "text":
        path.write_text("This is a text file, not audio.\nIt only has the name of one.\n")
        return "a text file"
    if kind == "garbage":
        n = int(rng.integers(2000, 20000))
        path.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        return f"{n} random bytes"
    raise ValueError(f"unknown broken kind {kind!r}")


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
    with open(out / "validated.tsv", newline="") as f:
        paths = {Path(r["path"]).stem: r["path"] for r in csv.DictReader(f, delimiter="\t")}
    by_clip: dict[str, list[dict]] = {}
    for r in rows:
        by_clip.setdefault(r["id"], []).append(r)
    hop_s = 0.005
    bad, errs = 0, []
    clips = sorted(by_clip)[:n]
    for ci, cid in enumerate(clips):
        y, sr = sf.read(out / "clips" / paths[cid], dtype="float64")
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

def _range(text: str) -> tuple[float, float]:
    """``A:B`` (seconds, 0 <= A <= B) or a single ``A`` for a fixed value."""
    try:
        parts = [float(x) for x in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B in seconds, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 0 <= parts[0] <= parts[1] or not np.isfinite(parts).all():
        raise argparse.ArgumentTypeError(f"expected A:B with 0 <= A <= B, got {text!r}")
    return parts[0], parts[1]


def _write_tsv(path: Path, columns: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path,
                    help="output directory (Common Voice layout)")
    ap.add_argument("--n-clips", "--n", dest="n_clips", type=int, default=80,
                    help="ordinary clips, one sentence each (default 80)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="worker processes (the output does not depend on it)")
    ap.add_argument("--voices", default="espeak",
                    help="comma-separated espeak-ng voices, each clip draws one: espeak's own "
                         "(e.g. en-us, its variant m1..f5 drawn too) or MBROLA ones (mb-us1, "
                         "mb-us2, mb-us3, mb-en1, mb-de1-en, ...; scripts/install_mbrola.sh); "
                         "shorthands 'espeak' (its 8 English voices, the default) and 'mbrola' "
                         f"({', '.join(MBROLA_VOICES)})")
    ap.add_argument("--texts", choices=sorted(TEXTS), default="a",
                    help="sentence list: a = Harvard lists 1-8 + Aesop (the demo's), "
                         "b = Harvard lists 9-16 (an independent corpus), all = both")
    ap.add_argument("--rate", type=int, default=OUT_SR, help="output sample rate (default 48000)")
    ap.add_argument("--format", choices=sorted(FORMATS), default="mp3",
                    help="clip format (default mp3, VBR through libsndfile)")
    ap.add_argument("--mp3-level", type=float, default=0.7,
                    help="libsndfile MP3 compression level 0..<1 (VBR; 0.7 ~ 45 kbit/s on speech)")
    ap.add_argument("--noise-dbfs", type=float, default=NOISE_DBFS,
                    help="RMS of the white noise floor added everywhere, dBFS (default -70)")
    ap.add_argument("--lead-silence", type=_range, default=DEFAULTS["lead"], metavar="A:B",
                    help="seconds of silence before the speech, drawn uniformly (default 0.1:0.4)")
    ap.add_argument("--trail-silence", type=_range, default=DEFAULTS["tail"], metavar="A:B",
                    help="seconds of silence after the speech (default 0.1:0.4)")
    ap.add_argument("--long", type=int, default=0, metavar="N",
                    help="also N long clips of concatenated sentences (see --long-seconds)")
    ap.add_argument("--long-seconds", type=float, default=60.0,
                    help="a long clip has words enough for at least this many seconds (default 60)")
    ap.add_argument("--broken", type=int, default=0, metavar="N",
                    help="also N broken files (truncated, 0 bytes, a text file, random bytes, "
                         "header only, in turn), in validated.tsv and broken.tsv but not in "
                         "word_times.tsv")
    ap.add_argument("--random-sentences", action="store_true",
                    help="draw sentences at random instead of cycling through the list")
    ap.add_argument("--verify", type=int, default=0, metavar="K",
                    help="after writing, check the first K clips' word boundaries against the "
                         "decoded MP3 energy (exit 1 on failure); --show prints every word")
    ap.add_argument("--show", type=int, default=0, metavar="K",
                    help="with --verify, print every word of the first K clips")
    args = ap.parse_args(argv)
    if args.n_clips < 0 or args.long < 0 or args.broken < 0:
        ap.error("--n-clips, --long and --broken must be >= 0")
    if args.n_clips + args.long + args.broken < 1:
        ap.error("nothing to make: --n-clips, --long and --broken are all 0")
    if args.rate < 8000:
        ap.error(f"--rate {args.rate}: must be >= 8000")
    if args.format == "mp3" and args.rate not in (8000, 11025, 12000, 16000, 22050, 24000,
                                                  32000, 44100, 48000):
        ap.error(f"--rate {args.rate}: not an MPEG audio sample rate")
    if args.long_seconds <= 0:
        ap.error("--long-seconds must be > 0")
    try:
        voices = parse_voices(args.voices)
    except ValueError as e:
        ap.error(str(e))
    cfg = dict(voices=voices, rate=args.rate, format=args.format, mp3_level=args.mp3_level,
               noise_dbfs=args.noise_dbfs, lead=args.lead_silence, tail=args.trail_silence,
               texts=args.texts, long_seconds=args.long_seconds)

    out: Path = args.out
    (out / "clips").mkdir(parents=True, exist_ok=True)
    try:
        load_library()  # fail early and loudly if the library is missing (no espeak_Initialize)
        check_mbrola(voices)
    except EspeakError as e:
        print(f"make_corpus.py: {e}", file=sys.stderr)
        return 1

    texts = TEXTS[args.texts]
    order = np.random.default_rng([args.seed, 2**31]).permutation(len(texts))
    n, n_long = args.n_clips, args.long
    kinds = ["clip"] * n + ["long"] * n_long + ["broken"] * args.broken
    jobs = []
    for i, kind in enumerate(kinds):
        # ordinary and broken clips cycle through the sentence list (broken ones continue it)
        k = i if kind == "clip" else i - n_long
        si = None if (args.random_sentences or kind == "long") else int(order[k % len(texts)])
        jobs.append((args.seed, i, si, out, cfg, kind))
    # libespeak-ng keeps internal state between syntheses (the same text and settings give
    # slightly different samples after other clips), so every clip is made in a process of its
    # own, forked from this one, which has loaded but never initialised the library: the same
    # seed then gives byte-identical output whatever --jobs is.
    import multiprocessing as mp
    # long clips first, so that the pool does not end on one of them
    order_jobs = sorted(range(len(jobs)), key=lambda j: jobs[j][5] != "long")
    try:
        with mp.get_context("fork").Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
            done = pool.map(_work, [jobs[j] for j in order_jobs], chunksize=1)
    except EspeakError as e:  # a voice that is not there, a sentence no voice can time
        print(f"make_corpus.py: {e}", file=sys.stderr)
        return 1
    results: list[dict] = [None] * len(jobs)  # type: ignore[list-item]
    for j, r in zip(order_jobs, done):
        results[j] = r

    broken_rows = []
    for b, r in enumerate(x for x in results if x["kind"] == "broken"):
        kind = BROKEN_KINDS[b % len(BROKEN_KINDS)]
        idx = int(r["info"]["id"].rsplit("_", 1)[1]) - 1
        note = damage(out / "clips" / r["row"]["path"], kind, args.seed, idx)
        r["info"]["kind"] = f"broken:{kind}"
        broken_rows.append(dict(path=r["row"]["path"], kind=kind, note=note,
                                sentence=r["row"]["sentence"]))

    _write_tsv(out / "validated.tsv", CV_COLUMNS, (r["row"] for r in results))
    _write_tsv(out / "word_times.tsv", WT_COLUMNS,
               (w for r in results if r["kind"] != "broken" for w in r["words"]))
    if cfg != DEFAULTS or n_long or broken_rows:
        # per-clip voice, speaker, silences and measured MP3 delay (scripts/eval_alignment.py
        # reads it for its per-voice table); not written with the defaults, so that the demo
        # corpus keeps exactly its three files
        _write_tsv(out / "clip_info.tsv", CLIP_INFO_COLUMNS, (r["info"] for r in results))
    if broken_rows:
        _write_tsv(out / "broken.tsv", ["path", "kind", "note", "sentence"], broken_rows)
    elif (out / "broken.tsv").exists():
        (out / "broken.tsv").unlink()

    good = [r for r in results if r["kind"] != "broken"]
    total = sum(r["duration"] for r in good)
    nbytes = sum((out / "clips" / r["row"]["path"]).stat().st_size for r in good)
    stale = {p.name for p in (out / "clips").iterdir()} - {r["row"]["path"] for r in results}
    if stale:
        print(f"warning: {len(stale)} file(s) in {out / 'clips'} are not in validated.tsv",
              file=sys.stderr)
    delays = sorted({r["info"]["mp3_delay"] for r in good})
    extra = f", {n_long} long" if n_long else ""
    extra += f", {len(broken_rows)} broken (broken.tsv)" if broken_rows else ""
    print(f"wrote {len(good)} clips{extra}, {total:.1f} s of audio, {nbytes} bytes of "
          f"{args.format} to {out}" + (f"; MP3 delay measured: {delays} samples"
                                       if args.format == "mp3" and delays != [0] else ""))
    if args.verify:
        return verify(out, args.verify, show=args.show)
    return 0


if __name__ == "__main__":
    sys.exit(main())

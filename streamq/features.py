"""Decode audio and compute MFCC frames.

Decoding is soundfile (wav, flac, ogg, mp3 with libsndfile >= 1.1), down-mixed to
mono and resampled with soxr to :attr:`FeatureConfig.sample_rate`. A clip is refused with a
reason that names the cause when it is empty (0 bytes), not audio, damaged (the decoder fails
part-way) or truncated (it decodes to less than its header's length, less one frame step). MFCCs are
python_speech_features' ``mfcc`` with every parameter written in the config, computed bit for bit by
:func:`_psf_mfcc` (faster, and without importing scipy.fft).

python_speech_features 0.6 uses ``nfft=512`` by default and silently truncates any
window longer than that (25 ms at 48 kHz is 1200 samples). streamq picks
``nfft`` as the next power of two that holds the whole window, so every frame uses
its whole window at any rate; at 16 kHz that is 512, identical to the library default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus")


class AudioError(ValueError):
    """A clip that cannot be turned into frames; the message names the file."""


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Every MFCC parameter. Defaults are python_speech_features' except ``nfft`` (see module doc)."""

    sample_rate: int = 16000
    winlen: float = 0.025
    winstep: float = 0.01
    numcep: int = 13
    nfilt: int = 26
    nfft: int = 0  # 0: next power of two >= winlen * sample_rate (512 at 16 kHz)
    lowfreq: float = 0.0
    highfreq: float = 0.0  # 0: sample_rate / 2
    preemph: float = 0.97
    ceplifter: int = 22
    append_energy: bool = True
    decoder: int = 2  # 2: one read per file; 1 (streamq <= 0.2): 16384-frame reads, which libsndfile 1.2.2
    # decodes wrongly for MP3 after each read boundary (up to 0.8 off against ffmpeg): stores differ

    @property
    def window_samples(self) -> int:
        return int(round(self.winlen * self.sample_rate))

    @property
    def fft_size(self) -> int:
        return self.nfft or 1 << max(0, math.ceil(math.log2(self.window_samples)))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_MAGIC = ((b"RIFF", "WAV"), (b"RF64", "WAV"), (b"fLaC", "FLAC"), (b"OggS", "Ogg"), (b"ID3", "MP3"),
          (b"FORM", "AIFF"))
_UNKNOWN_LENGTH = 1 << 62  # libsndfile's frame count when a file does not say how long it is
_ONE_READ_MAX = 1 << 31  # frames read at once at most (12 h at 48 kHz); longer or unknown: in blocks
_LIBSNDFILE_MISLEADING = "File does not exist or is not a regular file (possibly a pipe?)."


def _libsndfile_message(e: Exception, path) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    msg = msg.replace(f"Error opening {str(path)!r}: ", "").replace(_LIBSNDFILE_MISLEADING, "unrecognised or damaged data")
    return msg.strip()


def _why_unopenable(path, e: Exception) -> str:
    """Why libsndfile could not open a non-empty file: damaged audio, text, or some other format."""
    with open(path, "rb") as f:
        head = f.read(512)
    msg = _libsndfile_message(e, path)
    kind = next((k for m, k in _MAGIC if head.startswith(m)), None)
    if kind is None and len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        kind = "MP3"  # an MPEG audio frame sync word
    if kind is not None:
        return f"cannot decode audio (damaged or truncated {kind} data; libsndfile: {msg})"
    try:
        text = head.decode("utf-8")
        if text and all(c.isprintable() or c in "\t\r\n" for c in text):
            return f"not an audio file (text: {text[:40]!r})"
    except UnicodeDecodeError:
        pass
    return f"not an audio file (unrecognised format, first bytes {head[:8].hex(' ')}; libsndfile: {msg})"


def _declared_frames(f) -> int | None:
    """The length a WAV header declares (libsndfile clamps ``frames`` to the data present), or None."""
    import re

    info = f.extra_info or ""
    m = re.search(r"^data\s*:\s*(\d+) \(should be \d+\)", info, re.M)
    b = re.search(r"Block Align\s*:\s*(\d+)", info)
    if not m or not b or int(b.group(1)) <= 0:
        return None
    declared = int(m.group(1))
    if declared in (0, 0xFFFFFFFF, 0x7FFFFFFF):  # placeholders written by streaming encoders
        return None
    return declared // int(b.group(1))


def decode(path, target_rate: int, max_short: float = 0.01) -> np.ndarray:
    """Read an audio file as float32 mono at ``target_rate`` Hz.

    A clip whose decoded length falls short of the length in its header by more than ``max_short``
    seconds (one MFCC frame step) is truncated and refused, as is one whose decoder fails part-way.

    Raises
    ------
    AudioError
        Missing, empty (0 bytes), not audio, damaged, truncated, no samples, or NaN/inf samples; the
        message names the file and the cause.
    """
    import soundfile as sf

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise AudioError(f"{path}: file missing ({e.strerror})") from None
    if size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:
        raise AudioError(f"{path}: {_why_unopenable(path, e)}") from None
    with f:
        rate = f.samplerate
        header = _declared_frames(f) or f.frames
        blocks, got = [], 0
        # One read of the whole declared length: libsndfile 1.2.2 returns wrong MP3 samples after every
        # boundary between reads (tests/test_features.py compares with one read). Only a file of unknown
        # or absurd length, or what follows a short first read, is read in blocks; a decoder error is then
        # located by re-reading in blocks.
        first = int(f.frames) if 0 < f.frames < _ONE_READ_MAX else 1 << 14
        while True:
            try:
                b = f.read(first if not blocks else 1 << 14, dtype="float32", always_2d=True)
            except Exception as e:
                got = _decoded_before_error(path) if not blocks else got
                of = f" of {header / rate:.2f} s in header" if header < _UNKNOWN_LENGTH else ""
                raise AudioError(f"{path}: decoder error after {got / rate:.2f} s{of} "
                                 f"(libsndfile: {_libsndfile_message(e, path)})") from None
            if len(b) == 0:
                break
            blocks.append(b)
            got += len(b)
    if got == 0:
        raise AudioError(f"{path}: empty clip (0 samples)")
    if header < _UNKNOWN_LENGTH and header - got > max(1, round(max_short * rate)):
        raise AudioError(f"{path}: truncated: decoded {got / rate:.2f} s of {header / rate:.2f} s in header")
    data = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != target_rate:
        import soxr

        mono = soxr.resample(mono, rate, target_rate, quality="HQ").astype(np.float32)
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{path}: decoded samples contain NaN or inf")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decoded_before_error(path) -> int:
    """Frames a failing file yields in 16384-frame reads before its decoder error (for the message)."""
    import soundfile as sf

    got = 0
    try:
        with sf.SoundFile(str(path)) as f:
            while True:
                b = f.read(1 << 14, dtype="float32", always_2d=True)
                if len(b) == 0:
                    break
                got += len(b)
    except Exception:
        pass
    return got


def _round_half_up(x: float) -> int:
    """python_speech_features.sigproc.round_half_up."""
    import decimal

    return int(decimal.Decimal(x).quantize(decimal.Decimal("1"), rounding=decimal.ROUND_HALF_UP))


@functools.lru_cache(maxsize=16)
def _filterbank(nfilt: int, nfft: int, sample_rate: int, lowfreq: float, highfreq: float) -> np.ndarray:
    """python_speech_features' ``get_filterbanks`` (0.6, MIT licence), the same operations on the same values:
    the Mel filterbank (nfilt, nfft // 2 + 1), computed once per config (the library recomputes it for every
    clip), read-only."""
    highfreq = highfreq or sample_rate / 2
    if highfreq > sample_rate / 2:
        raise ValueError(f"highfreq {highfreq} is greater than samplerate/2 ({sample_rate / 2})")
    lowmel, highmel = 2595 * np.log10(1 + lowfreq / 700.), 2595 * np.log10(1 + highfreq / 700.)
    melpoints = np.linspace(lowmel, highmel, nfilt + 2)
    bins = np.floor((nfft + 1) * (700 * (10 ** (melpoints / 2595.0) - 1)) / sample_rate)
    fb = np.zeros([nfilt, nfft // 2 + 1])
    for j in range(nfilt):
        for i in range(int(bins[j]), int(bins[j + 1])):
            fb[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(int(bins[j + 1]), int(bins[j + 2])):
            fb[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    fb.flags.writeable = False
    return fb


def _lifter(cepstra: np.ndarray, L: int) -> np.ndarray:
    """python_speech_features' ``lifter``."""
    if L > 0:
        n = np.arange(cepstra.shape[1])
        lift = 1 + (L / 2.) * np.sin(np.pi * n / L)
        return lift * cepstra
    return cepstra


@functools.lru_cache(maxsize=1)
def _dct_impl():
    """``scipy.fftpack.dct(x, type=2, axis=1, norm='ortho')`` for float64 (T, n) ``x``.

    scipy.fftpack calls pocketfft's extension module (``scipy.fft._pocketfft.pypocketfft.dct``); importing it
    the usual way imports scipy.fft, which imports scipy.special and the array-API layer: ~0.25 s of CPU in
    every fresh process, as long as extracting fifty clips. Here the module is loaded from scipy's directory
    alone and called with the arguments scipy.fft passes (type 2, the axis, orthonormal scaling, no output
    array, one thread). Where that fails (another scipy layout or signature), scipy.fftpack itself.
    ``tests/test_features_mfcc.py`` checks both against scipy.fftpack, bit for bit."""
    try:
        import importlib.machinery
        import importlib.util
        import sysconfig

        spec = importlib.util.find_spec("scipy")
        name = "scipy.fft._pocketfft.pypocketfft"
        path = os.path.join(spec.submodule_search_locations[0], "fft", "_pocketfft",
                            "pypocketfft" + sysconfig.get_config_var("EXT_SUFFIX"))
        loader = importlib.machinery.ExtensionFileLoader(name, path)
        mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path, loader=loader))
        loader.exec_module(mod)

        def dct(x):
            return mod.dct(x, 2, (1,), 1, None, 1, None)

        probe = np.arange(6.0).reshape(2, 3)
        if dct(probe).shape != probe.shape:
            raise ValueError("unexpected result")
        return dct
    except Exception:  # noqa: BLE001 - any failure: the public function
        return _fftpack_dct


def _fftpack_dct(x):
    from scipy.fftpack import dct

    return dct(x, type=2, axis=1, norm="ortho")


def preload() -> None:
    """Import what extraction uses (the decoders, soxr, the DCT) now, e.g. before forking workers."""
    import soundfile  # noqa: F401
    import soxr  # noqa: F401

    _dct_impl()


def _psf_mfcc(signal: np.ndarray, c: FeatureConfig) -> np.ndarray:
    """``python_speech_features.mfcc(signal, ...)`` (0.6, MIT licence) for config ``c``, bit for bit, in about
    half the time and without importing scipy.fft (:func:`_dct_impl`).

    The same NumPy / pocketfft operations on the same values in the same order (preemphasis, framing, rfft,
    power spectrum, energy, filterbank product, log, DCT, lifter), without the library's per-clip waste:
    frames are a strided view copied once instead of a gather through tiled int32 indices multiplied by a
    tiled window of ones (the default window: ``x * 1.0 == x``), the filterbank is cached, and the power
    spectrum is formed in place. ``tests/test_features_mfcc.py`` checks equality with the library itself."""
    from numpy.lib.stride_tricks import as_strided

    rate, nfft = c.sample_rate, c.fft_size
    highfreq = (c.highfreq or None) or rate / 2
    sig = np.append(signal[0], signal[1:] - c.preemph * signal[:-1])
    flen, fstep = _round_half_up(c.winlen * rate), _round_half_up(c.winstep * rate)
    slen = len(sig)
    nframes = 1 if slen <= flen else 1 + int(math.ceil((1.0 * slen - flen) / fstep))
    padlen = int((nframes - 1) * fstep + flen)
    pad = np.concatenate((sig, np.zeros((padlen - slen,))))
    frames = np.ascontiguousarray(as_strided(pad, shape=(nframes, flen), strides=(fstep * pad.itemsize, pad.itemsize),
                                             writeable=False))
    pspec = np.absolute(np.fft.rfft(frames, nfft))
    np.square(pspec, out=pspec)
    pspec = 1.0 / nfft * pspec
    energy = np.sum(pspec, 1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    feat = np.dot(pspec, _filterbank(c.nfilt, nfft, rate, c.lowfreq, highfreq).T)
    feat = np.where(feat == 0, np.finfo(float).eps, feat)
    feat = np.log(feat)
    feat = _dct_impl()(feat)[:, :c.numcep]
    feat = _lifter(feat, c.ceplifter)
    if c.append_energy:
        feat[:, 0] = np.log(energy)
    return feat


def mfcc(signal: np.ndarray, config: FeatureConfig, name: str = "signal") -> np.ndarray:
    """MFCC frames of a mono signal already at ``config.sample_rate``: python_speech_features' ``mfcc`` with
    every parameter from the config, bit for bit (:func:`_psf_mfcc`).

    Returns
    -------
    float32 (T, numcep), T = 1 + (len(signal) - window) // step (python_speech_features rounds up the tail).
    """
    c = config
    if len(signal) < c.window_samples:
        raise AudioError(
            f"{name}: clip shorter than one frame ({len(signal)} samples < {c.window_samples} at {c.sample_rate} Hz)")
    feats = _psf_mfcc(np.asarray(signal, dtype=np.float64), c).astype(np.float32)
    if not np.all(np.isfinite(feats)):
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise AudioError(f"{name}: {bad} MFCC frames are NaN or inf")
    return feats


def extract(path, config: FeatureConfig) -> tuple[np.ndarray, float]:
    """Decode ``path`` and compute its MFCC frames. Returns (frames float32 (T, numcep), duration seconds)."""
    signal = decode(path, config.sample_rate, max_short=config.winstep)
    return mfcc(signal, config, name=str(path)), len(signal) / config.sample_rate

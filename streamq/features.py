"""Decode audio and compute MFCC frames.

Decoding is soundfile (wav, flac, ogg, mp3 with libsndfile >= 1.1), down-mixed to
mono and resampled with soxr to :attr:`FeatureConfig.sample_rate`. MFCCs are
python_speech_features' ``mfcc`` with every parameter written in the config.

python_speech_features 0.6 uses ``nfft=512`` by default and silently truncates any
window longer than that (25 ms at 48 kHz is 1200 samples). streamq picks
``nfft`` as the next power of two that holds the whole window, so every frame uses
its whole window at any rate; at 16 kHz that is 512, identical to the library default.
"""

from __future__ import annotations

import dataclasses
import math

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


def decode(path, target_rate: int) -> np.ndarray:
    """Read an audio file as float32 mono at ``target_rate`` Hz.

    Raises
    ------
    AudioError
        The file cannot be decoded or holds no samples.
    """
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports corrupt, truncated and unknown files alike
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"{path}: cannot decode audio ({msg})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty clip (0 samples)")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != target_rate:
        import soxr

        mono = soxr.resample(mono, rate, target_rate, quality="HQ").astype(np.float32)
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{path}: decoded samples contain NaN or inf")
    return np.ascontiguousarray(mono, dtype=np.float32)


def mfcc(signal: np.ndarray, config: FeatureConfig, name: str = "signal") -> np.ndarray:
    """MFCC frames of a mono signal already at ``config.sample_rate``.

    Returns
    -------
    float32 (T, numcep), T = 1 + (len(signal) - window) // step (python_speech_features rounds up the tail).
    """
    from python_speech_features import mfcc as psf_mfcc

    c = config
    if len(signal) < c.window_samples:
        raise AudioError(
            f"{name}: clip shorter than one frame ({len(signal)} samples < {c.window_samples} at {c.sample_rate} Hz)")
    feats = psf_mfcc(np.asarray(signal, dtype=np.float64), samplerate=c.sample_rate, winlen=c.winlen,
                     winstep=c.winstep, numcep=c.numcep, nfilt=c.nfilt, nfft=c.fft_size, lowfreq=c.lowfreq,
                     highfreq=c.highfreq or None, preemph=c.preemph, ceplifter=c.ceplifter,
                     appendEnergy=c.append_energy)
    feats = feats.astype(np.float32)
    if not np.all(np.isfinite(feats)):
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise AudioError(f"{name}: {bad} MFCC frames are NaN or inf")
    return feats


def extract(path, config: FeatureConfig) -> tuple[np.ndarray, float]:
    """Decode ``path`` and compute its MFCC frames. Returns (frames float32 (T, numcep), duration seconds)."""
    signal = decode(path, config.sample_rate)
    return mfcc(signal, config, name=str(path)), len(signal) / config.sample_rate

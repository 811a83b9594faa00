"""streamq's MFCC (:func:`streamq.features._psf_mfcc`) against python_speech_features itself: bit for bit,
for every parameter of the config, at every signal length that takes a different branch of the framing."""

import numpy as np
import pytest
import soundfile as sf
from python_speech_features import mfcc as psf_mfcc

from streamq.features import (FeatureConfig, _dct_impl, _fftpack_dct, _filterbank, _lifter, _psf_mfcc,
                              _round_half_up, extract, mfcc)

CONFIGS = [
    FeatureConfig(),
    FeatureConfig(sample_rate=48000),  # nfft 2048: python_speech_features' default would truncate
    FeatureConfig(sample_rate=8000, winlen=0.02, winstep=0.005),
    FeatureConfig(numcep=20, nfilt=40, append_energy=False, ceplifter=0),
    FeatureConfig(highfreq=6000.0, lowfreq=100.0, preemph=0.0, winlen=0.032, winstep=0.015, nfft=1024),
    FeatureConfig(sample_rate=22050, winlen=0.0251, winstep=0.0099),  # non-integer sample counts: rounding
]


def reference(signal, c):
    return psf_mfcc(np.asarray(signal, np.float64), samplerate=c.sample_rate, winlen=c.winlen, winstep=c.winstep,
                    numcep=c.numcep, nfilt=c.nfilt, nfft=c.fft_size, lowfreq=c.lowfreq, highfreq=c.highfreq or None,
                    preemph=c.preemph, ceplifter=c.ceplifter, appendEnergy=c.append_energy)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("c", CONFIGS, ids=lambda c: f"{c.sample_rate}-{c.numcep}-{c.nfft}-{c.winlen}")
def test_bit_identical_to_python_speech_features(c):
    rng = np.random.default_rng(7)
    w, step = c.window_samples, int(round(c.winstep * c.sample_rate))
    # exactly one window (one frame, no padding), one sample more (two frames, padded tail), a tail that
    # is a whole step, long signals
    for n in (w, w + 1, w + step, w + step - 1, 12345, 3 * c.sample_rate + 17):
        x = (0.1 * rng.normal(size=n)).astype(np.float32)
        assert same_bits(_psf_mfcc(x.astype(np.float64), c), reference(x, c)), n
        assert same_bits(mfcc(x, c), reference(x, c).astype(np.float32)), n


def test_silent_frames_take_the_epsilon_branch_identically():
    """All-zero frames: energy and filterbank outputs of 0 are replaced by eps before the log."""
    c = FeatureConfig()
    x = np.zeros(8000)
    x[4000:4400] = np.sin(np.arange(400) * 0.2)
    ours, ref = _psf_mfcc(x, c), reference(x, c)
    assert np.isclose(ours[0, 0], np.log(np.finfo(float).eps))  # a silent frame's log energy
    assert same_bits(ours, ref)


def test_filterbank_lifter_rounding_and_dct_are_the_library_s():
    from python_speech_features.base import get_filterbanks, lifter
    from python_speech_features.sigproc import round_half_up
    from scipy.fftpack import dct

    for nfilt, nfft, rate, lo, hi in [(26, 512, 16000, 0.0, 8000.0), (40, 2048, 48000, 100.0, 20000.0),
                                      (20, 256, 8000, 0.0, 4000.0), (64, 1024, 22050, 300.0, 11025.0)]:
        assert same_bits(_filterbank(nfilt, nfft, rate, lo, hi), get_filterbanks(nfilt, nfft, rate, lo, hi))
    a = _filterbank(26, 512, 16000, 0.0, 8000.0)
    assert a is _filterbank(26, 512, 16000, 0.0, 8000.0) and a.shape == (26, 257)
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    with pytest.raises(ValueError, match="highfreq"):
        _filterbank(26, 512, 16000, 0.0, 9000.0)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(57, 26))
    for L in (22, 0, -1, 7):
        assert same_bits(_lifter(x[:, :13], L), lifter(x[:, :13], L))
    for v in (400.0, 399.5, 400.5, 551.25, 0.5, 1.5, 2.5):
        assert _round_half_up(v) == round_half_up(v)
    for shape in ((57, 26), (1, 26), (300, 40), (5, 1)):
        y = rng.normal(size=shape)
        ref = dct(y, type=2, axis=1, norm="ortho")
        assert same_bits(_dct_impl()(y), ref) and same_bits(_fftpack_dct(y), ref)


def test_extraction_does_not_import_scipy_fft(tmp_path):
    """The DCT comes from pocketfft's module alone: a fresh process extracting MFCCs never imports scipy.fft
    (0.25 s of CPU, the largest import of an ingest worker)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from streamq.features import FeatureConfig, mfcc, preload; preload(); "
            "f = mfcc(np.random.default_rng(0).normal(size=16000).astype(np.float32), FeatureConfig()); "
            "print(f.shape, 'scipy.fft' in sys.modules, 'python_speech_features' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["(99,", "13)", "False", "False"], r.stdout + r.stderr


def test_extract_of_a_file_matches_the_library(speech_dir):
    c = FeatureConfig(sample_rate=22050)  # no resampling: the file's samples go to the MFCC unchanged
    x, sr = sf.read(speech_dir / "utt1.wav", dtype="float32")
    assert sr == 22050
    ours, _ = extract(speech_dir / "utt1.wav", c)
    assert same_bits(ours, reference(x, c).astype(np.float32))

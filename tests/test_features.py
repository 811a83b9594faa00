import numpy as np
import pytest
import soundfile as sf
from python_speech_features import mfcc as psf_mfcc

from streamq.features import AudioError, FeatureConfig, decode, extract, mfcc


def test_mfcc_identical_to_python_speech_features_at_16k(speech_dir):
    import soxr

    x, sr = sf.read(speech_dir / "utt0.wav", dtype="float32")
    x16 = soxr.resample(x, sr, 16000, quality="HQ").astype(np.float32)
    sf.write(speech_dir / "utt0_16k.wav", x16, 16000, subtype="FLOAT")
    ours, dur = extract(speech_dir / "utt0_16k.wav", FeatureConfig())
    ref = psf_mfcc(x16.astype(np.float64), samplerate=16000).astype(np.float32)
    assert ours.shape == ref.shape and ours.shape[1] == 13
    np.testing.assert_array_equal(ours, ref)
    assert abs(dur - len(x16) / 16000) < 1e-9


def test_48k_input_uses_full_windows():
    """At 48 kHz a 25 ms window is 1200 samples: energy in its last 600 samples must reach the frame."""
    cfg = FeatureConfig(sample_rate=48000)
    assert cfg.window_samples == 1200 and cfg.fft_size == 2048
    sig = np.zeros(1200, np.float32)
    sig[700:1100] = np.sin(np.arange(400) * 0.3).astype(np.float32)  # only past sample 512
    quiet = mfcc(np.zeros(1200, np.float32), cfg)
    loud = mfcc(sig, cfg)
    assert loud.shape == (1, 13)
    assert loud[0, 0] > quiet[0, 0] + 5  # log energy sees the burst
    # python_speech_features' default nfft=512 truncates the frame and misses it entirely
    trunc = psf_mfcc(sig.astype(np.float64), samplerate=48000, nfft=512)
    trunc_quiet = psf_mfcc(np.zeros(1200), samplerate=48000, nfft=512)
    np.testing.assert_allclose(trunc, trunc_quiet)


def test_48k_file_resampled_to_16k(speech_dir, tmp_path):
    import soxr

    x, sr = sf.read(speech_dir / "utt1.wav", dtype="float32")
    sf.write(tmp_path / "a48.flac", soxr.resample(x, sr, 48000), 48000)
    sf.write(tmp_path / "a16.flac", soxr.resample(x, sr, 16000), 16000)
    f48, d48 = extract(tmp_path / "a48.flac", FeatureConfig())
    f16, d16 = extract(tmp_path / "a16.flac", FeatureConfig())
    assert abs(d48 - d16) < 0.002 and abs(len(f48) - len(f16)) <= 1
    n = min(len(f48), len(f16))
    voiced = f16[:n, 0] > np.median(f16[:n, 0])  # silence is all rounding noise: compare speech frames
    for c in range(4):
        assert np.corrcoef(f48[:n][voiced, c], f16[:n][voiced, c])[0, 1] > 0.97


def test_stereo_downmix(tmp_path):
    t = np.arange(16000) / 16000
    st = np.stack([np.sin(2 * np.pi * 440 * t), -np.sin(2 * np.pi * 440 * t) * 0.5], 1).astype(np.float32)
    sf.write(tmp_path / "s.wav", st, 16000)
    x = decode(tmp_path / "s.wav", 16000)
    np.testing.assert_allclose(x, st.mean(1), atol=1e-4)


def test_bad_audio_errors_name_the_file(tmp_path):
    (tmp_path / "corrupt.mp3").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(AudioError, match=r"corrupt.mp3: not an audio file \(unrecognised format, first bytes 00 67"):
        decode(tmp_path / "corrupt.mp3", 16000)
    (tmp_path / "text.mp3").write_text("hello, this is not audio\n" * 5)
    with pytest.raises(AudioError, match=r"text.mp3: not an audio file \(text: 'hello, this is not"):
        decode(tmp_path / "text.mp3", 16000)
    (tmp_path / "zero.mp3").write_bytes(b"")
    with pytest.raises(AudioError, match=r"zero.mp3: empty file \(0 bytes\)$"):
        decode(tmp_path / "zero.mp3", 16000)
    with pytest.raises(AudioError, match=r"gone.wav: file missing"):
        decode(tmp_path / "gone.wav", 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: empty clip"):
        extract(tmp_path / "empty.wav", FeatureConfig())
    sf.write(tmp_path / "short.wav", np.zeros(100, np.float32), 16000)
    with pytest.raises(AudioError, match="short.wav: clip shorter than one frame"):
        extract(tmp_path / "short.wav", FeatureConfig())


@pytest.fixture(scope="module")
def tone():
    """5.34 s of a noisy tone at 16 kHz (the length of the clip in issue 9)."""
    t = np.arange(int(5.34 * 16000)) / 16000
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.normal(size=len(t))).astype(np.float32)


@pytest.mark.parametrize("fmt", ["MP3", "WAV", "FLAC", "OGG"])
def test_complete_files_are_accepted(tmp_path, tone, fmt):
    p = tmp_path / f"x.{fmt.lower()}"
    sf.write(p, tone, 16000, format=fmt)
    x = decode(p, 16000)
    assert abs(len(x) - len(tone)) <= 160


@pytest.mark.parametrize("fmt", ["MP3", "WAV"])
def test_truncated_files_are_rejected_with_both_lengths(tmp_path, tone, fmt):
    full = tmp_path / f"full.{fmt.lower()}"
    sf.write(full, tone, 16000, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(AudioError, match=r"cut\.\w+: truncated: decoded 2\.\d\d s of 5\.34 s in header$"):
        decode(cut, 16000)
    # losing less than one frame step (10 ms) of samples is not truncation
    sf.write(full, tone, 16000, format="WAV", subtype="PCM_16")
    data = full.read_bytes()
    cut.write_bytes(data[:len(data) - 2 * 100])  # 100 samples = 6 ms
    assert len(decode(cut, 16000)) == len(tone) - 100


def test_first_bytes_of_an_mp3_and_a_damaged_stream(tmp_path, tone):
    sf.write(tmp_path / "a.mp3", tone, 16000, format="MP3")
    data = (tmp_path / "a.mp3").read_bytes()
    (tmp_path / "head.mp3").write_bytes(data[:700])
    with pytest.raises(AudioError, match=r"head.mp3: (cannot decode audio \(damaged or truncated MP3|truncated: "
                       r"decoded 0\.\d\d s of 5\.34 s)"):
        decode(tmp_path / "head.mp3", 16000)
    sf.write(tmp_path / "a.flac", tone, 16000, format="FLAC")
    data = (tmp_path / "a.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[:len(data) // 2])
    with pytest.raises(AudioError, match=r"cut.flac: decoder error after \d\.\d\d s of 5\.34 s in header "
                       r"\(libsndfile: .*\)$"):
        decode(tmp_path / "cut.flac", 16000)


def test_mp3_decoded_in_one_read_not_in_blocks():
    """libsndfile 1.2.2 returns wrong MP3 samples after every boundary between reads (16384-frame reads were up
    to 0.8 off against ffmpeg on the demo clips); decode reads a file at once and matches one sf.read."""
    from pathlib import Path

    clips = sorted((Path(__file__).resolve().parents[1] / "data" / "commonvoice_demo" / "clips").glob("*.mp3"))[:4]
    assert clips
    worst_blocks = 0.0
    for p in clips:
        ref, rate = sf.read(str(p), dtype="float32", always_2d=True)
        ref = ref.mean(axis=1) if ref.shape[1] > 1 else ref[:, 0]
        assert len(ref) > 1 << 14  # the clip spans several of the old reads
        x = decode(p, rate)
        np.testing.assert_array_equal(x, ref)
        parts = []
        with sf.SoundFile(str(p)) as f:
            while len(b := f.read(1 << 14, dtype="float32", always_2d=True)):
                parts.append(b.mean(axis=1))
        blocks = np.concatenate(parts)
        worst_blocks = max(worst_blocks, float(np.abs(blocks[:len(ref)] - ref[:len(blocks)]).max()))
    assert FeatureConfig().decoder == 2
    print(f"block reads differ from one read by up to {worst_blocks:.3f}")

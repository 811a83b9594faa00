"""Pictures (issue 13): LBG and MFCC animations, the DFT basis, alignment over EM; `streamq plot`.

Every picture is rendered headless (Agg) and read back: frame count, pixel variance of each frame above a
floor (not blank), frames that differ from each other (it moves), and the data behind the MFCC image.
"""

import csv

import numpy as np
import pytest
from PIL import Image

from conftest import espeak
from streamq import plots
from streamq.cli import main
from streamq.features import FeatureConfig, decode, extract

VAR_FLOOR = 150.0  # grey-level variance (0..255 scale); a blank or single-colour frame is ~0


def gif_frames(path):
    """Every frame of a GIF as a grey-level float array."""
    im = Image.open(path)
    out = []
    for i in range(im.n_frames):
        im.seek(i)
        out.append(np.asarray(im.convert("L"), np.float64))
    return out


def assert_lively(frames, moving=True):
    for i, f in enumerate(frames):
        assert f.var() > VAR_FLOOR, f"frame {i} looks blank (variance {f.var():.1f})"
    if moving and len(frames) > 1:
        assert all(np.abs(a - b).mean() > 0.01 for a, b in zip(frames, frames[1:])), "two consecutive frames equal"


# ------------------------------------------------------------------ fixtures written to the data contracts
def write_lbg_fit(d, ks=(1, 2, 4, 8, 16, 24), D=5, seed=0, legacy=False):
    """A fit dir as `streamq fit --method lbg` writes it: fit_history.csv and codebook_stages.npz (ks,
    codebooks); ``legacy``: the history under its older name history.csv.

    The codebooks follow the split layout of kernels.lloyd.split (codeword k -> k and K + k), with a last
    stage that splits only some codewords; history rows carry the stage, frames_seen and metrics."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    stages = [rng.normal(size=(1, D)).astype(np.float32)]
    for k in ks[1:]:
        prev = stages[-1]
        kp = len(prev)
        idx = np.arange(kp) if k == 2 * kp else np.arange(k - kp)
        delta = rng.normal(size=(len(idx), D)).astype(np.float32) * 0.6 / len(stages)
        nxt = np.concatenate([prev, prev[idx] - delta])
        nxt[idx] += delta
        stages.append(nxt.astype(np.float32))
    np.savez(d / "codebook_stages.npz", ks=np.array(ks, np.int64), codebooks=np.concatenate(stages))
    rows, step, seen = [], 0, 0
    for s, k in enumerate(ks):
        for j in range(3):
            step += 1
            seen += 256
            rows.append({"method": "lbg", "stage": s, "step": step, "k": k, "frames_seen": seen,
                         "wall_seconds": 0.01 * step, "loss": 10.0 / (1 + s) + 0.3 / (1 + j),
                         "entropy": np.log(k) * (0.8 + 0.05 * j), "log_k": np.log(k),
                         "utilisation": min(1.0, 0.7 + 0.1 * j), "dead": 0, "repaired": 0, "shifted": 0,
                         "imbalance": 1.0})
    rows.append({**rows[-1], "step": step + 1, "frames_seen": seen + 5000, "loss": rows[-1]["loss"] * 0.9,
                 "pass": 1})
    cols = list(rows[0]) + ["pass"]
    with open(d / ("history.csv" if legacy else "fit_history.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return d, stages


def write_trace(align_dir, uid="utt_a", n_iter=4, T=60, seed=0, words=("the", "cat")):
    """ALIGN_DIR/traces/ID.npz as `streamq align --plot N` writes it."""
    rng = np.random.default_rng(seed)
    chars = ["<sil>"] + [c for w in words for c in w] + ["<sil>"]
    labels = np.array([c for c in chars for _ in range(3)])
    S = len(labels)
    post = np.zeros((n_iter, T, S), np.float32)
    paths = np.zeros((n_iter, T), np.int32)
    for i in range(n_iter):
        # a monotone path that sharpens with the iterations
        p = np.minimum((np.arange(T) * S / T + rng.normal(scale=3.0 / (i + 1), size=T)).clip(0, S - 1), S - 1)
        p = np.maximum.accumulate(p.astype(np.int32))
        paths[i] = p
        post[i, np.arange(T), p] = 0.6 + 0.1 * i
        post[i] += rng.random((T, S)) * 0.05
    d = align_dir / "traces"
    d.mkdir(parents=True, exist_ok=True)
    step = 0.01
    ws = np.array([0.1, 0.32])
    np.savez(d / f"{uid}.npz", posteriors=post.astype(np.float16), paths=paths, state_labels=labels,
             frames=rng.normal(size=(T, 13)).astype(np.float32), loglik=np.linspace(-60, -50, n_iter),
             words=np.array(words), word_start=ws, word_end=ws + 0.2, frame_step=np.float64(step))
    return d / f"{uid}.npz"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """About 1 s of espeak-ng speech (22050 Hz, resampled by decode)."""
    d = tmp_path_factory.mktemp("clip")
    return espeak("the birch canoe", d / "clip.wav")


# ------------------------------------------------------------------ LBG
def test_lbg_order_doubling_puts_children_under_their_parent():
    C1 = np.array([[0.0], [5.0]], np.float32)              # stage of K = 2
    C2 = np.array([[0.1], [5.1], [-0.1], [4.9]], np.float32)  # split layout: k -> k ("+"), K + k ("-")
    o = plots.lbg_order([np.zeros((1, 1), np.float32), C1, C2])
    assert o[1].tolist() == [0, 1]
    assert o[2].tolist() == [0, 2, 1, 3]  # parent 0's copies, then parent 1's, "+" before "-"


def test_lbg_order_partial_stage_uses_the_nearest_parent():
    C1 = np.array([[5.0], [0.0]], np.float32)  # stage 0 ordered by c0: row order [1, 0]
    C2 = np.array([[5.2], [0.1], [4.8]], np.float32)  # only codeword 0 split; its "-" copy appended
    o = plots.lbg_order([C1, C2])
    assert o[0].tolist() == [1, 0]
    assert o[1].tolist() == [1, 0, 2]
    for order, C in zip(o, (C1, C2)):
        assert sorted(order.tolist()) == list(range(len(C)))


def test_animate_lbg_one_frame_per_stage(tmp_path):
    fit, stages = write_lbg_fit(tmp_path / "fit")
    out = plots.animate_lbg(fit, tmp_path / "lbg.gif", fps=2)
    frames = gif_frames(out)
    assert len(frames) == len(stages)
    assert_lively(frames)
    assert (tmp_path / "lbg.gif").stat().st_size < 5_000_000
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed


def test_animate_lbg_reads_what_fit_writes(tmp_path):
    from streamq.pipelines import run_fit

    rng = np.random.default_rng(1)
    X = (rng.normal(size=(4000, 4)) + rng.integers(0, 4, size=(4000, 1)) * 3.0).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    run_fit(tmp_path / "x.npy", tmp_path / "fit", n_clusters=12, verbose=0)  # 1, 2, 4, 8, 12
    ks, stages, _ = plots.load_lbg_stages(tmp_path / "fit")
    assert ks.tolist() == [1, 2, 4, 8, 12]
    # the last stage is recorded before LBG's final exact Lloyd passes, so it is close to, not equal to, the result
    assert [c.shape for c in stages] == [(k, 4) for k in ks] and stages[-1].dtype == np.float32
    frames = gif_frames(plots.animate_lbg(tmp_path / "fit", tmp_path / "lbg.gif"))
    assert len(frames) == 5
    assert_lively(frames)


@pytest.mark.parametrize("legacy", [False, True])
def test_load_lbg_stages_names_the_bad_field(tmp_path, legacy):
    fit, written = write_lbg_fit(tmp_path / "fit", legacy=legacy)
    ks, stages, records = plots.load_lbg_stages(fit)
    assert ks.tolist() == [1, 2, 4, 8, 16, 24] and [len(s) for s in stages] == ks.tolist()
    for a, b in zip(stages, written):
        np.testing.assert_array_equal(a, b)
    assert records[-1]["pass"] == 1 and np.isnan(records[0]["pass"])
    name = "codebook_stages.npz"
    np.savez(fit / name, ks=np.array([1, 2, 4]), codebooks=np.zeros((6, 5), np.float32))
    with pytest.raises(ValueError, match=rf"{name}: 'ks' \(sum 7\) does not match 'codebooks' \(\(6, 5\)\)"):
        plots.load_lbg_stages(fit)
    (fit / name).write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(ValueError, match=rf"{name}: cannot read .*damaged"):
        plots.load_lbg_stages(fit)
    (fit / name).unlink()
    with pytest.raises(ValueError, match="codebook_stages.npz: not found; per-stage codebooks are written by"):
        plots.load_lbg_stages(fit)
    write_lbg_fit(tmp_path / "fit", legacy=legacy)
    (fit / ("history.csv" if legacy else "fit_history.csv")).unlink()
    with pytest.raises(ValueError, match="fit_history.csv: not found"):
        plots.load_lbg_stages(fit)


# ------------------------------------------------------------------ MFCC
def test_mfcc_stages_equal_what_ingest_stores(clip):
    for cfg in (FeatureConfig(), FeatureConfig(sample_rate=22050, numcep=20, nfilt=40),
                FeatureConfig(append_energy=False, preemph=0.0, lowfreq=100, highfreq=6000)):
        st = plots.mfcc_stages(decode(clip, cfg.sample_rate), cfg)
        X, _ = extract(clip, cfg)
        assert st["mfcc"].dtype == np.float32
        np.testing.assert_allclose(st["mfcc"], X, rtol=0, atol=0)
        T = len(X)
        assert st["frames"].shape == (T, cfg.window_samples) and st["fbank"].shape == (T, cfg.nfilt)
        assert st["power"].shape == (T, cfg.fft_size // 2 + 1)
        np.testing.assert_allclose(st["log_fbank"], np.log(st["fbank"]))


def test_mfcc_figure_last_frame_image_is_the_stored_matrix(clip):
    cfg = FeatureConfig()
    st = plots.mfcc_stages(decode(clip, cfg.sample_rate), cfg)
    X, _ = extract(clip, cfg)
    fig, draw, idx, img = plots.mfcc_figure(st, cfg, max_frames=7)
    try:
        assert len(idx) == 7 and idx[0] == 0 and idx[-1] == len(X) - 1
        draw(3)
        part = np.ma.filled(img.get_array(), np.nan)
        j = idx[3]
        np.testing.assert_array_equal(part[:, :j + 1], X[:j + 1].T)
        assert np.isnan(part[:, j + 1:]).all()
        draw(len(idx) - 1)
        np.testing.assert_allclose(np.ma.filled(img.get_array(), np.nan), X.T, rtol=0, atol=0)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_animate_mfcc_caps_the_frames(clip, tmp_path):
    out = plots.animate_mfcc(clip, tmp_path / "mfcc.gif", max_frames=6, fps=5)
    frames = gif_frames(out)
    assert len(frames) == 6
    assert_lively(frames)


def test_frame_subsample():
    assert plots.frame_subsample(5, 120).tolist() == [0, 1, 2, 3, 4]
    for n, cap in ((1000, 120), (121, 120), (7, 2), (50, 1)):
        i = plots.frame_subsample(n, cap)
        assert 1 <= len(i) <= cap and i[-1] == n - 1 and np.all(np.diff(i) > 0)
        if cap > 1:
            assert i[0] == 0
    with pytest.raises(ValueError):
        plots.frame_subsample(10, 0)


# ------------------------------------------------------------------ DFT
def test_dft_basis_is_the_seed_formula():
    B = plots.dft_basis(64, 8000, 100)
    k = np.linspace(100, 4000, 64, endpoint=False)
    n = np.arange(64)
    assert B.shape == (64, 64)
    np.testing.assert_allclose(B[5], np.exp(-2j * np.pi * k[5] * n / 8000))
    np.testing.assert_allclose(np.abs(B), 1.0)
    with pytest.raises(ValueError, match="low"):
        plots.dft_basis(64, 8000, 4000)


def test_plot_dft_renders(tmp_path):
    p = plots.plot_dft(tmp_path / "dft.png", size=128)
    a = np.asarray(Image.open(p).convert("L"), np.float64)
    assert a.shape[0] > 300 and a.var() > VAR_FLOOR


# ------------------------------------------------------------------ alignment over EM
def test_animate_alignment_one_frame_per_iteration(tmp_path):
    write_trace(tmp_path / "align", "utt_a", n_iter=5)
    out = plots.animate_alignment(tmp_path / "align", "utt_a", tmp_path / "a.gif")
    frames = gif_frames(out)
    assert len(frames) == 5
    assert_lively(frames)


def test_animate_alignment_reads_what_align_writes(tmp_path):
    from streamq.pipelines import run_align
    from streamq.store import FrameStore
    from test_align import TEXTS, synth_model, synth_utt

    rng = np.random.default_rng(3)
    means, var = synth_model()
    store = FrameStore.create(tmp_path / "store", dim=means.shape[1], feature_config={"winlen": 0.025,
                                                                                       "winstep": 0.01})
    store.append([{"id": f"u{i}", "frames": synth_utt(t, means, rng)[0], "transcript": t} for i, t in enumerate(TEXTS)])
    (tmp_path / "gmm").mkdir()
    np.savez(tmp_path / "gmm" / "gmm.npz", weights=np.ones(len(means)) / len(means), means=means, variances=var)
    run_align(tmp_path / "store", tmp_path / "gmm", tmp_path / "align", iters=4, plots=2, verbose=0)
    tr = plots.load_trace(plots.trace_path(tmp_path / "align", "u1"))
    assert tr["posteriors"].shape[0] == 4
    frames = gif_frames(plots.animate_alignment(tmp_path / "align", "u1", tmp_path / "u1.gif"))
    assert len(frames) == 4
    assert_lively(frames)


def test_alignment_trace_lookup_and_bad_fields(tmp_path):
    p = write_trace(tmp_path / "align", "cv_1-x", n_iter=2)
    assert plots.trace_path(tmp_path / "align", "cv_1-x") == p
    write_trace(tmp_path / "align", "a_b", n_iter=2)
    assert plots.trace_path(tmp_path / "align", "a b").name == "a_b.npz"  # the file-safe form of the id
    with pytest.raises(ValueError, match=r"no trace for utterance 'nope'; traced: a_b, cv_1-x"):
        plots.trace_path(tmp_path / "align", "nope")
    with np.load(p) as z:
        d = dict(z)
    d["paths"] = d["paths"][:, :-1]
    np.savez(p, **d)
    with pytest.raises(ValueError, match=r"field 'paths' has shape \(2, 59\), expected \(2, 60\)"):
        plots.load_trace(p)
    np.savez(p, **{**d, "posteriors": d["posteriors"][:0], "paths": d["paths"][:0, :-1], "loglik": d["loglik"][:0]})
    with pytest.raises(ValueError, match="no EM iterations recorded"):
        plots.load_trace(p)
    del d["loglik"]
    np.savez(p, **d)
    with pytest.raises(ValueError, match="missing field 'loglik'"):
        plots.load_trace(p)


def test_state_ticks_one_per_symbol():
    ticks, names = plots._state_ticks(["<sil>"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3)
    assert ticks == [1, 4, 7, 10] and names == ["<sil>", "a", "b", "a"]
    # the aligner's labels carry the state number: a repeated letter is two symbols
    labels = ["<sil>", "t0", "t1", "t2", "e0", "e1", "e2", "e0", "e1", "e2", "<sil>", "10", "11"]
    ticks, names = plots._state_ticks(labels)
    assert names == ["<sil>", "t", "e", "e", "<sil>", "1"] and ticks == [0, 2, 5, 8, 10, 11.5]


def test_read_ctm_and_plot_segmentation(tmp_path):
    ctm = tmp_path / "words.ctm"
    ctm.write_text("a 1 0.00 0.20 the 0.56\nb 1 0.10 0.30 x\na 1 0.20 0.25 cat\n")  # confidence optional
    assert plots.read_ctm(ctm, ["a", "zz"]) == {"a": [(0.0, 0.2, "the"), (0.2, 0.45, "cat")]}
    for bad in ("a 1 oops", "a 1 0.1 0.2 the high", "a 1 0.1 0.2 the 0.5 extra"):
        ctm.write_text("a 1 0.00 0.20 the\n" + bad + "\n")
        with pytest.raises(ValueError, match=r"words\.ctm:2: expected 'id channel start duration label \[confidence\]'"):
            plots.read_ctm(ctm, ["a"])
    X = np.random.default_rng(0).normal(size=(50, 13)).astype(np.float32)
    p = plots.plot_segmentation(X, [(0.0, 0.2, "the"), (0.2, 0.45, "cat")],
                                [(0.05 * k, 0.05 * (k + 1), c) for k, c in enumerate("thecat")], tmp_path / "s.png")
    assert np.asarray(Image.open(p).convert("L"), np.float64).var() > VAR_FLOOR


# ------------------------------------------------------------------ formats
def test_mp4_needs_ffmpeg_and_suffix_must_match(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg here
    fit, _ = write_lbg_fit(tmp_path / "fit")
    with pytest.raises(RuntimeError, match="MP4 needs ffmpeg on the PATH"):
        plots.animate_lbg(fit, tmp_path / "lbg.mp4")
    assert not (tmp_path / "lbg.mp4").exists()
    with pytest.raises(ValueError, match="as .gif or .mp4, not .png"):
        plots.animate_lbg(fit, tmp_path / "lbg.png")
    with pytest.raises(ValueError, match="fps must be > 0"):
        plots.animate_lbg(fit, tmp_path / "lbg.gif", fps=0)
    assert not list(tmp_path.glob("*.gif")) and not list(tmp_path.glob(".*"))


def mp4_frames(path, tmp):
    """(frame count, grey-level last frame) of an MP4, read back with ffprobe / ffmpeg."""
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:  # a failure, never a skip
        raise RuntimeError("ffmpeg is required by the MP4 tests (scripts/test installs it)")
    n = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                        "stream=nb_read_frames", "-of", "csv=p=0", str(path)], capture_output=True, text=True,
                       check=True).stdout.strip()
    last = tmp / "last.png"
    subprocess.run(["ffmpeg", "-v", "error", "-sseof", "-0.5", "-i", str(path), "-update", "1", "-y", str(last)],
                   check=True, capture_output=True)
    return int(n), np.asarray(Image.open(last).convert("L"), np.float64)


def test_mp4_with_ffmpeg(tmp_path):
    fit, stages = write_lbg_fit(tmp_path / "fit")
    out = plots.animate_lbg(fit, tmp_path / "lbg.mp4", fps=2)
    n, last = mp4_frames(out, tmp_path)
    assert n == len(stages) and last.var() > VAR_FLOOR
    write_trace(tmp_path / "align", "u", n_iter=3, T=61)  # an odd figure size is padded to even sides
    n, last = mp4_frames(plots.animate_alignment(tmp_path / "align", "u", tmp_path / "a.mp4"), tmp_path)
    assert n == 3 and last.var() > VAR_FLOOR


# ------------------------------------------------------------------ the CLI
def test_cli_plot_commands(tmp_path, clip, capsys):
    fit, stages = write_lbg_fit(tmp_path / "fit")
    assert main(["plot", "lbg", str(fit), str(tmp_path / "l.gif"), "--fps", "4"]) == 0
    assert len(gif_frames(tmp_path / "l.gif")) == len(stages)
    assert str(tmp_path / "l.gif") in capsys.readouterr().out
    assert main(["plot", "dft", str(tmp_path / "d.png"), "--size", "64", "--rate", "8000", "--low", "20"]) == 0
    assert Image.open(tmp_path / "d.png").size[0] > 500
    write_trace(tmp_path / "align", "u1", n_iter=3)
    assert main(["plot", "align", str(tmp_path / "align"), "u1", str(tmp_path / "a.gif")]) == 0
    assert len(gif_frames(tmp_path / "a.gif")) == 3
    assert main(["plot", "mfcc", str(clip), str(tmp_path / "m.gif"), "--max-frames", "4"]) == 0
    assert len(gif_frames(tmp_path / "m.gif")) == 4


def test_cli_plot_errors_are_one_line(tmp_path, capsys, monkeypatch):
    fit, _ = write_lbg_fit(tmp_path / "fit")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["plot", "lbg", str(fit), str(tmp_path / "l.mp4"), "--format", "mp4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ffmpeg" in err
    assert main(["plot", "lbg", str(fit), str(tmp_path / "l.gif"), "--format", "mp4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--format mp4" in err and ".gif" in err
    assert main(["plot", "align", str(tmp_path), "x", str(tmp_path / "a.gif")]) == 1
    assert "no trace for utterance 'x'" in capsys.readouterr().err


def test_cli_plot_help_states_defaults():
    import argparse

    from streamq.cli import build_parser

    def subparsers(p):
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices

    top = subparsers(build_parser())
    parsers = [top["report"]] + list(subparsers(top["plot"]).values())
    assert sorted(subparsers(top["plot"])) == ["align", "dft", "lbg", "mfcc"]
    for p in parsers:
        for a in p._actions:
            if a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and a.dest != "help":
                assert "default" in (a.help or ""), f"{p.prog} {a.option_strings[0]}: default missing in help"

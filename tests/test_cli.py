"""The command line in a terminal: logs never break a progress bar, defaults in --help, locked and clean
outputs, quantise against NumPy."""

import argparse
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest
import zarr

from streamq import artifacts as af
from streamq.cli import build_parser
from streamq.pipelines import run_fit, run_quantise
from streamq.store import FrameStore, StoreError


def _cli(*args):
    return [sys.executable, "-m", "streamq.cli", *map(str, args)]


def small_store(path, n_utt=12, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(6, 3)) * 4
    st = FrameStore.create(path, dim=3, chunk_frames=256, feature_config={"winlen": 0.025, "winstep": 0.01})
    utts = []
    for i in range(n_utt):
        T = int(rng.integers(60, 120))
        X = means[rng.integers(0, 6, T)] + rng.normal(size=(T, 3)) * 0.5
        utts.append({"id": f"u{i:02d}", "frames": X.astype(np.float32), "transcript": ["ab cd", "dab", "cab a"][i % 3],
                     "duration": T * 0.01})
    with st.writer_lock():
        st.append(utts)
    return path, means


def test_every_option_default_is_in_help():
    def walk(p, name):
        for act in p._actions:
            if isinstance(act, argparse._SubParsersAction):
                for sub_name, sp in act.choices.items():
                    yield from walk(sp, f"{name} {sub_name}")
            elif act.option_strings and act.default not in (None, False, argparse.SUPPRESS) \
                    and not isinstance(act, argparse._HelpAction):
                yield name, act
    missing = [(n, a.option_strings[0]) for n, a in walk(build_parser(), "streamq")
               if "default" not in (a.help or "")]
    assert not missing, missing


def _run_in_pty(argv, timeout=240):
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; the raw bytes it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # a 100-column terminal
    env = dict(os.environ, COLUMNS="100", TERM="xterm")
    p = subprocess.Popen(argv, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    p.wait(timeout=10)
    os.close(master)
    return p.returncode, out.decode("utf-8", "replace")


def test_log_lines_never_break_a_progress_bar(tmp_path):
    store, means = small_store(tmp_path / "store")
    model = tmp_path / "gmm"
    model.mkdir()
    np.savez(model / "gmm.npz", weights=np.ones(6), means=means, variances=np.ones((6, 3)))
    rc, out = _run_in_pty(_cli("align", store, model, tmp_path / "al", "--iters", "12"))
    assert rc == 0, out
    assert "align EM" in out and "%|" in out, "a live bar was drawn"
    log_lines = [seg for seg in out.replace("\r\n", "\n").split("\n") if "INFO align EM" in seg]
    assert len(log_lines) == 12
    for seg in log_lines:  # what is left on screen of that line starts with the log record, no bar before it
        visible = seg.split("\r")[-1]
        assert visible.startswith("INFO align EM"), repr(seg)


def test_fit_outputs_are_locked_checked_and_clean(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(4000, 3)).astype(np.float32))
    out = tmp_path / "fit"
    with af.locked_dir(out, "fit"):  # another command is writing into OUT
        with pytest.raises(ValueError, match="streamq fit .* is writing into this directory"):
            run_fit(tmp_path / "x.npy", out, n_clusters=8, verbose=0)
    run_fit(tmp_path / "x.npy", out, n_clusters=8, verbose=0)
    with pytest.raises(ValueError, match="cannot resume with different settings.*'k': \\(8, 16\\)"):
        run_fit(tmp_path / "x.npy", out, n_clusters=16, verbose=0, resume=True)
    assert np.load(out / "codebook.npy").shape == (8, 3)  # the refused run touched nothing
    # a failure before any result leaves no output directory behind
    with pytest.raises(ValueError, match="larger than the number of frames"):
        run_fit(tmp_path / "x.npy", tmp_path / "never", n_clusters=5000, verbose=0)
    X = rng.normal(size=(50000, 3)).astype(np.float32)
    X[-1, 0] = np.nan  # found while streaming, after training started
    np.save(tmp_path / "bad.npy", X)
    with pytest.raises(StoreError, match="NaN"):
        run_fit(tmp_path / "bad.npy", tmp_path / "half", n_clusters=8, verbose=0)
    assert not (tmp_path / "never").exists() and not (tmp_path / "half").exists()


def test_estimator_refuses_a_foreign_checkpoint(tmp_path):
    from streamq import LBG

    X = np.random.default_rng(1).normal(size=(3000, 2)).astype(np.float32)
    ck = tmp_path / "ck.npz"
    LBG(4, checkpoint=str(ck)).fit(X)
    with pytest.raises(ValueError, match="checkpoint was made with other settings.*n_clusters"):
        LBG(8, checkpoint=str(ck), resume=True).fit(X)
    np.testing.assert_array_equal(LBG(4, checkpoint=str(ck), resume=True).fit(X).codebook_,
                                  LBG(4).fit(X).codebook_)


def test_quantise_matches_numpy(tmp_path):
    store, _ = small_store(tmp_path / "store", n_utt=40)
    rng = np.random.default_rng(2)
    C = (rng.normal(size=(10, 3)) * 3).astype(np.float32)
    st = FrameStore.open(store)
    X = st.read(0, st.n_frames)
    cb = tmp_path / "cb"
    cb.mkdir()
    np.save(cb / "codebook.npy", C)
    r = subprocess.run(_cli("quantise", store, cb, tmp_path / "q.zarr", "--quiet"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    g = zarr.open_group(str(tmp_path / "q.zarr"), mode="r")
    labels, d2 = g["labels"][:], g["d2"][:]
    assert labels.dtype == np.int32 and d2.dtype == np.float32 and len(labels) == st.n_frames
    assert g["labels"].chunks == (st.chunk_frames,) and g["labels"].metadata.dimension_names == ("frame",)
    ref = ((X.astype(np.float64)[:, None] - C.astype(np.float64)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, ref.argmin(1))
    np.testing.assert_allclose(d2, ref.min(1), rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "q.zarr.partial").exists()
    with pytest.raises(ValueError, match="already exists"):
        run_quantise(store, cb, tmp_path / "q.zarr", verbose=0)


def test_damaged_model_files_are_named(tmp_path):
    store, means = small_store(tmp_path / "store")
    d = tmp_path / "m"
    d.mkdir()
    (d / "gmm.npz").write_bytes(b"PK\x03\x04 not really a zip")
    r = subprocess.run(_cli("align", store, d, tmp_path / "al", "--quiet"), capture_output=True, text=True)
    assert r.returncode == 1 and f"{d / 'gmm.npz'}: cannot read" in r.stderr and r.stderr.count("\n") == 1
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(3000, 3)).astype(np.float32))
    out = tmp_path / "fit"
    out.mkdir()
    (out / "fit_checkpoint.npz").write_bytes(b"\x00" * 100)
    r = subprocess.run(_cli("fit", tmp_path / "x.npy", out, "--k", "4", "--resume", "--quiet"), capture_output=True,
                       text=True)
    assert r.returncode == 1 and "fit_checkpoint.npz: cannot read" in r.stderr, r.stderr
    (d / "gmm.npz").unlink()
    np.save(d / "codebook.npy", np.full((4, 3), np.nan, np.float32))
    r = subprocess.run(_cli("gmm", store, d, tmp_path / "g", "--quiet"), capture_output=True, text=True)
    assert r.returncode == 1 and "codebook.npy: codebook holds NaN" in r.stderr
    assert not (tmp_path / "g").exists() and not (tmp_path / "al").exists()


@pytest.mark.parametrize("eps", ["nan", "inf", "-1"])
def test_bad_eps_is_refused(tmp_path, eps):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(3000, 3)).astype(np.float32))
    r = subprocess.run(_cli("fit", tmp_path / "x.npy", tmp_path / "o", "--k", "4", "--eps", eps, "--quiet"),
                       capture_output=True, text=True)
    assert r.returncode == 1 and "--eps must be a finite number > 0" in r.stderr

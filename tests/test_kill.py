"""Kill anywhere: fit, gmm and align SIGKILLed at seeded random moments, then the same command again (with
``--resume`` where the command has checkpoints), end with the bytes of an uninterrupted run.

(Ingest has its own kill tests in test_ingest.py; scripts/soak_kill.py runs the long version of all four.)
"""

import filecmp
import subprocess
import sys
import time

import numpy as np
import pytest

from streamq.store import FrameStore

KILLS = 8


def _cli(*args):
    return [sys.executable, "-m", "streamq.cli", *map(str, args), "--quiet"]


def _run(argv):
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def kill_then_finish(first, rerun, n_kills, wall, seed):
    """Start ``first``, SIGKILL it after U(0, wall) s; repeat with ``rerun`` ``n_kills`` times, then run
    ``rerun`` to the end. Returns how many runs were really killed (not finished before their time)."""
    rng = np.random.default_rng(seed)
    killed = 0
    for k in range(n_kills):
        p = subprocess.Popen(first if k == 0 else rerun, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + rng.uniform(0.2, wall)
        while p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if p.poll() is None:
            p.kill()
            killed += 1
        p.wait()
        if p.returncode not in (0, -9):
            raise AssertionError(f"run {k} failed: {p.stderr.read().decode()}")
    _run(rerun)
    return killed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    rng = np.random.default_rng(0)
    C = rng.normal(size=(40, 6)) * 4
    X = (C[rng.integers(0, 40, 80000)] + rng.normal(size=(80000, 6))).astype(np.float32)
    np.save(root / "x.npy", X)
    st = FrameStore.create(root / "store", dim=6, chunk_frames=2048, feature_config={"winlen": 0.025, "winstep": 0.01})
    texts = ["ab cd", "dab ca", "cab", "bad dc a"]
    with st.writer_lock():
        st.append([{"id": f"u{i:03d}", "frames": X[i * 400:(i + 1) * 400], "transcript": texts[i % 4],
                    "duration": 4.0} for i in range(200)])
    return root


def _timed(argv):
    t0 = time.perf_counter()
    _run(argv)
    return time.perf_counter() - t0


def test_fit_killed_anywhere(data, tmp_path):
    args = ("fit", data / "x.npy", None, "--k", 64, "--seed", 3, "--batch-size", 2048)
    wall = _timed(_cli(*[a if a is not None else tmp_path / "clean" for a in args]))
    out = tmp_path / "killed"
    argv = _cli(*[a if a is not None else out for a in args])
    killed = kill_then_finish(argv, argv + ["--resume"], KILLS, wall, seed=1)
    assert killed >= KILLS // 2
    for f in ("codebook.npy", "codebook_counts.npy", "codebook_stages.npz"):
        assert filecmp.cmp(out / f, tmp_path / "clean" / f, shallow=False), f
    assert not list(out.glob(".*.tmp*"))


def test_gmm_killed_anywhere(data, tmp_path):
    _run(_cli("fit", data / "store", tmp_path / "cb", "--k", 32, "--seed", 0))
    args = ("gmm", data / "store", tmp_path / "cb", None, "--iters", 6)
    wall = _timed(_cli(*[a if a is not None else tmp_path / "clean" for a in args]))
    out = tmp_path / "killed"
    argv = _cli(*[a if a is not None else out for a in args])
    killed = kill_then_finish(argv, argv + ["--resume"], KILLS, wall, seed=2)
    assert killed >= KILLS // 2
    a, b = np.load(out / "gmm.npz"), np.load(tmp_path / "clean" / "gmm.npz")
    for k in ("weights", "means", "variances", "iteration"):
        np.testing.assert_array_equal(a[k], b[k])


def test_align_killed_anywhere(data, tmp_path):
    _run(_cli("fit", data / "store", tmp_path / "cb", "--k", 32, "--seed", 0))
    args = ("align", data / "store", tmp_path / "cb", None, "--iters", 8, "--plot", 1)
    wall = _timed(_cli(*[a if a is not None else tmp_path / "clean" for a in args]))
    out = tmp_path / "killed"
    argv = _cli(*[a if a is not None else out for a in args])
    killed = kill_then_finish(argv, argv, KILLS, wall, seed=3)
    assert killed >= KILLS // 2
    for f in ("words.ctm", "chars.ctm", "unaligned.tsv", "textgrids/u000.TextGrid", "textgrids/u199.TextGrid"):
        assert filecmp.cmp(out / f, tmp_path / "clean" / f, shallow=False), f
    np.testing.assert_array_equal(np.load(out / "aligner.npz")["unit_weights"],
                                  np.load(tmp_path / "clean" / "aligner.npz")["unit_weights"])

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from streamq.codebook import LBG, MiniBatchLloyd, RandomSample, evaluate, plan_shifts
from streamq.pipelines import run_compare, run_fit
from streamq.store import StoreError


def blobs(rng, n_clusters=32, n=40000, d=13, spread=5.0, noise=0.3):
    centers = (rng.normal(size=(n_clusters, d)) * spread).astype(np.float32)
    X = centers[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, d)).astype(np.float32) * noise
    return centers, X.astype(np.float32)


def full_loss(C, X):
    d = ((X.astype(np.float64)[:, None, :] - C.astype(np.float64)[None]) ** 2).sum(-1)
    return d.min(1).mean()


def lloyd_step_reference(C, X):
    d = ((X.astype(np.float64)[:, None, :] - C.astype(np.float64)[None]) ** 2).sum(-1)
    lab = d.argmin(1)
    out = C.astype(np.float64).copy()
    for k in range(len(C)):
        if (lab == k).any():
            out[k] = X[lab == k].astype(np.float64).mean(0)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_lloyd_step_equals_reference_and_never_raises_loss(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(3000, 5)).astype(np.float32)
    C0 = X[rng.choice(3000, 40, replace=False)] + 0.1
    est = MiniBatchLloyd(40, decay=0.0, init=C0, repair=False)
    est.partial_fit(X)
    np.testing.assert_allclose(est.codebook_, lloyd_step_reference(C0, X), rtol=1e-5, atol=1e-5)
    assert full_loss(est.codebook_, X) <= full_loss(C0, X) + 1e-9


def test_lbg_recovers_well_separated_clusters():
    rng = np.random.default_rng(0)
    centers, X = blobs(rng, n_clusters=32)
    est = LBG(32, seed=0).fit(X)
    d = ((centers[:, None] - est.codebook_[None]) ** 2).sum(-1)
    assert (d.min(1) < 0.5).all(), "every true cluster has a codeword at its centre"
    optimum = 13 * 0.3 ** 2
    assert est.history_[-1]["loss"] < 1.15 * optimum
    assert est.codebook_.dtype == np.float32 and est.codebook_.shape == (32, 13)


def test_lbg_beats_random_and_any_k():
    rng = np.random.default_rng(1)
    _, X = blobs(rng, n_clusters=50, n=30000, d=4)
    lbg = LBG(100, seed=0).fit(X)
    assert lbg.codebook_.shape == (100, 4)
    assert [r["k"] for r in lbg.history_][-1] == 100
    assert lbg.stages() == [1, 2, 4, 8, 16, 32, 64, 100]
    rnd = RandomSample(100, seed=0).fit(X)
    assert lbg.history_[-1]["loss"] < rnd.history_[-1]["loss"]


@pytest.mark.parametrize("cls", [LBG, MiniBatchLloyd])
def test_same_seed_same_codebook(cls):
    rng = np.random.default_rng(2)
    _, X = blobs(rng, n_clusters=16, n=6000, d=4)
    kw = dict(batch_size=1024, eval_size=2000)
    a = cls(24, seed=3, **kw).fit(X).codebook_
    b = cls(24, seed=3, **kw).fit(X).codebook_
    c = cls(24, seed=4, **kw).fit(X).codebook_
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_k_larger_than_data_is_a_clear_error():
    X = np.zeros((10, 3), np.float32)
    for est in (LBG(11), MiniBatchLloyd(11), RandomSample(11)):
        with pytest.raises(ValueError, match=r"n_samples=10 should be >= n_clusters=11"):
            est.fit(X)


def test_nan_frames_named(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(5000, 3)).astype(np.float32)
    X[1234, 2] = np.inf
    X[4000, 0] = np.nan
    np.save(tmp_path / "x.npy", X)  # streamed from disk: the frames are named
    with pytest.raises(StoreError, match=r"2 frames with NaN or inf.*frame 1234, 4000"):
        LBG(8).fit(tmp_path / "x.npy")
    with pytest.raises(ValueError, match="NaN|infinity"):  # in memory: scikit-learn's check
        LBG(8).fit(X)


def test_edge_cases_k1_d1_n_equals_k():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(500, 1)).astype(np.float32)
    one = LBG(1).fit(X)
    np.testing.assert_allclose(one.codebook_[0, 0], X.mean(), atol=0.05)
    assert (one.predict(X) == 0).all()
    Y = rng.normal(size=(64, 2)).astype(np.float32)
    full = LBG(64, batch_size=64).fit(Y)
    assert full.codebook_.shape == (64, 2) and full.history_[-1]["loss"] < evaluate(Y.mean(0, keepdims=True), Y)["loss"]
    lab = MiniBatchLloyd(8, max_steps=5).fit(X).predict(X)
    assert lab.shape == (500,) and lab.dtype == np.int64


def test_dead_codewords_are_repaired():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(20000, 4)).astype(np.float32)
    C0 = X[:64].copy()
    C0[:10] += 1000.0  # ten codewords no frame will ever reach
    kw = dict(decay=0.9, init=C0, batch_size=1024, max_steps=400, seed=0)
    off = MiniBatchLloyd(64, repair=False, **kw).fit(X)
    on = MiniBatchLloyd(64, repair=True, **kw).fit(X)
    assert off.history_[-1]["dead"] >= 10 and off.n_repaired_ == 0
    assert on.history_[-1]["dead"] == 0 and on.n_repaired_ >= 10
    assert on.history_[-1]["loss"] < off.history_[-1]["loss"]
    assert on.history_[-1]["utilisation"] == 1.0


def test_plan_shifts_moves_redundant_codewords_to_merged_clusters():
    # two codewords on one cluster, one codeword over two far-apart clusters
    C = np.array([[0, 0], [0.01, 0], [10, 0]], np.float32)
    n = np.array([50.0, 50.0, 100.0])
    sse = np.array([5.0, 5.0, 100.0 * 25])
    movers, targets = plan_shifts(C, n, sse, max_moves=5)
    assert list(targets) == [2] and movers[0] in (0, 1)


def test_history_metrics_are_consistent():
    rng = np.random.default_rng(6)
    _, X = blobs(rng, n_clusters=8, n=10000, d=3)
    h = LBG(16).fit(X).history_
    for r in h:
        assert 0 <= r["entropy"] <= r["log_k"] + 1e-9
        assert 0 < r["utilisation"] <= 1 and r["imbalance"] >= 1 - 1e-9
    assert [r["frames_seen"] for r in h] == sorted(r["frames_seen"] for r in h)
    assert [r["wall_seconds"] for r in h] == sorted(r["wall_seconds"] for r in h)


def test_run_fit_files_and_compare(tmp_path):
    rng = np.random.default_rng(7)
    _, X = blobs(rng, n_clusters=8, n=8000, d=5)
    np.save(tmp_path / "x.npy", X)
    s = run_fit(tmp_path / "x.npy", tmp_path / "fit", n_clusters=16, method="lbg", verbose=0)
    C = np.load(tmp_path / "fit" / "codebook.npy")
    assert C.shape == (16, 5) and C.dtype == np.float32
    cfg = json.loads((tmp_path / "fit" / "fit_config.json").read_text())
    assert cfg["k"] == 16 and cfg["method"] == "lbg"
    header = (tmp_path / "fit" / "fit_history.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "entropy", "log_k", "utilisation", "dead", "repaired", "imbalance", "frames_seen",
            "wall_seconds"} <= set(header)
    c = run_compare(tmp_path / "x.npy", tmp_path / "cmp", n_clusters=16, verbose=0)
    for f in ("compare_history.csv", "loss_vs_steps.png", "loss_vs_wall.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 1000
    methods = {line.split(",")[0] for line in (tmp_path / "cmp" / "compare_history.csv").read_text().splitlines()[1:]}
    assert methods == {"random", "lloyd", "lbg"}
    assert c["methods"]["lbg"]["loss"] < c["methods"]["random"]["loss"]


def _cli(*args):
    return [sys.executable, "-m", "streamq.cli", *map(str, args)]


def test_resume_after_sigkilled_fit_is_identical(tmp_path):
    rng = np.random.default_rng(8)
    _, X = blobs(rng, n_clusters=64, n=60000, d=13)
    np.save(tmp_path / "x.npy", X)
    args = ("fit", tmp_path / "x.npy", None, "--k", 256, "--method", "lbg", "--quiet", "--seed", 1)
    clean = subprocess.run(_cli(*[a if a is not None else tmp_path / "clean" for a in args]), capture_output=True,
                           text=True)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "killed"
    p = subprocess.Popen(_cli(*[a if a is not None else out for a in args]), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    killed = False
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        ck = out / "fit_checkpoint.npz"
        if ck.exists():
            try:
                with np.load(ck) as z:
                    done = json.loads(str(z["extra"]))["stage_done"]
            except Exception:
                done = -1
            if done >= 5:
                p.send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.02)
    p.wait()
    assert killed, "fit finished before it could be killed"
    assert not (out / "codebook.npy").exists()
    r = subprocess.run(_cli(*[a if a is not None else out for a in args], "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(out / "codebook.npy"), np.load(tmp_path / "clean" / "codebook.npy"))


def test_cli_errors_exit_codes(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 2), np.float32))
    r = subprocess.run(_cli("fit", tmp_path / "x.npy", tmp_path / "o", "--k", 6), capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "--k 6 is larger than the number of frames (5)" in r.stderr
    r = subprocess.run(_cli("fit", tmp_path / "x.npy", tmp_path / "o"), capture_output=True, text=True)
    assert r.returncode == 2
    r = subprocess.run(_cli("fit", tmp_path / "nope.npy", tmp_path / "o", "--k", 2), capture_output=True, text=True)
    assert r.returncode == 1 and "nope.npy: file not found" in r.stderr


def test_evaluation_sample_is_held_out_of_training():
    from streamq.codebook import _sample_excluding, held_out
    from streamq.store import as_source

    X = np.arange(200000, dtype=np.float32).reshape(-1, 2)  # row i holds 2i, 2i+1: rows are identifiable
    src = as_source(X)
    H, idx = held_out(src, k=16, eval_size=5000, seed=0)
    assert idx is not None and len(H) == 5000
    np.testing.assert_array_equal(H, X[idx])
    init = _sample_excluding(src, 3000, seed=1, exclude=idx)
    assert not np.isin(init[:, 0], H[:, 0]).any() and len(np.unique(init[:, 0])) == 3000
    seen = np.concatenate(list(src.iter_minibatches(4096, seed=0, exclude=idx)))
    assert len(seen) == len(X) - 5000 and not np.isin(seen[:, 0], H[:, 0]).any()
    tiny = as_source(X[:100])  # too small to hold anything out for K = 16: evaluate on training frames
    H2, idx2 = held_out(tiny, k=16, eval_size=5000, seed=0)
    assert idx2 is None and len(H2) == 100


def test_lbg_repairs_codewords_that_win_nothing():
    rng = np.random.default_rng(9)
    X = rng.normal(size=(30000, 2)).astype(np.float32)
    X[:40] += 50.0  # a tiny far-away cluster: the codeword split onto it starves its twin
    est = LBG(64, seed=0, batch_size=2048).fit(X)
    assert est.history_[-1]["dead"] == 0
    labels = est.predict(X)
    assert len(np.unique(labels)) == 64


def test_final_lloyd_passes_never_raise_the_training_loss():
    rng = np.random.default_rng(10)
    _, X = blobs(rng, n_clusters=40, n=20000, d=3, spread=2.0, noise=0.5)
    a = LBG(32, seed=0, n_passes=0, eval_size=2000).fit(X)
    b = LBG(32, seed=0, n_passes=1, eval_size=2000).fit(X)
    np.testing.assert_array_equal(a.history_[-1]["k"], 32)
    train = np.delete(X, b._exclude, axis=0)
    assert full_loss(b.codebook_, train) <= full_loss(a.codebook_, train) + 1e-6
    assert b.history_[-1]["pass"] == 1 and b.counts_.sum() == len(train)


def test_lbg_keeps_every_stage_and_the_last_is_the_final_codebook():
    rng = np.random.default_rng(11)
    _, X = blobs(rng, n_clusters=20, n=8000, d=3)
    est = LBG(20, seed=0).fit(X)
    assert [len(c) for c in est.stage_codebooks_] == est.stages() == [1, 2, 4, 8, 16, 20]
    np.testing.assert_array_equal(est.stage_codebooks_[-1], est.codebook_)
    np.testing.assert_allclose(est.stage_codebooks_[0][0], X.mean(0), atol=0.1)

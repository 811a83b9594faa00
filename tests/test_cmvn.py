"""CMVN: statistics and normalisation against NumPy, per utterance and per speaker, and the cmvn command."""

import numpy as np
import pytest

from streamq.cmvn import apply_cmvn, cmvn_stats, groups_of
from streamq.pipelines import run_cmvn
from streamq.store import FrameStore


def corpus(tmp_path, offset=0.0):
    rng = np.random.default_rng(0)
    st = FrameStore.create(tmp_path / "store", dim=3, chunk_frames=64)
    utts = []
    for i in range(9):
        spk = ["a", "b", ""][i % 3]
        T = int(rng.integers(20, 90))
        X = rng.normal(size=(T, 3)) * (1 + i) + (5 * i + offset)
        X[:, 2] = 7.0 if i == 4 else X[:, 2]  # a constant dimension in one utterance
        utts.append({"id": f"u{i}", "frames": X.astype(np.float32), "transcript": "ab", "speaker": spk,
                     "duration": T * 0.01})
    with st.writer_lock():
        st.append(utts)
    return tmp_path / "store", utts


@pytest.mark.parametrize("per", ["utterance", "speaker"])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_cmvn_matches_numpy(tmp_path, per, offset):
    path, utts = corpus(tmp_path, offset)
    g = groups_of(len(utts), [u["speaker"] for u in utts], per)
    if per == "speaker":
        assert g[0] == g[3] and g[1] == g[4] and len(set(g[[2, 5, 8]])) == 3  # no speaker: its own group
    mean, std = cmvn_stats([[(i, u["frames"]) for i, u in enumerate(utts)]], g, 3)
    for k in range(g.max() + 1):
        X = np.concatenate([u["frames"] for i, u in enumerate(utts) if g[i] == k]).astype(np.float64)
        np.testing.assert_allclose(mean[k], X.mean(0), rtol=1e-12)
        sd = X.std(0)
        np.testing.assert_allclose(std[k], np.where(sd > 0, sd, 1.0), rtol=1e-6)
    out = run_cmvn(path, tmp_path / "norm", per=per, verbose=0)
    st = FrameStore.open(tmp_path / "norm")
    assert st.ids == [u["id"] for u in utts] and st.speakers == [u["speaker"] for u in utts]
    assert st.feature_config["cmvn"]["per"] == per and out["groups"] == g.max() + 1
    for i, u in enumerate(utts):
        Y = st.utterance(i)[0]
        np.testing.assert_allclose(Y, apply_cmvn(u["frames"], mean[g[i]], std[g[i]]), rtol=1e-6, atol=1e-6)
    if per == "utterance":
        Y = st.utterance(1)[0].astype(np.float64)
        np.testing.assert_allclose(Y.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(Y.std(0), 1, atol=1e-4)
        assert np.isfinite(st.utterance(4)[0]).all()


def test_cmvn_resumes_and_refuses_a_foreign_output(tmp_path):
    path, utts = corpus(tmp_path)
    run_cmvn(path, tmp_path / "a", verbose=0)
    again = run_cmvn(path, tmp_path / "a", verbose=0)  # finished: nothing to add
    assert FrameStore.open(tmp_path / "a").n_utterances == len(utts) == again["utterances"]
    with pytest.raises(ValueError, match="must be a new store"):
        run_cmvn(tmp_path / "a", tmp_path / "a", verbose=0)
    with pytest.raises(ValueError, match="different feature config"):  # another source, another config
        run_cmvn(path, tmp_path / "a", per="utterance", verbose=0)

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import make_cv
from streamq.features import FeatureConfig, extract
from streamq.ingest import CorpusError, discover, ingest, rejects_path
from streamq.store import FrameStore, StoreError


@pytest.fixture(scope="module")
def cv(tmp_path_factory, speech_dir):
    return make_cv(tmp_path_factory.mktemp("cv"), speech_dir)


def test_common_voice_ingest_matches_direct_extraction(cv, tmp_path):
    s = ingest(cv, tmp_path / "st", jobs=2, quiet=True)
    assert s["added"] == 6 and s["rejected"] == 0
    st = FrameStore.open(tmp_path / "st")
    assert st.ids == [f"common_voice_en_{i:04d}" for i in range(6)]
    assert st.transcripts[2] == "It is easy to tell the depth of a well."
    f, _ = st.utterance(3)
    ref, dur = extract(cv / "clips" / "common_voice_en_0003.mp3", FeatureConfig())
    np.testing.assert_array_equal(f, ref)
    assert st.feature_config["numcep"] == 13 and st.feature_config["sample_rate"] == 16000
    assert abs(st.durations[3] - dur) < 1e-9


def test_reingest_is_noop_and_jobs_agree(cv, tmp_path):
    ingest(cv, tmp_path / "a", jobs=1, quiet=True)
    ingest(cv, tmp_path / "b", jobs=2, quiet=True)
    a, b = FrameStore.open(tmp_path / "a"), FrameStore.open(tmp_path / "b")
    np.testing.assert_array_equal(a.read(0, a.n_frames), b.read(0, b.n_frames))
    s = ingest(cv, tmp_path / "a", jobs=2, quiet=True)
    assert s["added"] == 0 and s["skipped_existing"] == 6
    assert FrameStore.open(tmp_path / "a").n_frames == a.n_frames


def test_shuffled_and_extra_columns(tmp_path, speech_dir):
    root = make_cv(tmp_path / "cv", speech_dir, n=3, shuffle_columns=True)
    header = (root / "validated.tsv").read_text().splitlines()[0].split("\t")
    assert header[0] != "client_id" and "extra_column" in header
    items = discover(root)
    assert [i.id for i in items] == [f"common_voice_en_{i:04d}" for i in range(3)]
    assert items[0].transcript.startswith("The birch canoe")


def test_split_and_missing_split(tmp_path, speech_dir):
    root = make_cv(tmp_path / "cv", speech_dir, n=2)
    (root / "train.tsv").write_text("path\tsentence\ncommon_voice_en_0001.mp3\thi\n")
    assert [i.id for i in discover(root, split="train")] == ["common_voice_en_0001"]
    with pytest.raises(CorpusError, match="split 'dev' not found"):
        discover(root, split="dev")


def test_bad_inputs_are_reported_and_skipped(tmp_path, speech_dir):
    import soundfile as sf

    extra = [{"path": "missing.mp3", "sentence": "gone"}, {"path": "corrupt.mp3", "sentence": "bad"},
             {"path": "truncated.mp3", "sentence": "cut"}, {"path": "empty.wav", "sentence": "nothing"},
             {"path": "tiny.wav", "sentence": "too short"}]
    root = make_cv(tmp_path / "cv", speech_dir, n=3, extra_rows=extra)
    (root / "clips" / "corrupt.mp3").write_bytes(b"ID3" + os.urandom(2000))
    good = (root / "clips" / "common_voice_en_0000.mp3").read_bytes()
    (root / "clips" / "truncated.mp3").write_bytes(good[:300])
    sf.write(root / "clips" / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(root / "clips" / "tiny.wav", np.zeros(50, np.float32), 16000)
    s = ingest(root, tmp_path / "st", quiet=True)
    rej = rejects_path(tmp_path / "st").read_text().splitlines()
    names = {r.split("\t")[0] for r in rej[1:]}
    assert {"missing", "corrupt", "empty", "tiny"} <= names
    assert s["added"] + s["rejected"] == 8
    st = FrameStore.open(tmp_path / "st")
    assert {"common_voice_en_0000", "common_voice_en_0001", "common_voice_en_0002"} <= set(st.ids)
    before = st.read(0, st.n_frames).copy()
    with pytest.raises(Exception, match="missing.mp3: file missing|corrupt.mp3|truncated.mp3|empty.wav|tiny.wav"):
        ingest(root, tmp_path / "st", strict=True, quiet=True)
    st = FrameStore.open(tmp_path / "st")
    np.testing.assert_array_equal(st.read(0, st.n_frames), before)


def test_directory_and_tsv_sources(tmp_path, speech_dir):
    d = tmp_path / "d" / "sub"
    d.mkdir(parents=True)
    for i in range(2):
        (d / f"x{i}.wav").write_bytes((speech_dir / f"utt{i}.wav").read_bytes())
    (d / "x1.txt").write_text("hello there\n")
    items = discover(tmp_path / "d")
    assert [(i.id, i.transcript) for i in items] == [("x0", ""), ("x1", "hello there")]
    tsv = tmp_path / "list.tsv"
    tsv.write_text(f"d/sub/x1.wav\tsome words\n{d / 'x0.wav'}\n")
    assert [(i.id, i.transcript) for i in discover(tsv)] == [("x1", "some words"), ("x0", "")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no audio files"):
        discover(tmp_path / "empty")
    with pytest.raises(CorpusError, match="no such file"):
        discover(tmp_path / "nope")


def test_different_config_refused(cv, tmp_path):
    ingest(cv, tmp_path / "st", quiet=True)
    with pytest.raises(StoreError, match="different feature config"):
        ingest(cv, tmp_path / "st", config=FeatureConfig(numcep=13, nfilt=40), quiet=True)


def test_resume_after_sigkill(tmp_path, speech_dir):
    """SIGKILL a real `streamq ingest` mid-run; re-running completes it with frames identical to a clean run."""
    root = make_cv(tmp_path / "cv", speech_dir, n=6)
    # many clips so the run takes a while: replicate the six
    tsv = (root / "validated.tsv").read_text().splitlines()
    header, rows = tsv[0], tsv[1:]
    path_col = header.split("\t").index("path")
    lines = [header]
    for rep in range(8):
        for r in rows:
            cols = r.split("\t")
            src = cols[path_col]
            dst = src.replace(".mp3", f"_{rep}.mp3")
            (root / "clips" / dst).write_bytes((root / "clips" / src).read_bytes())
            cols[path_col] = dst
            lines.append("\t".join(cols))
    (root / "validated.tsv").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "streamq.cli", "ingest", str(root), str(tmp_path / "killed"), "--quiet",
           "--chunk-frames", "1024"]
    env = dict(os.environ)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and p.poll() is None:
        zj = tmp_path / "killed" / "zarr.json"
        if zj.exists():
            try:
                n = FrameStore.open(tmp_path / "killed").n_utterances
            except Exception:
                n = 0
            if n >= 5:
                p.send_signal(signal.SIGKILL)
                killed_at = n
                break
        time.sleep(0.05)
    p.wait()
    assert killed_at is not None, "ingest finished before it could be killed; make the corpus larger"
    partial = FrameStore.open(tmp_path / "killed")
    assert 5 <= partial.n_utterances < 48
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ingest(root, tmp_path / "clean", chunk_frames=1024, quiet=True)
    a, b = FrameStore.open(tmp_path / "killed"), FrameStore.open(tmp_path / "clean")
    assert a.ids == b.ids and len(set(a.ids)) == 48
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.read(0, a.n_frames), b.read(0, b.n_frames))


def test_all_clips_rejected_is_an_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(3):
        (d / f"x{i}.mp3").write_bytes(b"not audio" * 10)
    with pytest.raises(Exception, match=r"all 3 clips were rejected \(first: .*x0.mp3: cannot decode"):
        ingest(d, tmp_path / "st", quiet=True)
    assert rejects_path(tmp_path / "st").read_text().count("\n") == 4

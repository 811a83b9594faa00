import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import assert_same_store, make_cv, replicate_cv
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
    assert [(i.id, i.transcript, i.speaker) for i in items] == [("sub/x0", "", "sub"), ("sub/x1", "hello there", "sub")]
    tsv = tmp_path / "list.tsv"
    tsv.write_text(f"d/sub/x1.wav\tsome words\n{d / 'x0.wav'}\n")
    assert [(i.id, i.transcript) for i in discover(tsv)] == [("d/sub/x1", "some words"), ("d/sub/x0", "")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no audio files"):
        discover(tmp_path / "empty")
    with pytest.raises(CorpusError, match="no such file"):
        discover(tmp_path / "nope")


def test_mfa_layout_ids_speakers_and_lab_transcripts(tmp_path, speech_dir):
    """spk1/001 and spk2/001 are two utterances; the speaker is the first directory level; .lab beats .txt."""
    root = tmp_path / "mfa"
    for spk, i in (("spk1", 0), ("spk2", 1), ("spk2/session b", 2)):
        (root / spk).mkdir(parents=True)
        (root / spk / "001.wav").write_bytes((speech_dir / f"utt{i}.wav").read_bytes())
    (root / "spk1" / "001.lab").write_text("\ufeffthe birch\ncanoe  slid\n")
    (root / "spk1" / "001.txt").write_text("not this one")
    (root / "spk2" / "001.txt").write_text("glue the sheet")
    (root / "top.wav").write_bytes((speech_dir / "utt3.wav").read_bytes())
    s = ingest(root, tmp_path / "st", quiet=True)
    assert s["added"] == 4 and s["rejected"] == 0
    st = FrameStore.open(tmp_path / "st")
    assert st.ids == ["spk1/001", "spk2/001", "spk2/session_b/001", "top"]
    assert st.speakers == ["spk1", "spk2", "spk2", ""]
    assert st.transcripts[:3] == ["the birch canoe slid", "glue the sheet", ""]
    assert st.paths[0] == os.path.abspath(root / "spk1" / "001.wav")
    assert st.utterance(0)[0].shape != st.utterance(1)[0].shape  # two clips, both kept


def test_tsv_bom_tab_in_transcript_speaker_column_and_whitespace_ids(tmp_path, speech_dir, caplog):
    for i in range(4):
        (tmp_path / f"c {i}.wav" if i == 3 else tmp_path / f"c{i}.wav").write_bytes(
            (speech_dir / f"utt{i}.wav").read_bytes())
    tsv = tmp_path / "list.tsv"
    tsv.write_bytes("\ufeffpath\tsentence\tspk\n"
                    "c0.wav\tthe birch canoe\talice\n"
                    "c1.wav\tglue the\tsheet\tbob\n"        # a tab inside the transcript
                    "c2.wav\tit is easy\tbob\n"
                    "c 3.wav\tthese days\tcarol\n".encode("utf-8"))
    items = discover(tsv)
    assert [i.id for i in items] == ["c0", "c1", "c2", "c_3"]
    assert items[1].error.endswith("list.tsv:3: 4 tab-separated fields but the header has 3 "
                                   "(a tab inside the transcript?); fix the row")
    assert "1 ids held whitespace, replaced by '_' (e.g. 'c 3' -> 'c_3')" in caplog.text
    s = ingest(tsv, tmp_path / "st", quiet=True)
    assert (s["added"], s["rejected"]) == (3, 1)
    st = FrameStore.open(tmp_path / "st")
    assert st.ids == ["c0", "c2", "c_3"] and st.speakers == ["alice", "bob", "carol"]
    assert st.transcripts == ["the birch canoe", "it is easy", "these days"]
    rej = rejects_path(tmp_path / "st").read_text().splitlines()
    assert len(rej) == 2 and rej[1].startswith("c1\t") and "a tab inside the transcript?" in rej[1]
    # headerless list: path<TAB>transcript only
    (tmp_path / "bare.tsv").write_text("c0.wav\tone\tcut here\n")
    assert "3 tab-separated fields but a list without a header has path<TAB>transcript" in discover(
        tmp_path / "bare.tsv")[0].error


def test_common_voice_speakers_are_client_ids(cv, tmp_path):
    ingest(cv, tmp_path / "st", quiet=True)
    assert FrameStore.open(tmp_path / "st").speakers == [f"c{i}" for i in range(6)]


def test_an_id_already_stored_from_another_file_is_rejected(tmp_path, speech_dir):
    for name, i in (("a", 0), ("b", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "001.wav").write_bytes((speech_dir / f"utt{i}.wav").read_bytes())
        (tmp_path / name / "002.wav").write_bytes((speech_dir / f"utt{i + 2}.wav").read_bytes())
    ingest(tmp_path / "a", tmp_path / "st", quiet=True)
    before = FrameStore.open(tmp_path / "st")
    s = ingest(tmp_path / "b", tmp_path / "st", quiet=True)  # same relative names, other audio
    assert (s["added"], s["skipped_existing"], s["rejected"]) == (0, 0, 2)
    rej = rejects_path(tmp_path / "st").read_text()
    assert f"id '001' is already in the store from another file ({tmp_path / 'a' / '001.wav'})" in rej
    after = FrameStore.open(tmp_path / "st")
    assert after.ids == before.ids == ["001", "002"]
    np.testing.assert_array_equal(after.read(0, after.n_frames), before.read(0, before.n_frames))
    s = ingest(tmp_path / "a", tmp_path / "st", quiet=True)  # the same corpus again: already stored
    assert (s["added"], s["skipped_existing"], s["rejected"]) == (0, 2, 0)


def test_different_config_refused(cv, tmp_path):
    ingest(cv, tmp_path / "st", quiet=True)
    with pytest.raises(StoreError, match="different feature config"):
        ingest(cv, tmp_path / "st", config=FeatureConfig(numcep=13, nfilt=40), quiet=True)


def _ingest_cmd(src, dst, *extra):
    return [sys.executable, "-m", "streamq.cli", "ingest", str(src), str(dst), "--quiet", "--chunk-frames", "128",
            *extra]


@pytest.fixture(scope="module")
def big_cv(tmp_path_factory, speech_dir):
    """48 clips (the six, eight times over), so an ingest with small chunks commits often and runs a while."""
    root = make_cv(tmp_path_factory.mktemp("bigcv"), speech_dir, n=6)
    replicate_cv(root, 8)
    return root


def test_kill_anywhere_then_resume_is_byte_identical(big_cv, tmp_path):
    """SIGKILL a real `streamq ingest` (a commit per clip) at seeded random moments, ten times; the store opens
    cleanly after every kill, and each run that gets to the end leaves a store byte-identical to an
    uninterrupted ingest (then the next round starts from nothing)."""
    import shutil

    t0 = time.perf_counter()
    r = subprocess.run(_ingest_cmd(big_cv, tmp_path / "clean"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    wall = time.perf_counter() - t0
    rng = np.random.default_rng(20261201)
    killed, kills, rounds, in_round = tmp_path / "killed", 0, 0, 0
    while kills < 10:
        p = subprocess.Popen(_ingest_cmd(big_cv, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = p.communicate(timeout=float(rng.uniform(0.0, wall / 3)))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.communicate()
            kills += 1
            in_round += 1
            if (killed / "zarr.json").exists():
                FrameStore.open(killed)  # never an inconsistent store in between
            continue
        assert p.returncode == 0, err.decode()
        assert_same_store(killed, tmp_path / "clean")
        rounds += 1
        shutil.rmtree(killed)
        in_round = 0
    if in_round:
        r = subprocess.run(_ingest_cmd(big_cv, killed), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert_same_store(killed, tmp_path / "clean")
        assert FrameStore.open(killed).n_utterances == 48


def test_exit_between_data_and_commit_then_resume(cv, tmp_path):
    """os._exit exactly between the data writes and the commit write of the third append (STREAMQ_CRASH_AT):
    the store holds the first two clips only, and the re-run ends identical to a clean ingest."""
    ingest(cv, tmp_path / "clean", chunk_frames=128, quiet=True)
    env = dict(os.environ, STREAMQ_CRASH_AT="append-before-commit:3")
    r = subprocess.run(_ingest_cmd(cv, tmp_path / "st"), env=env, capture_output=True, text=True)
    assert r.returncode == 86, r.stderr
    st = FrameStore.open(tmp_path / "st")
    assert st.n_utterances == 2 and st.ids == ["common_voice_en_0000", "common_voice_en_0001"]
    assert st.group["frames"].shape[0] > st.n_frames and st.group["ids"].shape[0] == 3  # the dead append's rows
    r = subprocess.run(_ingest_cmd(cv, tmp_path / "st"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_same_store(tmp_path / "st", tmp_path / "clean")


def test_killed_create_and_racing_ingests(cv, tmp_path):
    ingest(cv, tmp_path / "clean", chunk_frames=128, quiet=True)
    env = dict(os.environ, STREAMQ_CRASH_AT="create-before-rename")
    r = subprocess.run(_ingest_cmd(cv, tmp_path / "a"), env=env, capture_output=True, text=True)
    assert r.returncode == 86 and not (tmp_path / "a").exists()
    r = subprocess.run(_ingest_cmd(cv, tmp_path / "a"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_same_store(tmp_path / "a", tmp_path / "clean")
    # two ingests started together on a fresh path: one writes, the other is refused or finds the work done
    ps = [subprocess.Popen(_ingest_cmd(cv, tmp_path / "b"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for _ in range(2)]
    outs = [(p.wait(), p.stderr.read()) for p in ps]
    for rc, err in outs:
        assert rc == 0 or (rc == 1 and "another streamq process is writing to this store" in err), err
    assert any(rc == 0 for rc, _ in outs)
    r = subprocess.run(_ingest_cmd(cv, tmp_path / "b"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_same_store(tmp_path / "b", tmp_path / "clean")


def test_all_clips_rejected_is_an_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(3):
        (d / f"x{i}.mp3").write_bytes(b"not audio" * 10)
    with pytest.raises(Exception, match=r"all 3 clips were rejected \(first: .*x0.mp3: not an audio file \(text: "):
        ingest(d, tmp_path / "st", quiet=True)
    assert rejects_path(tmp_path / "st").read_text().count("\n") == 4


def test_bad_clips_get_reasons_that_name_the_cause(tmp_path, speech_dir):
    import soundfile as sf

    extra = [{"path": f"{n}.mp3", "sentence": n} for n in ("empty", "text", "half", "head")]
    root = make_cv(tmp_path / "cv", speech_dir, n=2, extra_rows=extra)
    clips = root / "clips"
    (clips / "empty.mp3").write_bytes(b"")
    (clips / "text.mp3").write_text("this is a transcript, not a clip\n")
    good = (clips / "common_voice_en_0001.mp3").read_bytes()
    (clips / "half.mp3").write_bytes(good[:len(good) // 2])
    (clips / "head.mp3").write_bytes(good[:700])
    header_s = sf.info(str(clips / "common_voice_en_0001.mp3")).frames / 48000
    s = ingest(root, tmp_path / "st", quiet=True)
    assert (s["added"], s["rejected"]) == (2, 4)
    reasons = {r.split("\t")[0]: r.split("\t")[2] for r in rejects_path(tmp_path / "st").read_text().splitlines()[1:]}
    assert reasons["empty"].endswith("empty.mp3: empty file (0 bytes)")
    assert "text.mp3: not an audio file (text: 'this is a transcript" in reasons["text"]
    assert re.search(rf"half.mp3: truncated: decoded \d\.\d\d s of {header_s:.2f} s in header$", reasons["half"])
    assert re.search(r"head.mp3: (cannot decode audio \(damaged or truncated MP3|truncated: decoded 0\.)",
                     reasons["head"])
    assert FrameStore.open(tmp_path / "st").ids == ["common_voice_en_0000", "common_voice_en_0001"]


def test_ingest_to_a_url_is_refused_before_any_work(cv):
    with pytest.raises(StoreError, match=r"s3://bucket/st.zarr: .*ingest locally, then copy"):
        ingest(cv, "s3://bucket/st.zarr", quiet=True)


def test_forked_pool_resumes_a_partial_store_and_stops_cleanly_when_strict(big_cv, tmp_path):
    """jobs=2 on a store holding a prefix ends identical to jobs=1 from nothing; on a new store the pool that
    started before the store existed is stopped when a strict ingest fails (no worker left behind)."""
    import multiprocessing

    ingest(big_cv, tmp_path / "ref", jobs=1, quiet=True, chunk_frames=128)
    head = FrameStore.open(tmp_path / "ref")
    st = FrameStore.create(tmp_path / "p", 13, feature_config=head.feature_config, chunk_frames=128)
    with st.writer_lock():
        st.append([{"id": head.ids[i], "frames": head.utterance(i)[0], "transcript": head.transcripts[i],
                    "speaker": head.speakers[i], "path": head.paths[i], "duration": float(head.durations[i])}
                   for i in range(10)])
    s = ingest(big_cv, tmp_path / "p", jobs=2, quiet=True)
    assert s["skipped_existing"] == 10 and s["added"] == 38
    assert_same_store(tmp_path / "p", tmp_path / "ref")
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"path\tsentence\n{big_cv}/clips/common_voice_en_0000.mp3\ta\n{tmp_path}/missing.mp3\tb\n"
                   + "".join(f"{big_cv}/clips/common_voice_en_0001_{r}.mp3\tc\n" for r in range(6)))
    before = set(multiprocessing.active_children())
    with pytest.raises(Exception, match="missing.mp3: file missing"):
        ingest(bad, tmp_path / "strict", jobs=2, quiet=True, strict=True)
    assert set(multiprocessing.active_children()) <= before

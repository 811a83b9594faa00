"""``ingest --jobs N`` on a new store: the extraction process (streamq.ingest._Extractor) that lists the corpus
and runs the workers while the writer creates the store. Same store as --jobs 1, errors from the listing
raised before any store exists, and no process left behind when the writer is killed or fails."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_store, make_cv, replicate_cv
from streamq.ingest import CorpusError, ingest
from streamq.store import FrameStore


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, speech_dir):
    """36 clips (the six, six times over)."""
    root = make_cv(tmp_path_factory.mktemp("jobscv"), speech_dir, n=6)
    replicate_cv(root, 6)
    return root


def _descendants(pid):
    """PIDs of every live descendant of ``pid`` (Linux /proc)."""
    kids = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_jobs_2_and_4_match_jobs_1_with_bad_rows(corpus, tmp_path, speech_dir):
    tsv = tmp_path / "list.tsv"
    rows = (corpus / "validated.tsv").read_text().splitlines()[1:]
    col = (corpus / "validated.tsv").read_text().splitlines()[0].split("\t").index("path")
    paths = [corpus / "clips" / r.split("\t")[col] for r in rows]
    (tmp_path / "empty.mp3").write_bytes(b"")
    listed = paths[:5] + [tmp_path / "empty.mp3", tmp_path / "missing.mp3"] + paths[5:]
    tsv.write_text("path\tsentence\n" + "".join(f"{p}\tword {i}\n" for i, p in enumerate(listed)))
    ingest(tsv, tmp_path / "one", jobs=1, quiet=True, chunk_frames=256)
    for jobs in (2, 4):
        s = ingest(tsv, tmp_path / f"j{jobs}", jobs=jobs, quiet=True, chunk_frames=256)
        assert s["added"] == len(paths) and s["rejected"] == 2
        assert_same_store(tmp_path / f"j{jobs}", tmp_path / "one")
        assert (tmp_path / f"j{jobs}.rejects.tsv").read_text() == (tmp_path / "one.rejects.tsv").read_text()


def test_listing_error_is_raised_before_any_store_exists(tmp_path):
    import multiprocessing

    (tmp_path / "cv" / "clips").mkdir(parents=True)
    (tmp_path / "cv" / "train.tsv").write_text("path\tsentence\n")
    before = set(multiprocessing.active_children())
    with pytest.raises(CorpusError, match="split 'validated' not found"):
        ingest(tmp_path / "cv", tmp_path / "st", jobs=2, quiet=True)
    with pytest.raises(CorpusError, match="no such file or directory"):
        ingest(tmp_path / "nothing", tmp_path / "st", jobs=2, quiet=True)
    assert not (tmp_path / "st").exists()
    assert set(multiprocessing.active_children()) <= before


def test_single_clip_corpus(corpus, tmp_path):
    tsv = tmp_path / "one.tsv"
    first = sorted((corpus / "clips").iterdir())[0]
    tsv.write_text(f"path\tsentence\n{first}\thello\n")
    ingest(tsv, tmp_path / "a", jobs=1, quiet=True)
    s = ingest(tsv, tmp_path / "b", jobs=2, quiet=True)
    assert s["added"] == 1
    assert_same_store(tmp_path / "a", tmp_path / "b")


def test_writer_killed_anywhere_leaves_no_process_and_resumes_identical(corpus, tmp_path):
    """SIGKILL `streamq ingest --jobs 2` on a new store at seeded random moments (while listing, while the
    workers start, mid-way); every process it started exits within seconds, the store opens after every
    kill, and re-running to the end gives the store of an uninterrupted --jobs 1 ingest."""
    cmd = [sys.executable, "-m", "streamq.cli", "ingest", str(corpus), None, "--quiet", "--chunk-frames", "256"]
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    subprocess.run([c if c is not None else str(ref) for c in cmd], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    rng = np.random.default_rng(11)
    st = tmp_path / "st"
    argv = [c if c is not None else str(st) for c in cmd] + ["--jobs", "2"]
    kills = 0
    for k in range(6):
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + rng.uniform(0.15, max(0.3, wall * 0.8))
        kids = set()
        while p.poll() is None and time.time() < deadline:
            kids |= set(_descendants(p.pid))
            time.sleep(0.01)
        if p.poll() is None:
            kids |= set(_descendants(p.pid))
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate()
        assert p.returncode in (0, -signal.SIGKILL), p.stderr
        t = time.time()
        while any(_alive(c) for c in kids) and time.time() - t < 20:
            time.sleep(0.05)
        left = [c for c in kids if _alive(c)]
        for c in left:
            os.kill(c, signal.SIGKILL)
        assert not left, f"run {k}: processes left behind after the writer was killed: {left}"
        if (st / "zarr.json").exists():
            FrameStore.open(st)
    assert kills >= 3
    subprocess.run(argv, check=True, capture_output=True)
    assert_same_store(st, ref)


def test_extraction_process_leaves_by_itself_after_a_complete_ingest(corpus, tmp_path, monkeypatch):
    """Not stopped by a signal at the end of a run (its workers would be left to exit orphaned, their CPU
    time unaccounted): it reaps them and exits 0."""
    import streamq.ingest as ingest_mod

    codes = []
    close = ingest_mod._Extractor.close

    def recording_close(self):
        finished = self._done  # every result read, down to the end marker: nothing to stop
        close(self)
        codes.append((finished, self._proc.exitcode))

    monkeypatch.setattr(ingest_mod._Extractor, "close", recording_close)
    ingest(corpus, tmp_path / "st", jobs=2, quiet=True)
    assert codes == [(True, 0)]

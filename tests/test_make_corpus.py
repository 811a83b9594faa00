"""scripts/make_corpus.py: a 3-clip Common-Voice-shaped corpus with espeak-ng word timings.

espeak-ng (libespeak-ng) must be installed: this test fails, never skips, when it is missing.
"""
from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_corpus.py"

CV_HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes",
             "down_votes", "age", "gender", "accents", "variant", "locale", "segment"]
WT_HEADER = ["id", "word_index", "word", "start", "end", "event_start", "event_end"]
N = 3


def _load_module():
    spec = importlib.util.spec_from_file_location("make_corpus", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(out: Path, jobs: int) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--n-clips", str(N),
                           "--seed", "7", "--jobs", str(jobs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"make_corpus.py failed:\n{proc.stdout}\n{proc.stderr}"


def _tsv(path: Path):
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    mod = _load_module()
    try:
        mod.load_library()
    except mod.EspeakError as e:  # fail loudly: CI installs espeak-ng
        pytest.fail(f"espeak-ng is required for this test: {e}")
    out = tmp_path_factory.mktemp("cv") / "corpus"
    _run(out, jobs=2)
    return out


def test_layout_and_validated_tsv(corpus: Path):
    header, rows = _tsv(corpus / "validated.tsv")
    assert header == CV_HEADER
    assert len(rows) == N
    mp3s = sorted(p.name for p in (corpus / "clips").iterdir())
    assert mp3s == sorted(r["path"] for r in rows)
    for r in rows:
        assert re.fullmatch(r"common_voice_en_\d{6}\.mp3", r["path"])
        assert r["sentence"].strip() and r["locale"] == "en"
        assert len(r["client_id"]) == 128 and len(r["sentence_id"]) == 64


def test_clips_decode_at_48k(corpus: Path):
    for p in (corpus / "clips").glob("*.mp3"):
        y, sr = sf.read(p, dtype="float32")
        assert sr == 48000
        assert y.ndim == 1 and len(y) > 0.5 * sr
        assert np.isfinite(y).all() and 0.05 < np.abs(y).max() <= 1.0


def test_word_times(corpus: Path):
    _, clips = _tsv(corpus / "validated.tsv")
    header, rows = _tsv(corpus / "word_times.tsv")
    assert header == WT_HEADER
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    assert sorted(by_id) == sorted(c["path"][:-4] for c in clips)
    for clip in clips:
        cid = clip["path"][:-4]
        words = by_id[cid]
        toks = clip["sentence"].split()
        assert len(words) == len(toks), "one row per transcript word"
        assert [int(w["word_index"]) for w in words] == list(range(len(toks)))
        for w, t in zip(words, toks):
            assert w["word"] and w["word"] in t
        y, sr = sf.read(corpus / "clips" / clip["path"], dtype="float64")
        dur = len(y) / sr
        st = np.array([float(w["start"]) for w in words])
        en = np.array([float(w["end"]) for w in words])
        es = np.array([float(w["event_start"]) for w in words])
        ee = np.array([float(w["event_end"]) for w in words])
        assert (st > 0.09).all() and (en <= dur).all(), "inside the clip, after the lead silence"
        assert (st < en).all()
        assert (np.diff(st) > 0).all() and (en[:-1] <= st[1:] + 1e-4).all(), "monotone"
        assert (es <= st + 1e-4).all() and (en <= ee + 1e-4).all(), "trimmed inside event span"
        assert np.allclose(ee[:-1], es[1:], atol=2e-4)
        # the timings are on the clip's time base: silence before the first word, speech after
        rms = lambda a, b: np.sqrt(np.mean(y[int(a * sr):int(b * sr)] ** 2))  # noqa: E731
        lead = rms(0.0, st[0] - 0.03)
        speech = rms(st[0], en[-1])
        assert 20 * np.log10(speech / max(lead, 1e-9)) > 30.0
        assert rms(st[0], st[0] + 0.03) > 10 * lead


def test_deterministic_across_jobs(corpus: Path, tmp_path: Path):
    other = tmp_path / "again"
    _run(other, jobs=1)
    for name in ("validated.tsv", "word_times.tsv"):
        assert (corpus / name).read_bytes() == (other / name).read_bytes()
    for p in (corpus / "clips").glob("*.mp3"):
        assert p.read_bytes() == (other / "clips" / p.name).read_bytes()

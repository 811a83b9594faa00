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


# --------------------------------------------------------------------------------------------
# The harder corpus: MBROLA voices, noise floor, silences, long and broken files
# --------------------------------------------------------------------------------------------

MB_VOICES = ["mb-us2", "mb-de2-en"]
HARD_ARGS = ["--voices", ",".join(MB_VOICES), "--rate", "48000", "--format", "mp3",
             "--noise-dbfs", "-60", "--lead-silence", "0.3:1.0", "--trail-silence", "0.2:0.5",
             "--long", "1", "--long-seconds", "8", "--broken", "3", "--texts", "b"]


def _run_hard(out: Path, jobs: int) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--n", str(N),
                           "--seed", "3", "--jobs", str(jobs)] + HARD_ARGS,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"make_corpus.py failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def mod():
    return _load_module()


@pytest.fixture(scope="module")
def hard(tmp_path_factory, mod) -> Path:
    try:
        mod.load_library()
        mod.check_mbrola(MB_VOICES)
    except mod.EspeakError as e:  # fail loudly, never skip: scripts/test installs them
        pytest.fail(f"MBROLA voices are required for this test (run scripts/install_mbrola.sh "
                    f"as root): {e}")
    out = tmp_path_factory.mktemp("hard") / "corpus"
    _run_hard(out, jobs=2)
    return out


def _info(corpus: Path) -> dict[str, dict]:
    _, rows = _tsv(corpus / "clip_info.tsv")
    return {r["id"]: r for r in rows}


def test_defaults_write_only_the_demo_files(corpus: Path):
    assert sorted(p.name for p in corpus.iterdir()) == ["clips", "validated.tsv",
                                                         "word_times.tsv"]


def test_hard_layout_broken_and_long(hard: Path):
    _, clips = _tsv(hard / "validated.tsv")
    assert len(clips) == N + 1 + 3, "ordinary, long and broken clips are all in validated.tsv"
    header, broken = _tsv(hard / "broken.tsv")
    assert header == ["path", "kind", "note", "sentence"]
    assert [b["kind"] for b in broken] == ["truncated", "empty", "text"]
    info = _info(hard)
    _, words = _tsv(hard / "word_times.tsv")
    bad = {Path(b["path"]).stem for b in broken}
    good = {c["path"][:-4] for c in clips} - bad
    assert {w["id"] for w in words} == good, "broken files have no word timings"
    for b in broken:
        p = hard / "clips" / b["path"]
        assert p.suffix == ".mp3"
        if b["kind"] == "empty":
            assert p.stat().st_size == 0
        elif b["kind"] == "text":
            assert p.read_text().startswith("This is a text file")
            with pytest.raises(Exception):
                sf.read(p)
        else:  # truncated: a prefix of a real MP3, shorter than the clip it was cut from
            full = float(info[p.stem]["duration"])
            try:
                y, sr = sf.read(p)
                assert len(y) / sr < 0.8 * full
            except Exception:
                pass  # undecodable is broken too
    longs = [i for i in info.values() if i["kind"] == "long"]
    assert len(longs) == 1 and float(longs[0]["duration"]) >= 8.0
    long_words = [w for w in words if w["id"] == longs[0]["id"]]
    assert len(long_words) > 15 and float(long_words[-1]["end"]) > 7.0
    texts_b = set(_load_module().HARVARD_B)
    for c in clips:
        if info[c["path"][:-4]]["kind"] == "clip":
            assert c["sentence"] in texts_b, "--texts b: Harvard lists 9-16"


def test_hard_voices_speakers_and_metadata(hard: Path, mod):
    import hashlib

    _, clips = _tsv(hard / "validated.tsv")
    info = _info(hard)
    for c in clips:
        i = info[c["path"][:-4]]
        assert i["voice"] in MB_VOICES and i["speaker"] == i["voice"] and i["variant"] == ""
        assert c["client_id"] == hashlib.sha256(
            f"streamq-espeak-{i['speaker']}".encode()).hexdigest() * 2, "speaker per clip"
        gender, accent, _ = mod.MBROLA_VOICES[i["voice"]]
        assert c["gender"] == gender and c["accents"] == accent
        assert int(i["synth_sr"]) == 16000
        if not i["kind"].startswith("broken"):
            assert int(i["mp3_delay"]) == 0, "libsndfile's VBR writer: no delay in the decode"


def test_hard_silences_and_noise_floor(hard: Path):
    info = _info(hard)
    _, words = _tsv(hard / "word_times.tsv")
    by_id: dict[str, list[dict]] = {}
    for w in words:
        by_id.setdefault(w["id"], []).append(w)
    for cid, ws in by_id.items():
        i = info[cid]
        y, sr = sf.read(hard / "clips" / i["path"], dtype="float64")
        assert sr == 48000
        lead, tail = float(i["lead"]), float(i["tail"])
        assert 0.3 <= lead <= 1.0 + 1e-4 and 0.2 <= tail <= 0.5 + 1e-4
        st, en = float(ws[0]["start"]), float(ws[-1]["end"])
        assert st >= lead - 1e-4, "the first word starts after the leading silence"
        assert len(y) / sr - en >= tail - 1e-3, "the trailing silence follows the last word"
        # the noise floor: RMS of the leading silence, after MP3 coding, near -60 dBFS
        seg = y[int(0.02 * sr):int((lead - 0.02) * sr)]
        floor = 20 * np.log10(np.sqrt(np.mean(seg ** 2)))
        assert -64.0 < floor < -57.0, f"{cid}: noise floor {floor:.1f} dBFS"
        speech = 20 * np.log10(np.sqrt(np.mean(y[int(st * sr):int(en * sr)] ** 2)))
        assert speech - floor > 25.0


def test_hard_deterministic_across_jobs(hard: Path, tmp_path: Path):
    other = tmp_path / "again"
    _run_hard(other, jobs=1)
    for name in ("validated.tsv", "word_times.tsv", "clip_info.tsv", "broken.tsv"):
        assert (hard / name).read_bytes() == (other / name).read_bytes(), name
    for p in (hard / "clips").iterdir():
        assert p.read_bytes() == (other / "clips" / p.name).read_bytes(), p.name


def test_mbrola_word_starts_are_pho_phone_boundaries(hard: Path, mod):
    """Independently of the script's event mapping: every word's event_start is a phone
    boundary of `espeak-ng --pho` for the same text and settings (cumulative durations), and
    the decoded clip is mbrola's rendering of that .pho file, at the lead silence."""
    import shutil
    import tempfile

    _, clips = _tsv(hard / "validated.tsv")
    _, words = _tsv(hard / "word_times.tsv")
    info = _info(hard)
    assert shutil.which("espeak-ng"), "the espeak-ng program is needed (apt-get install espeak-ng)"
    checked = 0
    for c in clips:
        i = info[c["path"][:-4]]
        if i["kind"].startswith("broken"):
            continue
        text = mod.synth_text(c["sentence"])
        pho = subprocess.run(["espeak-ng", "-v", i["voice"], "-s", i["rate_wpm"], "-p", i["pitch"],
                              "-g", i["wordgap"], "--pho", "-q", text],
                             capture_output=True, text=True, check=True).stdout
        durs = [d for _, d in mod.parse_pho(pho)]
        bounds = np.cumsum([0] + durs) / 1000.0
        lead = float(i["lead"])
        ws = [w for w in words if w["id"] == i["id"]]
        assert len(ws) == len(c["sentence"].split())
        for w in ws:
            t = float(w["event_start"]) - lead
            assert np.abs(bounds - t).min() < 2e-4, f"{i['id']} {w['word']}: {t:.4f} s is no " \
                "phone boundary of espeak-ng --pho"
        # the audio: mbrola's rendering of the .pho file of the clip's own settings (the pitch
        # range too, which espeak-ng's command line cannot set), starting at the lead silence
        code = (f"import importlib.util; spec = importlib.util.spec_from_file_location('mc', "
                f"{str(SCRIPT)!r}); mc = importlib.util.module_from_spec(spec); "
                f"spec.loader.exec_module(mc); print(mc.Espeak.get().pho({text!r}, "
                f"{i['voice']!r}, {i['rate_wpm']}, {i['pitch']}, {i['pitch_range']}, "
                f"{i['wordgap']}), end='')")
        own = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
        def speech(ph):  # up to the last phone: the final pause differs (--pho: 451 ms)
            k = max(j for j, (nm, _) in enumerate(ph) if not nm.startswith("_"))
            return ph[:k + 1]

        assert speech(mod.parse_pho(own)) == speech(mod.parse_pho(pho)), "same .pho as --pho"
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "x.pho").write_text(own)
            db = mod.mbrola_db_path(mod.MBROLA_VOICES[i["voice"]][2])
            subprocess.run(["mbrola", "-e", str(db), f"{d}/x.pho", f"{d}/x.wav"],
                           capture_output=True, check=True)
            ref, rsr = sf.read(f"{d}/x.wav", dtype="float64")
        import soxr

        ref = soxr.resample(ref, rsr, 48000, quality="VHQ")
        y, sr = sf.read(hard / "clips" / i["path"], dtype="float64")
        n0 = int(round(lead * sr))
        n = min(len(ref), len(y) - n0) - 4800  # leave out the final pause
        a, b = y[n0:n0 + n], ref[:n]
        rho = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert rho > 0.95, f"{i['id']}: decoded clip vs mbrola rendering correlate {rho:.3f}"
        # and it peaks at the lead, to the 0.1 ms (4.8 samples) the times are rounded to
        lags = np.arange(-12, 13)
        off = [float(y[n0 + k:n0 + k + n] @ b) for k in lags]
        assert abs(int(lags[np.argmax(off)])) <= 3
        checked += 1
    assert checked == N + 1


def test_mbrola_mapping_agrees_with_exact_events(mod, tmp_path: Path):
    """In a sentence without a pause espeak's events are exact; the .pho mapping must give
    the very same word starts (run in a fresh process: libespeak-ng keeps state)."""
    code = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("mc", {str(SCRIPT)!r})
mc = importlib.util.module_from_spec(spec); spec.loader.exec_module(mc)
es = mc.Espeak.get()
text = mc.synth_text("The birch canoe slid on the smooth planks.")
raw = es.synth(text, "mb-us2", 170, 50, 50, 0)[1]
audio, placed, sr, info = mc.synth_mbrola(es, text, "mb-us2", 170, 50, 50, 0)
print(json.dumps([sorted(set(s for _, _, s in raw)), [s for _, _, s in placed], sr, len(audio)]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    raw, placed, sr, n = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sr == 16000 and n > sr
    assert len(placed) == 8 and placed == sorted(placed)
    assert placed == raw


def test_place_on_pho_with_a_slip_and_a_split(mod):
    text = "ab \u200bcd \u200bef"
    # .pho: a 50 | b 40 | _ 100 | _ 1 | c 30 | A 20 r 20 (one phoneme split in two) | e 40 f 60
    phones = [("a", 50), ("b", 40), ("_", 100), ("_", 1), ("c", 30), ("A", 20), ("r", 20),
              ("e", 40), ("f", 60)]
    sr = 16000
    ms = np.cumsum([0] + [d for _, d in phones])
    at = lambda k: int(ms[k] * sr / 1000)  # noqa: E731
    slip = -16  # the 1-ms pause asked for and not returned
    phonemes = [("a", 0, at(0)), ("b", 0, at(1)), ("_:", 0, at(2)), ("_", 0, at(3)),
                ("c", 4, at(4) + slip), ("A@", 0, at(5) + slip), ("e", 8, at(7) + slip),
                ("f", 0, at(8) + slip)]
    placed, worst = mod.place_on_pho(text, phonemes, phones, sr)
    assert [(p, s) for p, _, s in placed] == [(0, at(0)), (3, at(4)), (7, at(7))]
    assert worst == pytest.approx(1000 * 16 / sr)
    # an event clock far off the .pho file is refused, not guessed
    far = phonemes[:4] + [(n, p, s + 2000) for n, p, s in phonemes[4:]]
    with pytest.raises(ValueError):
        mod.place_on_pho(text, far, phones, sr)


def test_encoder_delay_by_cross_correlation(mod):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(48000) * np.hanning(48000)
    for lag in (0, 1105, -300):
        y = np.roll(np.pad(x, 2000), lag)[2000:-2000] + 1e-3 * rng.standard_normal(48000)
        got, rho = mod.encoder_delay(x, y, max_lag=4096)
        assert got == lag and rho > 0.99


def test_voice_options(mod):
    assert mod.parse_voices("mbrola,en-us") == list(mod.MBROLA_VOICES) + ["en-us"]
    assert mod.parse_voices("espeak,en-us") == mod.VOICES
    with pytest.raises(ValueError):
        mod.parse_voices(" , ")
    with pytest.raises(mod.EspeakError, match="install_mbrola.sh"):
        mod.check_mbrola(["mb-zz9"])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", "/nonexistent/x", "--n", "1",
                           "--lead-silence", "1.0:0.3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--lead-silence" in proc.stderr


# --------------------------------------------------------------------------------------------
# scripts/eval_alignment.py: reading alignments and scoring them against word_times.tsv
# --------------------------------------------------------------------------------------------

def _eval_module():
    spec = importlib.util.spec_from_file_location("eval_alignment",
                                                  ROOT / "scripts" / "eval_alignment.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


LONG_TG = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 2.5
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 2.5
        intervals: size = 4
        intervals [1]:
            xmin = 0
            xmax = 0.52
            text = ""
        intervals [2]:
            xmin = 0.52
            xmax = 1.0
            text = "apple"
        intervals [3]:
            xmin = 1.0
            xmax = 1.61
            text = "shaped"
        intervals [4]:
            xmin = 1.61
            xmax = 2.5
            text = ""
    item [2]:
        class = "IntervalTier"
        name = "chars"
        xmin = 0
        xmax = 2.5
        intervals: size = 1
        intervals [1]:
            xmin = 0
            xmax = 2.5
            text = "a ""quoted"" label"
'''

SHORT_TG = '''File type = "ooTextFile"
Object class = "TextGrid"

0
2.5
<exists>
1
"IntervalTier"
"words"
0
2.5
3
0
0.52
""
0.52
1.0
"apple"
1.0
1.61
"shaped"
'''


def test_eval_reads_textgrids_and_ctm(tmp_path: Path):
    ev = _eval_module()
    for name, text in (("long", LONG_TG), ("short", SHORT_TG)):
        p = tmp_path / f"{name}.TextGrid"
        p.write_text(text)
        assert ev.read_textgrid(p) == [("apple", 0.52, 1.0), ("shaped", 1.0, 1.61)]
    assert ev.read_textgrid(tmp_path / "long.TextGrid", "chars") == [('a "quoted" label', 0, 2.5)]
    with pytest.raises(ev.EvalError):
        ev.read_textgrid(tmp_path / "long.TextGrid", "phones")
    ctm = tmp_path / "words.ctm"
    ctm.write_text("u2 1 0.300 0.200 b 0.91\nu1 1 0.520 0.480 apple\nu1 1 1.000 0.610 shaped\n")
    got = ev.read_ctm(ctm)
    assert got["u1"] == [("apple", 0.52, 1.0), ("shaped", 1.0, pytest.approx(1.61))]
    assert got["u2"] == [("b", 0.3, pytest.approx(0.5))], "extra columns (confidence) ignored"
    ctm.write_text("u1 1 0.5\n")
    with pytest.raises(ev.EvalError, match="words.ctm:1"):
        ev.read_ctm(ctm)


def test_eval_scores_against_word_times(tmp_path: Path):
    ev = _eval_module()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "word_times.tsv").write_text(
        "id\tword_index\tword\tstart\tend\tevent_start\tevent_end\n"
        "u1\t0\tThe\t0.500\t0.700\t0.5\t0.7\n"
        "u1\t1\tapple-shaped\t0.720\t1.600\t0.72\t1.6\n"   # two words for the aligner
        "u2\t0\tfish\t0.300\t0.600\t0.3\t0.6\n"
        "u3\t0\tgone\t0.300\t0.600\t0.3\t0.6\n")
    (corpus / "clip_info.tsv").write_text("id\tkind\tvoice\nu1\tclip\tmb-us1\nu2\tlong\ten-us\n"
                                          "u3\tclip\ten-us\n")
    al = tmp_path / "align"
    al.mkdir()
    (al / "words.ctm").write_text(
        "u1 1 0.505 0.180 the\n"          # start +5 ms, end -15 ms
        "u1 1 0.740 0.300 apple\n"        # start +20 ms
        "u1 1 1.040 0.640 shaped\n"       # end +80 ms
        "u2 1 0.300 0.300 dish\n")        # other words: mismatched, not scored
    (al / "unaligned.tsv").write_text("utterance_id\treason\nu3\tno finite path\n")
    r = ev.evaluate(al, corpus / "word_times.tsv")
    assert r["utterances"] == dict(truth=3, compared=1, mismatched=1, missing=1, unaligned=1,
                                   not_in_store=0)
    assert r["boundaries"] == 4
    assert r["within_10ms"] == 0.25 and r["within_20ms"] == 0.75 and r["within_50ms"] == 0.75
    assert r["within_100ms"] == 1.0
    assert r["median_ms"] == pytest.approx(17.5) and r["start"]["median_ms"] == pytest.approx(12.5)
    assert list(r["by_voice"]) == ["mb-us1"] and r["by_voice"]["mb-us1"]["boundaries"] == 4
    assert "mb-us1" in ev.format_report(r) and "1 compared" in ev.format_report(r)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_alignment.py"), "-",
                           str(al), str(corpus / "word_times.tsv"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    assert json.loads(proc.stdout)["within_20ms"] == 0.75

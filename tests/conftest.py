"""Shared fixtures: speech synthesised with espeak-ng (required: scripts/test and CI install it)."""

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

SENTENCES = [
    "the birch canoe slid on the smooth planks",
    "glue the sheet to the dark blue background",
    "it is easy to tell the depth of a well",
    "these days a chicken leg is a rare dish",
    "rice is often served in round bowls",
    "the juice of lemons makes fine punch",
]


def espeak(text, path, voice="en", speed=160):
    exe = shutil.which("espeak-ng")
    if exe is None:  # a hard failure, never a skip: scripts/test installs espeak-ng
        raise RuntimeError("espeak-ng is required by the tests (apt-get install espeak-ng)")
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory):
    """Six espeak-ng wav clips at 22050 Hz with their sentences."""
    d = tmp_path_factory.mktemp("speech")
    for i, s in enumerate(SENTENCES):
        espeak(s, d / f"utt{i}.wav", speed=150 + 10 * i)
    return d


def make_cv(root, speech_dir, n=6, rate=48000, extra_rows=(), shuffle_columns=False):
    """A Common Voice style release: clips/*.mp3 at ``rate`` and validated.tsv."""
    import soxr

    clips = root / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        x, sr = sf.read(speech_dir / f"utt{i}.wav", dtype="float32")
        name = f"common_voice_en_{i:04d}.mp3"
        sf.write(clips / name, soxr.resample(x, sr, rate), rate, format="MP3")
        rows.append({"client_id": f"c{i}", "path": name, "sentence_id": str(i), "sentence": SENTENCES[i].capitalize()
                     + ".", "up_votes": "2", "down_votes": "0", "age": "", "gender": "", "accents": "", "variant": "",
                     "locale": "en", "segment": ""})
    rows += list(extra_rows)
    cols = list(rows[0].keys())
    if shuffle_columns:
        cols = cols[::-1] + ["extra_column"]
    with open(root / "validated.tsv", "w") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            f.write("\t".join(r.get(c, "x") for c in cols) + "\n")
    return root


def replicate_cv(root, copies):
    """List every clip of the Common Voice release at ``root`` ``copies`` times (as clip_{rep}.mp3 copies, the
    originals unlisted); rewrites validated.tsv and returns its lines (header first) and the path column."""
    tsv = (root / "validated.tsv").read_text().splitlines()
    header, rows = tsv[0], tsv[1:]
    col = header.split("\t").index("path")
    lines = [header]
    for rep in range(copies):
        for r in rows:
            cols = r.split("\t")
            dst = cols[col].replace(".mp3", f"_{rep}.mp3")
            (root / "clips" / dst).write_bytes((root / "clips" / cols[col]).read_bytes())
            cols[col] = dst
            lines.append("\t".join(cols))
    (root / "validated.tsv").write_text("\n".join(lines) + "\n")
    return lines, col


def assert_same_store(a, b):
    """Two stores hold byte-identical frames and index."""
    from streamq.store import FrameStore

    A, B = FrameStore.open(a), FrameStore.open(b)
    assert (A.n_frames, A.n_utterances) == (B.n_frames, B.n_utterances)
    assert A.ids == B.ids and A.transcripts == B.transcripts and A.speakers == B.speakers and A.paths == B.paths
    assert A.offsets.tobytes() == B.offsets.tobytes() and A.durations.tobytes() == B.durations.tobytes()
    assert A.read(0, A.n_frames).tobytes() == B.read(0, B.n_frames).tobytes()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)

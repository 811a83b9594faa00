#!/usr/bin/env python3
"""Word-boundary accuracy of `streamq align` output against a corpus's true word timings.

Two modes::

    # score an alignment already made
    python scripts/eval_alignment.py STORE ALIGN_DIR CORPUS/word_times.tsv [--json]

    # run ingest -> fit (LBG) -> gmm -> align for every K and seed, one table row each
    python scripts/eval_alignment.py --pipeline CORPUS WORK --k 256,1024 --seeds 0,1,2 \\
        [--gmm-iters 5] [--align-iters 30] [--jobs 2] [--align-args "--states-per-symbol 3"]

Scoring. ALIGN_DIR is what `streamq align STORE MODEL ALIGN_DIR` wrote: ``words.ctm`` (``id
channel start duration word [extra columns...]``, seconds) is read, or else the ``words`` tier of
``textgrids/*.TextGrid`` (long or short text format). The truth is ``start``/``end`` of
``word_times.tsv`` (scripts/make_corpus.py: first and last audible sample of the word). Both
sides are normalised to words with the aligner's own normaliser; a transcript token that
normalises to several words (``apple-shaped``) is scored from its first word's start to its
last word's end, one that normalises to none is left out. An utterance is compared only when its
aligned word sequence equals the truth's; otherwise it counts as ``mismatched``. Every word gives
two boundaries (start, end); reported are the share within 10 / 20 / 50 / 100 ms, the median,
90th percentile and mean absolute error, overall, per voice, per voice family (MBROLA /
espeak) and per clip kind (ordinary / long), with counts of utterances compared, mismatched, missing from the alignment (and, when
STORE can be read, missing from the store, i.e. rejected by ingest). Voices come from the
corpus's ``clip_info.tsv`` when it exists, else from ``validated.tsv``'s ``client_id`` (a hash
of the synthetic speaker, see make_corpus.py), else "?".

Pipeline mode drives the `streamq` command line (never its Python API), so it measures what a
user gets: ``streamq ingest CORPUS WORK/store`` (once; reused when present), then for each (K,
seed) ``streamq fit STORE WORK/K{K}_s{seed}/codebook --k K --method lbg --seed S``, ``streamq
gmm STORE .../codebook .../gmm --iters N``, ``streamq align STORE .../gmm .../align --iters N
--jobs J`` (``--seed S`` too where the command takes one) and the scoring above. ``--fit-args/--gmm-args/--align-args`` pass
extra flags (the aligner's levers) through; ``--tag`` names a variant so that its outputs go
to their own folders; ``--reuse`` keeps codebooks, GMMs and alignments already made. One
row per run; ``--json`` prints all rows as JSON instead.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

TOLERANCES_MS = (10, 20, 50, 100)
ROOT = Path(__file__).resolve().parents[1]


class EvalError(ValueError):
    pass


# ------------------------------------------------------------------------------ normalisation

def _normaliser():
    """The aligner's own transcript normaliser (it has moved between modules)."""
    for mod in ("streamq.transcripts", "streamq.align"):
        try:
            m = __import__(mod, fromlist=["normalise"])
            return m.normalise
        except (ImportError, AttributeError):
            continue
    raise EvalError("cannot import normalise from streamq.transcripts or streamq.align")


# ------------------------------------------------------------------------------ reading

def read_truth(path: Path, normalise) -> dict[str, list[tuple[tuple[str, ...], float, float]]]:
    """word_times.tsv -> {utterance id: [(normalised words of the token, start, end)]} in order;
    tokens that normalise to no word are dropped."""
    by_id: dict[str, list] = defaultdict(list)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            need = {"id", "word_index", "word", "start", "end"}
            if not need <= set(reader.fieldnames or []):
                raise EvalError(f"{path}: columns {sorted(need - set(reader.fieldnames or []))} "
                                "missing (a word_times.tsv of scripts/make_corpus.py?)")
            for r in reader:
                by_id[r["id"]].append((int(r["word_index"]), r["word"], float(r["start"]),
                                       float(r["end"])))
    except OSError as e:
        raise EvalError(f"{path}: {e.strerror}") from None
    out = {}
    for uid, rows in by_id.items():
        rows.sort()
        out[uid] = [(tuple(normalise(w)), a, b) for _, w, a, b in rows if normalise(w)]
    return out


def read_ctm(path: Path) -> dict[str, list[tuple[str, float, float]]]:
    """words.ctm -> {id: [(label, start, end)]}, sorted by start. Extra columns (confidence...)
    are ignored."""
    out: dict[str, list] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0].startswith(";"):
                continue
            if len(parts) < 5:
                raise EvalError(f"{path}:{n}: expected 'id channel start duration word', "
                                f"got {line.strip()!r}")
            try:
                s, d = float(parts[2]), float(parts[3])
            except ValueError:
                raise EvalError(f"{path}:{n}: start/duration not numbers: {line.strip()!r}") from None
            out[parts[0]].append((parts[4], s, s + d))
    for v in out.values():
        v.sort(key=lambda x: x[1])
    return dict(out)


_TG_TOKEN = re.compile(r'"((?:[^"]|"")*)"|(?<![\w\[])(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w\]])')


def read_textgrid(path: Path, tier: str = "words") -> list[tuple[str, float, float]]:
    """The non-empty intervals of one interval tier of a Praat TextGrid (long or short text
    format): [(label, start, end)]."""
    text = path.read_text(encoding="utf-8", errors="replace")
    text = re.sub(r"\[\s*\d+\s*\]", " ", text)  # item [1]: / intervals [3]: (long format)
    toks = [m.group(1).replace('""', '"') if m.group(1) is not None else float(m.group(2))
            for m in _TG_TOKEN.finditer(text)]
    # "ooTextFile" "TextGrid" xmin xmax n_tiers {class name xmin xmax n items...}
    try:
        if toks[:2] != ["ooTextFile", "TextGrid"]:
            raise EvalError(f"{path}: not a text TextGrid")
        i, n_tiers = 5, int(toks[4])
        for _ in range(n_tiers):
            cls, name, n = toks[i], toks[i + 1], int(toks[i + 4])
            i += 5
            width = 3 if cls == "IntervalTier" else 2
            items = toks[i:i + width * n]
            i += width * n
            if name == tier and cls == "IntervalTier":
                return [(items[k + 2], float(items[k]), float(items[k + 1]))
                        for k in range(0, len(items), 3) if str(items[k + 2]).strip()]
    except (IndexError, TypeError, ValueError) as e:
        if isinstance(e, EvalError):
            raise
        raise EvalError(f"{path}: cannot parse as a TextGrid ({e})") from None
    raise EvalError(f"{path}: no interval tier named {tier!r}")


def read_alignment(align_dir: Path) -> tuple[dict[str, list], str]:
    """{id: [(label, start, end)]} from ALIGN_DIR's words.ctm, or else its TextGrids."""
    ctm = align_dir / "words.ctm"
    if ctm.is_file():
        return read_ctm(ctm), str(ctm)
    tgs = sorted((align_dir / "textgrids").glob("*.TextGrid")) or sorted(align_dir.glob("*.TextGrid"))
    if not tgs:
        raise EvalError(f"{align_dir}: neither words.ctm nor textgrids/*.TextGrid")
    return {p.stem: read_textgrid(p) for p in tgs}, f"{len(tgs)} TextGrids"


def read_unaligned(align_dir: Path) -> dict[str, str]:
    p = align_dir / "unaligned.tsv"
    if not p.is_file():
        return {}
    with open(p, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return {r[0]: (r[1] if len(r) > 1 else "") for r in rows[1:] if r}


def _make_corpus_module():
    spec = importlib.util.spec_from_file_location("_make_corpus", ROOT / "scripts" / "make_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_voices(corpus_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({id: voice}, {id: kind}) from clip_info.tsv, else voices from validated.tsv's client_id."""
    info = corpus_dir / "clip_info.tsv"
    if info.is_file():
        with open(info, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        return {r["id"]: r["voice"] for r in rows}, {r["id"]: r["kind"] for r in rows}
    val = corpus_dir / "validated.tsv"
    if not val.is_file():
        return {}, {}
    try:
        mc = _make_corpus_module()
        names = [f"{v}+{x}" for v in mc.VOICES for x in mc.VARIANTS] + list(mc.MBROLA_VOICES)
        by_hash = {hashlib.sha256(f"streamq-espeak-{n}".encode()).hexdigest() * 2: n.split("+")[0]
                   for n in names}
    except Exception:  # the corpus script is optional here
        by_hash = {}
    with open(val, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return ({Path(r["path"]).stem: by_hash.get(r.get("client_id", ""), "?") for r in rows},
            {Path(r["path"]).stem: "clip" for r in rows})


def store_ids(store: Path) -> list[str] | None:
    try:
        from streamq.store import FrameStore

        return list(FrameStore.open(str(store)).ids)
    except Exception:
        return None


# ------------------------------------------------------------------------------ scoring

def match(truth_words, aligned, normalise):
    """Boundary errors (s, signed: aligned - true) for one utterance, or None when the aligned
    word sequence differs from the truth's."""
    flat = [w for ws, _, _ in truth_words for w in ws]
    al = []
    for lab, s, e in aligned:
        for w in normalise(lab) or []:
            al.append((w, s, e))
    if [w for w, _, _ in al] != flat:
        return None
    errs, k = [], 0
    for ws, ts, te in truth_words:
        seg = al[k:k + len(ws)]
        k += len(ws)
        errs.append(seg[0][1] - ts)
        errs.append(seg[-1][2] - te)
    return errs


def summarise(errs) -> dict:
    e = np.abs(np.asarray(errs, np.float64)) * 1000.0
    if len(e) == 0:
        return {"boundaries": 0}
    out = {"boundaries": int(len(e))}
    for t in TOLERANCES_MS:  # (times are written to 0.1 / 1 ms: ignore float dust at t)
        out[f"within_{t}ms"] = float(np.mean(e <= t + 1e-6))
    out.update(median_ms=float(np.median(e)), p90_ms=float(np.percentile(e, 90)),
               mean_ms=float(np.mean(e)))
    return out


def evaluate(align_dir: Path, word_times: Path, store: Path | None = None) -> dict:
    normalise = _normaliser()
    truth = read_truth(word_times, normalise)
    if not truth:
        raise EvalError(f"{word_times}: no words")
    aligned, source = read_alignment(align_dir)
    unaligned = read_unaligned(align_dir)
    voices, kinds = read_voices(word_times.parent)
    in_store = store_ids(store) if store is not None else None
    store_set = set(in_store) if in_store is not None else None

    all_errs: list[float] = []
    starts: list[float] = []
    ends: list[float] = []
    by_voice: dict[str, list[float]] = defaultdict(list)
    by_kind: dict[str, list[float]] = defaultdict(list)
    by_family: dict[str, list[float]] = defaultdict(list)
    counts = dict(truth=len(truth), compared=0, mismatched=0, missing=0, unaligned=0,
                  not_in_store=0)
    missing_ids, mismatched_ids = [], []
    for uid in sorted(truth):
        if uid not in aligned:
            counts["missing"] += 1
            if store_set is not None and uid not in store_set:
                counts["not_in_store"] += 1
            elif uid in unaligned:
                counts["unaligned"] += 1
            missing_ids.append(uid)
            continue
        errs = match(truth[uid], aligned[uid], normalise)
        if errs is None:
            counts["mismatched"] += 1
            mismatched_ids.append(uid)
            continue
        counts["compared"] += 1
        all_errs += errs
        starts += errs[0::2]
        ends += errs[1::2]
        by_voice[voices.get(uid, "?")] += errs
        v = voices.get(uid, "?")
        by_family["?" if v == "?" else ("mbrola" if v.startswith("mb-") else "espeak")] += errs
        by_kind[kinds.get(uid, "clip")] += errs
    res = {"align_dir": str(align_dir), "source": source, "word_times": str(word_times),
           "utterances": counts, **summarise(all_errs),
           "start": summarise(starts), "end": summarise(ends),
           "signed_median_ms": float(np.median(all_errs) * 1000) if all_errs else None,
           "by_voice": {v: summarise(e) for v, e in sorted(by_voice.items())},
           "by_kind": {k: summarise(e) for k, e in sorted(by_kind.items())},
           "by_family": {k: summarise(e) for k, e in sorted(by_family.items())},
           "missing_ids": missing_ids[:50], "mismatched_ids": mismatched_ids[:50]}
    if in_store is not None:
        res["store_utterances"] = len(in_store)
    return res


def _pct(x):
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def format_report(r: dict) -> str:
    c = r["utterances"]
    lines = [f"{r['align_dir']} ({r['source']}) vs {r['word_times']}",
             f"utterances: {c['truth']} in the truth, {c['compared']} compared, "
             f"{c['mismatched']} with other words, {c['missing']} missing from the alignment"
             + (f" ({c['not_in_store']} not in the store, {c['unaligned']} listed unaligned)"
                if c["missing"] else "")]
    head = ("", "bounds") + tuple(f"<={t}ms" for t in TOLERANCES_MS) + ("median", "p90", "mean")
    lines.append("{:<14s} {:>7s} ".format(*head[:2]) + " ".join(f"{h:>7s}" for h in head[2:]))

    def row(name, s):
        if not s.get("boundaries"):
            return f"{name:<14s} {0:7d}"
        return (f"{name:<14s} {s['boundaries']:7d} "
                + " ".join(f"{_pct(s[f'within_{t}ms']):>7s}" for t in TOLERANCES_MS)
                + f" {s['median_ms']:6.1f}ms {s['p90_ms']:5.1f}ms {s['mean_ms']:5.1f}ms")

    lines.append(row("all", r))
    lines.append(row("  word starts", r["start"]))
    lines.append(row("  word ends", r["end"]))
    if len(r["by_kind"]) > 1:
        for k, s in r["by_kind"].items():
            lines.append(row(f"kind {k}", s))
    if len(r["by_family"]) > 1:
        for k, s in r["by_family"].items():
            lines.append(row(f"{k} voices", s))
    for v, s in r["by_voice"].items():
        lines.append(row(v, s))
    if r.get("signed_median_ms") is not None:
        lines.append(f"signed median (aligned - true): {r['signed_median_ms']:+.1f} ms")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ pipeline mode

def streamq_command(spec: str | None) -> list[str]:
    if spec:
        return shlex.split(spec)
    exe = Path(sys.executable).parent / "streamq"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("streamq")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from streamq.cli import main; sys.exit(main())"]


_HELP: dict[str, str] = {}


def seed_flag(sq: list[str], command: str, seed: int) -> list[str]:
    """``--seed S`` for a streamq command that takes one (fit always does; gmm / align may)."""
    if command not in _HELP:
        proc = subprocess.run(sq + [command, "--help"], capture_output=True, text=True)
        _HELP[command] = proc.stdout
    return ["--seed", str(seed)] if re.search(r"--seed\b", _HELP[command]) else []


def run_step(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise EvalError(f"{' '.join(cmd[-6:])} failed (exit {proc.returncode}): "
                        f"{tail[0] if tail else ''} (log {log})")
    return time.perf_counter() - t0


def pipeline(a) -> list[dict]:
    corpus, work = Path(a.corpus), Path(a.work)
    word_times = Path(a.word_times) if a.word_times else corpus / "word_times.tsv"
    if not word_times.is_file():
        raise EvalError(f"{word_times}: not found (pass --word-times)")
    work.mkdir(parents=True, exist_ok=True)
    sq = streamq_command(a.streamq)
    log = work / "pipeline.log"
    store = Path(a.store) if a.store else work / "store"
    rows = []
    t_ingest = 0.0
    if not store.exists():
        t_ingest = run_step(sq + ["ingest", str(corpus), str(store), "--jobs", str(a.jobs),
                                  "--quiet"] + shlex.split(a.ingest_args), log)
    tag = f"_{a.tag}" if a.tag else ""
    for k in a.k:
        for seed in a.seeds:
            run = work / f"K{k}_s{seed}"
            cb, gm, al = run / "codebook", run / f"gmm{tag}", run / f"align{tag}"
            run.mkdir(parents=True, exist_ok=True)
            t = {"ingest_s": round(t_ingest, 1)}
            if not (a.reuse and (cb / "codebook.npy").exists()):
                t["fit_s"] = round(run_step(sq + ["fit", str(store), str(cb), "--k", str(k),
                                                  "--method", "lbg", "--seed", str(seed),
                                                  "--quiet"] + shlex.split(a.fit_args), log), 1)
            if not (a.reuse and (gm / "gmm.npz").exists()):
                t["gmm_s"] = round(run_step(sq + ["gmm", str(store), str(cb), str(gm), "--iters",
                                                  str(a.gmm_iters), "--quiet"]
                                            + seed_flag(sq, "gmm", seed)
                                            + shlex.split(a.gmm_args), log), 1)
            if not (a.reuse and (al / "words.ctm").exists()):
                t["align_s"] = round(run_step(sq + ["align", str(store), str(gm), str(al),
                                                    "--iters", str(a.align_iters), "--jobs",
                                                    str(a.jobs), "--quiet"]
                                              + seed_flag(sq, "align", seed)
                                              + shlex.split(a.align_args), log), 1)
            r = evaluate(al, word_times, store)
            (al / "eval.json").write_text(json.dumps(r, indent=2))
            row = {"k": k, "seed": seed, "tag": a.tag, "align_args": a.align_args,
                   "compared": r["utterances"]["compared"], "truth": r["utterances"]["truth"],
                   **{key: r.get(key) for key in [f"within_{t}ms" for t in TOLERANCES_MS]
                      + ["median_ms", "p90_ms", "mean_ms", "boundaries"]},
                   "by_voice_within_50ms": {v: s.get("within_50ms")
                                            for v, s in r["by_voice"].items()},
                   **t, "align_dir": str(al)}
            rows.append(row)
            if not a.json:
                if len(rows) == 1:
                    print(f"{'K':>5s} {'seed':>4s} {'utts':>9s} " + " ".join(
                        f"{'<=' + str(t) + 'ms':>7s}" for t in TOLERANCES_MS)
                        + f" {'median':>8s} {'p90':>7s}  seconds (fit/gmm/align)  {a.tag}")
                secs = "/".join(str(t.get(x, "-")) for x in ("fit_s", "gmm_s", "align_s"))
                print(f"{k:5d} {seed:4d} {row['compared']:4d}/{row['truth']:<4d} "
                      + " ".join(f"{_pct(row[f'within_{t}ms']):>7s}" for t in TOLERANCES_MS)
                      + f" {row['median_ms'] or float('nan'):6.1f}ms {row['p90_ms'] or float('nan'):5.1f}ms"
                      f"  {secs}", flush=True)
    if not a.json and len(rows) > 1:
        for key in ("within_20ms", "within_50ms", "median_ms"):
            v = [r[key] for r in rows if r[key] is not None]
            if v:
                lo, hi = min(v), max(v)
                fmt = (lambda x: f"{100 * x:.1f}%") if key.startswith("within") else (lambda x: f"{x:.1f} ms")
                print(f"{key}: min {fmt(lo)}, max {fmt(hi)} over {len(v)} runs")
    return rows


# ------------------------------------------------------------------------------ main

def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--pipeline" in argv:
        argv.remove("--pipeline")
        ap = argparse.ArgumentParser(prog="eval_alignment.py --pipeline",
                                     description="ingest -> fit (LBG) -> gmm -> align per K and seed, scored")
        ap.add_argument("corpus", help="corpus directory (validated.tsv, clips/, word_times.tsv)")
        ap.add_argument("work", help="working directory (store, codebooks, models, alignments, pipeline.log)")
        ap.add_argument("--k", type=_int_list, default=[256, 1024], help="codebook sizes (default 256,1024)")
        ap.add_argument("--seeds", type=_int_list, default=[0], help="seeds (default 0)")
        ap.add_argument("--gmm-iters", type=int, default=5)
        ap.add_argument("--align-iters", type=int, default=30)
        ap.add_argument("--jobs", type=int, default=2)
        ap.add_argument("--store", default=None, help="an existing store (default WORK/store, ingested once)")
        ap.add_argument("--word-times", default=None, help="default CORPUS/word_times.tsv")
        ap.add_argument("--ingest-args", default="", help="extra flags for streamq ingest")
        ap.add_argument("--fit-args", default="", help="extra flags for streamq fit")
        ap.add_argument("--gmm-args", default="", help="extra flags for streamq gmm")
        ap.add_argument("--align-args", default="", help="extra flags for streamq align (the levers)")
        ap.add_argument("--tag", default="", help="variant name: its gmm/align outputs get their own folders")
        ap.add_argument("--reuse", action="store_true", help="keep codebooks, GMMs, alignments already made")
        ap.add_argument("--streamq", default=None, help="the streamq command (default: the venv's)")
        ap.add_argument("--json", action="store_true", help="print the rows as JSON")
        a = ap.parse_args(argv)
        try:
            rows = pipeline(a)
        except EvalError as e:
            print(f"eval_alignment: {e}", file=sys.stderr)
            return 1
        if a.json:
            print(json.dumps(rows, indent=2))
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="the frame store aligned (to count utterances ingest rejected); "
                                  "'-' to skip")
    ap.add_argument("align_dir", type=Path, help="output directory of `streamq align`")
    ap.add_argument("word_times", type=Path, help="word_times.tsv of scripts/make_corpus.py")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args(argv)
    try:
        r = evaluate(a.align_dir, a.word_times, None if a.store == "-" else Path(a.store))
    except EvalError as e:
        print(f"eval_alignment: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r, indent=2) if a.json else format_report(r))
    return 0 if r["utterances"]["compared"] else 1


if __name__ == "__main__":
    sys.exit(main())

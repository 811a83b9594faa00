"""``streamq report RUN_DIR``: one self-contained HTML page for a run directory of the demo's shape.

RUN_DIR may hold any of ``store/`` (a frame store), ``compare/`` (compare_history.csv and the two loss
pictures), ``codebook/`` (a fit directory; with ``codebook_stages.npz`` the LBG animation), ``gmm/``
(gmm_history.csv, gmm_history.png) and ``align/`` (align_summary.json, align_history.csv, unaligned.tsv,
alignment_analysis.csv, traces/, plots/). Runs written before the files had command prefixes (history.csv,
config.json, summary.json, history.png) are read too. A part
that is missing reads "not run"; a part that cannot be read says why, and the rest of the page still renders.
Every image is embedded as a base64 ``data:`` URI, so the page can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from .artifacts import load_npy, read_json, read_records
from .plots import find_file
from .progress import log

PARTS = ("store", "compare", "codebook", "gmm", "align")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1150px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.4em 0;display:block}
.missing{color:#a33;font-style:italic}.scroll{overflow-x:auto}.note{color:#666;font-size:.9em}
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _table(rows, columns=None, left=()) -> str:
    """An HTML table of dicts (columns default to the first row's keys); text columns in ``left``."""
    if not rows:
        return '<p class="note">(no rows)</p>'
    cols = list(columns or rows[0].keys())

    def cell(c, v, tag="td"):
        cls = ' class="l"' if c in left or (isinstance(v, str) and tag == "td" and not _numeric(v)) else ""
        if tag == "td" and c not in left and isinstance(v, str) and _numeric(v):
            v = float(v)  # a number read as text (alignment_analysis.csv): shown like the others
        return f"<{tag}{cls}>{_esc(_fmt(v) if tag == 'td' else v)}</{tag}>"

    head = "".join(cell(c, c, "th") for c in cols)
    body = "".join("<tr>" + "".join(cell(c, r.get(c)) for c in cols) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _numeric(s) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


def _kv(d: dict) -> str:
    return _table([{"field": k, "value": v} for k, v in d.items()], ["field", "value"], left=("field", "value"))


def _img(path, alt) -> str:
    """An <img> with the file's bytes as a base64 data URI (PNG or GIF)."""
    p = Path(path)
    mime = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}[p.suffix.lower()]
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return f'<img alt="{_esc(alt)}" title="{_esc(alt)}" src="data:{mime};base64,{data}">'


def _missing(what) -> str:
    return f'<p class="missing">not run ({_esc(what)} not found)</p>'




# ------------------------------------------------------------------ the sections
def _store(d: Path, tmp: Path) -> str:
    from .store import FrameStore

    if not d.exists():
        return _missing("store/")
    i = FrameStore.open(d).info()
    cfg = i.pop("feature_config", None) or {}
    out = {"path": i.pop("path", str(d))}
    if "frames" in i and "dim" in i:
        out["frames"] = f"{int(i.pop('frames')):,} x {i.pop('dim')} float32"
    if "hours" in i:
        h = float(i.pop("hours"))
        out["audio"] = f"{h:.3f} h ({h * 3600:.1f} s)"
    out.update(i)
    out["features"] = ", ".join(f"{k}={v}" for k, v in cfg.items()) or "(none: array data)"
    return _kv(out)


def _compare(d: Path, tmp: Path) -> str:
    h = find_file(d, "compare_history.csv", "history.csv")
    if h is None:
        return _missing("compare/compare_history.csv")
    recs = read_records(h)
    last = {}
    for r in recs:
        last[r["method"]] = r
    cols = [c for c in ("method", "k", "step", "frames_seen", "wall_seconds", "loss", "entropy", "log_k",
                        "utilisation", "dead") if recs and c in recs[0]]
    parts = ["<h3>final metrics per method (held-out sample)</h3>", _table(list(last.values()), cols, left=("method",))]
    for name in ("loss_vs_steps.png", "loss_vs_wall.png"):
        parts.append(_img(d / name, f"compare/{name}") if (d / name).exists() else _missing(f"compare/{name}"))
    return "\n".join(parts)


def _codebook(d: Path, tmp: Path, fps: float) -> str:
    from .artifacts import CODEBOOK_STAGES
    from .plots import FIT_HISTORY_FILES, animate_lbg

    h = find_file(d, *FIT_HISTORY_FILES)
    if h is None:
        return _missing(f"codebook/{FIT_HISTORY_FILES[0]}")
    parts = []
    cfg = find_file(d, "fit_config.json", "config.json")
    if cfg is not None:
        c = read_json(cfg)
        parts.append(_kv({k: v for k, v in c.items() if not isinstance(v, (dict, list))}))
    recs = read_records(h)
    if recs:
        r = recs[-1]
        cols = [c for c in ("method", "stage", "k", "step", "frames_seen", "wall_seconds", "loss", "entropy", "log_k",
                            "utilisation", "dead", "repaired", "shifted", "imbalance") if c in r]
        parts += [f"<h3>final record of {_esc(h.name)}</h3>", _table([r], cols, left=("method",))]
    counts = find_file(d, "codebook_counts.npy", "counts.npy")
    if counts is not None:
        parts += ["<h3>codeword usage (codebook_counts.npy)</h3>", _kv(usage_stats(load_npy(counts)))]
    if (d / CODEBOOK_STAGES).exists():
        parts += ["<h3>LBG: the codebook after each split</h3>",
                  _img(animate_lbg(d, tmp / "lbg.gif", fps=max(1.0, fps / 2)), "LBG stages")]
    else:
        parts.append(f'<p class="note">no {CODEBOOK_STAGES}: no LBG animation (only `streamq fit --method lbg` keeps '
                     'each stage)</p>')
    return "\n".join(parts)


def usage_stats(counts) -> dict:
    """Summary of per-codeword counts (frames won): K, used, share of frames held by the busiest 10 %,
    usage entropy against log K, min / median / max."""
    c = np.asarray(counts, np.float64).reshape(-1)
    if c.size == 0 or not np.all(np.isfinite(c)) or (c < 0).any():
        raise ValueError("codebook_counts.npy: expected finite non-negative counts")
    total = float(c.sum())
    p = c[c > 0] / total if total > 0 else np.zeros(0)
    top = np.sort(c)[::-1][:max(1, int(np.ceil(0.1 * c.size)))].sum()
    return {"codewords (K)": int(c.size), "used (count > 0)": int((c > 0).sum()), "frames counted": total,
            "share of frames in the busiest 10 %": f"{top / total:.1%}" if total else "",
            "usage entropy / log K": f"{float(-(p * np.log(p)).sum()):.3f} / {math.log(c.size):.3f}",
            "count min / median / max": f"{c.min():g} / {np.median(c):g} / {c.max():g}"}


def _gmm(d: Path, tmp: Path) -> str:
    h = find_file(d, "gmm_history.csv", "history.csv")
    if h is None:
        return _missing("gmm/gmm_history.csv")
    recs = read_records(h)
    parts = ["<h3>EM iterations</h3>", _table(recs)]
    png = find_file(d, "gmm_history.png", "history.png")
    parts.append(_img(png, f"gmm/{png.name}") if png is not None else _missing("gmm/gmm_history.png"))
    return "\n".join(parts)


# columns of alignment_analysis.csv worth a place in the page (others, like the speaker hash, are left out)
ANALYSIS_COLUMNS = ("id", "seconds", "loglik_per_frame", "loglik_z", "silence_share", "squeezed_words",
                    "min_word_confidence", "flagged", "reasons")


def worst_utterances(align_dir, n):
    """The ``n`` lowest ``loglik_per_frame`` rows of ``align_dir/alignment_analysis.csv`` (flagged rows first
    among equals), or None when the file is absent. Rows whose score is empty come last."""
    p = Path(align_dir) / "alignment_analysis.csv"
    if not p.exists():
        return None
    import csv

    with open(p, newline="", encoding="utf-8") as f:  # cells stay text: ids such as "007" are not numbers
        recs = list(csv.DictReader(f))
    if recs and ("id" not in recs[0] or "loglik_per_frame" not in recs[0]):
        raise ValueError(f"{p}: needs columns 'id' and 'loglik_per_frame'")

    def key(r):
        try:
            v = float(r.get("loglik_per_frame") or "nan")
        except ValueError:
            v = math.nan
        bad = math.isnan(v)
        flagged = str(r.get("flagged") or "").strip().lower() in ("1", "1.0", "true", "yes")
        return (bad, math.inf if bad else v, not flagged)

    return sorted(recs, key=key)[:max(0, int(n))]


def _align(d: Path, tmp: Path, worst: int, fps: float, store_dir: Path) -> str:
    from .plots import animate_alignment, file_safe_id

    summary = find_file(d, "align_summary.json", "summary.json")
    if summary is None:
        return _missing("align/align_summary.json")
    parts = [_kv(read_json(summary))]
    h = find_file(d, "align_history.csv", "history.csv")
    if h is not None:
        parts += ["<h3>EM iterations</h3>", _table(read_records(h))]
    un = d / "unaligned.tsv"
    if un.exists():
        lines = [ln.split("\t", 1) for ln in un.read_text().splitlines()[1:] if ln.strip()]
        if lines:
            parts += [f"<h3>unaligned utterances ({len(lines)})</h3>",
                      _table([{"id": a, "reason": b[0] if b else ""} for a, *b in lines[:20]], left=("id", "reason"))]
    rows = worst_utterances(d, worst)
    traced = sorted((d / "traces").glob("*.npz")) if (d / "traces").is_dir() else []
    if rows is None:
        rows = [{"id": p.stem} for p in traced[:max(0, worst)]]
        parts.append('<p class="note">no alignment_analysis.csv: showing the traced utterances instead of the '
                     'worst-scoring ones</p>')
        title = "traced utterances"
    else:
        title = f"the {len(rows)} worst-scoring utterances (alignment_analysis.csv, lowest log-likelihood per frame)"
    if rows:
        shown = [c for c in ANALYSIS_COLUMNS if rows[0].get(c) is not None]
        parts += [f"<h3>{_esc(title)}</h3>", _table(rows, shown if len(shown) > 1 else None, left=("id", "reasons"))]
    segs = None
    for k, r in enumerate(rows):
        uid = str(r["id"])
        try:
            gif = animate_alignment(d, uid, tmp / f"align_{k}.gif", fps=fps, dpi=60)
            parts += [f"<h3>{_esc(uid)}: posteriors and Viterbi path over EM</h3>", _img(gif, f"alignment of {uid}")]
            continue
        except ValueError as e:
            why = str(e)
        static = d / "plots" / f"{file_safe_id(uid)}.png"
        if static.exists():
            parts += [f"<h3>{_esc(uid)}: final alignment</h3>", _img(static, f"alignment of {uid}")]
            continue
        if segs is None:
            segs = _segments(d, [str(x["id"]) for x in rows])
        try:
            png = _segmentation_picture(store_dir, uid, segs, tmp / f"seg_{k}.png")
            parts += [f"<h3>{_esc(uid)}: final segmentation (words.ctm, chars.ctm) over the MFCCs</h3>",
                      _img(png, f"segmentation of {uid}")]
        except ValueError as e:
            parts.append(f'<p class="note">{_esc(uid)}: no picture ({_esc(why)}; {_esc(e)})</p>')
    # the EM animations of traced utterances that are not among the worst (up to as many again)
    done = {file_safe_id(r["id"]) for r in rows}
    extra = [p for p in traced if p.stem not in done][:max(0, worst)]
    if extra:
        parts.append("<h3>alignment over EM of the traced utterances (streamq align --plot N)</h3>")
    for k, p in enumerate(extra):
        try:
            gif = animate_alignment(d, p.stem, tmp / f"traced_{k}.gif", fps=fps, dpi=60)
            parts += [f"<h3>{_esc(p.stem)}: posteriors and Viterbi path over EM</h3>", _img(gif, f"alignment of {p.stem}")]
        except ValueError as e:
            parts.append(f'<p class="note">{_esc(p.stem)}: no picture ({_esc(e)})</p>')
    return "\n".join(parts)


def _segments(d: Path, ids) -> dict:
    """{"words": {id: segments}, "chars": {...}} from align/words.ctm and chars.ctm (empty when absent)."""
    from .plots import read_ctm

    return {tier: read_ctm(d / f"{tier}.ctm", ids) if (d / f"{tier}.ctm").exists() else {}
            for tier in ("words", "chars")}


def _segmentation_picture(store_dir: Path, uid: str, segs: dict, out: Path) -> str:
    """The MFCCs of ``uid`` from the run's store with its CTM segments; ValueError saying what is missing."""
    from .plots import plot_segmentation
    from .store import FrameStore

    if uid not in segs["words"]:
        raise ValueError("not in words.ctm")
    if not store_dir.exists():
        raise ValueError("no store/ to read its frames from")
    st = FrameStore.open(store_dir)
    ids = list(st.ids)
    if uid not in ids:
        raise ValueError(f"{store_dir}: no utterance {uid!r}")
    X, text = st.utterance(ids.index(uid))
    return plot_segmentation(X, segs["words"][uid], segs["chars"].get(uid, []), out, frame_step=st.frame_step,
                             title=f"{uid}: {text}")


# ------------------------------------------------------------------ the page
def write_report(run_dir, out=None, worst=3, fps=3.0) -> str:
    """Write ``RUN_DIR/report.html`` (or ``out``): store info, compare curves, codebook stats and the LBG
    animation, GMM history, alignment summary with the ``worst`` lowest-scoring utterances and their pictures.

    Returns the written path. Raises ValueError when ``run_dir`` is not a directory; a part that is missing
    or unreadable is reported on the page, not raised.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"{run}: not a directory")
    out = Path(out) if out is not None else run / "report.html"
    titles = {"store": "Frame store", "compare": "Codebook training: random / minibatch Lloyd / LBG",
              "codebook": "Codebook (streamq fit)", "gmm": "Diagonal GMM (streamq gmm)",
              "align": "Alignment (streamq align)"}
    body = []
    with tempfile.TemporaryDirectory(prefix="streamq-report-") as t:
        tmp = Path(t)
        for part in PARTS:
            d = run / part
            try:
                if part == "store":
                    sec = _store(d, tmp)
                elif part == "compare":
                    sec = _compare(d, tmp)
                elif part == "codebook":
                    sec = _codebook(d, tmp, fps)
                elif part == "gmm":
                    sec = _gmm(d, tmp)
                else:
                    sec = _align(d, tmp, worst, fps, run / "store")
            except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("report: %s: %s", part, msg)
                sec = f'<p class="missing">unreadable: {_esc(msg)}</p>'
            body.append(f'<section id="{part}"><h2>{_esc(titles[part])}</h2>\n{sec}\n</section>')
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>streamq report: {_esc(run.name)}'
            f'</title><style>{_CSS}</style></head><body>\n<h1>streamq run report</h1>\n'
            f'<p class="note">{_esc(run.resolve())}, written {stamp}</p>\n' + "\n".join(body) + "\n</body></html>\n")
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(page, encoding="utf-8")
    tmp_out.replace(out)
    return str(out)

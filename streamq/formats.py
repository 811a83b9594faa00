"""Alignment output formats: Praat TextGrids (long and short), MFA-style JSON and CSV, CTM lines, safe file
names and the frame-time convention.

Tiers are ``(name, [(start_s, stop_s, label), ...])``; gaps between segments are filled with empty
intervals, segments are clipped to ``[0, xmax]``, and the last interval ends exactly at ``xmax`` (the audio's
duration). Times are written with ``repr`` (shortest exact float), so a reader gets back the same numbers.
The JSON is the layout the Montreal Forced Aligner and praatio write (``{"start", "end", "tiers": {name:
{"type": "IntervalTier", "entries": [[start, end, label], ...]}}}``); the CSV has MFA's columns
``Begin,End,Label,Type,Speaker``.
"""

from __future__ import annotations

import csv
import io
import json
import re

FORMATS = ("textgrid", "short-textgrid", "json", "csv")


def fmt_seconds(x: float) -> str:
    return f"{x:.3f}"


def _t(x: float) -> str:
    return repr(round(float(x), 9))


def fill_gaps(segs, xmax: float) -> list[tuple[float, float, str]]:
    """Intervals covering [0, xmax]: the segments (clipped, in order) with empty intervals between them."""
    ivs, t = [], 0.0
    for a, b, lab in segs:
        a, b = max(float(a), t), min(float(b), xmax)
        if a > t + 1e-9:
            ivs.append((t, a, ""))
        if b > a:
            ivs.append((a, b, lab))
            t = b
    if t < xmax - 1e-9 or not ivs:
        ivs.append((t, xmax, ""))
    a, _, lab = ivs[-1]
    ivs[-1] = (a, xmax, lab)  # exactly the duration, not a rounded neighbour
    return ivs


def textgrid(tiers, xmax: float, short: bool = False) -> str:
    """A Praat TextGrid (long form, or Praat's short form with ``short``)."""
    filled = [(name, fill_gaps(segs, xmax)) for name, segs in tiers]
    q = lambda s: '"' + s.replace('"', '""') + '"'  # noqa: E731
    if short:
        out = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "0", _t(xmax), "<exists>",
               str(len(filled))]
        for name, ivs in filled:
            out += ['"IntervalTier"', q(name), "0", _t(xmax), str(len(ivs))]
            for a, b, lab in ivs:
                out += [_t(a), _t(b), q(lab)]
        return "\n".join(out) + "\n"
    out = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {_t(xmax)}",
           "tiers? <exists>", f"size = {len(filled)}", "item []:"]
    for n, (name, ivs) in enumerate(filled, 1):
        out += [f"    item [{n}]:", '        class = "IntervalTier"', f"        name = {q(name)}",
                "        xmin = 0", f"        xmax = {_t(xmax)}", f"        intervals: size = {len(ivs)}"]
        for k, (a, b, lab) in enumerate(ivs, 1):
            out += [f"        intervals [{k}]:", f"            xmin = {_t(a)}", f"            xmax = {_t(b)}",
                    f"            text = {q(lab)}"]
    return "\n".join(out) + "\n"


def json_alignment(tiers, xmax: float) -> str:
    """MFA / praatio JSON of the tiers (gaps filled)."""
    return json.dumps({"start": 0.0, "end": float(xmax), "tiers": {
        name: {"type": "IntervalTier", "entries": [[a, b, lab] for a, b, lab in fill_gaps(segs, xmax)]}
        for name, segs in tiers}}) + "\n"


def csv_alignment(tiers, speaker: str = "") -> str:
    """MFA CSV: one row per non-empty interval, ``Begin,End,Label,Type,Speaker`` (Type: the tier name)."""
    f = io.StringIO()
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["Begin", "End", "Label", "Type", "Speaker"])
    rows = sorted((a, b, lab, name) for name, segs in tiers for a, b, lab in segs)
    for a, b, lab, name in rows:
        w.writerow([f"{a:.3f}", f"{b:.3f}", lab, name, speaker])
    return f.getvalue()


def ctm_lines(utt_id: str, segs, confidence=None) -> list[str]:
    """CTM lines ``id 1 start duration label [confidence]`` (seconds, 3 decimals)."""
    out = []
    for k, (a, b, lab) in enumerate(segs):
        conf = "" if confidence is None else f" {confidence[k]:.3f}"
        out.append(f"{utt_id} 1 {fmt_seconds(a)} {fmt_seconds(b - a)} {lab}{conf}\n")
    return out


def safe_name(s: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", s).strip("._") or "utt"


VITERBI_LAG = 0.25  # frames: how late, on average, the Viterbi path enters the next character (measured)


def frame_time_offset(feature_config: dict) -> float:
    """Seconds to add to ``t * step`` to get the boundary before frame t.

    Frame t covers [t step, t step + window), so the midpoint between the centres of frames t - 1 and t is
    t step + (window - step) / 2. The self-loop HMM's Viterbi path enters a character a fraction of a frame
    late on average (the first frame of a sound must already be more likely under it), so a quarter of a
    step is taken off: measured on the bundled espeak corpus and a 203-clip espeak + MBROLA corpus at K = 256
    and 1024, 3 seeds each, the signed median boundary error fell from +2..+5 ms to -0.3..+2.3 ms and the
    share within 20 ms rose by 1.1 to 2.3 points (scripts/eval_alignment.py).
    """
    win = feature_config.get("winlen")
    step = float(feature_config.get("winstep", 0.01))
    if not win:
        return 0.0
    return max(0.0, (float(win) - step) / 2 - VITERBI_LAG * step)

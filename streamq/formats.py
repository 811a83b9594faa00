"""Alignment output formats: Praat TextGrids, CTM lines, safe file names and the frame-time convention."""

from __future__ import annotations

import re

def fmt_seconds(x: float) -> str:
    return f"{x:.3f}"


def textgrid(tiers, xmax: float) -> str:
    """A long-form Praat TextGrid. ``tiers``: list of (name, [(start_s, stop_s, label)]); gaps are filled."""
    out = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {xmax:.4f}",
           "tiers? <exists>", f"size = {len(tiers)}", "item []:"]
    for n, (name, segs) in enumerate(tiers, 1):
        ivs, t = [], 0.0
        for a, b, lab in segs:
            a, b = max(a, t), min(b, xmax)
            if a > t + 1e-9:
                ivs.append((t, a, ""))
            if b > a:
                ivs.append((a, b, lab))
                t = b
        if t < xmax - 1e-9 or not ivs:
            ivs.append((t, xmax, ""))
        out += [f"    item [{n}]:", '        class = "IntervalTier"', f'        name = "{name}"',
                "        xmin = 0", f"        xmax = {xmax:.4f}", f"        intervals: size = {len(ivs)}"]
        for k, (a, b, lab) in enumerate(ivs, 1):
            lab = lab.replace('"', '""')
            out += [f"        intervals [{k}]:", f"            xmin = {a:.4f}", f"            xmax = {b:.4f}",
                    f'            text = "{lab}"']
    return "\n".join(out) + "\n"


def safe_name(s: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", s).strip("._") or "utt"


def frame_time_offset(feature_config: dict) -> float:
    """Seconds to add to ``t * step`` to get the boundary before frame t: half of (window - step)."""
    win = feature_config.get("winlen")
    step = feature_config.get("winstep", 0.01)
    return max(0.0, (float(win) - float(step)) / 2) if win else 0.0

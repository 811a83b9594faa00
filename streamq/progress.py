"""Progress bars and logging shared by the library and the CLI.

Library code never prints: it reports through :func:`bar` (a tqdm bar on stderr
with rate and ETA) and the ``streamq`` logger. ``quiet=True`` silences the bar.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

log = logging.getLogger("streamq")


def bar(total=None, desc="", unit="it", quiet=False, **kw):
    """A progress bar with rate and ETA on stderr, or a silent stand-in when ``quiet``."""
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True,
                smoothing=0.1, leave=False, **kw)


def write_records(records, path, columns, extras=True) -> None:
    """Write metric records (dicts) as a CSV, atomically (temporary file, then rename).

    ``columns`` come first; with ``extras`` any other keys follow, sorted. Missing values and NaN are empty.
    """
    import csv
    import math
    import os
    from pathlib import Path

    cols = list(columns)
    if extras:
        cols += sorted({k for r in records for k in r} - set(cols))
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({c: "" if isinstance(r.get(c), float) and math.isnan(r[c]) else r.get(c, "") for c in cols})
    os.replace(tmp, path)

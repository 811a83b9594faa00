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

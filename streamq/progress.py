"""Progress bars and logging shared by the library and the CLI.

Library code never prints: it reports through :func:`bar` (a tqdm bar on stderr with rate and ETA) and
the ``streamq`` logger. ``quiet=True`` silences the bar. :func:`cli_logging` routes log records through
``tqdm.write`` so that a log line printed while a bar is live never breaks it.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from tqdm.auto import tqdm

log = logging.getLogger("streamq")


def bar(total=None, desc="", unit="it", quiet=False, **kw):
    """A progress bar with rate and ETA on stderr, or a silent stand-in when ``quiet``."""
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True,
                smoothing=0.1, leave=False, file=sys.stderr, **kw)


class _TqdmHandler(logging.StreamHandler):
    """Writes records with ``tqdm.write``: live bars are cleared, the line printed, the bars redrawn."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def cli_logging(level=logging.INFO):
    """Log ``streamq`` records (and warnings from ``warnings.warn``) as ``LEVEL message`` lines that never
    break a progress bar; restores the previous handlers on exit."""
    root = logging.getLogger()
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.handlers = old_handlers
        root.setLevel(old_level)

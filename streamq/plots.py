"""Every picture streamq draws (matplotlib, the ``plot`` extra). Functions take records / arrays and a path."""

from __future__ import annotations


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # the plot extra is optional for the library, required for pictures
        raise RuntimeError("pictures need matplotlib: pip install 'streamq[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

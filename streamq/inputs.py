"""What the estimators accept as X: one place for input validation.

- Streams: a :class:`streamq.store.FrameSource`, a store or ``.npy`` path, a ``np.memmap``, a Zarr or Dask
  array (anything chunked). Read in batches; each chunk's frames are checked for NaN / inf as it is read,
  so memory stays bounded by the batch.
- In-memory arrays (NumPy, lists): through scikit-learn's ``validate_data`` (ints become floats; NaN, inf,
  empty, 1-D, sparse and object input refused with scikit-learn's messages; ``n_features_in_`` set or
  checked), then float32.
"""

from __future__ import annotations

import os

import numpy as np
from sklearn.utils.validation import check_is_fitted, validate_data

from .store import ArraySource, FrameSource, as_source


def is_stream(X) -> bool:
    return isinstance(X, (FrameSource, str, os.PathLike, np.memmap)) or (
        not isinstance(X, (np.ndarray, list, tuple)) and hasattr(X, "chunks"))


def float32(X, name="X") -> np.ndarray:
    """C-contiguous float32; values that overflow float32 are refused (one line)."""
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    if X32.dtype != getattr(X, "dtype", None) and not np.isfinite(X32).all():
        raise ValueError(f"{name}: values beyond float32 range (|x| > 3.4e38); rescale the frames")
    return X32


def training_source(est, X, reset=True, name="X") -> FrameSource:
    """``X`` as a FrameSource for ``fit``; sets (``reset``) or checks ``est.n_features_in_``."""
    if is_stream(X):
        src = as_source(X, name=name)
        if not reset and src.dim != est.n_features_in_:
            raise ValueError(f"{src.name} has {src.dim} features, but {type(est).__name__} is expecting "
                             f"{est.n_features_in_} features as input")
    else:
        X = validate_data(est, X, dtype=[np.float32, np.float64], ensure_min_samples=1, reset=reset)
        src = ArraySource(float32(X, name), name=name)
    if reset:
        est.n_features_in_ = src.dim
    return src


def frames(est, X, fitted_attr: str) -> np.ndarray:
    """An in-memory batch for ``predict`` / ``score_samples`` / ``transform``: NotFittedError before fit,
    scikit-learn's checks (feature count included), float32."""
    check_is_fitted(est, fitted_attr)
    return float32(validate_data(est, X, dtype=[np.float32, np.float64], reset=False))

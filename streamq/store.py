"""Frame sources: the Zarr frame store and any (N, D) float array, streamed in minibatches.

Everything streamq learns from comes through :class:`FrameSource`:

- ``n_frames``, ``dim``;
- ``iter_minibatches(batch_size, seed, shuffle=True)``: one epoch of float32 (B, D) batches, every
  frame exactly once, memory bounded by the batch and a window of a few storage chunks;
- ``sample(n, seed)``: a deterministic held-out sample; ``read(start, stop)``; ``chunk_ranges()``.

:class:`FrameStore` is a Zarr v3 group on disk::

    STORE/
      zarr.json           group attributes: format version, feature config, committed counts
      frames/             float32 (N, D), chunked along N only
      offsets/            int64 (U + 1): utterance u is frames[offsets[u]:offsets[u+1]]
      ids/ transcripts/ paths/   str (U,)
      durations/          float64 (U,), seconds of audio

Crash safety: arrays are only ever appended to, every Zarr write is atomic (LocalStore
writes a temporary file and renames it), and the committed counts ``n_frames`` /
``n_utterances`` in the group attributes are written last. Rows past the committed
counts are ignored by readers and overwritten by the next append, so a writer killed
at any moment leaves every committed utterance intact.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 2 << 20  # ~2 MB of float32 per frames chunk


class StoreError(ValueError):
    """A store that cannot be opened, written or read as asked; the message names the store or field."""


def default_chunk_frames(dim: int) -> int:
    return max(1024, (DEFAULT_CHUNK_BYTES // (4 * max(dim, 1))) // 1024 * 1024)


class FrameSource:
    """Base class: streaming access to N frames of dimension D. Subclasses implement ``_read``."""

    n_frames: int
    dim: int
    chunk_frames: int
    name: str = "array"

    # ----------------------------------------------------------------- reading
    def _read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)`` as float32 C-contiguous (stop - start, D)."""
        start, stop = max(0, int(start)), min(self.n_frames, int(stop))
        if stop <= start:
            return np.empty((0, self.dim), np.float32)
        return np.ascontiguousarray(self._read(start, stop), dtype=np.float32)

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """The storage chunks as (start, stop) frame ranges, in order."""
        c = self.chunk_frames
        return [(s, min(s + c, self.n_frames)) for s in range(0, self.n_frames, c)]

    def _check_finite(self, x: np.ndarray, start: int) -> None:
        if np.isfinite(x.sum(dtype=np.float64)):  # fast path: a float64 sum of float32 frames cannot overflow
            return
        ok = np.isfinite(x).all(axis=1)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            where = ", ".join(str(start + int(i)) for i in bad[:5])
            more = "" if len(bad) <= 5 else ", ..."
            raise StoreError(f"{self.name}: {len(bad)} frames with NaN or inf in rows {start}..{start + len(x) - 1} "
                             f"(first at frame {where}{more}); clean or drop them before clustering")

    # --------------------------------------------------------------- streaming
    def iter_minibatches(self, batch_size: int, seed: int = 0, shuffle: bool = True, window_chunks: int = 4,
                         check_finite: bool = True, drop_last: bool = False, prefetch: int = 2, exclude=None):
        """Yield one epoch of float32 (B, D) batches; every frame exactly once.

        Shuffled order: chunks in a seeded random order, read ``window_chunks`` at a time by a
        background thread (so decompression overlaps the caller's compute), each window permuted as
        a whole; ``prefetch`` windows are read ahead concurrently. Memory: about (prefetch + 1) ×
        ``window_chunks`` chunks + one batch, whatever N is. ``shuffle=False``
        streams frames in storage order. The last batch may be short unless ``drop_last``.
        ``exclude``: sorted frame indices to leave out (a held-out set); the epoch covers the rest.

        Raises
        ------
        StoreError
            A frame holds NaN or inf (the message gives how many and where), when ``check_finite``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ranges = self.chunk_ranges()
        if shuffle:
            ranges = [ranges[i] for i in np.random.default_rng(seed).permutation(len(ranges))]
        windows = [ranges[i:i + window_chunks] for i in range(0, len(ranges), max(window_chunks, 1))]

        def load(w):
            """Read window ``w`` and, when shuffling, scatter its rows into a seeded random order (one copy)."""
            parts = [self.read(a, b) for a, b in windows[w]]
            if check_finite:
                for (a, _), p in zip(windows[w], parts):
                    self._check_finite(p, a)
            if exclude is not None:
                for i, (a, b) in enumerate(windows[w]):
                    lo, hi = np.searchsorted(exclude, [a, b])
                    if hi > lo:
                        parts[i] = np.delete(parts[i], exclude[lo:hi] - a, axis=0)
            block = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if shuffle:  # np.take is several times faster than fancy indexing for row gathers
                block = np.take(block, np.random.default_rng([seed, w]).permutation(len(block)), axis=0)
            return block

        carry = None
        with concurrent.futures.ThreadPoolExecutor(max_workers=prefetch) as pool:
            pending = [pool.submit(load, w) for w in range(min(prefetch, len(windows)))]
            for w in range(len(windows)):
                block = pending.pop(0).result()
                if w + prefetch < len(windows):
                    pending.append(pool.submit(load, w + prefetch))
                s = 0
                if carry is not None:  # complete the batch left over from the previous window
                    s = min(batch_size - len(carry), len(block))
                    carry = np.concatenate([carry, block[:s]])
                    if len(carry) < batch_size:
                        continue
                    yield carry
                    carry = None
                while s + batch_size <= len(block):
                    yield block[s:s + batch_size]
                    s += batch_size
                if s < len(block):
                    carry = block[s:].copy()
        if carry is not None and len(carry) and not drop_last:
            yield carry

    def sample_indices(self, n: int, seed: int = 0) -> np.ndarray:
        """Sorted indices of a uniform sample of ``min(n, N)`` distinct frames (int64)."""
        n = min(int(n), self.n_frames)
        return np.sort(np.random.default_rng(seed).choice(self.n_frames, size=n, replace=False)).astype(np.int64)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """A uniform sample of ``min(n, N)`` distinct frames, float32 (n, D), reading one chunk at a time."""
        return self.take(self.sample_indices(n, seed))

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Frames at sorted indices ``idx``, float32 (len(idx), D), reading one chunk at a time."""
        n = len(idx)
        out = np.empty((n, self.dim), np.float32)
        done = 0
        for a, b in self.chunk_ranges():
            hi = np.searchsorted(idx, b)
            if hi > done:
                block = self.read(a, b)
                self._check_finite(block, a)
                out[done:hi] = block[idx[done:hi] - a]
                done = hi
        return out


class ArraySource(FrameSource):
    """Any (N, D) float array (NumPy, ``np.load(..., mmap_mode='r')``, zarr.Array) as a frame source."""

    def __init__(self, array, name: str = "array", chunk_frames: int | None = None):
        shape = getattr(array, "shape", None)
        dtype = np.dtype(getattr(array, "dtype", np.float64))
        if shape is None or len(shape) != 2:
            raise StoreError(f"{name}: expected a 2-D (N, D) array of frames, got shape {shape}")
        if not (np.issubdtype(dtype, np.floating)):
            raise StoreError(f"{name}: expected float frames, got dtype {dtype}; convert with .astype(np.float32)")
        if shape[0] == 0 or shape[1] == 0:
            raise StoreError(f"{name}: no frames (shape {shape})")
        self.array, self.name = array, name
        self.n_frames, self.dim = int(shape[0]), int(shape[1])
        zchunks = getattr(array, "chunks", None)
        self.chunk_frames = int(chunk_frames or (zchunks[0] if zchunks else default_chunk_frames(self.dim)))

    def _read(self, start, stop):
        return np.asarray(self.array[start:stop])


class FrameStore(FrameSource):
    """The chunked Zarr v3 frame store with an utterance index (see the module docstring)."""

    def __init__(self, path, group, writable=False):
        self.path, self.group, self.writable = Path(path), group, writable
        self.name = str(path)
        self._reload()

    # --------------------------------------------------------------- creating
    @classmethod
    def create(cls, path, dim: int, feature_config: dict | None = None, chunk_frames: int | None = None,
               exist_ok: bool = False) -> "FrameStore":
        """Create an empty store (or open an existing one with the same dim and config when ``exist_ok``)."""
        import zarr

        path = Path(path)
        if (path / "zarr.json").exists():
            if not exist_ok:
                raise StoreError(f"{path}: a store already exists here")
            store = cls.open(path, mode="a")
            if store.dim != dim:
                raise StoreError(f"{path}: store has dim {store.dim}, new frames have dim {dim}")
            if feature_config is not None and store.feature_config and store.feature_config != feature_config:
                raise StoreError(f"{path}: store was made with a different feature config "
                                 f"({store.feature_config}); use a new store")
            return store
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path}: directory exists and is not a streamq store")
        chunk_frames = int(chunk_frames or default_chunk_frames(dim))
        g = zarr.open_group(str(path), mode="w")
        g.create_array("frames", shape=(0, dim), chunks=(chunk_frames, dim), dtype="float32")
        g.create_array("offsets", shape=(1,), chunks=(65536,), dtype="int64", fill_value=0)
        for name in ("ids", "transcripts", "paths"):
            g.create_array(name, shape=(0,), chunks=(65536,), dtype=str)
        g.create_array("durations", shape=(0,), chunks=(65536,), dtype="float64")
        g.attrs.update({"streamq_format": FORMAT_VERSION, "dim": dim, "feature_config": feature_config or {},
                        "n_frames": 0, "n_utterances": 0})
        return cls(path, g, writable=True)

    @classmethod
    def open(cls, path, mode: str = "r") -> "FrameStore":
        """Open an existing store; ``mode='a'`` to append."""
        import zarr

        path = Path(path)
        if not (path / "zarr.json").exists():
            raise StoreError(f"{path}: not a streamq frame store (no zarr.json); create one with `streamq ingest`")
        g = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
        if "streamq_format" not in g.attrs:
            raise StoreError(f"{path}: Zarr group is not a streamq frame store (no streamq_format attribute)")
        if g.attrs["streamq_format"] > FORMAT_VERSION:
            raise StoreError(f"{path}: store format {g.attrs['streamq_format']} is newer than this streamq")
        return cls(path, g, writable=mode != "r")

    def _reload(self):
        a = self.group.attrs.asdict()
        self.dim = int(a["dim"])
        self.n_frames = int(a["n_frames"])
        self.n_utterances = int(a["n_utterances"])
        self.feature_config = dict(a.get("feature_config") or {})
        self._frames = self.group["frames"]
        self.chunk_frames = int(self._frames.chunks[0])
        self._index = None

    # ---------------------------------------------------------------- writing
    @contextlib.contextmanager
    def writer_lock(self):
        """Hold an exclusive lock for writing; a second writer gets a clear error, a killed one releases it."""
        f = open(self.path / ".writer.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise StoreError(f"{self.path}: another streamq process is writing to this store; "
                             "wait for it to finish or stop it") from None
        try:
            yield self
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    def append(self, utterances) -> None:
        """Append utterances and commit them atomically.

        Parameters
        ----------
        utterances : list of dict with keys ``id`` (str), ``frames`` (float32 (T, D)), and optional
            ``transcript`` (str), ``path`` (str), ``duration`` (float seconds).
        """
        if not self.writable:
            raise StoreError(f"{self.path}: store opened read-only")
        if not utterances:
            return
        for u in utterances:
            f = u["frames"]
            if f.ndim != 2 or f.shape[1] != self.dim:
                raise StoreError(f"{self.path}: utterance {u['id']} has frames of shape {f.shape}, store dim {self.dim}")
            if len(f) == 0:
                raise StoreError(f"{self.path}: utterance {u['id']} has no frames")
            if not np.isfinite(f).all():
                raise StoreError(f"{self.path}: utterance {u['id']} has NaN or inf frames")
        g, n0, u0 = self.group, self.n_frames, self.n_utterances
        frames = np.concatenate([np.asarray(u["frames"], np.float32) for u in utterances])
        lengths = np.array([len(u["frames"]) for u in utterances], np.int64)
        n1, u1 = n0 + len(frames), u0 + len(utterances)
        # 1. data past the committed counts (readers ignore it until step 2)
        if self._frames.shape[0] < n1:
            self._frames.resize((n1, self.dim))
        self._frames[n0:n1] = frames
        cols = {"ids": [u["id"] for u in utterances],
                "transcripts": [u.get("transcript", "") or "" for u in utterances],
                "paths": [str(u.get("path", "")) for u in utterances]}
        for name, values in cols.items():
            arr = g[name]
            if arr.shape[0] < u1:
                arr.resize((u1,))
            arr[u0:u1] = np.array(values, dtype=str)
        dur = g["durations"]
        if dur.shape[0] < u1:
            dur.resize((u1,))
        dur[u0:u1] = np.array([float(u.get("duration", 0.0)) for u in utterances])
        off = g["offsets"]
        if off.shape[0] < u1 + 1:
            off.resize((u1 + 1,))
        off[u0 + 1:u1 + 1] = n0 + np.cumsum(lengths)
        # 2. the commit point
        g.attrs.update({"n_frames": n1, "n_utterances": u1})
        self.n_frames, self.n_utterances, self._index = n1, u1, None

    # ---------------------------------------------------------------- reading
    def _read(self, start, stop):
        return self._frames[start:stop]

    def _load_index(self):
        if self._index is None:
            g, u = self.group, self.n_utterances
            self._index = {
                "offsets": np.asarray(g["offsets"][:u + 1], np.int64),
                "ids": [str(s) for s in g["ids"][:u]] if u else [],
                "transcripts": [str(s) for s in g["transcripts"][:u]] if u else [],
                "paths": [str(s) for s in g["paths"][:u]] if u else [],
                "durations": np.asarray(g["durations"][:u], np.float64) if u else np.zeros(0),
            }
        return self._index

    offsets = property(lambda self: self._load_index()["offsets"])
    ids = property(lambda self: self._load_index()["ids"])
    transcripts = property(lambda self: self._load_index()["transcripts"])
    paths = property(lambda self: self._load_index()["paths"])
    durations = property(lambda self: self._load_index()["durations"])

    @property
    def frame_step(self) -> float:
        """Seconds between consecutive frames (the MFCC window step)."""
        return float(self.feature_config.get("winstep", 0.01))

    def utterance(self, i: int) -> tuple[np.ndarray, str]:
        """Frames float32 (T_i, D) and transcript of utterance ``i``."""
        if not 0 <= i < self.n_utterances:
            raise IndexError(f"{self.path}: utterance {i} out of range (0..{self.n_utterances - 1})")
        off = self.offsets
        return self.read(off[i], off[i + 1]), self.transcripts[i]

    def info(self) -> dict:
        """Summary numbers for ``streamq info``."""
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        hours = float(self.durations.sum()) / 3600 if self.n_utterances else 0.0
        return {"path": str(self.path), "frames": self.n_frames, "utterances": self.n_utterances,
                "hours": hours, "dim": self.dim, "chunk_frames": self.chunk_frames,
                "chunks": len(self.chunk_ranges()), "bytes_on_disk": size,
                "frame_step": self.frame_step, "feature_config": self.feature_config}


def as_source(obj, name: str | None = None) -> FrameSource:
    """Wrap anything streamq can learn from as a :class:`FrameSource`.

    ``obj``: a FrameSource, a store directory, a ``.npy`` path (opened as a memmap), a Zarr array
    (or its path), or an (N, D) float NumPy array.
    """
    if isinstance(obj, FrameSource):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if p.suffix == ".npy":
            if not p.exists():
                raise StoreError(f"{p}: file not found")
            return ArraySource(np.load(p, mmap_mode="r"), name=str(p))
        if (p / "zarr.json").exists():
            import json

            meta = json.loads((p / "zarr.json").read_text())
            if meta.get("node_type") == "array":
                import zarr

                return ArraySource(zarr.open_array(str(p), mode="r"), name=str(p))
            return FrameStore.open(p)
        raise StoreError(f"{p}: not a frame store, .npy file or Zarr array")
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return ArraySource(obj, name=name or type(obj).__name__)
    raise TypeError(f"cannot stream frames from {type(obj).__name__}; pass a FrameStore, path, or (N, D) array")

"""Corpus discovery and resumable, parallel ingest into a :class:`~streamq.store.FrameStore`.

A source is one of

- a **Common Voice release** directory: ``clips/`` plus ``validated.tsv``, ``train.tsv``, ... (``split``
  picks the TSV); columns are found by header name (``path``, ``sentence``), whatever else is there;
- a **TSV list**: a header with a ``path`` column and optionally ``sentence`` / ``transcript`` / ``text``, or
  no header and rows ``path[<TAB>transcript]``; relative paths are relative to the TSV;
- a **directory** of audio, searched recursively; a ``.txt`` file beside a clip is its transcript.

Extraction runs in a process pool (``jobs``); one writer appends results in source order, so a
resumed run ends with the same store as an uninterrupted one. Bad clips are reported by name in
``STORE.rejects.tsv`` and skipped (``strict=True`` makes the first one fatal).
"""

from __future__ import annotations

import csv
import dataclasses
import multiprocessing
import time
from pathlib import Path

from .features import AUDIO_EXTENSIONS, AudioError, FeatureConfig, extract
from .progress import bar, log
from .store import FrameStore, StoreError

TRANSCRIPT_COLUMNS = ("sentence", "transcript", "text")


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    path: str
    transcript: str = ""


class CorpusError(ValueError):
    """The corpus description itself is unusable (no TSV, no path column, ...)."""


def _read_tsv(tsv: Path) -> tuple[list[str] | None, list[list[str]]]:
    csv.field_size_limit(1 << 24)
    with open(tsv, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r and any(c.strip() for c in r)]
    if not rows:
        raise CorpusError(f"{tsv}: empty TSV")
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header:
        return header, rows[1:]
    return None, rows


def _items_from_tsv(tsv: Path, audio_dir: Path) -> list[Item]:
    header, rows = _read_tsv(tsv)
    if header is None:
        p_col, t_col = 0, 1
    else:
        p_col = header.index("path")
        t_col = next((header.index(c) for c in TRANSCRIPT_COLUMNS if c in header), None)
    items = []
    for r in rows:
        if p_col >= len(r) or not r[p_col].strip():
            continue
        rel = r[p_col].strip()
        path = Path(rel) if Path(rel).is_absolute() else audio_dir / rel
        text = r[t_col].strip() if t_col is not None and t_col < len(r) else ""
        items.append(Item(Path(rel).stem, str(path), text))
    return items


def discover(src, split: str = "validated") -> list[Item]:
    """List a corpus's utterances in a deterministic order (see the module docstring)."""
    src = Path(src)
    if not src.exists():
        raise CorpusError(f"{src}: no such file or directory")
    if src.is_file():
        if src.suffix.lower() in AUDIO_EXTENSIONS:
            return [Item(src.stem, str(src), "")]
        return _items_from_tsv(src, src.parent)
    if (src / "clips").is_dir() and any(src.glob("*.tsv")):
        tsv = src / f"{split}.tsv"
        if not tsv.exists():
            have = ", ".join(sorted(p.stem for p in src.glob("*.tsv")))
            raise CorpusError(f"{src}: Common Voice split '{split}' not found ({tsv.name} missing; have: {have})")
        header, _ = _read_tsv(tsv)
        if header is None:
            raise CorpusError(f"{tsv}: no 'path' column in the header")
        return _items_from_tsv(tsv, src / "clips")
    items = []
    for p in sorted(src.rglob("*")):
        if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file():
            txt = p.with_suffix(".txt")
            items.append(Item(p.stem, str(p), txt.read_text(encoding="utf-8").strip() if txt.exists() else ""))
    if not items:
        raise CorpusError(f"{src}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) and no Common Voice TSVs")
    return items


_LIMITS = None


def _worker_init():
    """One BLAS thread per extraction process: ``jobs`` processes already use the cores, and OpenBLAS
    threads of several processes spinning against each other made --jobs 2 slower than --jobs 1."""
    global _LIMITS
    from threadpoolctl import threadpool_limits

    _LIMITS = threadpool_limits(limits=1)


def _extract_one(args):
    item, config = args
    try:
        if not Path(item.path).is_file():
            raise AudioError(f"{item.path}: file missing")
        frames, duration = extract(item.path, config)
    except AudioError as e:
        return item, None, 0.0, str(e)
    except ImportError:  # a broken installation is not a bad clip: stop
        raise
    except Exception as e:  # never let one odd clip kill the pool; report it by name
        return item, None, 0.0, f"{item.path}: {type(e).__name__}: {e}"
    return item, frames, duration, None


def _write_rejects(path, rejects):
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\tpath\treason\n")
        for r in rejects:
            f.write("\t".join(x.replace("\t", " ").replace("\n", " ") for x in r) + "\n")


def rejects_path(store_path) -> Path:
    p = Path(store_path)
    return p.with_name(p.name + ".rejects.tsv")


def ingest(src, store_path, config: FeatureConfig | None = None, split: str = "validated", jobs: int = 1,
           strict: bool = False, chunk_frames: int | None = None, quiet: bool = False,
           commit_seconds: float = 2.0) -> dict:
    """Extract MFCCs of every clip in ``src`` into the store at ``store_path`` (created if absent).

    Resumable: utterances already committed are skipped, so re-running after a kill finishes the
    job and re-running a finished ingest does nothing. Returns a summary dict.
    """
    config = config or FeatureConfig()
    items = discover(src, split)
    store = FrameStore.create(store_path, config.numcep, feature_config=config.as_dict(),
                              chunk_frames=chunk_frames, exist_ok=True)
    rejects = []
    with store.writer_lock():
        done = set(store.ids)
        seen, todo = set(), []
        for it in items:
            if it.id in seen:
                rejects.append((it.id, it.path, f"{it.path}: duplicate utterance id '{it.id}'"))
                continue
            seen.add(it.id)
            if it.id not in done:
                todo.append(it)
        log.info("%s: %d utterances listed, %d already stored, %d to extract", src, len(items),
                 len(items) - len(todo) - len(rejects), len(todo))
        t0, audio_s, added, frames_added = time.perf_counter(), 0.0, 0, 0
        buffer, buffered, last = [], 0, time.perf_counter()

        def flush():
            nonlocal buffer, buffered, last
            store.append(buffer)
            buffer, buffered, last = [], 0, time.perf_counter()

        args = ((it, config) for it in todo)
        pool = (multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init)
                if jobs > 1 and len(todo) > 1 else None)
        results = pool.imap(_extract_one, args, chunksize=2) if pool else map(_extract_one, args)
        try:
            with bar(len(todo), desc="ingest", unit="clip", quiet=quiet) as pb:
                for item, frames, duration, error in results:
                    if error is not None:
                        if strict:
                            raise AudioError(error)
                        rejects.append((item.id, item.path, error))
                        log.warning("rejected %s", error)
                    else:
                        buffer.append({"id": item.id, "frames": frames, "transcript": item.transcript,
                                       "path": item.path, "duration": duration})
                        buffered += len(frames)
                        audio_s += duration
                        added += 1
                        frames_added += len(frames)
                        if buffered >= store.chunk_frames or time.perf_counter() - last > commit_seconds:
                            flush()
                    pb.update(1)
                    wall = time.perf_counter() - t0
                    pb.set_postfix_str(f"{audio_s / 3600:.2f} h audio, {audio_s / 3600 / max(wall, 1e-9):.4f} h/s "
                                       f"({audio_s / max(wall, 1e-9):.0f}x realtime)", refresh=False)
            if buffer:
                flush()
        finally:
            if pool:
                pool.terminate()
                pool.join()
    wall = time.perf_counter() - t0
    rp = rejects_path(store_path)
    if todo and added == 0 and len(rejects) >= len(todo):
        _write_rejects(rp, rejects)
        raise AudioError(f"{src}: all {len(todo)} clips were rejected (first: {rejects[0][2]}); see {rp}")
    if rejects:
        _write_rejects(rp, rejects)
    elif rp.exists():
        rp.unlink()
    return {"store": str(store_path), "listed": len(items), "added": added, "frames_added": frames_added,
            "skipped_existing": sum(1 for it in items if it.id in done),
            "rejected": len(rejects), "rejects_file": str(rp) if rejects else None,
            "audio_seconds": audio_s, "wall_seconds": wall, "n_frames": store.n_frames,
            "n_utterances": store.n_utterances}


__all__ = ["Item", "CorpusError", "discover", "ingest", "rejects_path", "StoreError"]

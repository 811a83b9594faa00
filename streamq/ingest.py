"""Corpus discovery and resumable, parallel ingest into a :class:`~streamq.store.FrameStore`.

A source is one of

- a **Common Voice release** directory: ``clips/`` plus ``validated.tsv``, ``train.tsv``, ... (``split``
  picks the TSV); columns are found by header name (``path``, ``sentence``, ``client_id``), whatever else
  is there. The id is the clip name without its extension; the speaker is ``client_id``;
- a **TSV list**: a header with a ``path`` column and optionally ``sentence`` / ``transcript`` / ``text``
  and ``speaker`` / ``spk`` / ``speaker_id`` / ``client_id``, or no header and rows
  ``path[<TAB>transcript]``; relative paths are relative to the TSV, and so is the id (the path without
  its extension);
- a **directory** of audio, searched recursively (the MFA corpus layout): the id is the path relative to
  the directory without its extension (``spk1/001``), the speaker the first directory level under it,
  and a ``.lab`` (else ``.txt``) file beside a clip is its transcript.

Ids are unique by construction; whitespace in an id (it would break space-separated outputs such as
CTM) is replaced by ``_``. Rows that cannot be read as they stand (more fields than the header: a tab
inside a transcript) are rejected, never cut.

Extraction runs in a process pool (``jobs``) or on a Dask cluster (``client``); one writer appends
results in source order, so a resumed run ends with the same store as an uninterrupted one. Bad clips are
reported by name in ``STORE.rejects.tsv`` and skipped (``strict=True`` makes the first one fatal).

The local pool is forked (no re-import per process). For a new store with ``jobs > 1`` a forked extraction
process (:class:`_Extractor`) imports the decoders while the writer lists the corpus, then runs the pool
and relays its results in order while the writer imports zarr and creates the store.

On Dask (:func:`_dask_results`) the listing is cut into fixed shards by position (:func:`shard_size`: at most
``SHARD_ITEMS`` clips, at least ``MIN_SHARDS`` shards when the listing allows); each task extracts one shard
into ``STORE.shards/`` (one file, written atomically, named by a hash of its clips and the feature config),
and the client appends the shards in order. A killed worker's shard is rerun by the scheduler; a killed client
finds the finished shard files on the next run and only extracts the rest; ``STORE.shards/`` is removed when
the ingest completes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from .features import AUDIO_EXTENSIONS, AudioError, FeatureConfig, extract
from .progress import bar, log
from .store import FrameStore, StoreError, is_url, refuse_remote_write, writer_lock

TRANSCRIPT_COLUMNS = ("sentence", "transcript", "text")
SPEAKER_COLUMNS = ("client_id", "speaker", "spk", "speaker_id")
TRANSCRIPT_SUFFIXES = (".lab", ".txt")


@dataclasses.dataclass(frozen=True)
class Item:
    """One listed utterance. ``error`` is set for a listing row that cannot be used (it is rejected)."""

    id: str
    path: str
    transcript: str = ""
    speaker: str = ""
    error: str | None = None


class CorpusError(ValueError):
    """The corpus description itself is unusable (no TSV, no path column, ...)."""


_WS = re.compile(r"\s+")


def _make_id(path: Path, root: Path) -> str:
    """The id of ``path``: relative to ``root`` when inside it (else the absolute path without its leading
    ``/``), without the extension, ``/``-separated. Whitespace is replaced later (:func:`_sanitise`)."""
    p, r = Path(os.path.normpath(path)), Path(os.path.normpath(root))
    try:
        rel = p.relative_to(r)
    except ValueError:
        try:
            rel = Path(os.path.abspath(p)).relative_to(os.path.abspath(r))
        except ValueError:
            rel = Path(*Path(os.path.abspath(p)).parts[1:])
    return (rel.with_suffix("") if rel.suffix else rel).as_posix()


def _sanitise(items: list[Item]) -> list[Item]:
    """Replace whitespace in ids by ``_`` (CTM and other space-separated outputs need whitespace-free ids)."""
    out, changed = [], []
    for it in items:
        new = _WS.sub("_", it.id.strip())
        if new != it.id:
            changed.append((it.id, new))
            it = dataclasses.replace(it, id=new)
        out.append(it)
    if changed:
        log.warning("%d ids held whitespace, replaced by '_' (e.g. %r -> %r)", len(changed), *changed[0])
    return out


def _read_tsv(tsv: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    csv.field_size_limit(1 << 24)
    with open(tsv, newline="", encoding="utf-8-sig") as f:  # -sig: a UTF-8 byte-order mark is not a column name
        rows = [(n, r) for n, r in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1)
                if r and any(c.strip() for c in r)]
    if not rows:
        raise CorpusError(f"{tsv}: empty TSV")
    header = [c.strip().lower() for c in rows[0][1]]
    if "path" in header:
        return header, rows[1:]
    return None, rows


def _items_from_tsv(tsv: Path, audio_dir: Path) -> list[Item]:
    header, rows = _read_tsv(tsv)
    if header is None:
        p_col, t_col, s_col, width = 0, 1, None, 2
    else:
        p_col = header.index("path")
        t_col = next((header.index(c) for c in TRANSCRIPT_COLUMNS if c in header), None)
        s_col = next((header.index(c) for c in SPEAKER_COLUMNS if c in header), None)
        width = len(header)
    items = []
    for line, r in rows:
        if p_col >= len(r) or not r[p_col].strip():
            continue
        rel = r[p_col].strip()
        path = Path(rel) if Path(rel).is_absolute() else audio_dir / rel
        uid = _make_id(path, audio_dir)
        if len(r) > width:
            what = f"the header has {width}" if header is not None else "a list without a header has path<TAB>transcript"
            items.append(Item(uid, str(path), error=f"{tsv}:{line}: {len(r)} tab-separated fields but {what} "
                              "(a tab inside the transcript?); fix the row"))
            continue
        text = r[t_col].strip() if t_col is not None and t_col < len(r) else ""
        spk = r[s_col].strip() if s_col is not None and s_col < len(r) else ""
        items.append(Item(uid, str(path), text, spk))
    return items


def _transcript_beside(audio: Path) -> str:
    for suffix in TRANSCRIPT_SUFFIXES:
        t = audio.with_suffix(suffix)
        if t.is_file():
            return " ".join(t.read_text(encoding="utf-8-sig").split())
    return ""


def discover(src, split: str = "validated") -> list[Item]:
    """List a corpus's utterances in a deterministic order (see the module docstring).

    Items whose ``error`` is set are listing rows that cannot be used; :func:`ingest` rejects them.
    """
    src = Path(src)
    if not src.exists():
        raise CorpusError(f"{src}: no such file or directory")
    if src.is_file():
        if src.suffix.lower() in AUDIO_EXTENSIONS:
            return _sanitise([Item(_make_id(src, src.parent), str(src), _transcript_beside(src))])
        return _sanitise(_items_from_tsv(src, src.parent))
    if (src / "clips").is_dir() and any(src.glob("*.tsv")):
        tsv = src / f"{split}.tsv"
        if not tsv.exists():
            have = ", ".join(sorted(p.stem for p in src.glob("*.tsv")))
            raise CorpusError(f"{src}: Common Voice split '{split}' not found ({tsv.name} missing; have: {have})")
        header, _ = _read_tsv(tsv)
        if header is None:
            raise CorpusError(f"{tsv}: no 'path' column in the header")
        return _sanitise(_items_from_tsv(tsv, src / "clips"))
    items = []
    for p in sorted(src.rglob("*")):
        if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file():
            rel = p.relative_to(src)
            spk = rel.parts[0] if len(rel.parts) > 1 else ""
            items.append(Item(_make_id(p, src), str(p), _transcript_beside(p), spk))
    if not items:
        raise CorpusError(f"{src}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) and no Common Voice TSVs")
    return _sanitise(items)


_LIMITS = None


def _worker_init():
    """One BLAS thread per extraction process: ``jobs`` processes already use the cores, and OpenBLAS
    threads of several processes spinning against each other made --jobs 2 slower than --jobs 1."""
    global _LIMITS
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # first: a worker can always be terminated
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


def _mp_context():
    """Fork where the platform has it: the workers start with the parent's imports (numpy, the decoders,
    the DCT), in milliseconds instead of the ~0.5 s a spawned interpreter needs to import them, which is
    what made ``--jobs 2`` slower than one process on small corpora. Extraction touches no
    lock another thread could hold (no zarr, no logging)."""
    if "fork" in multiprocessing.get_all_start_methods():
        _preload()
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _preload():
    """Import the decoders and the DCT (imported lazily by :mod:`streamq.features`) before forking, so the
    workers inherit them instead of each importing them again."""
    from .features import preload

    preload()


def _extract_many(args):
    """:func:`_extract_one` over a list of items (one pool task: fewer round trips)."""
    items, config = args
    return [_extract_one((it, config)) for it in items]


def _pool_results(pool, items, config, per_task):
    """(item, frames, duration, error) for ``items`` in order, extracted by ``pool`` ``per_task`` at a time."""
    tasks = ((items[i:i + per_task], config) for i in range(0, len(items), per_task))
    for batch in pool.imap(_extract_many, tasks):
        yield from batch


def _per_task(n: int, jobs: int) -> int:
    """Clips per pool task: 8 (fewer round trips), fewer on short listings (every process gets work)."""
    return max(1, min(8, n // (4 * jobs)))


class _Extractor:
    """Extraction for a new store, started before the corpus is listed and the store created.

    One forked process (numpy and streamq come with it) imports the decoders and the MFCC code while this
    process lists the corpus; it receives the usable items, forks ``jobs`` extraction workers (they inherit
    those imports) and relays their results in source order, while this process imports zarr and creates
    the store on the other core. Without it these steps ran one after another in the writer and one core sat
    idle. The child never touches the store; it stops when the writer closes the connection or dies (a send
    to a dead writer fails)."""

    def __init__(self, config, jobs):
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_extractor_main, args=(child, self._conn, config, jobs),
                                 name="streamq-ingest-extract")
        self._proc.start()
        child.close()
        self._done, self._sender = False, None

    def start(self, usable) -> None:
        """Extract ``usable`` (items in source order). Sent by a thread: a long listing fills the pipe until
        the child, still importing, reads it, and this process has zarr to import meanwhile."""
        import threading

        self._sender = threading.Thread(target=self._send_items, args=(list(usable),), daemon=True)
        self._sender.start()

    def _send_items(self, usable):
        try:
            self._conn.send(usable)
        except OSError:  # the child is gone; results() says so
            pass

    def results(self):
        """(item, frames, duration, error) for the items given to :meth:`start`, in order."""
        self._sender.join()
        while True:
            try:
                kind, payload = self._conn.recv()
            except EOFError:
                raise RuntimeError(f"the extraction process stopped (exit code {self._proc.exitcode})") from None
            if kind == "error":
                raise payload
            if kind == "done":
                self._done = True
                return
            yield from payload

    def close(self):
        """Stop the extraction process: it leaves by itself once it has sent everything, else it is stopped
        now (SIGTERM: it terminates its workers)."""
        if not self._done:
            self._proc.terminate()
        if self._sender is not None:
            self._sender.join()
        self._conn.close()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _extractor_main(conn, parent_end, config, jobs):
    """The body of :class:`_Extractor`'s process."""
    import signal
    import sys

    parent_end.close()  # else a dead writer's pipe still has a reader (this process) and sends would block

    def send(kind, payload):
        conn.send((kind, payload))

    try:
        _preload()
        import threadpoolctl  # noqa: F401 - imported once here, not by each worker as it starts
        try:
            usable = conn.recv()
        except EOFError:  # the writer failed before it had a listing (a corpus error)
            return
        if len(usable) > 1:
            k = _per_task(len(usable), jobs)
            tasks = ((usable[i:i + k], config) for i in range(0, len(usable), k))
            with multiprocessing.get_context("fork").Pool(jobs, initializer=_worker_init) as pool:
                # SIGTERM unwinds through the pool's terminate; installed after the workers are forked, so
                # they keep the default action (a worker stuck in C code still dies when terminated)
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
                for batch in pool.imap(_extract_many, tasks):
                    send("batch", batch)
                send("done", None)  # before the pool's teardown: the writer never waits on it
        else:
            _worker_init()
            send("batch", [_extract_one((it, config)) for it in usable])
            send("done", None)
    except (BrokenPipeError, ConnectionResetError, SystemExit):  # the writer has stopped listening
        pass
    except BaseException as e:  # noqa: BLE001 - any failure goes to the writer, which raises it
        try:
            send("error", e)
        except Exception:
            try:
                send("error", RuntimeError(f"extraction failed: {type(e).__name__}: {e}"))
            except Exception:
                pass
    finally:
        conn.close()


# ------------------------------------------------------------------------------------ ingest on Dask
SHARD_ITEMS = 64  # clips per Dask task (a shard file) at most ...
MIN_SHARDS = 16   # ... and at least this many shards when there are that many clips


def shard_size(n_items: int) -> int:
    """Clips per shard for a listing of ``n_items``: a function of the listing only (stable across re-runs)."""
    return max(1, min(SHARD_ITEMS, -(-int(n_items) // MIN_SHARDS)))


def shards_dir(store_path) -> Path:
    """Where a Dask ingest keeps finished shards until they are appended: ``STORE.shards/`` beside the store."""
    p = Path(store_path)
    return p.with_name(p.name + ".shards")


def _shard_name(k: int, items, config) -> str:
    h = hashlib.sha1(json.dumps([config.as_dict(), [(it.id, it.path) for it in items]]).encode()).hexdigest()[:16]
    return f"shard-{k:07d}-{h}.npz"


def _extract_shard(path: str, items, config) -> str:
    """Extract ``items`` into the shard file ``path`` (atomic: a temporary file renamed into place); a shard
    already there (a previous run's) is kept. Runs on a Dask worker."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    if os.path.exists(path):
        return path
    with threadpool_limits(limits=1):
        res = [_extract_one((it, config)) for it in items]
    lengths = np.array([0 if f is None else len(f) for _, f, _, _ in res], np.int64)
    parts = [f for _, f, _, _ in res if f is not None]
    frames = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, config.numcep), np.float32)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, frames=frames, lengths=lengths, durations=np.array([d for _, _, d, _ in res], np.float64),
                 errors=np.array([e or "" for _, _, _, e in res], dtype=str))
    os.replace(tmp, path)
    return path


def _read_shard(path, items):
    import numpy as np

    with np.load(path) as z:
        frames, lengths, durations, errors = z["frames"], z["lengths"], z["durations"], z["errors"]
    if len(lengths) != len(items):
        raise StoreError(f"{path}: shard holds {len(lengths)} clips, expected {len(items)}; delete it and re-run")
    off = np.concatenate([[0], np.cumsum(lengths)])
    for j, it in enumerate(items):
        if errors[j]:
            yield it, None, 0.0, str(errors[j])
        else:
            yield it, frames[off[j]:off[j + 1]], float(durations[j]), None


def _dask_results(client, listing, todo, config, store_path):
    """(item, frames, duration, error) for ``todo`` in order, extracted on the Dask workers shard by shard.

    Shards are fixed slices of ``listing`` (the usable items, in source order), so a re-run after a kill
    finds the same shard names for the shards it has not appended yet."""
    from .distributed import ordered_map

    want = {id(it) for it in todo}
    d = shards_dir(Path(store_path).absolute())  # absolute: workers need not share the client's directory
    d.mkdir(parents=True, exist_ok=True)
    jobs, keep, per = [], [], shard_size(len(listing))
    for k in range(0, len(listing), per):
        sh = [it for it in listing[k:k + per] if id(it) in want]
        if sh:
            ship = [dataclasses.replace(it, path=os.path.abspath(it.path)) for it in sh]
            jobs.append((str(d / _shard_name(k // per, ship, config)), ship, config))
            keep.append(sh)
    for sh, done in zip(keep, ordered_map(client, _extract_shard, jobs, key="ingest-shard")):
        yield from _read_shard(done, sh)


def _write_rejects(path, rejects):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("id\tpath\treason\n")
        for r in rejects:
            f.write("\t".join(x.replace("\t", " ").replace("\n", " ") for x in r) + "\n")
    os.replace(tmp, path)


def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def rejects_path(store_path) -> Path:
    p = Path(store_path)
    return p.with_name(p.name + ".rejects.tsv")


def ingest(src, store_path, config: FeatureConfig | None = None, split: str = "validated", jobs: int = 1,
           strict: bool = False, chunk_frames: int | None = None, quiet: bool = False,
           commit_seconds: float = 2.0, client=None) -> dict:
    """Extract MFCCs of every clip in ``src`` into the store at ``store_path`` (created if absent).

    Resumable: utterances already committed are skipped, so re-running after a kill finishes the
    job and re-running a finished ingest does nothing. ``client``: extract on that Dask cluster instead of
    local processes (the store's directory must be on a file system the workers share). The store must be a
    local (or shared) path: a URL is refused with how to ingest locally and copy. Returns a summary dict.
    """
    if is_url(str(store_path)):
        raise refuse_remote_write(str(store_path))
    config = config or FeatureConfig()
    pool, early, extractor = None, None, None
    new_store = not (Path(store_path) / "zarr.json").exists()
    if client is None and jobs > 1 and new_store and "fork" in multiprocessing.get_all_start_methods():
        # a new store: nothing is stored yet, so every usable item will be extracted; start at once (the
        # decoder imports while this process lists the corpus, then zarr here; see _Extractor)
        extractor = _Extractor(config, jobs)
        try:
            items = discover(src, split)
            usable = [it for it in items if it.error is None]
            extractor.start(usable)
            import zarr  # noqa: F401 - the writer's import, on the other core
        except BaseException:
            extractor.close()
            raise
        early = (usable, extractor.results())
    else:
        items = discover(src, split)
        if client is None and jobs > 1 and len(items) > 1 and new_store:  # no fork: a spawned pool, started early
            pool = _mp_context().Pool(jobs, initializer=_worker_init)
            usable = [it for it in items if it.error is None]
            early = (usable, _pool_results(pool, usable, config, _per_task(len(usable), jobs)))
    rejects = []
    try:
        with writer_lock(store_path):  # held from before the store exists: two ingests never race to create it
            summary = _ingest_locked(src, store_path, config, items, rejects, jobs, strict, chunk_frames, quiet,
                                     commit_seconds, client, pool, early)
    finally:
        if extractor is not None:
            extractor.close()
        if pool:
            pool.terminate()
            pool.join()
    return summary


def _local_results(todo, config):
    """:func:`_extract_one` over ``todo`` in this process, with one BLAS thread as in the workers (a second
    OpenBLAS thread buys nothing on these small products and, on a busy machine, spins against the other
    processes); the limit is lifted when the generator is closed."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        for it in todo:
            yield _extract_one((it, config))


def _wanted(usable, results, want):
    """The results of the items in ``want`` (ids of items), in order; then ``results`` is read to its end, so
    that its source finishes normally (the extraction process reaps its workers and leaves by itself)."""
    for it, r in zip(usable, results):
        if id(it) in want:
            yield r
    for _ in results:
        pass


def _ingest_locked(src, store_path, config, items, rejects, jobs, strict, chunk_frames, quiet, commit_seconds,
                   client, pool, early):
    store = FrameStore.create(store_path, config.numcep, feature_config=config.as_dict(),
                              chunk_frames=chunk_frames, exist_ok=True)
    done = dict(zip(store.ids, store.paths))
    seen, todo, skipped = {}, [], 0
    for it in items:
        if it.error is not None:
            reason = it.error
        elif it.id in seen:
            reason = f"{it.path}: duplicate utterance id '{it.id}' (also listed: {seen[it.id]})"
        elif it.id in done and not _same_file(done[it.id], it.path):
            reason = (f"{it.path}: id '{it.id}' is already in the store from another file ({done[it.id]}); "
                      "ids must be unique: rename the clip or use a new store")
        else:
            reason = None
        if reason is not None:
            if strict:
                raise CorpusError(reason)
            rejects.append((it.id, it.path, reason))
            log.warning("rejected %s", reason)
            continue
        seen[it.id] = it.path
        if it.id in done:
            skipped += 1
        else:
            todo.append(it)
    log.info("%s: %d utterances listed, %d already stored, %d to extract", src, len(items), skipped, len(todo))
    t0, audio_s, added, frames_added, n_listing = time.perf_counter(), 0.0, 0, 0, len(rejects)
    buffer, buffered, last = [], 0, time.perf_counter()

    def flush():
        nonlocal buffer, buffered, last
        store.append(buffer)
        buffer, buffered, last = [], 0, time.perf_counter()

    if client is not None:
        listing = [it for it in items if it.error is None]
        results = _dask_results(client, listing, todo, config, store_path)
    elif early is not None:  # started before the store was open: keep the items that are to do, in order
        results = _wanted(*early, {id(it) for it in todo})
    elif jobs > 1 and len(todo) > 1:
        pool = _mp_context().Pool(jobs, initializer=_worker_init)
        results = _pool_results(pool, todo, config, _per_task(len(todo), jobs))
    else:
        results = _local_results(todo, config)
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
                                   "speaker": item.speaker, "path": os.path.abspath(item.path),
                                   "duration": duration})
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
        if pool is not None and early is None:
            pool.terminate()
            pool.join()
    wall = time.perf_counter() - t0
    if client is not None:
        shutil.rmtree(shards_dir(store_path), ignore_errors=True)
    rp = rejects_path(store_path)
    if todo and added == 0:
        _write_rejects(rp, rejects)
        raise AudioError(f"{src}: all {len(todo)} clips were rejected (first: {rejects[n_listing][2]}); "
                         f"see {rp}")
    if rejects:
        _write_rejects(rp, rejects)
    elif rp.exists():
        rp.unlink()
    return {"store": str(store_path), "listed": len(items), "added": added, "frames_added": frames_added,
            "skipped_existing": skipped, "rejected": len(rejects), "rejects_file": str(rp) if rejects else None,
            "audio_seconds": audio_s, "wall_seconds": wall, "n_frames": store.n_frames,
            "n_utterances": store.n_utterances}


__all__ = ["Item", "CorpusError", "discover", "ingest", "rejects_path", "StoreError"]

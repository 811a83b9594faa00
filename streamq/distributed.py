"""Scale-out on Dask (``dask.distributed``): full passes as map-reduce over frame ranges, distributed ingest.

Every function here takes a ``client`` (a :class:`dask.distributed.Client`) and does what the local code
does, spread over the cluster's workers:

- a **full pass** (LBG's exact Lloyd passes, the GMM's initialisation and EM statistics, ``quantise``) splits
  the store's frames into ranges (:func:`partition`: a function of the data only, never of the number of
  workers), submits one task per range and tree-reduces the float64 sufficient statistics in a fixed order
  (:func:`tree_reduce`), so a pass gives the same bits whichever worker ran which range and however many
  times a range was rerun after a worker died. A task is a pure function of (store URL, range, model
  arrays); it reopens the store on the worker (cached per process) and runs the same Numba kernels as the
  local pass (:mod:`streamq.kernels.assign`, :mod:`streamq.kernels.gmm`, :mod:`streamq.kernels.tied`,
  :mod:`streamq.kernels.lattice`). Only statistics travel back.
- the **aligner's EM** does the same over contiguous groups of utterances; decoding maps over the groups
  and returns the alignments in corpus order (a bounded window of groups in flight).
- the minibatch EMA phases of LBG and MiniBatchLloyd are sequential and stay on the client.

The model arrays travel as the result of one small task per pass (not ``scatter``): a worker that holds
them may die, and the scheduler can then recompute them from the task, which it cannot do for scattered data.

Retries are the scheduler's: a worker killed mid-pass loses its tasks, the scheduler reruns them on the
others (``distributed.scheduler.allowed-failures``). Nothing here opens a socket or retries by itself.

Workers must be able to open the store: a path on a file system every worker mounts, or an fsspec URL
(``s3://...``, credentials from the workers' environment). Sources that only live in the client's memory
(NumPy arrays) are passed locally, with a warning.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from types import SimpleNamespace

import numpy as np

from .progress import bar, log

PART_FRAMES = 1 << 20  # at most this many frames per task ...
MIN_PARTS = 64         # ... and at least this many tasks per pass when the data allow it
SPLIT_EVERY = 8        # fan-in of the tree reduction
CONNECT_TIMEOUT = 5.0  # seconds to reach a scheduler before giving up with one line


class DistributedError(ValueError):
    """A cluster that cannot be reached or used as asked; one line naming the address or the store."""


# ------------------------------------------------------------------------------------------ the client
def _require():
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise DistributedError("--scheduler / --workers need dask.distributed: pip install 'streamq[dask]'") from None


_SHARED = {}


def shared(client):
    """``client`` made to copy as itself (``copy.copy`` / ``copy.deepcopy`` return it), so that
    scikit-learn's ``clone`` of an estimator holding it — which deep-copies every parameter — shares the
    cluster connection instead of failing on it. :func:`connect` already yields such a client. Returns
    ``client`` (None stays None)."""
    if client is None or getattr(type(client), "_streamq_shared", False):
        return client
    base = type(client)
    cls = _SHARED.get(base)
    if cls is None:
        cls = type(f"Shared{base.__name__}", (base,), {"_streamq_shared": True,
                                                       "__copy__": lambda self: self,
                                                       "__deepcopy__": lambda self, memo: self,
                                                       "__module__": __name__})
        _SHARED[base] = cls
    client.__class__ = cls
    return client


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None, timeout: float = CONNECT_TIMEOUT,
            threads_per_worker: int = 1):
    """A Dask client for the duration of the block, closed afterwards (``None`` when neither is given).

    ``scheduler``: the address of a running scheduler (``tcp://host:8786``, or a scheduler file path ending in
    ``.json``); ``workers``: start a :class:`~dask.distributed.LocalCluster` of that many worker processes
    (``threads_per_worker`` threads each). An unreachable scheduler raises :class:`DistributedError` after
    ``timeout`` seconds. The client is :func:`shared` (estimators holding it can be cloned).
    """
    if scheduler is not None and workers is not None:
        raise DistributedError("give either a scheduler address or a number of workers, not both")
    if scheduler is None and workers is None:
        yield None
        return
    _require()
    import logging

    import dask
    from distributed import Client, LocalCluster

    quiet = {name: logging.getLogger(name) for name in ("distributed", "tornado", "bokeh")}
    levels = {name: lg.level for name, lg in quiet.items()}
    for lg in quiet.values():  # Dask's INFO lines (scheduler, nannies, workers) would drown streamq's own
        lg.setLevel(logging.WARNING)
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": f"{timeout}s"}):
            yield from _connected(Client, LocalCluster, scheduler, workers, timeout, threads_per_worker)
    finally:
        for name, lg in quiet.items():
            lg.setLevel(levels[name])


def _connected(Client, LocalCluster, scheduler, workers, timeout, threads_per_worker):
    """Yield the client (and the local cluster behind it) and close them afterwards."""
    if scheduler is not None:
        try:
            if str(scheduler).endswith(".json"):
                client = Client(scheduler_file=str(scheduler), timeout=timeout)
            else:
                client = Client(str(scheduler), timeout=timeout)
        except (OSError, TimeoutError, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(f"{scheduler}: cannot reach the Dask scheduler ({msg}); start one with "
                                   "`dask scheduler` or use --workers N for a local cluster") from None
        try:
            yield shared(client)
        finally:
            client.close()
        return
    if int(workers) < 1:
        raise DistributedError(f"workers must be >= 1, got {workers}")
    import logging

    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=int(threads_per_worker), processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        yield shared(client)
    finally:
        client.close()
        cluster.close()


# ------------------------------------------------------------------------------------- ranges, reduce
def partition(n: int, unit: int, max_part: int = PART_FRAMES, min_parts: int = MIN_PARTS) -> list[tuple[int, int]]:
    """Split ``[0, n)`` into ranges whose starts are multiples of ``unit`` (a storage chunk or a batch): at
    least ``min_parts`` of them when there are that many units, none longer than ``max_part`` frames (unless
    one unit is). Depends only on the arguments, so a pass's arithmetic does not depend on the cluster."""
    n, unit = int(n), max(1, int(unit))
    if n <= 0:
        return []
    units = math.ceil(n / unit)
    want = max(min_parts, math.ceil(n / max(max_part, 1)))
    per = max(1, math.ceil(units / want))
    return [(a, min(a + per * unit, n)) for a in range(0, n, per * unit)]


def _add(*parts):
    """Element-wise sum of equally shaped tuples of statistics, strictly left to right (deterministic).
    Arrays and numbers are added, dicts merged (later keys win), lists concatenated."""
    out = list(parts[0])
    for p in parts[1:]:
        for j, v in enumerate(p):
            if isinstance(v, dict):
                out[j] = {**out[j], **v}
            elif isinstance(v, list):
                out[j] = out[j] + v
            else:
                out[j] = out[j] + v
    return tuple(out)


def tree_submit(client, futures, split_every: int = SPLIT_EVERY):
    """A future of the sum of the statistics of ``futures`` (in their order), added on the workers by a tree
    of ``split_every``-way additions; its value depends only on the order of ``futures``."""
    level = list(futures)
    if not level:
        raise ValueError("tree_reduce: nothing to reduce")
    depth = 0
    while len(level) > 1:
        level = [client.submit(_add, *level[i:i + split_every], pure=False,
                               key=f"streamq-reduce-{depth}-{i}-{_token()}")
                 if len(level[i:i + split_every]) > 1 else level[i] for i in range(0, len(level), split_every)]
        depth += 1
    return level[0]


def tree_sum(parts, split_every: int = SPLIT_EVERY):
    """The sum :func:`tree_submit` computes, in this process: the same grouping, so the same bits."""
    level = list(parts)
    if not level:
        raise ValueError("tree_sum: nothing to reduce")
    while len(level) > 1:
        level = [_add(*level[i:i + split_every]) if len(level[i:i + split_every]) > 1 else level[i]
                 for i in range(0, len(level), split_every)]
    return level[0]


def tree_reduce(client, futures, split_every: int = SPLIT_EVERY):
    """The sum of the statistics of ``futures`` (see :func:`tree_submit`), gathered to the client."""
    return tree_submit(client, futures, split_every).result()


def _reduce_with_bar(client, parts, sizes, desc, verbose):
    """Submit the reduction tree, show a bar over the parts as they finish, return the gathered sum."""
    top = tree_submit(client, parts)
    _wait_with_bar(client, parts, sizes, desc, verbose)
    return top.result()


_counter = [0]
_counter_lock = threading.Lock()


def _token() -> str:
    with _counter_lock:
        _counter[0] += 1
        return f"{os.getpid()}-{_counter[0]}-{time.monotonic_ns()}"


def _identity(x):
    return x


def _model(client, obj):
    """``obj`` (model arrays) as a future that the scheduler can recompute if the worker holding it dies."""
    return client.submit(_identity, obj, pure=False, key=f"streamq-model-{_token()}")


def _wait_with_bar(client, futures, sizes, desc, verbose):
    """Show a progress bar over the tasks as they finish (the reduction runs meanwhile); raises a task's error."""
    from distributed import as_completed

    size_of = {f.key: s for f, s in zip(futures, sizes)}
    with bar(int(sum(sizes)), desc, "frame", not verbose) as pb:
        for f in as_completed(futures):
            if f.status == "error":
                f.result()
            pb.update(size_of[f.key])


# ------------------------------------------------------------------------------------- worker side
_SOURCES: dict = {}
_SOURCES_LOCK = threading.Lock()


def _open(url: str, n_frames: int):
    """The frame source at ``url`` in this worker process (cached; reopened if the store has grown)."""
    from .store import as_source

    with _SOURCES_LOCK:
        src = _SOURCES.get(url)
        if src is None or src.n_frames != n_frames:
            src = as_source(url)
            _SOURCES[url] = src
    if src.n_frames != n_frames:
        raise DistributedError(f"{url}: the worker sees {src.n_frames} frames, the client {n_frames}; "
                               "is the store being written, or is it another file at the same path?")
    return src


def _open_utterances(url: str, n_frames: int):
    from .store import UtteranceSource

    key = ("utterances", url)
    with _SOURCES_LOCK:
        u = _SOURCES.get(key)
    if u is None or u.n_frames != n_frames:
        u = UtteranceSource.from_store(_open(url, n_frames))
        with _SOURCES_LOCK:
            _SOURCES[key] = u
    return u


@contextlib.contextmanager
def _task_threads(budget):
    """Numba threads for this task: the worker host's cores divided among the Dask threads running there
    (``budget``: {host: threads}), so 2 workers x 1 thread on 2 cores do not run 4 Numba threads."""
    import numba

    n = 1
    try:
        from distributed import get_worker

        host = get_worker().address.split("://")[-1].rsplit(":", 1)[0]
        n = int(budget.get(host, 1))
    except (ImportError, ValueError):
        n = int(budget.get(None, 1))
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


_BUDGETS: dict = {}


def thread_budget(client) -> dict:
    """{host: Numba threads per Dask thread} for the workers now in the cluster (cached per worker set)."""
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # older distributed: no n_workers argument
        workers = client.scheduler_info()["workers"]
    key = (id(client), frozenset(workers))
    if key in _BUDGETS:
        return _BUDGETS[key]
    cores = client.run(os.cpu_count)
    per_host_threads, per_host_cores = {}, {}
    for addr, w in workers.items():
        host = w.get("host") or addr.split("://")[-1].rsplit(":", 1)[0]
        per_host_threads[host] = per_host_threads.get(host, 0) + int(w.get("nthreads", 1))
        per_host_cores[host] = max(per_host_cores.get(host, 1), int(cores.get(addr) or 1))
    budget = {h: max(1, per_host_cores[h] // max(1, t)) for h, t in per_host_threads.items()}
    _BUDGETS[key] = budget
    return budget


def _blocks(src, a, b, batch):
    """(start, frames) of ``src`` over [a, b) in ``batch``-frame reads, each checked for NaN / inf, the next
    read running in a background thread while the caller computes (as ``iter_minibatches`` does locally)."""
    import concurrent.futures

    def load(p):
        X = src.read(p, min(p + batch, b))
        src.check_finite(X, p)
        return X

    starts = list(range(a, b, batch))
    if not starts:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, starts[0])
        for j, p in enumerate(starts):
            X = nxt.result()
            if j + 1 < len(starts):
                nxt = pool.submit(load, starts[j + 1])
            yield p, X


def _chunk_batch(source, batch):
    """A read size of whole storage chunks near ``batch`` frames (no chunk decoded twice)."""
    c = source.chunk_frames
    return c * max(1, int(round(batch / c)))


def source_url(source) -> str | None:
    """A path or URL from which a worker can reopen ``source``, or None (an in-memory array)."""
    from .store import FrameStore

    if isinstance(source, FrameStore):
        return source.url
    return getattr(source, "url", None)


def _url_or_none(source, what):
    url = source_url(source)
    if url is None:
        log.warning("%s: %s runs in this process: workers can only read stores, .npy files or Zarr arrays "
                    "(a path or URL), not arrays in the client's memory", getattr(source, "name", "X"), what)
    return url


# ------------------------------------------------------------------------------------- LBG / Lloyd
def _lloyd_part(url, n_frames, a, b, C, exclude, batch, budget):
    """Hard-assignment statistics of frames [a, b) (less ``exclude``): counts, sums, sse (float64), frames."""
    from .kernels.assign import assign, cluster_stats
    from .selection import codeword_groups

    src = _open(url, n_frames)
    group_of = codeword_groups(C)  # once per task (memoised per worker on the codebook's bytes)
    K, D = C.shape
    counts, sums, sse, frames = np.zeros(K), np.zeros((K, D)), np.zeros(K), 0
    with _task_threads(budget):
        for s, X in _blocks(src, a, b, batch):
            e = s + len(X)
            if exclude is not None and len(exclude):
                lo, hi = np.searchsorted(exclude, [s, e])
                if hi > lo:
                    X = np.delete(X, exclude[lo:hi] - s, axis=0)
            if not len(X):
                continue
            labels, d2 = assign(X, C, group_of=group_of)
            st = cluster_stats(X, labels, K, d2=d2, second_order=False)
            counts += st.counts
            sums += st.sums
            sse += st.sse
            frames += len(X)
    return counts, sums, sse, frames


def lloyd_stats(client, source, C, exclude=None, batch_size: int = 65536, verbose: int = 0):
    """One exact Lloyd pass's statistics over ``source`` (less the sorted frame indices ``exclude``):
    ``(counts float64 (K,), sums float64 (K, D), sse float64 (K,), frames int)``, as the local pass of
    :meth:`streamq.codebook.LBG._full_pass` computes them. Returns None when ``source`` has no URL."""
    url = _url_or_none(source, "the Lloyd pass")
    if url is None:
        return None
    C = np.ascontiguousarray(C, np.float32)
    ranges = partition(source.n_frames, source.chunk_frames)
    budget = thread_budget(client)
    ex = None if exclude is None else np.asarray(exclude, np.int64)
    parts = []
    for a, b in ranges:
        part_ex = None
        if ex is not None:
            lo, hi = np.searchsorted(ex, [a, b])
            part_ex = ex[lo:hi]
        parts.append(client.submit(_lloyd_part, url, source.n_frames, a, b, C, part_ex,
                                   _chunk_batch(source, batch_size), budget,
                                   pure=False, key=f"streamq-lloyd-{a}-{_token()}"))
    counts, sums, sse, frames = _reduce_with_bar(client, parts, [b - a for a, b in ranges], "Lloyd pass (dask)",
                                                 verbose)
    return counts, sums, sse, int(frames)


# ------------------------------------------------------------------------------------- GMM
def _init_part(url, n_frames, a, b, C, shift, batch, budget):
    from .kernels.assign import assign, cluster_stats
    from .selection import codeword_groups

    src = _open(url, n_frames)
    group_of = codeword_groups(C)  # once per task (memoised per worker on the codebook's bytes)
    K, D = C.shape
    n, f, s = np.zeros(K), np.zeros((K, D)), np.zeros((K, D))
    with _task_threads(budget):
        for _, X in _blocks(src, a, b, batch):
            labels, _ = assign(X, C, group_of=group_of)
            st = cluster_stats(X, labels, K, shift=shift)
            n += st.counts
            f += st.sums
            s += st.sq
    return n, f, s


def codebook_stats(client, source, C, shift, batch_size: int = 65536, verbose: int = 0):
    """Per-codeword counts, sums and sums of squares about ``shift`` (float64) over ``source``: the pass of
    :meth:`streamq.gmm.DiagGMM.init_from_codebook`. Returns None when ``source`` has no URL."""
    url = _url_or_none(source, "the GMM initialisation pass")
    if url is None:
        return None
    batch = _chunk_batch(source, batch_size)  # hard assignments: any batching gives the same sums to rounding
    ranges = partition(source.n_frames, source.chunk_frames)
    budget = thread_budget(client)
    model = _model(client, (np.ascontiguousarray(C, np.float32), np.asarray(shift, np.float64)))
    parts = [client.submit(_init_part_m, url, source.n_frames, a, b, model, batch, budget, pure=False,
                           key=f"streamq-gmminit-{a}-{_token()}") for a, b in ranges]
    return _reduce_with_bar(client, parts, [b - a for a, b in ranges], "GMM init (dask)", verbose)


def _init_part_m(url, n_frames, a, b, model, batch, budget):
    C, shift = model
    return _init_part(url, n_frames, a, b, C, shift, batch, budget)


def _gmm_part(url, n_frames, a, b, model, batch, budget):
    """E-step statistics of frames [a, b) in batches of ``batch`` from ``a`` (the local pass's batches when
    ``a`` is a multiple of ``batch``): (log-likelihood total, frames, n, f, s). ``model`` is
    ``(fn, args)``: ``fn(X, *args)`` returns (total, n, f, s) for one batch."""
    from threadpoolctl import threadpool_limits

    fn, args = model
    src = _open(url, n_frames)
    tot, frames, n, f, s = 0.0, 0, 0.0, 0.0, 0.0
    with _task_threads(budget), threadpool_limits(1, user_api="blas"):
        for _, X in _blocks(src, a, b, batch):
            t, bn, bf, bs = fn(X, *args)
            tot += t
            n = n + bn
            f = f + bf
            s = s + bs
            frames += len(X)
    return tot, frames, n, f, s


def gmm_stats(client, source, fn, args, batch_size: int = 65536, verbose: int = 0, desc: str = "EM (dask)"):
    """One E-step pass over ``source``: ``(total log-likelihood, frames, n (K,), f (K, D), s (K, D))``, the
    statistics of :meth:`streamq.gmm.DiagGMM.accumulate`. ``fn(X, *args)`` is the per-batch statistics
    function (:func:`streamq.kernels.gmm.diag_gmm_stats` with the model's prepared arrays, or Gaussian
    selection's ``selected_accumulate``); it and ``args`` travel to the workers once per pass. Ranges start
    at multiples of ``batch_size``, so every batch is the local pass's batch. None without a URL."""
    url = _url_or_none(source, "the EM pass")
    if url is None:
        return None
    batch = int(batch_size)
    ranges = partition(source.n_frames, batch)
    budget = thread_budget(client)
    model = _model(client, (fn, tuple(args)))
    parts = [client.submit(_gmm_part, url, source.n_frames, a, b, model, batch, budget, pure=False,
                           key=f"streamq-em-{a}-{_token()}") for a, b in ranges]
    tot, frames, n, f, s = _reduce_with_bar(client, parts, [b - a for a, b in ranges], desc, verbose)
    return float(tot), int(frames), n, f, s


# ------------------------------------------------------------------------------------- quantise
def _quantise_part(url, n_frames, a, b, C, out, batch, budget):
    import zarr

    from .kernels.assign import assign
    from .selection import codeword_groups

    src = _open(url, n_frames)
    group_of = codeword_groups(C)  # once per task (memoised per worker on the codebook's bytes)
    g = zarr.open_group(str(out), mode="r+")
    lab, d2a = g["labels"], g["d2"]
    loss = 0.0
    with _task_threads(budget):
        for p, X in _blocks(src, a, b, batch):
            e = p + len(X)
            labels, d2 = assign(X, C, group_of=group_of)
            lab[p:e] = labels.astype(np.int32)
            d2a[p:e] = d2
            loss += float(d2.sum(dtype=np.float64))
    return (loss,)


def quantise(client, source, C, out, batch_size: int = 65536, verbose: int = 0):
    """Write each frame's nearest codeword and squared distance into the Zarr group ``out`` (arrays
    ``labels`` and ``d2`` chunked like the store, already created; a path every worker can write) and
    return the summed d2 (float). Ranges are whole chunks, so no two tasks write the same chunk, and a rerun
    task rewrites the same values. None when ``source`` has no URL."""
    url = _url_or_none(source, "quantise")
    if url is None:
        return None
    out = os.path.abspath(str(out))  # workers need not share the client's working directory
    chunk = source.chunk_frames
    ranges = partition(source.n_frames, chunk)
    batch = max(chunk, (int(batch_size) // chunk) * chunk)
    budget = thread_budget(client)
    C = np.ascontiguousarray(C, np.float32)
    parts = [client.submit(_quantise_part, url, source.n_frames, a, b, C, str(out), batch, budget, pure=False,
                           key=f"streamq-quantise-{a}-{_token()}") for a, b in ranges]
    return float(_reduce_with_bar(client, parts, [b - a for a, b in ranges], "quantise (dask)", verbose)[0])


# ------------------------------------------------------------------------------------- aligner
def utterance_groups(lengths, indices, max_part: int = PART_FRAMES, min_parts: int = MIN_PARTS) -> list[list[int]]:
    """Contiguous groups of ``indices`` (in order) of about equal frame totals: at least ``min_parts`` groups
    when there are that many utterances, none over ``max_part`` frames unless one utterance is."""
    indices = [int(i) for i in indices]
    if not indices:
        return []
    total = int(sum(int(lengths[i]) for i in indices))
    target = max(1, min(max_part, math.ceil(total / min(min_parts, len(indices)))))
    groups, cur, acc = [], [], 0
    for i in indices:
        t = int(lengths[i])
        if cur and acc + t > target:
            groups.append(cur)
            cur, acc = [], 0
        cur.append(i)
        acc += t
    if cur:
        groups.append(cur)
    return groups


# Aligner attributes that stay on the client: the corpus and client, per-utterance state (shipped per group),
# caches and locks (rebuilt on the worker), and what the client alone records.
_ALIGNER_LOCAL = {"client", "corpus_", "model", "chains_", "self_loops_", "_cache", "_cache_budget", "_cache_lock",
                  "_select_lock", "_fail_reasons", "lattice_stats_", "traces_", "history_", "unaligned_"}


def _aligner_on_worker(shared, local):
    """An :class:`streamq.align.Aligner` rebuilt on a worker from the fitted state ``shared`` and one
    group's chains, self-loops and ids (``local``): the estimator's own per-utterance methods run on it."""
    from .align import Aligner

    al = Aligner.__new__(Aligner)
    al.__dict__.update(shared)
    al.client, al.model = None, None
    al.chains_, al.self_loops_ = local["chains"], local["loops"]
    al._cache, al._cache_budget = {}, 0.0
    al._cache_lock, al._select_lock = threading.Lock(), threading.Lock()
    al._fail_reasons, al.lattice_stats_ = {}, {}
    al.corpus_ = SimpleNamespace(ids=local.get("ids", {}))
    return al


def _group_statistics(al, corpus, idx):
    """EM statistics of the utterances ``idx`` (one group), summed from zero in order: (acc (n_units, K),
    loglik, frames, fallbacks, aligned, loops, failure reasons, [lattice stats])."""
    from .align import sum_e_steps

    acc, total, frames, fallbacks, aligned, loops = sum_e_steps(
        (al._e_step(i, X) for blk in corpus.iter_blocks(idx) for i, X in blk), np.shape(al.unit_weights_),
        corpus.lengths)
    return (acc, total, frames, fallbacks, aligned, loops, dict(getattr(al, "_fail_reasons", {})),
            [dict(getattr(al, "lattice_stats_", {}))])


def _align_part(url, n_frames, idx, shared, local, budget):
    """EM statistics of utterances ``idx`` on a worker (see :func:`_group_statistics`)."""
    corpus = _open_utterances(url, n_frames)
    al = _aligner_on_worker(shared, local)
    with _task_threads(budget):
        return _group_statistics(al, corpus, idx)


def _align_shared(client, aligner):
    return _model(client, {k: v for k, v in vars(aligner).items() if k not in _ALIGNER_LOCAL})


def _align_local(aligner, idx, ids=None):
    loc = {"chains": {i: aligner.chains_[i] for i in idx},
           "loops": {i: float(aligner.self_loops_[i]) for i in idx}}
    if ids is not None:
        loc["ids"] = {i: ids[i] for i in idx}
    return loc


def _merge_worker_notes(aligner, reasons, stats):
    """Failure reasons and lattice sizes recorded on the workers, into the client's aligner."""
    fr = getattr(aligner, "_fail_reasons", None)
    if fr is not None:
        fr.update(reasons)
    ls = getattr(aligner, "lattice_stats_", None)
    if ls is not None:
        for st in stats:
            for k, v in st.items():
                ls[k] = max(ls.get(k, v), v)


def align_statistics(client, aligner, corpus, todo, verbose: int = 0):
    """One EM iteration's statistics of :meth:`streamq.align.Aligner.fit` over the utterances ``todo``:
    ``(acc float64 (n_units, K), loglik total, frames, log fallbacks, aligned, {i: self-loop estimate})``;
    failure reasons go into ``aligner._fail_reasons``. Returns None when the corpus is not in a store the
    workers can open."""
    store = corpus.store
    if store is None:
        log.warning("align: utterances in the client's memory: EM runs in this process")
        return None
    groups = utterance_groups(corpus.lengths, todo)
    if not groups:
        return np.zeros(np.shape(aligner.unit_weights_)), 0.0, 0, 0, 0, {}
    budget = thread_budget(client)
    shared = _align_shared(client, aligner)
    parts = [client.submit(_align_part, store.url, store.n_frames, idx, shared, _align_local(aligner, idx), budget,
                           pure=False, key=f"streamq-align-{gi}-{_token()}") for gi, idx in enumerate(groups)]
    sizes = [int(sum(int(corpus.lengths[i]) for i in g)) for g in groups]
    acc, total, frames, fallbacks, aligned, loops, reasons, stats = _reduce_with_bar(client, parts, sizes,
                                                                                     "align EM (dask)", verbose)
    _merge_worker_notes(aligner, reasons, stats)
    return acc, float(total), int(frames), int(fallbacks), int(aligned), loops


def local_align_statistics(aligner, corpus, todo):
    """What :func:`align_statistics` returns, computed in this process with the same utterance groups and the
    same reduction tree, hence the same bits: an in-process loop that accumulates through this function
    gives alignments identical to a cluster's, not only equal to float64 rounding (Viterbi ties included)."""
    groups = utterance_groups(corpus.lengths, todo)
    if not groups:
        return np.zeros(np.shape(aligner.unit_weights_)), 0.0, 0, 0, 0, {}
    parts = [_group_statistics(aligner, corpus, idx) for idx in groups]
    acc, total, frames, fallbacks, aligned, loops, reasons, _ = tree_sum(parts)
    return acc, float(total), int(frames), int(fallbacks), int(aligned), loops


def _decode_part(url, n_frames, idx, post, shared, local, budget):
    corpus = _open_utterances(url, n_frames)
    al = _aligner_on_worker(shared, local)
    out = []
    with _task_threads(budget):
        for blk in corpus.iter_blocks(idx):
            for i, X in blk:
                out.append((i, None) if al.chains_.get(i) is None else al._decode(i, X, i in post))
    return out, dict(al._fail_reasons), [dict(al.lattice_stats_)]


def ordered_map(client, fn, arglists, window: int | None = None, key: str = "task"):
    """``fn(*args)`` for each of ``arglists`` on the cluster, results yielded in order, with at most
    ``window`` tasks submitted ahead (default 4 per worker thread) so memory stays bounded."""
    if window is None:
        try:
            n = sum(client.nthreads().values())
        except Exception:  # noqa: BLE001 - a cluster that cannot say: a modest window
            n = 2
        window = max(2, 4 * n)
    pending = []
    it = iter(arglists)
    done = False
    while True:
        while not done and len(pending) < window:
            try:
                args = next(it)
            except StopIteration:
                done = True
                break
            pending.append(client.submit(fn, *args, pure=False, key=f"streamq-{key}-{_token()}"))
        if not pending:
            return
        f = pending.pop(0)
        yield f.result()
        f.release()


def align_decode(client, aligner, corpus, indices, posteriors=()):
    """(index, Alignment or None) over ``indices`` in order, decoded on the workers (Viterbi, and the state
    posteriors of the utterances in ``posteriors``). Returns None when the corpus has no store."""
    store = corpus.store
    if store is None:
        return None
    groups = utterance_groups(corpus.lengths, list(indices))
    budget = thread_budget(client)
    post = set(posteriors)
    shared = _align_shared(client, aligner)
    args = ((store.url, store.n_frames, idx, post & set(idx), shared, _align_local(aligner, idx, corpus.ids), budget)
            for idx in groups)

    def gen():
        for res, reasons, stats in ordered_map(client, _decode_part, args, key="decode"):
            _merge_worker_notes(aligner, reasons, stats)
            yield from res

    return gen()


__all__ = ["DistributedError", "connect", "shared", "partition", "tree_submit", "tree_reduce", "tree_sum", "thread_budget",
           "source_url", "lloyd_stats", "codebook_stats", "gmm_stats", "quantise", "utterance_groups",
           "align_statistics", "local_align_statistics", "align_decode", "ordered_map", "PART_FRAMES", "MIN_PARTS"]

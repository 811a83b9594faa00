"""The commands behind the CLI: files in, files out, checkpoints, locks.

Each ``run_*`` validates its inputs *before* it creates anything, then locks its output directory
(:func:`streamq.artifacts.locked_dir`: a second command into the same directory is refused), trains
with an estimator, and writes every file atomically under the command's own names (listed in
:mod:`streamq.artifacts`), the ``*_config.json`` last. A command that fails before writing any result
removes the output directory it created. Estimators never write files; this module never does maths.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from . import artifacts as af
from .align import HISTORY_FIELDS as ALIGN_FIELDS
from .align import ANALYSIS_FIELDS, Aligner, analyse_alignments
from .codebook import LBG, METRIC_COLUMNS, MiniBatchLloyd, RandomSample
from .formats import FORMATS, csv_alignment, ctm_lines, frame_time_offset, json_alignment, safe_name, textgrid
from .gmm import HISTORY_FIELDS as GMM_FIELDS
from .gmm import DiagGMM
from .kernels.assign import assign
from .selection import codeword_groups
from .progress import bar, log
from .store import FrameStore, StoreError, UtteranceSource, as_source
from .transcripts import Inventory

FIT_CONFIG, FIT_HISTORY, FIT_CHECKPOINT = "fit_config.json", "fit_history.csv", "fit_checkpoint.npz"
GMM_CONFIG, GMM_HISTORY, GMM_PLOT, GMM_CHECKPOINT = "gmm_config.json", "gmm_history.csv", "gmm_history.png", "gmm.npz"
ALIGN_HISTORY, ALIGN_SUMMARY, ANALYSIS = "align_history.csv", "align_summary.json", "alignment_analysis.csv"
COMPARE_HISTORY = "compare_history.csv"


@contextlib.contextmanager
def _output(out, command):
    """Lock ``out`` for ``command``; if the command fails and ``out`` did not exist before, remove it."""
    out = Path(out)
    existed = out.exists()
    try:
        with af.locked_dir(out, command) as d:
            yield d
    except BaseException:
        if not existed and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _open_source(store):
    try:
        return as_source(store)
    except StoreError as e:
        raise ValueError(str(e)) from None


# ------------------------------------------------------------------ codebooks
def make_codebook_estimator(method, n_clusters, batch_size=None, max_steps=None, decay=0.9, eps=None, seed=0,
                            repair=True, checkpoint=None, resume=False, verbose=0, client=None):
    """The estimator behind ``streamq fit --method`` (``client``: LBG's exact passes on Dask)."""
    if method == "random":
        return RandomSample(n_clusters, seed=seed)
    common = dict(batch_size=batch_size, seed=seed, repair=repair, checkpoint=checkpoint, resume=resume,
                  verbose=verbose)
    if method == "lloyd":
        return MiniBatchLloyd(n_clusters, decay=decay, max_steps=max_steps, eps=eps, **common)
    if method == "lbg":
        kw = {"max_stage_steps": max_steps} if max_steps else {}
        return LBG(n_clusters, eps=0.01 if eps is None else eps, decay=decay, client=client, **kw, **common)
    raise ValueError(f"unknown method {method!r}: choose lbg, lloyd or random")


def _check_k(source, n_clusters):
    if n_clusters > source.n_frames:
        raise ValueError(f"{source.name}: --k {n_clusters} is larger than the number of frames ({source.n_frames})")


def run_fit(store, out, n_clusters, method="lbg", batch_size=None, max_steps=None, decay=0.9, eps=None, seed=0,
            resume=False, repair=True, verbose=1, client=None) -> dict:
    """``streamq fit``: train one codebook; writes ``codebook.npy``, ``codebook_counts.npy``,
    ``codebook_stages.npz`` (LBG), ``fit_history.csv``, ``fit_config.json`` and ``fit_checkpoint.npz``.

    ``resume`` continues from the checkpoint, which must have been made with the same settings."""
    source = _open_source(store)
    _check_k(source, n_clusters)
    if eps is not None and not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"--eps must be a finite number > 0, got {eps}")
    config = {"store": str(store), "k": n_clusters, "method": method, "batch_size": batch_size,
              "max_steps": max_steps, "decay": decay, "eps": eps, "seed": seed, "repair": repair,
              "dim": source.dim, "n_frames": source.n_frames}
    with _output(out, "fit") as out:
        ckpt = out / FIT_CHECKPOINT
        if not resume and ckpt.exists():
            ckpt.unlink()
        if resume and ckpt.exists() and (out / FIT_CONFIG).exists():
            old = af.read_json(out / FIT_CONFIG)
            diff = {c: (old.get(c), config[c]) for c in config if c != "store" and old.get(c) != config[c]}
            if diff:
                raise ValueError(f"{out / FIT_CONFIG}: cannot resume with different settings {diff}")
        est = make_codebook_estimator(method, n_clusters, batch_size, max_steps, decay, eps, seed, repair,
                                      checkpoint=None if method == "random" else str(ckpt), resume=resume,
                                      verbose=verbose, client=client)
        est.fit(source)
        af.save_codebook(out, est.codebook_, est.counts_, getattr(est, "stage_codebooks_", None))
        af.write_records(est.history_, out / FIT_HISTORY, METRIC_COLUMNS)
        af.write_json(out / FIT_CONFIG, config)
    last = est.history_[-1]
    return {"k": n_clusters, "method": method, "loss": last["loss"], "entropy": last["entropy"],
            "log_k": last["log_k"], "dead": last["dead"], "repaired": est.n_repaired_,
            "wall_seconds": last["wall_seconds"], "heldout": est.heldout_}


def run_compare(store, out, n_clusters=256, batch_size=None, seed=0, verbose=1) -> dict:
    """``streamq compare``: the seed's experiment. LBG runs to K; MiniBatchLloyd gets the same number of
    frames; RandomSample is the baseline. Writes ``compare_history.csv``, the three codebooks and the
    two pictures."""
    from . import plots

    source = _open_source(store)
    _check_k(source, n_clusters)
    with _output(out, "compare") as out:
        lbg = LBG(n_clusters, batch_size=batch_size, seed=seed, verbose=verbose).fit(source)
        budget = lbg.frames_seen_
        lloyd = MiniBatchLloyd(n_clusters, batch_size=batch_size, seed=seed, verbose=verbose)
        B = min(batch_size or lloyd._default_batch(), source.n_frames)
        lloyd.set_params(batch_size=B, max_steps=max(1, budget // B)).fit(source)
        rnd = RandomSample(n_clusters, seed=seed).fit(source)
        records = rnd.history_ + lloyd.history_ + lbg.history_
        af.write_records(records, out / COMPARE_HISTORY, METRIC_COLUMNS)
        for name, est in (("random", rnd), ("lloyd", lloyd), ("lbg", lbg)):
            af.save_npy(out / f"codebook_{name}.npy", est.codebook_)
        files = [str(out / COMPARE_HISTORY)] + plots.plot_compare(records, out)
    summary = {m: dict(e.history_[-1]) for m, e in (("random", rnd), ("lloyd", lloyd), ("lbg", lbg))}
    return {"methods": summary, "files": files, "budget_frames": budget}


# ------------------------------------------------------------------ GMM
def run_gmm(store, codebook_dir, out, iters=10, resume=False, batch_size=65536, gselect=None, seed=0, verbose=1,
            client=None, **gmm_kw) -> dict:
    """``streamq gmm``: a DiagGMM initialised from ``codebook_dir/codebook.npy``, trained by streaming EM.

    Writes ``gmm.npz`` (also the checkpoint: parameters after the last finished iteration),
    ``gmm_history.csv`` and ``gmm_history.png`` after every iteration, ``gmm_config.json`` at the end.
    ``resume=True`` continues from ``gmm.npz`` up to ``iters`` iterations in total; a checkpoint made with
    other settings is refused. ``gmm_kw`` go to :class:`streamq.gmm.DiagGMM`.
    """
    t0 = time.perf_counter()
    src = _open_source(store)
    cb_file = Path(codebook_dir) / af.CODEBOOK if Path(codebook_dir).suffix != ".npy" else Path(codebook_dir)
    C = af.load_codebook(codebook_dir)
    K, D = C.shape
    if D != src.dim:
        raise ValueError(f"{cb_file}: codebook dim {D} != store dim {src.dim} ({src.name})")
    if K > src.n_frames:
        raise ValueError(f"{cb_file}: K = {K} components > {src.n_frames} frames in {src.name}")
    g = DiagGMM(K, batch_size=batch_size, gselect=gselect, seed=seed, verbose=verbose, client=client, **gmm_kw)
    g._check_params()
    config = {"store": str(store), "codebook": str(cb_file), "n_components": K, "dim": D, "n_frames": src.n_frames,
              **{k: v for k, v in g.get_params().items() if k not in ("verbose", "means_init", "max_iter", "client")}}
    cfg_key = json.dumps({k: v for k, v in config.items() if k != "store"}, sort_keys=True)
    with _output(out, "gmm") as out:
        ckpt = out / GMM_CHECKPOINT
        g.set_heldout(src)
        if resume and ckpt.exists():
            prev, meta = af.load_gmm(ckpt)
            if meta.get("config") != cfg_key:
                raise ValueError(f"{ckpt}: checkpoint was made with other settings or another codebook; "
                                 "use the same settings or drop --resume")
            g._set_gaussians(prev)
            g.n_iter_, g.reseeded_ = int(meta.get("iteration", 0)), int(meta.get("reseeded", 0))
            hist = af.read_records(out / GMM_HISTORY) if (out / GMM_HISTORY).exists() else []
            g.history_ = [r for r in hist if r["iteration"] <= g.n_iter_]
            log.info("resuming from %s at iteration %d", ckpt, g.n_iter_)
        else:
            if resume:
                log.info("no checkpoint in %s: starting from the codebook", out)
            g.init_from_codebook(src, C)
            g.history_ = [g.initial_record()]
            _gmm_checkpoint(g, out, cfg_key, GMM_FIELDS)
        while g.n_iter_ < iters:
            g.em_step(src)
            _gmm_checkpoint(g, out, cfg_key, GMM_FIELDS)
        af.write_json(out / GMM_CONFIG, {**config, "iterations": g.n_iter_})
    last = g.history_[-1] if g.history_ else {}
    return {"out": str(out), "n_components": K, "dim": D, "frames": src.n_frames, "iterations": g.n_iter_,
            "train_loglik": last.get("train_loglik"), "heldout_loglik": last.get("heldout_loglik"),
            "reseeded": g.reseeded_, "gselect": gselect, "seconds": time.perf_counter() - t0,
            "files": [str(out / n) for n in (GMM_CHECKPOINT, GMM_HISTORY, GMM_PLOT)]}


def _gmm_checkpoint(g, out: Path, cfg_key: str, fields):
    af.save_gmm(out / GMM_CHECKPOINT, g, iteration=np.int64(g.n_iter_), reseeded=np.int64(g.reseeded_),
                var_floor=np.float64(g.var_floor), config=np.str_(cfg_key))
    af.write_records(g.history_, out / GMM_HISTORY, fields, extras=False)
    try:
        from .plots import plot_gmm_history
    except ImportError:
        return
    try:
        af.atomic_write(out / GMM_PLOT, lambda tmp: plot_gmm_history(g.history_, tmp))
    except RuntimeError as e:  # matplotlib missing: the picture is optional
        log.warning("%s not written: %s", GMM_PLOT, e)


def load_gmm(path, **params):
    """A fitted :class:`streamq.gmm.DiagGMM` from ``gmm.npz`` (or a directory holding it)."""
    g, meta = af.load_gmm(path)
    if "var_floor" in meta:
        params.setdefault("var_floor", float(meta["var_floor"]))
    est = DiagGMM.from_gaussians(g, **params)
    est.n_iter_, est.reseeded_ = int(meta.get("iteration", 0)), int(meta.get("reseeded", 0))
    return est


# ------------------------------------------------------------------ alignment
def run_align(store, model_dir, out, iters=30, jobs=1, plots=0, states_per_symbol=3, formats=("textgrid",),
              verbose=1, client=None, **aligner_kw) -> dict:
    """``streamq align``: train the aligner on a store and write alignments.

    Writes into ``out``: ``align_history.csv`` (log-likelihood per EM iteration), per utterance in each of
    ``formats`` (:data:`streamq.formats.FORMATS`) ``textgrids/ID.TextGrid`` (long or short form, tiers
    ``words`` then ``phones``, the characters, as MFA names them), ``json/ID.json``, ``csv/ID.csv``;
    ``words.ctm`` and ``chars.ctm`` (``id 1 start duration label confidence``, seconds),
    ``alignment_analysis.csv`` (per-utterance quality and flags, :func:`streamq.align.analyse_alignments`),
    ``unaligned.tsv`` (``utterance_id<TAB>reason``), ``aligner.npz`` (unit labels, unit weights),
    ``align_summary.json`` and, when ``plots`` > 0, for the first ``plots`` alignable utterances
    ``plots/ID.png`` (posteriors over states x frames with the Viterbi path, above the MFCC image) and
    ``traces/ID.npz`` (posteriors and path after every EM iteration, for ``streamq plot align``).

    Raises
    ------
    ValueError
        One line naming the file or field: a missing / malformed store or model, a model whose
        dimension differs from the store's, a store without transcripts, bad parameters, or no
        utterance that could be aligned.
    """
    t_start = time.perf_counter()
    try:
        fs = FrameStore.open(store)
    except StoreError as e:
        raise ValueError(str(e)) from None
    if fs.n_utterances == 0:
        raise ValueError(f"{store}: store holds no utterances")
    corpus = UtteranceSource.from_store(fs)
    if not any(t.strip() for t in corpus.transcripts):
        raise ValueError(f"{store}: field 'transcripts' is empty for every utterance; ingest with transcripts")
    if int(plots) < 0:
        raise ValueError(f"plots must be >= 0, got {plots}")
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--format {','.join(bad) or '(none)'}: choose from {', '.join(FORMATS)}")
    model = af.load_model(model_dir)
    mdim = model.dim if isinstance(model, af.Gaussians) else model.shape[1]
    if mdim != fs.dim:
        raise ValueError(f"{model_dir}: model dimension {mdim} differs from the store's {fs.dim}")
    inv = Inventory.from_transcripts(corpus.transcripts, states_per_symbol)
    trace = []
    for i, tr in enumerate(corpus.transcripts):
        if len(trace) >= int(plots):
            break
        ch = inv.chain(tr)
        if ch.words and ch.n_required <= corpus.lengths[i]:
            trace.append(i)
    al = Aligner(model, states_per_symbol=states_per_symbol, max_iter=iters, n_jobs=jobs, verbose=verbose,
                 trace=tuple(trace), client=client, **aligner_kw)
    with _output(out, "align") as out:
        al.fit(corpus)
        step = corpus.frame_step
        off = frame_time_offset(corpus.feature_config)
        dirs = {"textgrid": "textgrids", "short-textgrid": "textgrids", "json": "json", "csv": "csv"}
        for f in formats:
            (out / dirs[f]).mkdir(exist_ok=True)
        n_ok, frames_ok = 0, 0
        words_ctm, chars_ctm, done, done_speakers = [], [], [], []
        with bar(corpus.n, "align decode", "utt", not verbose) as pb:
            for i, a in al.align_corpus(posteriors=set(al.traces_)):
                pb.update(1)
                if a is None:
                    continue
                n_ok += 1
                T = len(a.path)
                frames_ok += T
                dur = float(corpus.durations[i])
                xmax = dur if dur > 0 else T * step + 2 * off  # the audio's exact duration when known
                uid, name = corpus.ids[i], safe_name(corpus.ids[i])

                def secs(segs):
                    return [(0.0 if s == 0 else s * step + off, xmax if e == T else min(e * step + off, xmax), lab)
                            for s, e, lab in segs]

                cs, ws = secs(a.chars), secs(a.words)
                chars_ctm += ctm_lines(uid, cs, a.char_confidence)
                words_ctm += ctm_lines(uid, ws, a.word_confidence)
                tiers = [("words", ws), ("phones", cs)]
                for f in formats:
                    if f in ("textgrid", "short-textgrid"):
                        af.write_text(out / "textgrids" / f"{name}.TextGrid",
                                      textgrid(tiers, xmax, short=f == "short-textgrid"))
                    elif f == "json":
                        af.write_text(out / "json" / f"{name}.json", json_alignment(tiers, xmax))
                    else:
                        af.write_text(out / "csv" / f"{name}.csv", csv_alignment(tiers, corpus.speakers[i]))
                if i in al.traces_:
                    _write_trace(out, al, i, a, corpus, ws, name)
                a.path, a.posteriors = a.path[:0], None  # keep only what the analysis needs
                done.append(a)
                done_speakers.append(corpus.speakers[i])
        if n_ok == 0:
            reasons = sorted(set(al.unaligned_.values()))
            raise ValueError(f"{store}: no utterance could be aligned ({len(al.unaligned_)} unaligned: "
                             f"{'; '.join(reasons[:2])})")
        af.write_text(out / "words.ctm", "".join(words_ctm))
        af.write_text(out / "chars.ctm", "".join(chars_ctm))
        analysis = analyse_alignments(done, done_speakers, step)
        af.write_records(analysis, out / ANALYSIS, ANALYSIS_FIELDS, extras=False)
        af.write_text(out / "unaligned.tsv", "utterance_id\treason\n"
                      + "".join(f"{corpus.ids[i]}\t{al.unaligned_[i]}\n" for i in sorted(al.unaligned_)))
        af.write_records(al.history_, out / ALIGN_HISTORY, ALIGN_FIELDS, extras=False)
        af.save_npz(out / af.ALIGNER, units=np.array(al.inventory_.unit_labels()), unit_weights=al.unit_weights_,
                    states_per_symbol=np.int64(al.states_per_symbol))
        hist = al.history_
        flagged = sum(r["flagged"] for r in analysis)
        summary = {"utterances": corpus.n, "aligned": n_ok, "unaligned": len(al.unaligned_), "flagged": flagged,
                   "iterations": len(hist), "loglik_per_frame": hist[-1]["loglik_per_frame"] if hist else None,
                   "aligned_hours": frames_ok * step / 3600, "seconds": time.perf_counter() - t_start,
                   "symbols": len(al.inventory_.symbols), "units": al.inventory_.n_units,
                   "components": al.gaussians_.n_components, "out": str(out)}
        af.write_json(out / ALIGN_SUMMARY, summary)
    return summary


def _write_trace(out, al, i, a, corpus, words_sec, name):
    """``traces/ID.npz`` and ``plots/ID.png`` of a traced utterance."""
    tr = al.traces_[i]
    X = corpus.utterance(i)
    (out / "traces").mkdir(exist_ok=True)
    af.save_npz(out / "traces" / f"{name}.npz", posteriors=np.stack(tr["posteriors"]) if tr["posteriors"]
                else np.zeros((0, len(X), len(a.state_labels)), np.float16),
                paths=np.stack(tr["paths"]) if tr["paths"] else np.zeros((0, len(X)), np.int32),
                state_labels=np.array(a.state_labels), frames=X, loglik=np.array(tr["loglik"], np.float64),
                words=np.array([w for _, _, w in words_sec]),
                word_start=np.array([s for s, _, _ in words_sec], np.float64),
                word_end=np.array([e for _, e, _ in words_sec], np.float64),
                frame_step=np.float64(corpus.frame_step))
    try:
        from .plots import plot_alignment
    except ImportError:
        return
    (out / "plots").mkdir(exist_ok=True)
    try:
        af.atomic_write(out / "plots" / f"{name}.png", lambda tmp: plot_alignment(
            a.posteriors, a.path, X, a.state_labels, tmp, frame_step=corpus.frame_step,
            title=f"{corpus.ids[i]}: {' '.join(al.chains_[i].words)}"))
    except RuntimeError as e:
        log.warning("alignment picture not written: %s", e)


# ------------------------------------------------------------------ quantise
def run_quantise(store, codebook_dir, out, batch_size=65536, verbose=1, client=None) -> dict:
    """``streamq quantise``: each frame's nearest codeword (``labels`` int32 (N,)) and squared distance
    (``d2`` float32 (N,)) as a Zarr group at ``out``, aligned with the store's frames and chunked like them.

    Streams the store in storage order (memory: one batch). Written to ``out.partial`` and renamed when
    complete, so ``out`` is either absent or whole; a killed run starts over. With ``client`` the chunks are
    assigned and written by the Dask workers (``out`` must then be on a file system they share).
    """
    import zarr

    src = _open_source(store)
    C = af.load_codebook(codebook_dir)
    if C.shape[1] != src.dim:
        raise ValueError(f"{codebook_dir}: codebook dim {C.shape[1]} != store dim {src.dim} ({src.name})")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; remove it or choose another OUT")
    part = out.with_name(out.name + ".partial")
    with af.locked_dir(part.parent, "quantise"):
        if part.exists():
            shutil.rmtree(part)
        t0 = time.perf_counter()
        chunk = src.chunk_frames
        g = zarr.open_group(str(part), mode="w")
        lab = g.create_array("labels", shape=(src.n_frames,), chunks=(chunk,), dtype="int32",
                             dimension_names=("frame",))
        d2a = g.create_array("d2", shape=(src.n_frames,), chunks=(chunk,), dtype="float32",
                             dimension_names=("frame",))
        g.attrs.update({"streamq_quantise": 1, "store": str(store), "codebook": str(codebook_dir),
                        "k": int(C.shape[0]), "dim": int(C.shape[1]), "n_frames": int(src.n_frames)})
        B = max(chunk, (int(batch_size) // chunk) * chunk)
        loss = None
        if client is not None:
            from .distributed import quantise

            loss = quantise(client, src, C, part, batch_size, verbose)
        local, loss = loss is None, loss or 0.0
        group_of = codeword_groups(C) if local else None
        with bar(src.n_frames, "quantise", "frame", not verbose or not local) as pb:
            for a in (range(0, src.n_frames, B) if local else ()):
                X = src.read(a, min(a + B, src.n_frames))
                src.check_finite(X, a)
                labels, d2 = assign(X, C, group_of=group_of)
                lab[a:a + len(X)] = labels.astype(np.int32)
                d2a[a:a + len(X)] = d2
                loss += float(d2.sum(dtype=np.float64))
                pb.update(len(X))
        part.rename(out)
    return {"out": str(out), "frames": src.n_frames, "k": int(C.shape[0]), "mean_d2": loss / src.n_frames,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------ CMVN
def run_cmvn(store, out, per="speaker", variance=True, verbose=1) -> dict:
    """``streamq cmvn``: a copy of ``store`` with every utterance's frames mean- (and variance-) normalised
    over its speaker or itself (:mod:`streamq.cmvn`); the index (ids, transcripts, speakers, paths,
    durations) is copied. Two passes over the store; memory: one block of utterances. Resumable: a killed run,
    then the same command, ends with the same store (it continues after the last committed utterance)."""
    from .cmvn import apply_cmvn, cmvn_stats, groups_of

    t0 = time.perf_counter()
    if Path(out).resolve() == Path(store).resolve():
        raise ValueError(f"{out}: OUT must be a new store, not STORE itself")
    try:
        src = FrameStore.open(store)
    except StoreError as e:
        raise ValueError(str(e)) from None
    groups = groups_of(src.n_utterances, src.speakers, per)
    utts = UtteranceSource.from_store(src)
    mean, std = cmvn_stats(utts.iter_blocks(range(src.n_utterances)), groups, src.dim)
    config = dict(src.feature_config, cmvn={"per": per, "variance": bool(variance), "source": str(store)})
    dst = FrameStore.create(out, dim=src.dim, feature_config=config, chunk_frames=src.chunk_frames, exist_ok=True)
    with dst.writer_lock():
        done = dst.n_utterances
        if list(dst.ids) != list(src.ids[:done]):
            raise ValueError(f"{out}: holds other utterances than the first {done} of {store}; use a new OUT")
        with bar(src.n_utterances, f"cmvn per {per}", "utt", not verbose, initial=done) as pb:
            for blk in utts.iter_blocks(range(done, src.n_utterances)):
                dst.append([{"id": src.ids[i], "frames": apply_cmvn(X, mean[groups[i]], std[groups[i]], variance),
                             "transcript": src.transcripts[i], "speaker": src.speakers[i], "path": src.paths[i],
                             "duration": float(src.durations[i])} for i, X in blk])
                pb.update(len(blk))
    return {"out": str(out), "utterances": src.n_utterances, "groups": int(groups.max()) + 1, "per": per,
            "seconds": time.perf_counter() - t0}


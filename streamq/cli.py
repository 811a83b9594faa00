"""The ``streamq`` command line: argument parsing, progress, exit codes. No algorithms live here.

Exit codes: 0 success, 2 usage error, 1 any other failure (one line on stderr; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .progress import cli_logging


def _positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def _add_common(p):
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_cluster(p):
    """--scheduler / --workers: where the full passes run (streamq.distributed)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run the passes on the Dask cluster at ADDRESS (tcp://host:8786, or a scheduler file "
                   ".json); workers must reach the store (default: in-process)")
    g.add_argument("--workers", metavar="N", type=_positive_int, default=None,
                   help="run the passes on a local Dask cluster of N worker processes (default: in-process)")


def _client(a):
    """The Dask client of --scheduler / --workers for the command's duration (None: in-process), then closed."""
    from .distributed import connect

    return connect(getattr(a, "scheduler", None), getattr(a, "workers", None))


# ------------------------------------------------------------------- commands
def cmd_ingest(a):
    from .features import FeatureConfig
    from .ingest import ingest

    cfg = FeatureConfig(sample_rate=a.sample_rate, numcep=a.numcep)
    with _client(a) as client:
        s = ingest(a.src, a.store, cfg, split=a.split, jobs=a.jobs, strict=a.strict, chunk_frames=a.chunk_frames,
                   quiet=a.quiet, client=client)
    print(f"{s['store']}: +{s['added']} utterances ({s['audio_seconds'] / 3600:.3f} h, {s['frames_added']} frames) "
          f"in {s['wall_seconds']:.1f} s; {s['skipped_existing']} already stored; {s['rejected']} rejected"
          + (f" (see {s['rejects_file']})" if s["rejects_file"] else "")
          + f"; store now {s['n_utterances']} utterances, {s['n_frames']} frames")


def cmd_info(a):
    from .store import FrameStore

    i = FrameStore.open(a.store).info()
    if a.json:
        print(json.dumps(i, indent=2))
        return
    print(f"store          {i['path']}")
    print(f"frames         {i['frames']:,} x {i['dim']} float32")
    print(f"utterances     {i['utterances']:,}")
    print(f"audio          {i['hours']:.3f} h ({i['hours'] * 3600:.1f} s)")
    print(f"chunking       {i['chunks']} chunks of {i['chunk_frames']:,} frames")
    print(f"bytes on disk  {i['bytes_on_disk']:,}")
    print(f"speakers       {i.get('speakers', 0):,}")
    print(f"format         {i.get('format', '?')}")
    cfg = ", ".join(f"{k}={v}" for k, v in i["feature_config"].items())
    print(f"features       {cfg or '(none: array data)'}")


def cmd_upgrade(a):
    from .store import FrameStore

    st = FrameStore.upgrade(a.store)
    print(f"{a.store}: format {st.format_version}, {st.n_utterances:,} utterances, {st.n_frames:,} frames")


def cmd_fit(a):
    from .pipelines import run_fit

    with _client(a) as client:
        s = run_fit(a.store, a.out, n_clusters=a.k, method=a.method, batch_size=a.batch_size, max_steps=a.steps,
                    decay=a.decay, eps=a.eps, seed=a.seed, resume=a.resume, repair=not a.no_repair,
                    verbose=int(not a.quiet), client=client)
    which = "held-out" if s["heldout"] else "training-sample"
    print(f"{a.out}: K={s['k']} {s['method']} codebook; {which} loss {s['loss']:.4f}, "
          f"entropy {s['entropy']:.3f} / log K {s['log_k']:.3f}, {s['dead']} dead, {s['repaired']} repaired, "
          f"{s['wall_seconds']:.1f} s")


def cmd_compare(a):
    from .pipelines import run_compare

    s = run_compare(a.store, a.out, n_clusters=a.k, batch_size=a.batch_size, seed=a.seed, verbose=int(not a.quiet))
    for m, r in s["methods"].items():
        print(f"{m:8s} loss {r['loss']:.4f}  entropy {r['entropy']:.3f}/{r['log_k']:.3f}  dead {r['dead']:4d}  "
              f"{r['wall_seconds']:.2f} s")
    print(f"wrote {', '.join(s['files'])}")


def cmd_gmm(a):
    from .pipelines import run_gmm

    with _client(a) as client:
        s = run_gmm(a.store, a.codebook_dir, a.out, iters=a.iters, resume=a.resume, gselect=a.gselect, seed=a.seed,
                    verbose=int(not a.quiet), client=client)
    print(f"{s['out']}: {s['n_components']}-component diagonal GMM, {s['iterations']} EM iterations over "
          f"{s['frames']:,} frames; held-out log-likelihood {s['heldout_loglik']:.4f} per frame, "
          f"{s['reseeded']} re-seeded, {s['seconds']:.1f} s")


def cmd_align(a):
    from .pipelines import run_align

    prior = a.weight_prior if a.weight_prior == "auto" else float(a.weight_prior)
    with _client(a) as client:
        s = run_align(a.store, a.model, a.out, iters=a.iters, jobs=a.jobs, plots=a.plot, verbose=int(not a.quiet),
                      states_per_symbol=a.states_per_symbol, formats=[f for f in a.format.split(",") if f],
                      client=client, gselect=a.gselect or None, beam=a.beam or None,
                      retry_beam=a.retry_beam or None, weight_prior=prior)
    print(f"{s['out']}: aligned {s['aligned']} of {s['utterances']} utterances ({s['aligned_hours']:.3f} h) in "
          f"{s['iterations']} EM iterations, log-likelihood {s['loglik_per_frame']:.4f} per frame, "
          f"{s['seconds']:.1f} s; {s['unaligned']} unaligned (see unaligned.tsv), {s['flagged']} flagged "
          "(see alignment_analysis.csv)")


def cmd_cmvn(a):
    from .pipelines import run_cmvn

    s = run_cmvn(a.store, a.out, per=a.per, variance=not a.no_variance, verbose=int(not a.quiet))
    print(f"{s['out']}: {s['utterances']} utterances normalised per {s['per']} ({s['groups']} groups), "
          f"{s['seconds']:.1f} s")


def cmd_quantise(a):
    from .pipelines import run_quantise

    with _client(a) as client:
        s = run_quantise(a.store, a.codebook_dir, a.out, verbose=int(not a.quiet), client=client)
    print(f"{s['out']}: {s['frames']:,} frames quantised with K={s['k']}; mean squared distance "
          f"{s['mean_d2']:.4f}, {s['seconds']:.1f} s")


# ------------------------------------------------------------------- pictures (issue 13)
def _animation_out(a):
    """Check OUT against --format before any work: its suffix must be the format's; mp4 needs ffmpeg."""
    import shutil
    from pathlib import Path

    suffix = Path(a.out).suffix.lower()
    if suffix != f".{a.format}":
        raise ValueError(f"{a.out}: ends in {suffix or 'no suffix'} but --format {a.format}; "
                         f"name it {Path(a.out).with_suffix('.' + a.format).name}")
    if a.format == "mp4" and shutil.which("ffmpeg") is None:
        raise RuntimeError("--format mp4 needs ffmpeg on the PATH; install ffmpeg or use --format gif")
    return a.out


def cmd_plot(a):
    from . import plots

    if a.picture == "dft":
        out = plots.plot_dft(a.out, size=a.size, rate=a.rate, low=a.low)
    elif a.picture == "lbg":
        out = plots.animate_lbg(a.fit_dir, _animation_out(a), fps=a.fps)
    elif a.picture == "mfcc":
        from .features import FeatureConfig

        cfg = FeatureConfig(sample_rate=a.sample_rate, numcep=a.numcep)
        out = plots.animate_mfcc(a.audio, _animation_out(a), cfg, fps=a.fps, max_frames=a.max_frames)
    else:
        out = plots.animate_alignment(a.align_dir, a.utt_id, _animation_out(a), fps=a.fps)
    print(out)


def cmd_report(a):
    from .report import write_report

    print(write_report(a.run_dir, worst=a.worst, fps=a.fps))


def _add_picture_parsers(sub):
    """``streamq plot {lbg,mfcc,dft,align}`` and ``streamq report``."""
    p = sub.add_parser("plot", help="pictures: LBG and MFCC animations, the DFT basis, alignment over EM",
                       description="Animations are GIF (pillow) or MP4 (needs ffmpeg on the PATH).")
    psub = p.add_subparsers(dest="picture", metavar="PICTURE", required=True)

    def animated(q, fps):
        q.add_argument("--fps", type=float, default=fps, help=f"animation frames per second (default {fps:g})")
        q.add_argument("--format", choices=["gif", "mp4"], default="gif",
                       help="gif (pillow) or mp4 (needs ffmpeg on the PATH); OUT's suffix must match (default gif)")
        _add_common(q)
        q.set_defaults(func=cmd_plot)

    q = psub.add_parser("lbg", help="one frame per LBG stage: codebook image, loss, entropy vs log K, utilisation")
    q.add_argument("fit_dir", help="directory written by `streamq fit --method lbg` (codebook_stages.npz, "
                   "fit_history.csv)")
    q.add_argument("out", help="OUT.gif or OUT.mp4")
    animated(q, 2.0)

    q = psub.add_parser("mfcc", help="MFCC extraction of one clip step by step (the last frame is what ingest "
                        "stores)")
    q.add_argument("audio", help="an audio file (wav, flac, ogg, mp3, opus)")
    q.add_argument("out", help="OUT.gif or OUT.mp4")
    q.add_argument("--sample-rate", type=_positive_int, default=16000,
                   help="resample to this rate, as ingest does (default 16000)")
    q.add_argument("--numcep", type=_positive_int, default=13, help="cepstra per frame, as ingest (default 13)")
    q.add_argument("--max-frames", type=_positive_int, default=120,
                   help="at most this many analysis frames, evenly spaced, always the last (default 120)")
    animated(q, 10.0)

    q = psub.add_parser("dft", help="real and imaginary parts of the DFT basis as images (PNG)")
    q.add_argument("out", help="OUT.png")
    q.add_argument("--size", type=_positive_int, default=512, help="frequencies and samples (default 512)")
    q.add_argument("--rate", type=float, default=16000.0, help="sample rate in Hz (default 16000)")
    q.add_argument("--low", type=float, default=50.0, help="lowest frequency in Hz (default 50)")
    _add_common(q)
    q.set_defaults(func=cmd_plot)

    q = psub.add_parser("align", help="posterior map and Viterbi path after each EM iteration of one utterance")
    q.add_argument("align_dir", help="directory written by `streamq align --plot N` (traces/ID.npz)")
    q.add_argument("utt_id", help="utterance id (one of the first N aligned)")
    q.add_argument("out", help="OUT.gif or OUT.mp4")
    animated(q, 3.0)

    p = sub.add_parser("report", help="RUN_DIR/report.html: one self-contained page for a demo-shaped run",
                       description="RUN_DIR holds any of store/, compare/, codebook/, gmm/, align/ "
                       "(scripts/demo's layout); missing parts read 'not run'.")
    p.add_argument("run_dir")
    p.add_argument("--worst", type=int, default=3,
                   help="worst-scoring utterances to show with their pictures (default 3)")
    p.add_argument("--fps", type=float, default=3.0, help="frames per second of the embedded animations (default 3)")
    _add_common(p)
    p.set_defaults(func=cmd_report)


# --------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="streamq", description="Streaming vector quantisation, Gaussian mixtures and "
                                 "HMM alignment for corpora too big for memory.")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"streamq {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ingest", help="decode audio, compute MFCCs, write/extend a frame store (resumable)",
                       description="SRC: a Common Voice release dir (clips/ + TSVs), a TSV list of paths, or a "
                       "directory of audio. Re-run the same command to resume after an interruption.")
    p.add_argument("src")
    p.add_argument("store")
    p.add_argument("--split", default="validated", help="Common Voice TSV to read (default: validated)")
    p.add_argument("--jobs", type=_positive_int, default=1, help="extraction processes (default 1)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad clip instead of skipping it")
    p.add_argument("--sample-rate", type=_positive_int, default=16000, help="resample to this rate (default 16000)")
    p.add_argument("--numcep", type=_positive_int, default=13, help="cepstra per frame (default 13)")
    p.add_argument("--chunk-frames", type=_positive_int, default=None, help="frames per Zarr chunk (default ~2 MB)")
    _add_cluster(p)
    _add_common(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("info", help="describe a frame store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("upgrade", help="convert a store written by streamq 0.1 (format 1) in place")
    p.add_argument("store")
    _add_common(p)
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("fit", help="learn a codebook (LBG, minibatch Lloyd or random sample)",
                       description="Writes OUT/codebook.npy, codebook_counts.npy, codebook_stages.npz (LBG), "
                       "fit_history.csv, fit_config.json and fit_checkpoint.npz.")
    p.add_argument("store", help="frame store, .npy file or Zarr array")
    p.add_argument("out", help="output directory")
    p.add_argument("--k", type=_positive_int, required=True, help="number of codewords (required)")
    p.add_argument("--method", choices=["lbg", "lloyd", "random"], default="lbg", help="(default lbg)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="frames per step (default: LBG clip(16K, 8192, 65536), Lloyd clip(8K, 4096, 65536))")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="Lloyd steps (default two passes, at least 100); LBG: steps per stage at most (default 200)")
    p.add_argument("--decay", type=float, default=0.9, help="EMA weight of the old codeword (default 0.9)")
    p.add_argument("--eps", type=float, default=None,
                   help="split / repair offset in standard deviations (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-repair", action="store_true", help="leave dead codewords alone")
    p.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint (same settings)")
    _add_cluster(p)
    _add_common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("compare", help="the seed experiment: random / lloyd / lbg under one budget, with plots")
    p.add_argument("store")
    p.add_argument("out")
    p.add_argument("--k", type=_positive_int, default=256, help="number of codewords (default 256)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="frames per step (default: per method)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("gmm", help="fit a diagonal GMM by streaming EM, initialised from a codebook",
                       description="Writes OUT/gmm.npz (the checkpoint too), gmm_history.csv, gmm_history.png, "
                       "gmm_config.json.")
    p.add_argument("store")
    p.add_argument("codebook_dir", help="directory written by `streamq fit`")
    p.add_argument("out")
    p.add_argument("--iters", type=_positive_int, default=10, help="EM iterations in total (default 10)")
    p.add_argument("--gselect", type=_positive_int, default=None,
                   help="hierarchical Gaussian selection: each frame's top-n components, found by scoring group "
                   "representatives then the members of the best groups (default: exact, all components)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the held-out sample (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/gmm.npz (same settings)")
    _add_cluster(p)
    _add_common(p)
    p.set_defaults(func=cmd_gmm)

    p = sub.add_parser("align", help="self-trained HMM alignment of transcripts; TextGrid and CTM output")
    p.add_argument("store")
    p.add_argument("model", help="directory written by `streamq gmm` (or `streamq fit`)")
    p.add_argument("out")
    p.add_argument("--iters", type=_positive_int, default=30, help="EM iterations (default 30)")
    p.add_argument("--jobs", type=_positive_int, default=1, help="threads over utterances (default 1)")
    p.add_argument("--plot", type=int, default=0,
                   help="pictures and EM traces for the first N alignable utterances (default 0)")
    p.add_argument("--states-per-symbol", type=_positive_int, default=3, help="HMM states per character (default 3)")
    p.add_argument("--gselect", type=int, default=16,
                   help="each frame's top-n Gaussians, found once and reused by every EM iteration; 0: exact, all "
                   "K (default 16)")
    p.add_argument("--beam", type=float, default=100.0,
                   help="lattice beam in nats below the best partial path; 0: no pruning (default 100)")
    p.add_argument("--retry-beam", type=float, default=400.0,
                   help="beam of the retry for an utterance with no path inside --beam (default 400)")
    p.add_argument("--weight-prior", default="auto",
                   help="Dirichlet pseudo-count pulling each unit's mixture weights to the global weights, in frames; "
                   "auto = K/4 (default auto)")
    p.add_argument("--format", default="textgrid",
                   help="per-utterance files, comma-separated: textgrid (long), short-textgrid, json (MFA / praatio), "
                   "csv (MFA); words.ctm, chars.ctm and alignment_analysis.csv are always written (default textgrid)")
    _add_cluster(p)
    _add_common(p)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("cmvn", help="a copy of a store with cepstral mean/variance normalisation per speaker or "
                       "utterance (Kaldi apply-cmvn)")
    p.add_argument("store")
    p.add_argument("out", help="the new store")
    p.add_argument("--per", choices=["speaker", "utterance"], default="speaker",
                   help="normalisation group; utterances without a speaker are their own (default speaker)")
    p.add_argument("--no-variance", action="store_true", help="remove the mean only")
    _add_common(p)
    p.set_defaults(func=cmd_cmvn)

    p = sub.add_parser("quantise", help="each frame's nearest codeword and squared distance, as Zarr arrays",
                       description="OUT is a new Zarr group with labels int32 (N,) and d2 float32 (N,), "
                       "aligned with STORE's frames and chunked like them; written to OUT.partial, then renamed.")
    p.add_argument("store")
    p.add_argument("codebook_dir", help="directory written by `streamq fit` (or a codebook .npy)")
    p.add_argument("out")
    _add_cluster(p)
    _add_common(p)
    p.set_defaults(func=cmd_quantise)
    _add_picture_parsers(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)  # exits 2 on usage errors
    try:
        with cli_logging(logging.WARNING if a.quiet else logging.INFO):
            a.func(a)
    except KeyboardInterrupt:
        print("streamq: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line on stderr, no traceback unless --debug
        if a.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, (ValueError, OSError, RuntimeError, IndexError)):
            msg = f"{type(e).__name__}: {msg}"
        print(f"streamq {a.command}: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

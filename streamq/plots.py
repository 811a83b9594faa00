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


def plot_compare(records, out_dir) -> list[str]:
    """The seed's comparison: loss vs steps, and loss / entropy / utilisation vs wall seconds, per method.

    ``records``: metric dicts with method, step, wall_seconds, loss, entropy, log_k, utilisation.
    Writes ``loss_vs_steps.png`` and ``loss_vs_wall.png`` into ``out_dir``; returns their paths.
    """
    from pathlib import Path

    plt = _plt()
    out_dir = Path(out_dir)
    methods = list(dict.fromkeys(r["method"] for r in records))
    colours = {"random": "tab:grey", "lloyd": "tab:blue", "lbg": "tab:red"}
    series = {m: [r for r in records if r["method"] == m] for m in methods}
    log_k = max(float(r["log_k"]) for r in records)
    paths = []
    for xkey, fname, xlabel in (("step", "loss_vs_steps.png", "minibatch steps"),
                                ("wall_seconds", "loss_vs_wall.png", "wall seconds")):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for m, rs in series.items():
            x = [float(r[xkey]) for r in rs]
            style = dict(color=colours.get(m), label=m, marker="o" if len(rs) == 1 else None, ms=5)
            axes[0].plot(x, [float(r["loss"]) for r in rs], **style)
            axes[1].plot(x, [float(r["entropy"]) for r in rs], **style)
            axes[2].plot(x, [float(r["utilisation"]) for r in rs], **style)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("quantisation loss (MSE per frame, eval sample)")
        axes[1].axhline(log_k, color="k", ls="--", lw=1, label=f"log K = {log_k:.2f}")
        axes[1].set_ylabel("usage entropy (nats)")
        axes[2].set_ylabel("utilisation (share of codewords used)")
        axes[2].set_ylim(0, 1.05)
        for ax in axes:
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"codebook training, K = {round(float(__import__('math').exp(log_k)))}")
        fig.tight_layout()
        p = out_dir / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def plot_alignment(posteriors, path, frames, state_labels, out_path, frame_step=0.01, title=""):
    """One utterance's alignment: posteriors over states x frames with the Viterbi path, above the MFCCs.

    Parameters
    ----------
    posteriors : float (T, S) state posteriors; path : int (T,) Viterbi state per frame;
    frames : float (T, D) MFCC frames; state_labels : list of S str; out_path : where the PNG goes.
    """
    import numpy as np

    plt = _plt()
    post = np.asarray(posteriors, float)
    T, S = post.shape
    t_end = T * frame_step
    fig, (a0, a1) = plt.subplots(2, 1, figsize=(max(8.0, min(24.0, T / 40)), 7), sharex=True,
                                 gridspec_kw={"height_ratios": [2, 1]})
    a0.imshow(post.T, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
              extent=(0, t_end, -0.5, S - 0.5), vmin=0, vmax=1)
    a0.plot((np.arange(T) + 0.5) * frame_step, path, color="cyan", lw=1.0, label="Viterbi path")
    if S <= 80:
        a0.set_yticks(range(S))
        a0.set_yticklabels(state_labels, fontsize=6)
    a0.set_ylabel("state")
    a0.legend(loc="upper left", fontsize=7)
    a0.set_title(title, fontsize=9)
    a1.imshow(np.asarray(frames, float).T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
              extent=(0, t_end, -0.5, frames.shape[1] - 0.5))
    a1.set_ylabel("MFCC")
    a1.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return str(out_path)


def plot_gmm_history(records, path) -> str:
    """Streaming-EM progress: average log-likelihood per frame of the model after each EM iteration, on
    the fixed held-out sample and on the training pass, with re-seeded components marked.

    ``records``: dicts with iteration, train_loglik, heldout_loglik, reseeded (``DiagGMM.history_``).
    Writes a PNG to ``path``; returns it.
    """
    import math

    plt = _plt()
    it = [int(r["iteration"]) for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    # train_loglik of iteration i is measured in its E-step, i.e. it scores the model of iteration i - 1
    for key, label, style, lag in (("heldout_loglik", "fixed held-out sample", "o-", 0),
                                   ("train_loglik", "training pass (scored in the next E-step)", "s--", 1)):
        pts = [(i - lag, float(r[key])) for i, r in zip(it, records)
               if r.get(key) is not None and not math.isnan(float(r[key]))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, ms=4)
    for i, r in zip(it, records):
        if i > 0 and int(r.get("reseeded", 0) or 0) > 0:
            ax.axvline(i, color="tab:red", alpha=0.25, lw=1)
            ax.annotate(f"{int(r['reseeded'])} re-seeded", (i, 0.02), xycoords=("data", "axes fraction"),
                        fontsize=7, color="tab:red", rotation=90)
    ax.set_xlabel("EM iteration (0 = initialised from the codebook)")
    ax.set_ylabel("average log-likelihood per frame (nats)")
    ax.set_title("Diagonal GMM, streaming EM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------ animations: GIF (pillow) or MP4 (ffmpeg)
ANIMATION_FORMATS = ("gif", "mp4")


def animation_format(out_path) -> str:
    """``gif`` or ``mp4`` from the suffix of ``out_path``; ValueError for any other suffix."""
    from pathlib import Path

    fmt = Path(out_path).suffix.lower().lstrip(".")
    if fmt not in ANIMATION_FORMATS:
        raise ValueError(f"{out_path}: an animation is written as .gif or .mp4, not {Path(out_path).suffix or 'no suffix'}")
    return fmt


def _save_animation(fig, draw, n_frames, out_path, fps, dpi, dynamic=()):
    """Call ``draw(i)`` for i in range(n_frames), grabbing each state of ``fig`` as one frame of ``out_path``.

    GIF through pillow: with ``dynamic`` (the artists ``draw`` changes, none of which moves an axis) the static
    rest is rendered once and each frame redraws only those artists (blitting, several times faster);
    otherwise every frame is a full redraw (matplotlib's PillowWriter). MP4 through FFMpegWriter, which needs
    ``ffmpeg`` on the PATH (RuntimeError otherwise). Written to a temporary name, then renamed.
    Returns ``str(out_path)``.
    """
    import os
    import shutil
    from pathlib import Path

    from matplotlib import animation

    plt = _plt()
    out_path = Path(out_path)
    fmt = animation_format(out_path)
    if not fps > 0:
        plt.close(fig)
        raise ValueError(f"fps must be > 0, got {fps}")
    tmp = out_path.with_name(f".{out_path.stem}.tmp{out_path.suffix}")
    try:
        if fmt == "mp4":
            if shutil.which("ffmpeg") is None:
                raise RuntimeError("MP4 needs ffmpeg on the PATH; install ffmpeg or write a .gif")
            # libx264 with yuv420p needs even sides: pad by one pixel where the figure is odd
            writer = animation.FFMpegWriter(fps=fps, codec="libx264", extra_args=[
                "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p"])
        elif dynamic:
            _save_gif_blit(fig, draw, n_frames, tmp, fps, dpi, dynamic)
            writer = None
        else:
            writer = animation.PillowWriter(fps=fps)
        if writer is not None:
            import logging

            mpl_log = logging.getLogger("matplotlib.animation")  # it logs the ffmpeg command line at INFO
            level = mpl_log.level
            mpl_log.setLevel(max(level, logging.WARNING))
            try:
                with writer.saving(fig, str(tmp), dpi):
                    for i in range(n_frames):
                        draw(i)
                        writer.grab_frame()
            finally:
                mpl_log.setLevel(level)
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return str(out_path)


def _save_gif_blit(fig, draw, n_frames, path, fps, dpi, dynamic):
    """A GIF by blitting: background once, then per frame only the ``dynamic`` artists (palette frames)."""
    from PIL import Image

    fig.set_dpi(dpi)
    canvas = fig.canvas
    for a in dynamic:
        a.set_animated(True)
    draw(0)
    canvas.draw()  # everything but the animated artists
    background = canvas.copy_from_bbox(fig.bbox)
    frames = []
    for i in range(n_frames):
        draw(i)
        canvas.restore_region(background)
        for a in dynamic:
            (a.axes if a.axes is not None else fig).draw_artist(a)
        w, h = canvas.get_width_height()
        im = Image.frombuffer("RGBA", (w, h), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
        frames.append(im.quantize(colors=255, method=Image.Quantize.MEDIANCUT))
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def find_file(directory, *names):
    """The first of ``names`` that exists in ``directory`` (a Path), or None. Output files carry the command's
    prefix (``fit_history.csv``, ``gmm_history.csv``, ...); older runs wrote plain names (``history.csv``):
    readers list both, newest first."""
    from pathlib import Path

    for n in names:
        p = Path(directory) / n
        if p.exists():
            return p
    return None


# ------------------------------------------------------------------ LBG: the codebook after each doubling
FIT_HISTORY_FILES = ("fit_history.csv", "history.csv")


def load_lbg_stages(fit_dir):
    """The per-stage codebooks and history of an LBG fit directory (``streamq fit --method lbg``):
    ``codebook_stages.npz`` (``ks`` int (S,), ``codebooks`` (sum ks, D)) and ``fit_history.csv`` (or the
    older name ``history.csv``).

    Returns
    -------
    ks : int64 (S,) codebook size after each stage; stages : list of S float32 (ks[s], D) arrays;
    records : list of dicts, the rows of the history (:func:`streamq.artifacts.read_records`).

    Raises
    ------
    ValueError
        A file missing or malformed (the message names the file and field).
    """
    from pathlib import Path

    import numpy as np

    from . import artifacts as af

    d = Path(fit_dir)
    if not (d / af.CODEBOOK_STAGES).exists():
        raise ValueError(f"{d / af.CODEBOOK_STAGES}: not found; per-stage codebooks are written by "
                         "`streamq fit --method lbg`")
    ks, stages = af.load_stages(d)
    if ks.size == 0 or ks.min() < 1:
        raise ValueError(f"{d / af.CODEBOOK_STAGES}: field 'ks' must hold positive codebook sizes, got {ks.tolist()}")
    stages = [np.asarray(c, np.float32) for c in stages]
    h = find_file(d, *FIT_HISTORY_FILES)
    if h is None:
        raise ValueError(f"{d / FIT_HISTORY_FILES[0]}: not found")
    records = af.read_records(h)
    for f in ("stage", "frames_seen", "loss", "entropy", "log_k", "utilisation"):
        if records and f not in records[0]:
            raise ValueError(f"{h}: column '{f}' missing")
    return ks, stages, records


def _nearest(X, C, block=4096):
    """Index of the nearest row of C for each row of X (squared Euclidean, float64, ties to the lower index)."""
    import numpy as np

    C64 = np.asarray(C, np.float64)
    cc = (C64 * C64).sum(1)
    out = np.empty(len(X), np.int64)
    for s in range(0, len(X), block):
        x = np.asarray(X[s:s + block], np.float64)
        out[s:s + block] = np.argmin(cc[None, :] - 2.0 * x @ C64.T, axis=1)
    return out


def lbg_order(stages) -> list:
    """Row order for each stage's codebook image, so that the split tree shows.

    Stage s + 1's codewords sit where their parent sat in stage s's order, "+" copy before "-" copy.
    When a stage exactly doubles (``kernels.lloyd.split`` layout) codeword j's parent is ``j mod K``;
    otherwise (a last stage that splits only the worst codewords, or sizes that do not double) the
    parent is the nearest codeword of the previous stage. Stage 0 is ordered by its first coefficient.

    Parameters
    ----------
    stages : list of (K_s, D) arrays.

    Returns
    -------
    list of int64 (K_s,) permutations: row r of the picture is codeword ``order[s][r]``.
    """
    import numpy as np

    orders = [np.argsort(np.asarray(stages[0])[:, 0], kind="stable").astype(np.int64)]
    for s in range(1, len(stages)):
        prev, cur = stages[s - 1], stages[s]
        kp, kc = len(prev), len(cur)
        parent = np.arange(kc) % kp if kc == 2 * kp else _nearest(cur, prev)
        rank = np.empty(kp, np.int64)
        rank[orders[-1]] = np.arange(kp)
        orders.append(np.lexsort((np.arange(kc), rank[parent])).astype(np.int64))
    return orders


def animate_lbg(fit_dir, out_path, fps=2.0, dpi=80) -> str:
    """``streamq plot lbg``: one frame per LBG stage of ``fit_dir``.

    Each frame: the stage's K x D codebook as an image (rows in :func:`lbg_order`, each coefficient scaled by
    the final codebook's mean and spread), beside the loss, usage entropy with log K, and utilisation of the
    history up to the end of that stage. ``out_path``: ``.gif`` or ``.mp4``. Returns the written path.
    """
    import numpy as np

    plt = _plt()
    ks, stages, records = load_lbg_stages(fit_dir)
    orders = lbg_order(stages)
    final = np.asarray(stages[-1], np.float64)
    mu, sd = final.mean(0), final.std(0) + 1e-12
    D = final.shape[1]
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    rows = [r for r in records if np.isfinite(num(r.get("stage"))) and np.isfinite(num(r.get("loss")))]
    x = np.nan_to_num(np.array([num(r.get("frames_seen")) for r in rows]))
    st = np.array([int(num(r["stage"])) for r in rows], np.int64)
    col = {k: np.array([num(r.get(k)) for r in rows]) for k in ("loss", "entropy", "log_k", "utilisation")}

    fig = plt.figure(figsize=(11, 6.2))
    gs = fig.add_gridspec(3, 2, width_ratios=[1, 2.2], hspace=0.45, wspace=0.25)
    a_img = fig.add_subplot(gs[:, 0])
    a_loss, a_ent, a_use = (fig.add_subplot(gs[i, 1]) for i in range(3))
    img = a_img.imshow(np.zeros((1, D)), aspect="auto", cmap="RdBu_r", vmin=-2.5, vmax=2.5,
                       interpolation="nearest", extent=(-0.5, D - 0.5, 0, 1))
    a_img.set_xlabel("coefficient")
    a_img.set_yticks([])
    fig.colorbar(img, ax=a_img, orientation="horizontal", fraction=0.04, pad=0.09,
                 label="(c - mean) / sd, final codebook")
    lines = {}
    for ax, key, label in ((a_loss, "loss", "loss (MSE per frame)"), (a_ent, "entropy", "usage entropy (nats)"),
                           (a_use, "utilisation", "utilisation")):
        (lines[key],) = ax.plot([], [], "o-", ms=3, color="tab:red", label=key)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        if len(x):
            ax.set_xlim(0, max(1.0, float(x.max())) * 1.02)
    (lines["log_k"],) = a_ent.plot([], [], "--", color="k", lw=1, label="log K")
    a_ent.legend(fontsize=7, loc="lower right")
    a_use.set_xlabel("frames seen")
    a_use.set_ylim(0, 1.05)
    for ax, keys in ((a_loss, ("loss",)), (a_ent, ("entropy", "log_k"))):
        v = np.concatenate([col[k][np.isfinite(col[k])] for k in keys])
        if v.size:
            lo, hi = float(v.min()), float(v.max())
            pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.1
            if ax is a_loss and lo > 0:
                ax.set_yscale("log")
                ax.set_ylim(lo / 1.1, hi * 1.1)
            else:
                ax.set_ylim(lo - pad, hi + pad)
    title = fig.suptitle("")

    def draw(s):
        C = (np.asarray(stages[s], np.float64)[orders[s]] - mu) / sd
        img.set_data(C)
        img.set_extent((-0.5, D - 0.5, ks[s], 0))
        a_img.set_ylim(ks[s], 0)
        a_img.set_ylabel(f"{ks[s]} codewords (split-tree order)")
        m = st <= s
        for key in ("loss", "entropy", "log_k", "utilisation"):
            lines[key].set_data(x[m], col[key][m])
        last = np.flatnonzero(st == s)
        extra = ""
        if last.size:
            r = rows[last[-1]]
            extra = (f": loss {float(r['loss']):.4g}, entropy {float(r['entropy']):.3f} / log K "
                     f"{float(r['log_k']):.3f}, utilisation {float(r['utilisation']):.2f}")
        title.set_text(f"LBG stage {s + 1} of {len(ks)}, K = {ks[s]}{extra}")

    return _save_animation(fig, draw, len(ks), out_path, fps, dpi)


# ------------------------------------------------------------------ MFCC extraction step by step
def mfcc_stages(signal, config) -> dict:
    """python_speech_features' MFCC pipeline one step at a time, with every intermediate array.

    The same steps and parameters as :func:`streamq.features.mfcc` (python_speech_features'
    ``sigproc`` and ``base`` functions, ``config``'s values), so ``result["mfcc"]`` equals what
    ``ingest`` stores for this signal.

    Parameters
    ----------
    signal : float (N,) mono samples at ``config.sample_rate``. config : :class:`streamq.features.FeatureConfig`.

    Returns
    -------
    dict of float64 arrays unless noted: ``signal`` (N,); ``emphasized`` (N,) after pre-emphasis;
    ``frames`` (T, W) the framed emphasized signal (rectangular window: python_speech_features' default);
    ``starts`` int64 (T,) first sample of each frame; ``power`` (T, nfft/2+1) |FFT|^2 / nfft;
    ``freqs`` (nfft/2+1,) Hz; ``filterbank`` (nfilt, nfft/2+1) mel filters; ``fbank`` (T, nfilt)
    filterbank energies; ``log_fbank`` (T, nfilt); ``dct`` (T, numcep) orthonormal DCT-II of the log
    energies; ``energy`` (T,) total frame energy; ``mfcc`` float32 (T, numcep): liftered cepstra with c0
    replaced by log energy when ``config.append_energy``.
    """
    import numpy as np
    from python_speech_features import base, sigproc

    from .features import AudioError

    c = config
    x = np.asarray(signal, np.float64).reshape(-1)
    if len(x) < c.window_samples:
        raise AudioError(f"signal shorter than one frame ({len(x)} samples < {c.window_samples})")
    nfft = c.fft_size
    emph = sigproc.preemphasis(x, c.preemph)
    frames = sigproc.framesig(emph, c.winlen * c.sample_rate, c.winstep * c.sample_rate, lambda n: np.ones((n,)))
    step = int(sigproc.round_half_up(c.winstep * c.sample_rate))
    power = sigproc.powspec(frames, nfft)
    energy = power.sum(1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    fb = base.get_filterbanks(c.nfilt, nfft, c.sample_rate, c.lowfreq, c.highfreq or c.sample_rate / 2)
    fbank = power @ fb.T
    fbank = np.where(fbank == 0, np.finfo(float).eps, fbank)
    log_fbank = np.log(fbank)
    cep = base.dct(log_fbank, type=2, axis=1, norm="ortho")[:, :c.numcep]
    out = base.lifter(cep, c.ceplifter)
    if c.append_energy:
        out[:, 0] = np.log(energy)
    return {"signal": x, "emphasized": emph, "frames": frames, "starts": np.arange(len(frames), dtype=np.int64) * step,
            "power": power, "freqs": np.arange(power.shape[1]) * c.sample_rate / nfft, "filterbank": fb,
            "fbank": fbank, "log_fbank": log_fbank, "dct": cep, "energy": energy, "mfcc": out.astype(np.float32)}


def frame_subsample(n, cap) -> "np.ndarray":
    """At most ``cap`` indices spread evenly over ``range(n)``, always holding the first and the last."""
    import numpy as np

    if cap < 1:
        raise ValueError(f"max_frames must be >= 1, got {cap}")
    if n <= cap:
        return np.arange(n, dtype=np.int64)
    if cap == 1:
        return np.array([n - 1], dtype=np.int64)
    return np.unique(np.round(np.linspace(0, n - 1, cap)).astype(np.int64))


def _lim(a, lo=0.5, hi=99.5, log=False):
    import numpy as np

    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a) & (a > 0)] if log else a[np.isfinite(a)]
    if a.size == 0:
        return (0.1, 1.0) if log else (-1.0, 1.0)
    lo_v, hi_v = np.percentile(a, lo), np.percentile(a, hi)
    if log:
        return lo_v / 1.5, hi_v * 1.5 if hi_v > lo_v else lo_v * 10
    pad = 0.05 * (hi_v - lo_v) or 0.05 * abs(hi_v) or 1.0
    return lo_v - pad, hi_v + pad


def mfcc_figure(stages, config, max_frames=120, title=""):
    """The figure behind :func:`animate_mfcc`: returns ``(fig, draw, frame_indices, mfcc_image)``.

    ``draw(i)`` shows analysis frame ``frame_indices[i]``; ``mfcc_image`` is the AxesImage of the growing
    MFCC matrix (its data after ``draw(len(frame_indices) - 1)`` is the full ``stages["mfcc"].T``).
    """
    import numpy as np
    from matplotlib.patches import Rectangle

    plt = _plt()
    st = stages
    sr = config.sample_rate
    x, frames, starts, power, mf = st["signal"], st["frames"], st["starts"], st["power"], st["mfcc"]
    T, W = frames.shape
    idx = frame_subsample(T, max_frames)
    step_s = config.winstep
    fig = plt.figure(figsize=(11, 8.2))
    gs = fig.add_gridspec(4, 3, height_ratios=[1, 1.1, 1.1, 1.4], hspace=0.65, wspace=0.3)
    a_wave = fig.add_subplot(gs[0, :])
    a_frame, a_pow, a_fb = (fig.add_subplot(gs[1, i]) for i in range(3))
    a_log, a_dct, a_vec = (fig.add_subplot(gs[2, i]) for i in range(3))
    a_img = fig.add_subplot(gs[3, :])

    if len(x) > 4000:  # min / max envelope in 2000 bins: the same picture, far fewer points to draw per frame
        nb = 2000
        edges = np.linspace(0, len(x), nb + 1).astype(np.int64)
        mn, mx = np.minimum.reduceat(x, edges[:-1]), np.maximum.reduceat(x, edges[:-1])
        a_wave.fill_between(edges[:-1] / sr, mn, mx, lw=0.4, color="tab:blue")
    else:
        a_wave.plot(np.arange(len(x)) / sr, x, lw=0.4, color="tab:blue")
    a_wave.set_xlim(0, len(x) / sr)
    a_wave.set_title("waveform and the analysis window", fontsize=9)
    a_wave.set_xlabel("seconds", fontsize=8)
    win = Rectangle((0, 0), W / sr, 1, transform=a_wave.get_xaxis_transform(), color="tab:orange", alpha=0.45)
    a_wave.add_patch(win)

    (l_frame,) = a_frame.plot(np.arange(W) / sr * 1000, frames[0], lw=0.8, color="tab:orange")
    a_frame.set_xlim(0, W / sr * 1000)
    a_frame.set_ylim(*_lim(frames))
    a_frame.set_title("pre-emphasised frame", fontsize=9)
    a_frame.set_xlabel("ms", fontsize=8)

    f = st["freqs"]
    (l_pow,) = a_pow.semilogy(f, np.maximum(power[0], 1e-12), lw=0.7, color="tab:purple")
    a_pow.set_ylim(*_lim(power, 5, 99.9, log=True))
    fb = st["filterbank"]
    a_fbk = a_pow.twinx()
    for row in fb:
        a_fbk.plot(f, row, color="grey", lw=0.4, alpha=0.6)
    a_fbk.set_ylim(0, 4)
    a_fbk.set_yticks([])
    a_pow.set_title("power spectrum |FFT|²/nfft, mel filters", fontsize=9)
    a_pow.set_xlabel("Hz", fontsize=8)

    nf = fb.shape[0]
    centres = (fb * f[None, :]).sum(1) / np.maximum(fb.sum(1), 1e-12)
    bars = a_fb.bar(np.arange(nf), st["fbank"][0], color="tab:green")
    a_fb.set_yscale("log")
    a_fb.set_ylim(*_lim(st["fbank"], 5, 99.9, log=True))
    a_fb.set_title("mel filterbank energies", fontsize=9)
    a_fb.set_xlabel(f"filter (centre {centres[0]:.0f}-{centres[-1]:.0f} Hz)", fontsize=8)

    (l_log,) = a_log.plot(np.arange(nf), st["log_fbank"][0], "o-", ms=2.5, color="tab:green")
    a_log.set_ylim(*_lim(st["log_fbank"]))
    a_log.set_title("log energies", fontsize=9)
    a_log.set_xlabel("filter", fontsize=8)

    nc = mf.shape[1]
    (l_dct,) = a_dct.plot(np.arange(nc), st["dct"][0], "o-", ms=3, color="tab:red")
    a_dct.axhline(0, color="k", lw=0.5)
    a_dct.set_ylim(*_lim(st["dct"]))
    a_dct.set_title("DCT of the log energies", fontsize=9)
    a_dct.set_xlabel("cepstrum", fontsize=8)

    (l_vec,) = a_vec.plot(np.arange(nc), mf[0], "s-", ms=3, color="tab:brown")
    a_vec.axhline(0, color="k", lw=0.5)
    a_vec.set_ylim(*_lim(mf))
    a_vec.set_title("liftered" + (", c0 = log energy" if config.append_energy else ""), fontsize=9)
    a_vec.set_xlabel("coefficient", fontsize=8)

    lo, hi = np.percentile(mf, [1, 99])
    grow = np.full((nc, T), np.nan, np.float32)
    img = a_img.imshow(grow, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       vmin=lo, vmax=hi, extent=(0, T * step_s, -0.5, nc - 0.5))
    a_img.set_xlim(0, len(x) / sr)
    a_img.set_ylabel("MFCC", fontsize=8)
    a_img.set_xlabel("seconds", fontsize=8)
    a_img.set_title("MFCC frames so far (what `streamq ingest` stores)", fontsize=9)
    for ax in fig.axes:
        ax.tick_params(labelsize=7)
    sup = fig.suptitle(title, fontsize=10)

    def draw(i):
        j = int(idx[i])
        win.set_x(starts[j] / sr)
        l_frame.set_ydata(frames[j])
        l_pow.set_ydata(np.maximum(power[j], 1e-12))
        for b, h in zip(bars, st["fbank"][j]):
            b.set_height(h)
        l_log.set_ydata(st["log_fbank"][j])
        l_dct.set_ydata(st["dct"][j])
        l_vec.set_ydata(mf[j])
        grow[:, :j + 1] = mf[:j + 1].T
        img.set_data(grow)
        sup.set_text(f"{title}  frame {j + 1} / {T} ({starts[j] / sr:.2f} s)".strip())

    draw.dynamic = [win, l_frame, l_pow, *bars, l_log, l_dct, l_vec, img, sup]
    return fig, draw, idx, img


def animate_mfcc(audio_path, out_path, config=None, fps=10.0, max_frames=120, dpi=72) -> str:
    """``streamq plot mfcc``: MFCC extraction of one clip, step by step, one animation frame per analysis frame.

    Decodes with :func:`streamq.features.decode` at ``config.sample_rate`` (default :class:`FeatureConfig`),
    and shows waveform with the moving window, the frame, its power spectrum with the mel filters, the
    filterbank energies, their log, the DCT, the final coefficients and the growing MFCC image; the last
    frame's image is exactly ``features.extract(audio_path, config)``. Long clips show at most
    ``max_frames`` evenly spaced analysis frames (always the last). Returns the written path.
    """
    from pathlib import Path

    from .features import FeatureConfig, decode

    config = config or FeatureConfig()
    animation_format(out_path)
    st = mfcc_stages(decode(audio_path, config.sample_rate), config)
    fig, draw, idx, _ = mfcc_figure(st, config, max_frames=max_frames, title=Path(audio_path).name)
    return _save_animation(fig, draw, len(idx), out_path, fps, dpi, dynamic=draw.dynamic)


# ------------------------------------------------------------------ the DFT basis (the seed's picture)
def dft_basis(size=512, rate=16000, low=50.0):
    """The seed's DFT basis: ``exp(-2 pi i k t)`` for ``size`` frequencies k from ``low`` to ``rate / 2``
    (endpoint excluded) and ``size`` sample times t = n / rate. complex128 (size, size), rows = frequencies."""
    import numpy as np

    if int(size) < 1 or rate <= 0 or not 0 <= low < rate / 2:
        raise ValueError(f"need size >= 1, rate > 0 and 0 <= low < rate / 2; got size={size}, rate={rate}, low={low}")
    k = np.linspace(low, rate / 2, int(size), endpoint=False)
    t = np.arange(int(size)) / rate
    return np.exp(-2j * np.pi * k[:, None] * t)


def plot_dft(out_path, size=512, rate=16000, low=50.0, dpi=110) -> str:
    """``streamq plot dft``: real and imaginary parts of :func:`dft_basis` side by side as images. Returns the path."""
    import numpy as np

    plt = _plt()
    B = dft_basis(size, rate, low)
    ms = size / rate * 1000
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True)
    for ax, part, name in ((axes[0], B.real, "real part cos(2πkt)"), (axes[1], B.imag, "imaginary part -sin(2πkt)")):
        im = ax.imshow(part, aspect="auto", origin="lower", cmap="Spectral", vmin=-1, vmax=1,
                       interpolation="antialiased", extent=(0, ms, low, rate / 2))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("t (ms)")
    axes[0].set_ylabel("k (Hz)")
    fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02)
    fig.suptitle(f"DFT basis: exp(-2πi k t), {size} frequencies from {low:g} Hz to {rate / 2:g} Hz, "
                 f"{size} samples at {rate:g} Hz")
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
    return str(out_path)


# ------------------------------------------------------------------ alignment over EM iterations
TRACE_FIELDS = ("posteriors", "paths", "state_labels", "frames", "loglik", "words", "word_start", "word_end",
                "frame_step")


def file_safe_id(utt_id) -> str:
    """The file stem ``streamq align`` gives per-utterance files (plots/ID.png, traces/ID.npz, textgrids/)."""
    import re

    return re.sub(r"[^\w.\-]+", "_", str(utt_id)).strip("._") or "utt"


def trace_path(align_dir, utt_id):
    """``align_dir/traces/ID.npz``, the per-iteration trace ``streamq align --plot N`` keeps for one utterance.

    ``ID`` is the utterance id as given or as made file-safe (runs of characters other than letters, digits,
    ``.``, ``-`` and ``_`` become ``_``). ValueError naming the available ids when neither exists.
    """
    from pathlib import Path

    d = Path(align_dir) / "traces"
    for name in (str(utt_id), file_safe_id(utt_id)):
        if name and (d / f"{name}.npz").is_file():
            return d / f"{name}.npz"
    have = sorted(p.stem for p in d.glob("*.npz")) if d.is_dir() else []
    raise ValueError(f"{d}: no trace for utterance {utt_id!r}; traced: {', '.join(have[:10]) or 'none'}"
                     + (" ..." if len(have) > 10 else "") + " (`streamq align --plot N` traces the first N)")


def load_trace(path) -> dict:
    """One utterance's alignment trace (``ALIGN_DIR/traces/ID.npz``) as a dict of arrays, checked.

    Fields: posteriors (n_iter, T, S), paths int (n_iter, T), state_labels str (S,), frames (T, D),
    loglik (n_iter,), words str (W,), word_start / word_end (W,) seconds, frame_step scalar.
    """
    import numpy as np

    from pathlib import Path

    if not Path(path).exists():
        raise ValueError(f"{path}: not found; `streamq align --plot N` records traces for the first N utterances")
    from . import artifacts as af

    tr = af.load_npz(path, required=TRACE_FIELDS)
    n, T, S = tr["posteriors"].shape if tr["posteriors"].ndim == 3 else (None,) * 3
    if n is None:
        raise ValueError(f"{path}: field 'posteriors' must be (n_iter, T, S), got shape {tr['posteriors'].shape}")
    if n == 0:
        raise ValueError(f"{path}: no EM iterations recorded")
    for f, shape in (("paths", (n, T)), ("state_labels", (S,)), ("loglik", (n,))):
        if tr[f].shape != shape:
            raise ValueError(f"{path}: field '{f}' has shape {tr[f].shape}, expected {shape}")
    if tr["frames"].ndim != 2 or tr["frames"].shape[0] != T:
        raise ValueError(f"{path}: field 'frames' has shape {tr['frames'].shape}, expected ({T}, D)")
    W = len(tr["words"])
    if tr["word_start"].shape != (W,) or tr["word_end"].shape != (W,):
        raise ValueError(f"{path}: fields 'word_start' / 'word_end' need one value per word ({W})")
    tr["frame_step"] = float(tr["frame_step"])
    return tr


def _state_ticks(labels):
    """One tick per symbol occurrence: a run of states with the same symbol, its label without the state
    number (``t0 t1 t2`` -> ``t``; ``<sil>`` as is). A run ends where the symbol changes or the state number
    does not increase (two e's in a row). Ticks sit at each run's middle state; at most 90 of them."""
    import re

    ticks, names = [], []
    start, prev_sym, prev_idx = 0, None, None
    for s, lab in enumerate(list(labels) + [None]):
        if lab is None:
            sym, idx = None, None
        else:
            m = re.fullmatch(r"(.+?)(\d+)", str(lab)) if not str(lab).startswith("<") else None
            sym, idx = (m.group(1), int(m.group(2))) if m else (str(lab), None)
        new = s == len(labels) or sym != prev_sym or (idx is not None and prev_idx is not None and idx <= prev_idx)
        if s > 0 and new:
            ticks.append((start + s - 1) / 2)
            names.append(prev_sym)
            start = s
        prev_sym, prev_idx = sym, idx
    if len(ticks) > 90:  # too many to read: every n-th
        keep = slice(None, None, -(-len(ticks) // 90))
        ticks, names = ticks[keep], names[keep]
    return ticks, names


def alignment_figure(trace, title=""):
    """The figure behind :func:`animate_alignment`: returns ``(fig, draw, n_frames)``; ``draw(i)`` shows EM
    iteration ``i``: posterior map with the Viterbi path, log-likelihood so far, MFCCs with word boundaries."""
    import numpy as np

    plt = _plt()
    post, paths, labels = trace["posteriors"], trace["paths"], [str(s) for s in trace["state_labels"]]
    n_iter, T, S = post.shape
    step = trace["frame_step"]
    X = np.asarray(trace["frames"], np.float64)
    t_end = T * step
    ticks, names = _state_ticks(labels)
    # tall enough for one readable character label per symbol on the state axis
    fig = plt.figure(figsize=(max(9.0, min(16.0, T / 45)), max(7.6, min(14.0, 3.4 + 0.13 * len(ticks)))))
    gs = fig.add_gridspec(2, 2, height_ratios=[2.4, 1], width_ratios=[5, 1], hspace=0.25, wspace=0.18)
    a_post = fig.add_subplot(gs[0, 0])
    a_ll = fig.add_subplot(gs[0, 1])
    a_mf = fig.add_subplot(gs[1, 0], sharex=a_post)
    img = a_post.imshow(np.asarray(post[0], np.float32).T, aspect="auto", origin="lower", cmap="magma",
                        interpolation="nearest", extent=(0, t_end, -0.5, S - 0.5), vmin=0, vmax=1)
    tc = (np.arange(T) + 0.5) * step
    (l_path,) = a_post.plot(tc, paths[0], color="cyan", lw=0.8, alpha=0.55, label="Viterbi path")
    a_post.set_yticks(ticks)
    a_post.set_yticklabels(names, fontsize=6 if len(ticks) > 40 else 8)
    a_post.set_ylabel("state (character)")
    a_post.legend(loc="upper left", fontsize=7)
    a_post.tick_params(labelbottom=False)
    it = np.arange(1, n_iter + 1)
    ll = np.asarray(trace["loglik"], np.float64)
    (l_ll,) = a_ll.plot([], [], "o-", ms=3, color="tab:red")
    a_ll.set_xlim(0.5, n_iter + 0.5)
    fin = ll[np.isfinite(ll)]
    if fin.size:
        pad = 0.05 * (fin.max() - fin.min()) or 0.05 * abs(fin.max()) or 0.1
        a_ll.set_ylim(fin.min() - pad, fin.max() + pad)
    a_ll.set_xlabel("EM iteration", fontsize=8)
    a_ll.set_title("log-likelihood / frame", fontsize=8)
    a_ll.tick_params(labelsize=7)
    a_ll.grid(alpha=0.3)
    lo, hi = np.percentile(X, [1, 99])
    a_mf.imshow(X.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest", vmin=lo, vmax=hi,
                extent=(0, t_end, -0.5, X.shape[1] - 0.5))
    D = X.shape[1]
    for w, s, e in zip(trace["words"], trace["word_start"], trace["word_end"]):
        a_mf.axvline(float(s), color="white", lw=1)
        a_mf.axvline(float(e), color="white", lw=0.6, ls=":")
        a_mf.text((float(s) + float(e)) / 2, D - 0.7, str(w), color="white", ha="center", va="top", fontsize=7,
                  clip_on=True)
    a_mf.set_xlim(0, t_end)
    a_mf.set_ylabel("MFCC")
    a_mf.set_xlabel("seconds (word boundaries from the final alignment)")
    sup = fig.suptitle("", fontsize=10)
    width = int(fig.get_figwidth() * 11)  # characters that fit on one title line at 10 pt, about
    head = "" if not title else (title if len(title) <= width else title[:width - 1] + "…") + "\n"

    def draw(i):
        img.set_data(np.asarray(post[i], np.float32).T)
        l_path.set_ydata(paths[i])
        l_ll.set_data(it[:i + 1], ll[:i + 1])
        sup.set_text(f"{head}EM iteration {i + 1} / {n_iter}, log-likelihood {ll[i]:.3f} per frame")

    draw.dynamic = [img, l_path, l_ll, sup]
    return fig, draw, n_iter


def animate_alignment(align_dir, utt_id, out_path, fps=3.0, dpi=72) -> str:
    """``streamq plot align``: the posterior map and Viterbi path of ``utt_id`` after each EM iteration,
    from ``align_dir/traces/ID.npz`` (written by ``streamq align --plot N``). Returns the written path."""
    animation_format(out_path)
    tr = load_trace(trace_path(align_dir, utt_id))
    fig, draw, n = alignment_figure(tr, title=f"{utt_id}: {' '.join(str(w) for w in tr['words'])}")
    return _save_animation(fig, draw, n, out_path, fps, dpi, dynamic=draw.dynamic)


# ------------------------------------------------------------------ a final segmentation over the MFCCs
def read_ctm(path, ids) -> dict:
    """Segments of the utterances ``ids`` from a CTM file (``id channel start duration label [confidence]``,
    seconds).

    Returns {id: [(start, end, label), ...]} in file order (the confidence is not kept); ids without a line
    are absent. One pass over the file. ValueError naming the file and line for a malformed line of a
    wanted id."""
    want = {str(i) for i in ids}
    out: dict = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0] not in want:
                continue
            try:
                if len(parts) not in (5, 6):
                    raise ValueError
                start, dur, label = float(parts[2]), float(parts[3]), parts[4]
                if len(parts) == 6:
                    float(parts[5])
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 'id channel start duration label [confidence]', "
                                 f"got {line.strip()!r}") \
                    from None
            out.setdefault(parts[0], []).append((start, start + dur, label))
    return out


def plot_segmentation(frames, words, chars, out_path, frame_step=0.01, title="", dpi=80) -> str:
    """One utterance's final alignment without its posteriors: the MFCC image with word boundaries and
    labels, above a strip with one cell per aligned character.

    Parameters
    ----------
    frames : float (T, D) MFCC frames. words, chars : lists of (start s, end s, label).
    out_path : PNG path. Returns it.
    """
    import numpy as np

    plt = _plt()
    X = np.asarray(frames, np.float64)
    T, D = X.shape
    t_end = T * frame_step
    fig, (a0, a1) = plt.subplots(2, 1, figsize=(max(8.0, min(16.0, T / 45)), 4.6), sharex=True,
                                 gridspec_kw={"height_ratios": [4, 1]})
    lo, hi = np.percentile(X, [1, 99])
    a0.imshow(X.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest", vmin=lo, vmax=hi,
              extent=(0, t_end, -0.5, D - 0.5))
    for s, e, w in words:
        a0.axvline(s, color="white", lw=1)
        a0.axvline(e, color="white", lw=0.6, ls=":")
        a0.text((s + e) / 2, D - 0.7, w, color="white", ha="center", va="top", fontsize=8, clip_on=True)
    a0.set_ylabel("MFCC")
    a0.set_title(title, fontsize=9)
    px_per_s = fig.get_figwidth() * 0.85 * dpi / max(t_end, 1e-9)  # about: the axes span most of the width
    for k, (s, e, c) in enumerate(chars):
        a1.axvspan(s, e, color=("tab:blue", "tab:orange")[k % 2], alpha=0.35, lw=0)
        if (e - s) * px_per_s >= 6:  # a label only where it fits
            a1.text((s + e) / 2, 0.5, c, ha="center", va="center", fontsize=7, clip_on=True)
    a1.set_yticks([])
    a1.set_ylabel("chars", fontsize=8)
    a1.set_xlim(0, t_end)
    a1.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
    return str(out_path)

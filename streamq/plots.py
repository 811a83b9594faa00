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

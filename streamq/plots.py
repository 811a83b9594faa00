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
        axes[0].set_ylabel("quantisation loss (MSE per frame, held-out)")
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

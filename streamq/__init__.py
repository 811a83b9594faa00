"""streamq: streaming vector quantisation, Gaussian mixtures and HMM alignment.

Learns codebooks, diagonal GMMs and linear-chain HMM alignments from frame stores too big for memory.
The public face is flat::

    import streamq
    store = streamq.FrameStore.open("out/demo/store")
    lbg = streamq.LBG(256, seed=0).fit(store)          # scikit-learn conventions
    gmm = streamq.DiagGMM(256, means_init=lbg.codebook_).fit(store)
    al = streamq.Aligner(gmm).fit(store)

Names are imported on first use (PEP 562), so ``import streamq`` and the CLI start fast.
"""

import importlib as _importlib
import os as _os

# Numba's OpenMP threading layer spin-waits between parallel regions by default. streamq calls many
# short parallel kernels per second; on a shared or oversubscribed machine the spinning threads cost
# 10-100x (measured: a 4096x256 assign took 8 ms instead of 0.27 ms under load). Passive waiting
# costs microseconds when the machine is idle. Set before Numba starts its thread pool; an explicit
# user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"

_WHERE = {
    # data
    "FrameStore": "store", "FrameSource": "store", "ArraySource": "store", "UtteranceSource": "store",
    "as_source": "store", "as_utterances": "store", "StoreError": "store",
    "FeatureConfig": "features", "extract": "features", "AudioError": "features",
    "ingest": "ingest",
    # estimators
    "RandomSample": "codebook", "MiniBatchLloyd": "codebook", "LBG": "codebook",
    "DiagGMM": "gmm", "Aligner": "align", "Alignment": "align",
    # models on disk
    "Gaussians": "artifacts", "load_codebook": "artifacts", "load_model": "artifacts", "ArtifactError": "artifacts",
    "load_gmm": "pipelines",
    # the commands as functions
    "run_fit": "pipelines", "run_compare": "pipelines", "run_gmm": "pipelines", "run_align": "pipelines",
    "run_quantise": "pipelines",
    "normalise": "transcripts",
}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(_importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'streamq' has no attribute {name!r}")


def __dir__():
    return __all__

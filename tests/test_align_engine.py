"""The aligner's emission / lattice engine: sparse cached emissions (gselect), pruned checkpointed lattices
(beam, retry_beam), their memory bounds and their agreement with the exact dense path."""

import numpy as np
import pytest
from sklearn.base import clone

import streamq.align as align_mod
from streamq.align import Aligner
from test_align import SYMS, TEXTS, boundary_errors, synth_model, synth_utt


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(7)
    means, var = synth_model()
    Xs, texts, truth = [], [], []
    for t in TEXTS * 2:
        X, w = synth_utt(t, means, rng)
        Xs.append(X)
        texts.append(t)
        truth.append(w)
    return Xs, texts, truth, {"weights": np.ones(12), "means": means, "variances": var}


def fit(model, Xs, texts, **kw):
    kw.setdefault("states_per_symbol", 2)
    kw.setdefault("max_iter", 4)
    kw.setdefault("weight_prior", 0.5)
    return Aligner(model, **kw).fit(Xs, texts)


def test_default_is_sparse_with_the_beam():
    p = Aligner().get_params()
    assert (p["gselect"], p["beam"], p["retry_beam"]) == (16, align_mod.DEFAULT_BEAM, align_mod.DEFAULT_RETRY_BEAM)


def test_params_are_explicit_and_clone():
    al = Aligner({"weights": np.ones(2), "means": np.zeros((2, 3)), "variances": np.ones((2, 3))}, gselect=8,
                 beam=50.0, retry_beam=None)
    p = clone(al).get_params()
    assert (p["gselect"], p["beam"], p["retry_beam"]) == (8, 50.0, None)
    for bad in ({"gselect": 0}, {"beam": 0.0}, {"retry_beam": -1.0}, {"cache_mb": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Aligner(al.model, **bad).fit([np.zeros((20, 3), np.float32)], ["a"])


@pytest.mark.parametrize("beam", [None, align_mod.DEFAULT_BEAM])
def test_sparse_with_every_gaussian_gives_the_dense_posteriors(small, beam):
    """gselect = K: the cached sparse lists hold every Gaussian; EM and the posteriors are the dense ones."""
    Xs, texts, _, model = small
    dense = fit(model, Xs, texts, beam=beam, trace=(0, 3), gselect=None)
    sparse = fit(model, Xs, texts, beam=beam, gselect=12, trace=(0, 3))
    assert sparse._selection is not None and dense._selection is None
    np.testing.assert_allclose([h["loglik"] for h in sparse.history_], [h["loglik"] for h in dense.history_],
                               rtol=1e-9)
    np.testing.assert_allclose(sparse.unit_weights_, dense.unit_weights_, atol=1e-6)
    for i in (0, 3):
        for a, b in zip(sparse.traces_[i]["posteriors"], dense.traces_[i]["posteriors"]):
            np.testing.assert_allclose(a.astype(float), b.astype(float), atol=2e-3)  # float16 traces
    da = dict(dense.align_corpus(posteriors=range(len(Xs))))
    sa = dict(sparse.align_corpus(posteriors=range(len(Xs))))
    for i in da:
        np.testing.assert_allclose(sa[i].posteriors, da[i].posteriors, atol=1e-6)
        np.testing.assert_array_equal(sa[i].path, da[i].path)
        assert sa[i].word_confidence == pytest.approx(da[i].word_confidence, abs=1e-6)
    # the cache holds (T, n) lists, not T x K
    comps, (cidx, rel), shift = sparse._cache[0]
    assert cidx.shape == rel.shape == (len(Xs[0]), 12) and rel.dtype == np.float32 and cidx.dtype == np.int32


def test_lists_are_found_once_and_reused(small, monkeypatch):
    """The selection runs once per utterance for all EM iterations while the cache holds them; without a cache
    (cache_mb=0) it reruns every iteration and gives the same statistics."""
    Xs, texts, truth, model = small
    calls = []
    real = align_mod.select

    def counting(X, *a, **k):
        calls.append(len(X))
        return real(X, *a, **k)

    monkeypatch.setattr(align_mod, "select", counting)
    cached = fit(model, Xs, texts, gselect=3, max_iter=5)
    n_cached = len(calls)
    assert n_cached == len(Xs)  # decoding later reuses them too
    list(cached.align_corpus())
    assert len(calls) == n_cached
    calls.clear()
    uncached = fit(model, Xs, texts, gselect=3, max_iter=5, cache_mb=0)
    assert len(calls) == 5 * len(Xs) and not uncached._cache
    np.testing.assert_array_equal(uncached.unit_weights_, cached.unit_weights_)
    entry_bytes = sum(c.nbytes + r.nbytes + s.nbytes + k.nbytes for k, (c, r), s in cached._cache.values())
    assert entry_bytes <= sum(len(X) for X in Xs) * (3 * 8 + 8) + 12 * 4 * len(Xs)
    errs = np.concatenate([boundary_errors(a.words, truth[i]) for i, a in cached.align_corpus()])
    assert (errs <= 2).mean() > 0.9


def test_sparse_at_k16384(small):
    """K = 16384 (12 speech-like Gaussians among 16372 distractors): gselect=8 aligns as the dense path does,
    with lists of 8 per frame."""
    Xs, texts, truth, model = small
    rng = np.random.default_rng(3)
    K = 16384
    far = rng.normal(size=(K - 12, 4)) * 4 + rng.choice([-30.0, 30.0], size=(K - 12, 4))
    big = {"weights": np.r_[np.ones(12), np.full(K - 12, 1e-3)], "means": np.vstack([model["means"], far]),
           "variances": np.vstack([model["variances"], rng.uniform(0.3, 1.0, (K - 12, 4))])}
    Xs, texts, truth = Xs[:6], texts[:6], truth[:6]
    sparse = fit(big, Xs, texts, gselect=8, max_iter=3)
    comps, (cidx, rel), shift = sparse._cache[0]
    assert cidx.shape == (len(Xs[0]), 8) and len(comps) < K
    dense = fit(big, Xs, texts, max_iter=3, gselect=None)
    np.testing.assert_allclose([h["loglik_per_frame"] for h in sparse.history_],
                               [h["loglik_per_frame"] for h in dense.history_], atol=0.02)
    for (i, a), (_, b) in zip(sparse.align_corpus(), dense.align_corpus()):
        assert np.abs(boundary_errors(a.words, truth[i])).max() <= 3
        assert np.mean(a.path != b.path) < 0.05


def test_no_path_inside_the_beam_is_retried_then_listed(small):
    """Frames that all look like silence under a long transcript, with weights trained on real utterances: a
    narrow beam keeps only the first states and the lattice dies out (the reason names the beams); a wide
    retry-beam aligns it; in a corpus it is listed in unaligned_ at decoding with that reason."""
    Xs, texts, _, model = small
    sil = (model["means"][0] + np.random.default_rng(0).normal(size=(120, 4)) * 0.6).astype(np.float32)
    al = fit(model, Xs, texts, beam=5.0, retry_beam=None, max_iter=3)
    with pytest.raises(ValueError, match="no path inside beam 5 "):
        al.align(sil, "abcde abcde abcde")
    al.set_params(retry_beam=5.2)
    with pytest.raises(ValueError, match="beam 5 or retry-beam 5.2"):
        al.align(sil, "abcde abcde abcde")
    al.set_params(retry_beam=2000.0)
    a = al.align(sil, "abcde abcde abcde")
    assert a.words and np.isfinite(a.loglik)
    al.set_params(retry_beam=None, beam=None)  # exact lattice: a path exists
    assert al.align(sil, "abcde abcde abcde").loglik == pytest.approx(a.loglik)
    # in EM: a fixed slow self-loop makes the forward lag behind; a 1-nat beam loses every utterance (listed,
    # with the reason), a retry-beam of 50 recovers them all
    lost = fit(model, Xs, texts, beam=1.0, retry_beam=None, max_iter=2, self_loop=0.8)
    assert sorted(lost.unaligned_) == list(range(len(Xs)))
    assert all(r.startswith("no path inside beam 1 ") for r in lost.unaligned_.values())
    assert all(a is None for _, a in lost.align_corpus())
    kept = fit(model, Xs, texts, beam=1.0, retry_beam=50.0, max_iter=2, self_loop=0.8)
    assert not kept.unaligned_ and all(a is not None for _, a in kept.align_corpus())


def test_thirty_minute_utterance_within_a_memory_bound():
    """180,000 frames (30 min at 100 fps), ~22,000 states: EM and decoding run in a working set (the arrays the
    lattice kernels allocate, as they report them) under 1/200 of the dense lattice's T x S x 8 bytes, and
    the alignment is right."""
    rng = np.random.default_rng(30)
    means, var = synth_model()
    words = ["".join(rng.choice(list(SYMS), int(rng.integers(2, 7)))) for _ in range(2560)]
    text = " ".join(words)
    X2, truth = synth_utt(text, means, rng, sil=(50, 100), pause=(0, 8), char=(12, 22))
    T = len(X2)
    al = Aligner({"weights": np.ones(12), "means": means, "variances": var}, states_per_symbol=2, max_iter=2,
                 gselect=4).fit([X2], [text])
    S = al.chains_[0].n_states
    assert T >= 170_000 and S >= 18_000, (T, S)
    (i, a), = list(al.align_corpus())
    assert a is not None and not al.unaligned_
    dense = T * S * 8
    st = al.lattice_stats_
    assert st["forward_backward_max_bytes"] < dense / 200, (st, dense)
    assert st["viterbi_max_bytes"] < dense / 200, (st, dense)
    errs = boundary_errors(a.words, truth)
    assert (errs <= 3).mean() > 0.95, np.bincount(errs)[:10]


def test_long_utterances_are_not_traced_nor_given_full_posteriors(small, monkeypatch):
    """Traces and posteriors=True need T x S arrays: past DENSE_FALLBACK_CELLS they are skipped, not allocated."""
    Xs, texts, _, model = small
    monkeypatch.setattr(align_mod, "DENSE_FALLBACK_CELLS", 40 * 20)
    long_i = int(np.argmax([len(X) * 1.0 for X in Xs]))
    al = fit(model, Xs, texts, max_iter=2, trace=(0, long_i))
    S = al.chains_[long_i].n_states
    assert len(Xs[long_i]) * S > 800
    assert long_i not in al.traces_
    out = dict(al.align_corpus(posteriors=[long_i]))
    assert out[long_i] is not None and out[long_i].posteriors is None and out[long_i].word_confidence

"""The aligner: transcripts -> chains, tied-weight EM, decoding, run_align outputs and errors."""

import csv

import numpy as np
import pytest

from streamq.align import Aligner, gaussians_from_codebook
from streamq.formats import textgrid
from streamq.pipelines import run_align
from streamq.store import FrameStore, as_utterances
from streamq.transcripts import Inventory, normalise

D = 4
SYMS = "abcde"


def synth_model(seed=0):
    """K = 12 well separated Gaussians: silence, then two (onset, offset) per symbol a..e, + 1 unused."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(12, D)) * 4
    return means, np.full((12, D), 0.6)


def synth_utt(text, means, rng, sil=(6, 12), pause=(0, 5), char=(4, 10)):
    """Frames for ``text`` and the true word boundaries (frame ranges)."""
    parts, words, t = [], [], 0

    def emit(comp, n):
        nonlocal t
        parts.append(np.repeat(means[comp][None], n, 0))
        t += n

    emit(0, int(rng.integers(*sil)))
    for wi, w in enumerate(text.split()):
        if wi:
            emit(0, int(rng.integers(*pause)))
        start = t
        for ch in w:
            n = int(rng.integers(*char))
            k = 1 + 2 * SYMS.index(ch)
            emit(k, n // 2)
            emit(k + 1, n - n // 2)
        words.append((start, t, w))
    emit(0, int(rng.integers(*sil)))
    X = np.concatenate(parts)
    return (X + rng.normal(size=X.shape) * 0.6).astype(np.float32), words


TEXTS = ["abc de", "dab cea", "ed ba", "ccab de", "bead cab", "a bed", "deed ace", "cab dab ebb"]


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(42)
    means, var = synth_model()
    Xs, truth, texts = [], [], []
    for r in range(3):
        for t in TEXTS:
            X, w = synth_utt(t, means, rng)
            Xs.append(X)
            truth.append(w)
            texts.append(t.upper() + ("!" if r else ","))
    return Xs, texts, truth, {"weights": np.ones(12), "means": means, "variances": var}


def boundary_errors(words, truth):
    assert [w for _, _, w in words] == [w for _, _, w in truth]
    return np.abs(np.array([(a, b) for a, b, _ in words]) - np.array([(a, b) for a, b, _ in truth])).ravel()


# --------------------------------------------------------------------------- transcripts and chains
def test_normalise():
    assert normalise("Ім’я — «М'ята», 2 рази!") == ["ім'я", "м'ята", "2", "рази"]
    assert normalise("Hello,world... It's  'quoted'") == ["hello", "world", "it's", "quoted"]
    assert normalise("ЇЖАК ґанок Є") == ["їжак", "ґанок", "є"]
    assert normalise("м’ясо ʼ м`ята") == ["м'ясо", "м'ята"]
    assert normalise("  ?! -- ") == []
    assert normalise("well-known") == ["well", "known"]


def test_chain_structure_and_transitions():
    inv = Inventory.from_transcripts(["Ab, c!"], states_per_symbol=2)
    assert inv.symbols == ["a", "b", "c"] and inv.n_units == 7
    ch = inv.chain("ab c")
    np.testing.assert_array_equal(ch.units, [0, 1, 2, 3, 4, 0, 5, 6, 0])
    np.testing.assert_array_equal(ch.char_of, [-1, 0, 0, 1, 1, -1, 2, 2, -1])
    np.testing.assert_array_equal(np.flatnonzero(ch.pre_pause), [4])
    assert (ch.n_required, ch.n_optional) == (8, 1) and ch.words == ["ab", "c"]
    stay, nxt, skip = ch.transitions(0.8, 0.3)
    np.testing.assert_allclose(stay + nxt + skip, 1.0)
    assert skip[4] == pytest.approx(0.2 * 0.7) and nxt[4] == pytest.approx(0.2 * 0.3)
    assert stay[-1] == 1.0 and skip.sum() == pytest.approx(0.14)
    with pytest.raises(ValueError, match="'z'"):
        inv.chain("abz")


# --------------------------------------------------------------------------- EM and decoding
def test_em_never_lowers_loglik_and_recovers_boundaries(corpus):
    Xs, texts, truth, model = corpus
    al = Aligner(model, states_per_symbol=2, max_iter=8, weight_prior=0.0).fit(Xs, texts)
    ll = [h["loglik"] for h in al.history_]
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(ll, ll[1:])), ll
    assert ll[-1] > ll[0] + 100
    errs = np.concatenate([boundary_errors(a.words, truth[i]) for i, a in al.align_corpus()])
    assert (errs <= 2).mean() > 0.9, np.bincount(errs)
    # onset / offset components end up in the right symbol's units
    labels = al.inventory_.unit_labels()
    assert labels[int(al.unit_weights_[:, 3].argmax())] == "b0"
    assert labels[int(al.unit_weights_[:, 4].argmax())] == "b1"


def test_em_monotone_with_transition_updates(corpus):
    Xs, texts, truth, model = corpus
    al = Aligner(model, states_per_symbol=1, max_iter=6, weight_prior=0.0, update_transitions=True).fit(Xs, texts)
    ll = [h["loglik"] for h in al.history_]
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(ll, ll[1:])), ll
    assert np.isfinite(al.self_loops_).all() and (al.self_loops_ < 0.999).all()


def test_jobs_give_identical_results(corpus):
    Xs, texts, truth, model = corpus
    a1 = Aligner(model, max_iter=3).fit(Xs, texts)
    a2 = Aligner(model, max_iter=3, n_jobs=2).fit(Xs, texts)
    np.testing.assert_array_equal(a1.unit_weights_, a2.unit_weights_)
    assert [h["loglik"] for h in a1.history_] == [h["loglik"] for h in a2.history_]


def test_unalignable_utterances_are_reported(corpus):
    Xs, texts, truth, model = corpus
    X_short = Xs[0][:5]
    al = Aligner(model, max_iter=2).fit(Xs[:4] + [X_short, Xs[0]], texts[:4] + ["abc de", "?!"])
    assert set(al.unaligned_) == {4, 5}
    assert "more states than frames" in al.unaligned_[4] and "empty" in al.unaligned_[5]
    res = dict(al.align_corpus())
    assert res[4] is None and res[0] is not None


def test_single_utterance_self_training(corpus):
    Xs, texts, truth, model = corpus
    al = Aligner(model, states_per_symbol=1, max_iter=15)
    a = al.align(Xs[6], texts[6], update=True, posteriors=True)
    assert a.posteriors.shape == (len(Xs[6]), 10)  # sil d e e d [sil] a c e sil
    assert (boundary_errors(a.words, truth[6]) <= 3).mean() >= 0.75
    # and an utterance not seen in training, with the trained weights
    b = al.align(Xs[14], "Deed, ace.")
    assert (boundary_errors(b.words, truth[14]) <= 3).mean() >= 0.75
    with pytest.raises(ValueError, match="'b'"):
        al.align(Xs[1], "dab cea")  # 'b' was never seen


def test_gaussians_from_codebook():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 3)).astype(np.float32)
    C = X[:4].copy()
    g = gaussians_from_codebook(C, as_utterances([X[:200], X[200:]], ["a", "b"]))
    a = ((X[:, None, :].astype(np.float64) - C[None]) ** 2).sum(2).argmin(1)
    np.testing.assert_array_equal(g.means, C.astype(np.float64))
    for k in range(4):  # the same statistics as DiagGMM.init_from_codebook: each cluster's own variance
        ref = X[a == k].astype(np.float64).var(0)
        np.testing.assert_allclose(g.variances[k], ref, rtol=1e-8)
    np.testing.assert_allclose(g.weights, np.bincount(a, minlength=4) / 500)


def test_textgrid_fills_gaps():
    tg = textgrid([("words", [(0.1, 0.3, "a"), (0.5, 0.9, 'say "x"')])], 1.0)
    assert "intervals: size = 5" in tg and 'text = "say ""x"""' in tg and "xmax = 1.0\n" in tg


# --------------------------------------------------------------------------- run_align
@pytest.fixture(scope="module")
def store_and_models(corpus, tmp_path_factory):
    Xs, texts, truth, model = corpus
    root = tmp_path_factory.mktemp("align")
    store = FrameStore.create(root / "store", dim=D, feature_config={"winlen": 0.025, "winstep": 0.01})
    utts = [{"id": f"u{i:02d}", "frames": X, "transcript": t, "duration": len(X) * 0.01}
            for i, (X, t) in enumerate(zip(Xs, texts))]
    utts.append({"id": "short", "frames": Xs[0][:4], "transcript": "abc de"})
    store.append(utts)
    (root / "gmm").mkdir()
    np.savez(root / "gmm" / "gmm.npz", **model)
    (root / "cb").mkdir()
    np.save(root / "cb" / "codebook.npy", model["means"].astype(np.float32))
    return root, truth


@pytest.mark.parametrize("kind", ["gmm", "cb"])
def test_run_align_outputs(store_and_models, kind):
    root, truth = store_and_models
    out = root / f"out_{kind}"
    s = run_align(root / "store", root / kind, out, iters=5, plots=1, verbose=0)
    assert s["utterances"] == 25 and s["aligned"] == 24 and s["unaligned"] == 1
    rows = list(csv.DictReader(open(out / "align_history.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5]
    assert (out / "unaligned.tsv").read_text().splitlines()[1].startswith("short\tmore states than frames")
    words = [ln.split() for ln in (out / "words.ctm").read_text().splitlines()]
    assert len(words) == sum(len(t) for t in truth)
    u0 = [w for w in words if w[0] == "u00"]
    assert [w[4] for w in u0] == ["abc", "de"] and all(w[1] == "1" for w in u0)
    assert all(0 < float(w[5]) <= 1.0001 for w in words)  # confidence: mean posterior of the path's states
    # times: frame boundary t -> t * 0.01 + 0.005 (half of window - step, less a quarter frame of Viterbi lag)
    starts = np.array([float(w[2]) for w in u0])
    true_starts = np.array([a for a, _, _ in truth[0]]) * 0.01 + 0.005
    assert np.abs(starts - true_starts).max() <= 0.0301
    chars = (out / "chars.ctm").read_text().splitlines()
    assert sum(ln.startswith("u00 ") for ln in chars) == 5
    tg = (out / "textgrids" / "u00.TextGrid").read_text()
    assert tg.index('name = "words"') < tg.index('name = "phones"') and 'text = "abc"' in tg
    assert len(list((out / "textgrids").glob("*.TextGrid"))) == 24
    assert (out / "plots" / "u00.png").stat().st_size > 1000
    tr = np.load(out / "traces" / "u00.npz")
    assert tr["posteriors"].shape[0] == 5 and tr["paths"].shape == (5, len(tr["frames"]))
    np.testing.assert_allclose(tr["posteriors"][-1].astype(np.float64).sum(1), 1.0, atol=1e-2)
    assert list(tr["words"]) == ["abc", "de"]


def test_every_output_format_loads_in_praatio(store_and_models, tmp_path):
    from praatio import textgrid as ptg

    root, truth = store_and_models
    out = tmp_path / "fmt"
    run_align(root / "store", root / "gmm", out, iters=3, formats=("short-textgrid", "json", "csv"), verbose=0)
    st = FrameStore.open(root / "store")
    for i in (0, 7):
        uid, dur = st.ids[i], float(st.durations[i])
        for f in (out / "textgrids" / f"{uid}.TextGrid", out / "json" / f"{uid}.json"):
            tg = ptg.openTextgrid(str(f), includeEmptyIntervals=True)
            assert tg.tierNames == ("words", "phones") and tg.maxTimestamp == pytest.approx(dur, abs=1e-9)  # the audio's
            words = [e.label for e in tg.getTier("words").entries if e.label]
            assert words == [w for _, _, w in truth[i]]
            assert tg.getTier("words").entries[-1].end == tg.maxTimestamp
        rows = list(csv.DictReader(open(out / "csv" / f"{uid}.csv")))
        assert [r["Label"] for r in rows if r["Type"] == "words"] == [w for _, _, w in truth[i]]
        assert set(rows[0]) == {"Begin", "End", "Label", "Type", "Speaker"}
    run_align(root / "store", root / "gmm", tmp_path / "long", iters=1, verbose=0)
    tg = ptg.openTextgrid(str(tmp_path / "long" / "textgrids" / "u03.TextGrid"), includeEmptyIntervals=True)
    assert tg.maxTimestamp == pytest.approx(float(st.durations[3]), abs=1e-9)
    with pytest.raises(ValueError, match="--format praat: choose from"):
        run_align(root / "store", root / "gmm", tmp_path / "x", formats=("praat",), verbose=0)


def test_quality_report_flags_a_wrong_transcript(corpus, tmp_path):
    Xs, texts, truth, model = corpus
    st = FrameStore.create(tmp_path / "store", dim=D, feature_config={"winlen": 0.025, "winstep": 0.01})
    wrong = list(texts)
    wrong[5] = "a " + "eeddccbbaa"  # 'a bed': the second word swapped for a long unrelated one
    st.append([{"id": f"u{i:02d}", "frames": X, "transcript": t, "duration": len(X) * 0.01}
               for i, (X, t) in enumerate(zip(Xs, wrong))])
    (tmp_path / "gmm").mkdir()
    np.savez(tmp_path / "gmm" / "gmm.npz", **model)
    s = run_align(tmp_path / "store", tmp_path / "gmm", tmp_path / "out", iters=8, verbose=0)
    rows = list(csv.DictReader(open(tmp_path / "out" / "alignment_analysis.csv")))
    assert len(rows) == s["aligned"] == len(Xs)
    flagged = {r["id"] for r in rows if r["flagged"] == "1"}
    assert "u05" in flagged and len(flagged) <= 2, flagged
    bad = next(r for r in rows if r["id"] == "u05")
    assert int(bad["squeezed_words"]) >= 1 and "squeezed" in bad["reasons"]
    assert float(bad["loglik_z"]) < min(float(r["loglik_z"]) for r in rows if r["id"] != "u05")
    assert all(0 < float(r["mean_word_confidence"]) <= 1 for r in rows)


def test_run_align_bad_input(store_and_models, tmp_path):
    root, _ = store_and_models
    with pytest.raises(ValueError, match="no gmm.npz or codebook.npy"):
        run_align(root / "store", tmp_path, tmp_path / "o", iters=1, verbose=0)
    with pytest.raises(ValueError, match="model directory not found"):
        run_align(root / "store", tmp_path / "nope", tmp_path / "o", iters=1, verbose=0)
    np.savez(tmp_path / "gmm.npz", weights=np.ones(3), means=np.zeros((3, D)))
    with pytest.raises(ValueError, match="gmm.npz: missing field 'variances'"):
        run_align(root / "store", tmp_path, tmp_path / "o", iters=1, verbose=0)
    np.savez(tmp_path / "gmm.npz", weights=np.ones(3), means=np.zeros((3, 7)), variances=np.ones((3, 7)))
    with pytest.raises(ValueError, match="dimension 7 differs"):
        run_align(root / "store", tmp_path, tmp_path / "o", iters=1, verbose=0)
    np.savez(tmp_path / "gmm.npz", weights=np.ones(3), means=np.zeros((3, D)), variances=-np.ones((3, D)))
    with pytest.raises(ValueError, match="'variances' must be > 0"):
        run_align(root / "store", tmp_path, tmp_path / "o", iters=1, verbose=0)
    with pytest.raises(ValueError, match="not a streamq frame store"):
        run_align(tmp_path / "nostore", root / "gmm", tmp_path / "o", iters=1, verbose=0)
    with pytest.raises(ValueError, match="states_per_symbol"):
        run_align(root / "store", root / "gmm", tmp_path / "o", iters=1, states_per_symbol=0, verbose=0)


def test_char_skip_lets_a_character_take_one_frame_less():
    inv = Inventory.from_transcripts(["ab c"], 3)
    plain, skipping = inv.chain("ab c"), inv.chain("ab c", char_skip=0.3)
    assert skipping.n_required == plain.n_required - 3  # one state less per character
    stay, nxt, skip = skipping.transitions(0.6, 0.5)
    first = np.flatnonzero(skipping.inner_skip)
    assert list(skipping.char_of[first]) == [0, 1, 2]
    np.testing.assert_allclose(skip[first], 0.4 * 0.3)
    np.testing.assert_allclose(stay + nxt + skip, 1.0)


def test_frame_time_offset_convention():
    from streamq.formats import frame_time_offset

    assert frame_time_offset({"winlen": 0.025, "winstep": 0.01}) == pytest.approx(0.005)
    assert frame_time_offset({"winlen": 0.025, "winstep": 0.005}) == pytest.approx(0.00875)
    assert frame_time_offset({}) == 0.0

"""DiagGMM streaming EM: scikit-learn agreement, EM monotonicity, edge cases, run_gmm files and resume."""

import csv
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from streamq.artifacts import Gaussians
from streamq.gmm import DiagGMM
from streamq.pipelines import load_gmm, run_gmm
from streamq.store import FrameStore


def with_params(g, w, m, v):
    """A fitted copy of ``g`` (same constructor parameters) holding the given Gaussians."""
    params = {k: v for k, v in g.get_params().items() if k != "n_components"}
    return DiagGMM.from_gaussians(Gaussians.checked(w, m, v), **params)


def blobs(seed, n_per=200, D=3, centres=None):
    rng = np.random.default_rng(seed)
    centres = np.array(centres if centres is not None else [[0, 0, 0], [4, 0, 1], [0, 5, -2], [-3, -3, 3]])[:, :D]
    X = np.concatenate([rng.normal(size=(n_per, D)) * rng.uniform(0.5, 1.5, D) + c for c in centres])
    return X[rng.permutation(len(X))].astype(np.float32)


def ref_avg_loglik(X, w, mu, var):
    X = np.asarray(X, np.float64)
    L = np.log(w)[None] - 0.5 * np.log(2 * np.pi * var).sum(1)[None] \
        - 0.5 * (((X[:, None] - mu[None]) ** 2) / var[None]).sum(-1)
    m = L.max(1, keepdims=True)
    return float((m[:, 0] + np.log(np.exp(L - m).sum(1))).mean())


@pytest.mark.parametrize("dot_dtype, rtol", [("float64", 1e-9), ("float32", 1e-5)])
@pytest.mark.parametrize("K", [1, 4])
def test_matches_sklearn_each_iteration(dot_dtype, rtol, K):
    X = blobs(0)
    rng = np.random.default_rng(1)
    w0 = rng.dirichlet(np.ones(K))
    m0 = X[rng.choice(len(X), K, replace=False)].astype(np.float64)
    v0 = rng.uniform(0.5, 2.0, size=(K, 3))
    reg = 1e-6  # sklearn adds reg_covar; we add the same and keep the floor (a clamp) inactive
    sk = GaussianMixture(K, covariance_type="diag", weights_init=w0, means_init=m0, precisions_init=1 / v0,
                         max_iter=1, warm_start=True, reg_covar=reg, tol=0)
    g = DiagGMM(K, var_floor=1e-12, reg_covar=reg, min_count=0, n_heldout=0, batch_size=300, dot_dtype=dot_dtype)
    g = with_params(g, w0, m0, v0)
    X64 = X.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(4):
            sk.fit(X64)
            g.em_step(X)
            np.testing.assert_allclose(g.score_samples(X).mean(), sk.score(X64), rtol=rtol)
            np.testing.assert_allclose(g.weights_, sk.weights_, rtol=rtol * 100, atol=1e-12)
            np.testing.assert_allclose(g.means_, sk.means_, rtol=rtol * 100, atol=rtol * 100)
            np.testing.assert_allclose(g.variances_, sk.covariances_, rtol=rtol * 100)
    assert len(g.history_) == 4


def test_floor_clamps_variance():
    rng = np.random.default_rng(2)
    X = np.column_stack([rng.normal(size=300), np.full(300, 1.5)]).astype(np.float32)  # zero-variance dim
    g = DiagGMM(2, var_floor=0.01, n_heldout=0, min_count=0)
    g = with_params(g, [0.5, 0.5], [[-1, 1.5], [1, 1.5]], [[1, 1], [1, 1]])
    for _ in range(3):
        g.em_step(X)
    assert np.all(g.variances_[:, 1] == 0.01)
    assert np.all(g.variances_[:, 0] > 0.01)
    assert np.isfinite(g.score_samples(X)).all()


@pytest.mark.parametrize("seed", range(6))
def test_em_never_lowers_likelihood(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, 7))
    X = blobs(seed, n_per=60)
    g = DiagGMM(K, var_floor=1e-3, min_count=0, n_heldout=0, batch_size=128, dot_dtype="float64")
    g = with_params(g, rng.dirichlet(np.ones(K)), X[rng.choice(len(X), K, replace=False)], rng.uniform(0.2, 3, (K, 3)))
    prev = g.score_samples(X).mean()
    for _ in range(6):
        rec = g.em_step(X)
        np.testing.assert_allclose(rec["train_loglik"], prev, rtol=1e-10)  # E-step scores the old parameters
        cur = g.score_samples(X).mean()
        assert cur >= prev - 1e-9 * abs(prev), (seed, cur, prev)
        prev = cur


def test_float32_and_float64_inputs_agree():
    X = blobs(3)
    res = []
    for dtype in (np.float32, np.float64):
        g = DiagGMM(3, n_heldout=0, min_count=0)
        g = with_params(g, np.ones(3) / 3, [[0, 0, 0], [3, 0, 0], [0, 3, 0]], np.ones((3, 3)))
        for _ in range(4):
            g.em_step(X.astype(dtype))
        res.append((g.score_samples(X.astype(dtype)), g.means_, g.variances_))
    for a, b in zip(*res):
        np.testing.assert_allclose(a, b, rtol=1e-4)


def test_pruning_error_is_bounded():
    rng = np.random.default_rng(13)
    K = 256
    X = blobs(13, n_per=100)
    w, m, v = rng.dirichlet(np.ones(K)), X[rng.choice(len(X), K, replace=False)], rng.uniform(0.05, 4, (K, 3))
    pruned = with_params(DiagGMM(K, n_heldout=0, dot_dtype="float64"), w, m, v)
    exact = with_params(DiagGMM(K, n_heldout=0, dot_dtype="float64", prune_tol=1e-300), w, m, v)  # no pruning
    d = exact.score_samples(X) - pruned.score_samples(X)
    assert (d >= -1e-12).all() and d.max() < 1e-10
    np.testing.assert_allclose(pruned.predict_proba(X), exact.predict_proba(X), atol=1e-10)
    a, b = pruned.accumulate(X), exact.accumulate(X)
    for x, y in zip(a[2:], b[2:]):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9)


def test_far_frames_are_finite():
    g = with_params(DiagGMM(2, n_heldout=0), [0.3, 0.7], [[0, 0], [1, 1]], [[1, 1], [0.5, 2]])
    X = np.array([[1e5, -1e5], [3e6, 0], [0.5, 0.5]], np.float32)
    ll = g.score_samples(X)
    P = g.predict_proba(X)
    assert np.isfinite(ll).all() and np.isfinite(P).all()
    np.testing.assert_allclose(ll, [ref_avg_loglik(x[None], g.weights_, g.means_, g.variances_) for x in X],
                               rtol=1e-6)
    np.testing.assert_allclose(P.sum(1), 1.0)


def test_zero_occupancy_component_is_reseeded_by_split():
    X = blobs(4, n_per=100)[:, :2]
    g = DiagGMM(3, n_heldout=0, min_count=5, split_eps=0.2)
    # component 2 sits far away: it gets (numerically) zero occupancy
    g = with_params(g, [0.5, 0.49, 0.01], [[0, 0], [4, 0], [1e3, 1e3]], np.ones((3, 2)))
    with np.errstate(all="raise"):  # nothing divided by zero
        rec = g.em_step(X)
    assert rec["reseeded"] == 1 and g.reseeded_ == 1
    assert np.isfinite(g.means_).all() and (g.variances_ > 0).all()
    np.testing.assert_allclose(g.weights_.sum(), 1.0)
    h = int(np.argmin(np.abs(g.weights_[:2] - g.weights_[2])))  # the split partner has the same weight
    np.testing.assert_allclose(g.weights_[h], g.weights_[2])
    d = g.means_[2] - g.means_[h]
    np.testing.assert_allclose(np.abs(d), 2 * 0.2 * np.sqrt(g.variances_[h]), rtol=1e-12)
    rec2 = g.em_step(X)
    assert rec2["reseeded"] == 0 and rec2["min_occupancy"] > 5


def test_zero_occupancy_without_reseed_keeps_weight_zero():
    X = blobs(5, n_per=50)[:, :2]
    g = DiagGMM(2, n_heldout=0, min_count=0, reseed=False)
    g = with_params(g, [1.0, 0.0], [[0, 0], [1, 1]], np.ones((2, 2)))
    with np.errstate(all="raise"):
        g.em_step(X)
    assert g.weights_[1] == 0.0 and np.isfinite(g.score_samples(X)).all()
    np.testing.assert_allclose(g.means_[1], [1, 1])


def test_k1_is_the_sample_mean_and_variance():
    X = blobs(6)
    g = with_params(DiagGMM(1, var_floor=1e-6, n_heldout=0, batch_size=50), [1.0], [[9, 9, 9]], [[1, 1, 1]])
    g.em_step(X)
    np.testing.assert_allclose(g.means_[0], X.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(g.variances_[0], X.astype(np.float64).var(0), rtol=1e-8)
    np.testing.assert_allclose(g.weights_, [1.0])


def test_init_from_codebook():
    X = blobs(7)
    C = np.array([[0, 0, 0], [4, 0, 1], [0, 5, -2], [-3, -3, 3], [50, 50, 50]], np.float32)  # last never used
    g = DiagGMM(5, var_floor=1e-3, n_heldout=0, split_eps=0.2).init_from_codebook(X, C)
    lab = ((X[:, None].astype(np.float64) - C[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(lab, minlength=5)
    h = int(counts.argmax())  # the empty cluster is re-seeded by splitting the heaviest one
    for j in range(4):
        sel = X[lab == j].astype(np.float64)
        var = np.maximum(sel.var(0), 1e-3)
        np.testing.assert_allclose(g.variances_[j], var, rtol=1e-9)
        if j == h:
            np.testing.assert_allclose(g.weights_[j], counts[j] / len(X) / 2, rtol=1e-12)
            np.testing.assert_allclose(g.means_[j], C[j] - 0.2 * np.sqrt(var), rtol=1e-9)
            np.testing.assert_allclose(g.means_[4], C[j] + 0.2 * np.sqrt(var), rtol=1e-9)
            np.testing.assert_allclose(g.variances_[4], var, rtol=1e-9)
        else:
            np.testing.assert_allclose(g.weights_[j], counts[j] / len(X), rtol=1e-12)
            np.testing.assert_allclose(g.means_[j], C[j])
    assert g.init_reseeded_ == 1
    np.testing.assert_allclose(g.weights_[4], g.weights_[h])


def test_fit_with_codebook_improves_heldout_and_records_history():
    X = blobs(8, n_per=300)
    C = X[:4]
    g = DiagGMM(4, max_iter=5, n_heldout=500, batch_size=256, means_init=C).fit(X)
    ho = [r["heldout_loglik"] for r in g.history_]
    assert [r["iteration"] for r in g.history_] == list(range(6))
    assert ho[-1] > ho[0] and all(np.isfinite(ho))
    assert g.history_[-1]["frames"] == len(X)


def test_fit_from_scratch_uses_lbg():
    X = blobs(14, n_per=150)
    g = DiagGMM(4, max_iter=3, n_heldout=300, batch_size=256).fit(X)
    ho = [r["heldout_loglik"] for r in g.history_]
    assert ho[-1] >= ho[0] and np.isfinite(ho).all()
    # the four blobs are found: every true centre has a component mean within one unit
    centres = np.array([[0, 0, 0], [4, 0, 1], [0, 5, -2], [-3, -3, 3]])
    assert (np.linalg.norm(centres[:, None] - g.means_[None], axis=-1).min(1) < 1.0).all()


def test_gselect_close_to_exact_and_top1_is_hard_em():
    X = blobs(9, n_per=200)
    C = np.array([[0, 0, 0], [4, 0, 1], [0, 5, -2], [-3, -3, 3]], np.float32)
    a = DiagGMM(4, max_iter=4, n_heldout=400, means_init=C).fit(X)
    b = DiagGMM(4, max_iter=4, n_heldout=400, gselect=2, means_init=C).fit(X)
    assert abs(a.history_[-1]["heldout_loglik"] - b.history_[-1]["heldout_loglik"]) < 1e-3
    # gselect = 1: every frame goes wholly to its best component (hard / Viterbi EM)
    h = with_params(DiagGMM(4, n_heldout=0, gselect=1, min_count=0), a.weights_, a.means_, a.variances_)
    lab = a.predict(X)  # exact posteriors' argmax = top-1 component
    h.em_step(X)
    for j in range(4):
        np.testing.assert_allclose(h.means_[j], X[lab == j].astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)


def test_predict_proba_matches_reference_and_refuses_huge():
    X = blobs(10)[:50]
    g = with_params(DiagGMM(3, n_heldout=0), [0.2, 0.3, 0.5], [[0, 0, 0], [4, 0, 1], [0, 5, -2]], np.ones((3, 3)))
    L = np.log(g.weights_) - 0.5 * np.log(2 * np.pi * g.variances_).sum(1) \
        - 0.5 * (((X[:, None].astype(np.float64) - g.means_) ** 2) / g.variances_).sum(-1)
    P = np.exp(L - L.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    np.testing.assert_allclose(g.predict_proba(X), P, atol=1e-6)
    big = DiagGMM(4096, n_heldout=0)
    big = with_params(big, np.ones(4096), np.zeros((4096, 1)), np.ones((4096, 1)))
    with pytest.raises(ValueError, match="predict_proba"):
        big.predict_proba(np.zeros((2 ** 16, 1), np.float32))


def test_validation_messages():
    g = with_params(DiagGMM(2), [0.5, 0.5], [[0, 0], [1, 1]], [[1, 1], [1, 1]])
    with pytest.raises(ValueError, match="X has 3 features, but DiagGMM is expecting 2"):
        g.score_samples(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        g.score_samples(np.array([[np.nan, 0]], np.float32))
    with pytest.raises(ValueError, match="field 'variances' must be > 0"):
        with_params(DiagGMM(1), [1], [[0]], [[0]])
    with pytest.raises(ValueError, match="n_components"):
        DiagGMM(5).fit(np.zeros((3, 2), np.float32))


# ----------------------------------------------------------------- run_gmm
def make_store(tmp_path, X, name="store"):
    st = FrameStore.create(tmp_path / name, dim=X.shape[1], chunk_frames=128)
    with st.writer_lock():
        st.append([{"id": f"u{i}", "frames": X[i * 100:(i + 1) * 100], "transcript": "a"}
                   for i in range(len(X) // 100)])
    return tmp_path / name


def test_run_gmm_files_resume_and_load(tmp_path):
    X = blobs(11, n_per=250)  # 1000 frames
    store = make_store(tmp_path, X)
    cb = tmp_path / "cb"
    cb.mkdir()
    np.save(cb / "codebook.npy", np.array([[0, 0, 0], [4, 0, 1], [0, 5, -2], [-3, -3, 3]], np.float32))
    out = tmp_path / "out"
    s = run_gmm(store, cb, out, iters=2, verbose=0, n_heldout=300)
    assert s["iterations"] == 2 and np.isfinite(s["heldout_loglik"])
    for f in ("gmm.npz", "gmm_history.csv", "gmm_history.png", "gmm_config.json"):
        assert (out / f).stat().st_size > 0
    assert not list(out.glob("*.tmp*"))
    rows = list(csv.DictReader(open(out / "gmm_history.csv")))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2]
    # resume continues to 4 iterations and gives the same model as 4 straight iterations
    s2 = run_gmm(store, cb, out, iters=4, resume=True, verbose=0, n_heldout=300)
    assert s2["iterations"] == 4
    rows = list(csv.DictReader(open(out / "gmm_history.csv")))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3, 4]
    run_gmm(store, cb, tmp_path / "straight", iters=4, verbose=0, n_heldout=300)
    a, b = load_gmm(out), load_gmm(tmp_path / "straight")
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-12)
    np.testing.assert_allclose(a.variances_, b.variances_, rtol=1e-12)
    assert a.n_iter_ == 4
    np.testing.assert_allclose(a.score_samples(X).mean(), s2["train_loglik"], rtol=0.05)
    # the aligner's reader accepts the file
    from streamq.artifacts import load_model

    gs = load_model(out)
    np.testing.assert_allclose(np.asarray(gs.means), a.means_)


def test_run_gmm_bad_inputs(tmp_path):
    X = blobs(12, n_per=50)  # 200 frames
    store = make_store(tmp_path, X)
    cb = tmp_path / "cb"
    cb.mkdir()
    with pytest.raises(ValueError, match="codebook.npy: not found"):
        run_gmm(store, cb, tmp_path / "o1", iters=1, verbose=0)
    np.save(cb / "codebook.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="dim 5 != store dim 3"):
        run_gmm(store, cb, tmp_path / "o2", iters=1, verbose=0)
    np.save(cb / "codebook.npy", np.zeros((500, 3), np.float32))
    with pytest.raises(ValueError, match="500 components > 200 frames"):
        run_gmm(store, cb, tmp_path / "o3", iters=1, verbose=0)
    np.save(cb / "codebook.npy", np.array([[np.nan, 0, 0]], np.float32))
    with pytest.raises(ValueError, match="NaN"):
        run_gmm(store, cb, tmp_path / "o4", iters=1, verbose=0)
    with pytest.raises(ValueError, match="gmm.npz"):
        load_gmm(tmp_path / "nowhere")


# ----------------------------------------------------------------- hierarchical Gaussian selection
def random_gmm(K=256, D=5, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(K, D)) * 6
    v = rng.uniform(0.3, 1.5, (K, D))
    return rng.dirichlet(np.ones(K) * 5), m, v


def test_selection_degenerate_case_is_exact():
    w, m, v = random_gmm()
    g = with_params(DiagGMM(256, n_heldout=0, gselect=256, gselect_groups=16, gselect_search=10 ** 6), w, m, v)
    X = (m[np.random.default_rng(1).integers(0, 256, 2000)] + np.random.default_rng(2).normal(size=(2000, 5)))
    X = X.astype(np.float32)
    ref = [ref_avg_loglik(x[None], w, m, v) for x in X[:300]]  # float64 NumPy
    np.testing.assert_allclose(g.score_samples(X[:300]), ref, rtol=1e-9)  # selection re-scores in float64
    np.testing.assert_allclose(g.score_samples(X, gselect=None), g.score_samples(X), rtol=1e-4)


def test_selected_score_is_close_to_the_exact_top_n():
    w, m, v = random_gmm(K=1024, D=6, seed=3)
    g = with_params(DiagGMM(1024, n_heldout=0, gselect=8), w, m, v)
    rng = np.random.default_rng(4)
    comp = rng.choice(1024, 3000, p=w)
    X = (m[comp] + rng.normal(size=(3000, 6)) * np.sqrt(v[comp])).astype(np.float32).astype(np.float64)
    L = np.log(w) - 0.5 * np.log(2 * np.pi * v).sum(1) - 0.5 * (((X[:, None] - m[None]) ** 2) / v[None]).sum(-1)
    top = np.sort(L, axis=1)[:, -8:]
    ref = top.max(1) + np.log(np.exp(top - top.max(1, keepdims=True)).sum(1))
    got = g.score_samples(X)
    assert np.all(got <= ref + 1e-6)  # a subset of the exact top 8 can only score lower
    assert np.mean(ref - got) < 0.02 and np.quantile(ref - got, 0.99) < 0.5
    assert np.mean(np.abs(g.score_samples(X, gselect=None) - got)) < 0.05


def test_em_with_selection_never_lowers_the_selected_objective():
    X = blobs(20, n_per=1500, centres=[[0, 0, 0], [6, 0, 1], [0, 7, -2], [-5, -5, 3], [8, 8, 8], [-8, 4, 0]])
    C = X[np.random.default_rng(0).choice(len(X), 24, replace=False)]
    g = DiagGMM(24, max_iter=6, n_heldout=0, gselect=4, min_count=0, reseed=False, means_init=C).fit(X)
    ll = [r["train_loglik"] for r in g.history_[1:]]
    assert all(b >= a - 1e-9 for a, b in zip(ll, ll[1:])), ll
    assert [r["selection"] for r in g.history_[1:]][0] == "built"
    assert {r["selection"] for r in g.history_[2:]} <= {"built", "refreshed"}
    exact = DiagGMM(24, max_iter=6, n_heldout=0, min_count=0, reseed=False, means_init=C).fit(X)
    assert abs(g.score(X, gselect=None) - exact.score(X)) < 0.02

"""scikit-learn conventions: check_estimator, clone, Pipeline, GridSearchCV, the flat public face."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

import streamq

# Small settings so that every check fits in a fraction of a second; nothing is expected to fail
# (check_estimator raises on the first failed check).
ESTIMATORS = [streamq.RandomSample(3), streamq.MiniBatchLloyd(3, max_steps=20), streamq.LBG(3, max_stage_steps=20),
              streamq.DiagGMM(2, max_iter=3)]


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_check_estimator(est):
    results = check_estimator(est, on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed, failed
    assert sum(r["status"] == "passed" for r in results) >= 40


def blobs(seed=0, n=3000, d=4, k=6):
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(k, d)) * 6
    return (C[rng.integers(0, k, n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("cls", [streamq.LBG, streamq.MiniBatchLloyd, streamq.RandomSample])
def test_clone_keeps_every_parameter_and_the_seed(cls):
    est = cls(7, seed=123, batch_size=512) if cls is not streamq.RandomSample else cls(7, seed=123)
    c = clone(est)
    assert c.get_params() == est.get_params() and c.seed == 123
    X = blobs()
    np.testing.assert_array_equal(c.fit(X).codebook_, est.fit(X).codebook_)


def test_public_face():
    for name in ("FrameStore", "LBG", "MiniBatchLloyd", "RandomSample", "DiagGMM", "Aligner", "UtteranceSource",
                 "Gaussians", "run_quantise"):
        assert name in streamq.__all__ and getattr(streamq, name) is not None
    with pytest.raises(AttributeError):
        streamq.NoSuchThing


def test_not_fitted_errors():
    X = blobs()[:10]
    for est in (streamq.LBG(2), streamq.DiagGMM(2)):
        with pytest.raises(NotFittedError):
            est.predict(X)
    with pytest.raises(NotFittedError):
        streamq.Aligner(model={"weights": [1.0], "means": [[0.0]], "variances": [[1.0]]}).align_corpus()


def test_score_transform_predict_agree_with_numpy():
    X = blobs(1)
    est = streamq.LBG(8, seed=0).fit(X)
    C = est.codebook_.astype(np.float64)
    d = np.sqrt(((X.astype(np.float64)[:, None] - C[None]) ** 2).sum(-1))
    np.testing.assert_allclose(est.transform(X), d, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(est.predict(X), d.argmin(1))
    np.testing.assert_allclose(est.score(X), -(d.min(1) ** 2).mean(), rtol=1e-5)
    assert est.n_features_in_ == 4 and est.cluster_centers_ is est.codebook_
    np.testing.assert_array_equal(est.fit_predict(X), est.predict(X))


def test_pipeline_with_scaler():
    X = blobs(2) * np.array([1, 100, 0.01, 10], np.float32) + 1000
    pipe = Pipeline([("scale", StandardScaler()), ("vq", streamq.LBG(6, seed=0))]).fit(X)
    labels = pipe.predict(X)
    assert labels.shape == (len(X),) and len(np.unique(labels)) == 6
    assert pipe.transform(X).shape == (len(X), 6)


def test_grid_search_picks_the_lower_heldout_loss():
    X = blobs(3, n=4000, k=12)
    grid = GridSearchCV(streamq.LBG(seed=0, max_stage_steps=50), {"n_clusters": [2, 12]}, cv=3).fit(X)
    assert grid.best_params_ == {"n_clusters": 12}
    tr, te = train_test_split(X, random_state=0)
    loss = {k: -streamq.LBG(k, seed=0, max_stage_steps=50).fit(tr).score(te) for k in (2, 12)}
    assert loss[12] < loss[2]  # what GridSearchCV maximised is minus this held-out loss
    g = GridSearchCV(streamq.DiagGMM(max_iter=2, n_heldout=0), {"n_components": [1, 12]}, cv=3).fit(X)
    assert g.best_params_ == {"n_components": 12}


def test_aligner_params_and_clone():
    al = streamq.Aligner(model="some/dir", states_per_symbol=2, max_iter=7, n_jobs=2, weight_prior=3.0)
    c = clone(al)
    assert c.get_params() == al.get_params()
    assert set(al.get_params()) >= {"model", "states_per_symbol", "max_iter", "n_jobs", "weight_prior", "trace"}
    with pytest.raises(ValueError, match="needs model="):
        streamq.Aligner().fit([np.zeros((20, 2), np.float32)], ["ab"])

"""Shuffled streaming pinned to its definition: chunks in a seeded order, ``window_chunks`` at a time, each
window's rows in the order of ``default_rng([seed, w]).permutation``, batches running across windows. A
plain NumPy reference (fancy indexing, concatenation) against FrameSource.iter_minibatches."""

import numpy as np
import pytest

from streamq.store import ArraySource, FrameStore, StoreError, _take_rows


def reference_batches(X, chunk, batch, seed, window_chunks, drop_last=False):
    n = len(X)
    ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    ranges = [ranges[i] for i in np.random.default_rng(seed).permutation(len(ranges))]
    rows = []
    for w, i in enumerate(range(0, len(ranges), window_chunks)):
        block = np.concatenate([X[a:b] for a, b in ranges[i:i + window_chunks]])
        rows.append(block[np.random.default_rng([seed, w]).permutation(len(block))])
    allrows = np.concatenate(rows)
    out = [allrows[s:s + batch] for s in range(0, n, batch)]
    if drop_last and len(out[-1]) < batch:
        out.pop()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(10_007, 5)).astype(np.float32)
    st = FrameStore.create(tmp_path_factory.mktemp("stream") / "s", 5, chunk_frames=1024)
    with st.writer_lock():
        st.append([{"id": f"u{i}", "frames": X[i * 1000:(i + 1) * 1000]} for i in range(11)])
    return X, FrameStore.open(st.path)


@pytest.mark.parametrize("batch,window,seed", [(256, 4, 0), (1000, 3, 7), (4096, 1, 2), (333, 16, 5)])
def test_shuffled_batches_are_the_reference_order(data, batch, window, seed):
    X, st = data
    want = reference_batches(X, 1024, batch, seed, window)
    for src in (st, ArraySource(X, chunk_frames=1024)):
        got = list(src.iter_minibatches(batch, seed=seed, window_chunks=window))
        assert len(got) == len(want)
        for g, r in zip(got, want):
            assert g.dtype == np.float32 and g.flags.c_contiguous
            np.testing.assert_array_equal(g, r)
    got = list(st.iter_minibatches(batch, seed=seed, window_chunks=window, drop_last=True))
    want = reference_batches(X, 1024, batch, seed, window, drop_last=True)
    assert len(got) == len(want) and all(np.array_equal(g, r) for g, r in zip(got, want))


def test_in_order_streaming_is_the_frames(data):
    X, st = data
    np.testing.assert_array_equal(np.concatenate(list(st.iter_minibatches(700, shuffle=False))), X)


def test_nan_in_a_later_chunk_of_a_window_is_named(tmp_path):
    import zarr

    X = np.random.default_rng(1).normal(size=(4096, 3)).astype(np.float32)
    st = FrameStore.create(tmp_path / "s", 3, chunk_frames=1024)
    with st.writer_lock():
        st.append([{"id": "a", "frames": X}])
    zarr.open_array(str(tmp_path / "s" / "frames"), mode="r+")[3000, 1] = np.inf  # a damaged chunk
    bad = X.copy()
    bad[3000, 1] = np.inf
    for src in (FrameStore.open(tmp_path / "s"), ArraySource(bad, chunk_frames=1024)):
        for shuffle in (True, False):
            with pytest.raises(StoreError, match=r"1 frames with NaN or inf in rows 2048\.\.3071 "
                                                 r"\(first at frame 3000\)"):
                list(src.iter_minibatches(500, seed=0, shuffle=shuffle, window_chunks=4))
        assert sum(len(b) for b in src.iter_minibatches(500, seed=0, check_finite=False)) == 4096


def test_a_sum_that_overflows_is_not_an_error():
    X = np.full((2048, 2), 3e38, np.float32)  # finite, but their float32 sum is inf
    assert not np.isfinite(X.sum())
    got = np.concatenate(list(ArraySource(X, chunk_frames=512).iter_minibatches(100, seed=0)))
    assert got.shape == X.shape and np.isfinite(got).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_take_rows_is_fancy_indexing(dtype):
    rng = np.random.default_rng(0)
    for d in (1, 3, 13, 40):
        B = rng.normal(size=(999, d)).astype(dtype)
        idx = rng.permutation(999)[:500]
        np.testing.assert_array_equal(_take_rows(B, idx), B[idx])
        np.testing.assert_array_equal(_take_rows(B[:, ::2], idx), B[:, ::2][idx])  # not contiguous

import numpy as np
import pytest
import zarr

from streamq.store import ArraySource, FrameStore, StoreError, as_source


def _utts(rng, n, dim=13, lo=1, hi=700):
    return [{"id": f"u{i:03d}", "frames": rng.normal(size=(int(rng.integers(lo, hi)), dim)).astype(np.float32),
             "transcript": f"текст {i} ʼ", "path": f"/x/u{i}.mp3", "duration": 1.5} for i in range(n)]


@pytest.fixture
def store(tmp_path, rng):
    s = FrameStore.create(tmp_path / "s", 13, chunk_frames=1000)
    utts = _utts(rng, 20)
    with s.writer_lock():
        s.append(utts[:7])
        s.append(utts[7:])
    return s, utts


def test_round_trip(store):
    s, utts = store
    s2 = FrameStore.open(s.path)
    assert s2.n_utterances == 20 and s2.dim == 13
    assert s2.n_frames == sum(len(u["frames"]) for u in utts)
    for i in (0, 6, 7, 19):
        f, t = s2.utterance(i)
        np.testing.assert_array_equal(f, utts[i]["frames"])
        assert t == utts[i]["transcript"]
    assert s2.ids == [u["id"] for u in utts]
    assert s2.offsets[0] == 0 and s2.offsets[-1] == s2.n_frames
    np.testing.assert_array_equal(s2.read(0, s2.n_frames), np.concatenate([u["frames"] for u in utts]))


def test_chunk_boundaries(store):
    s, utts = store
    allf = np.concatenate([u["frames"] for u in utts])
    for a, b in [(999, 1001), (0, 1000), (1000, 2000), (1500, 3500), (s.n_frames - 3, s.n_frames + 10)]:
        np.testing.assert_array_equal(s.read(a, b), allf[a:min(b, len(allf))])
    ranges = s.chunk_ranges()
    assert ranges[0] == (0, 1000) and ranges[-1][1] == s.n_frames
    assert all(r[1] == n[0] for r, n in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("batch", [1, 7, 256, 1000, 4096, 100000])
@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_yields_every_frame_once(store, batch, shuffle):
    s, utts = store
    allf = np.concatenate([u["frames"] for u in utts])
    batches = list(s.iter_minibatches(batch, seed=3, shuffle=shuffle))
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in batches)
    assert all(len(b) == batch for b in batches[:-1])
    got = np.concatenate(batches)
    assert got.shape == allf.shape
    # every frame exactly once: compare row multisets through a lexicographic sort
    key = lambda a: a[np.lexsort(a.T[::-1])]
    np.testing.assert_array_equal(key(got), key(allf))
    if not shuffle:
        np.testing.assert_array_equal(got, allf)


def test_same_seed_same_order_and_shuffled(store):
    s, _ = store
    a = np.concatenate(list(s.iter_minibatches(300, seed=5)))
    b = np.concatenate(list(s.iter_minibatches(300, seed=5)))
    c = np.concatenate(list(s.iter_minibatches(300, seed=6)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, s.read(0, s.n_frames))


def test_sample_deterministic_and_distinct(store):
    s, utts = store
    x, y = s.sample(500, seed=1), s.sample(500, seed=1)
    np.testing.assert_array_equal(x, y)
    assert len(np.unique(x, axis=0)) == 500
    assert s.sample(10**9, seed=0).shape == (s.n_frames, 13)


def test_uncommitted_rows_are_invisible(store):
    """Data written past the commit point (a writer killed before committing) is ignored and overwritten."""
    s, utts = store
    n = s.n_frames
    s._frames.resize((n + 50, 13))
    s._frames[n:n + 50] = 99.0  # a killed writer's frames, never committed
    s2 = FrameStore.open(s.path, mode="a")
    assert s2.n_frames == n and s2.n_utterances == 20
    assert s2.read(n - 5, n + 50).shape == (5, 13)
    new = {"id": "late", "frames": np.ones((10, 13), np.float32)}
    s2.append([new])
    f, _ = FrameStore.open(s.path).utterance(20)
    np.testing.assert_array_equal(f, new["frames"])


def test_bad_appends_leave_store_intact(store):
    s, utts = store
    before = s.read(0, s.n_frames).copy()
    bad = [{"id": "d", "frames": np.zeros((5, 12), np.float32)}]
    with pytest.raises(StoreError, match="utterance d has frames of shape"):
        s.append(bad)
    nan = np.zeros((5, 13), np.float32)
    nan[2, 3] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        s.append([{"id": "n", "frames": nan}])
    s2 = FrameStore.open(s.path)
    assert s2.n_utterances == 20
    np.testing.assert_array_equal(s2.read(0, s2.n_frames), before)


def test_second_writer_refused(store):
    s, _ = store
    other = FrameStore.open(s.path, mode="a")
    with s.writer_lock():
        with pytest.raises(StoreError, match="another streamq process is writing"):
            with other.writer_lock():
                pass


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="not a streamq frame store"):
        FrameStore.open(tmp_path)
    zarr.open_group(str(tmp_path / "g"), mode="w")
    with pytest.raises(StoreError, match="not a streamq frame store"):
        FrameStore.open(tmp_path / "g")
    FrameStore.create(tmp_path / "s", 4)
    with pytest.raises(StoreError, match="dim 4"):
        FrameStore.create(tmp_path / "s", 5, exist_ok=True)


@pytest.mark.parametrize("kind", ["numpy", "npy", "zarr", "float64"])
def test_any_array_streams_through_the_same_api(tmp_path, rng, kind):
    X = rng.normal(size=(5003, 7)).astype(np.float32)
    if kind == "numpy":
        src = as_source(X)
    elif kind == "float64":
        src = as_source(X.astype(np.float64))
    elif kind == "npy":
        np.save(tmp_path / "x.npy", X)
        src = as_source(str(tmp_path / "x.npy"))
    else:
        z = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(1000, 7), dtype="float32")
        z[:] = X
        src = as_source(str(tmp_path / "x.zarr"))
        assert src.chunk_frames == 1000
    assert (src.n_frames, src.dim) == (5003, 7)
    got = np.concatenate(list(src.iter_minibatches(512, seed=0)))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(X, axis=0))


def test_nan_frames_named(rng):
    X = rng.normal(size=(3000, 4)).astype(np.float32)
    X[[17, 2500], 1] = np.nan
    X[40, 0] = np.inf
    with pytest.raises(StoreError, match=r"3 frames with NaN or inf.*frame 17, 40"):
        list(as_source(X, name="mydata").iter_minibatches(100, seed=0, shuffle=False, window_chunks=100))


def test_array_source_rejects_bad_shapes(rng):
    with pytest.raises(StoreError, match="2-D"):
        ArraySource(np.zeros(10, np.float32))
    with pytest.raises(StoreError, match="float"):
        ArraySource(np.zeros((10, 2), np.int32))
    with pytest.raises(TypeError):
        as_source(object())


def test_exclude_leaves_out_exactly_the_held_out_frames(store):
    s, utts = store
    allf = np.concatenate([u["frames"] for u in utts])
    idx = s.sample_indices(700, seed=4)
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(s.take(idx), allf[idx])
    got = np.concatenate(list(s.iter_minibatches(333, seed=2, exclude=idx)))
    rest = np.delete(allf, idx, axis=0)
    key = lambda a: a[np.lexsort(a.T[::-1])]
    np.testing.assert_array_equal(key(got), key(rest))

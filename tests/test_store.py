import os

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


# ------------------------------------------------------------------ commit record, consistency, creation
def _commit(path):
    import json

    return json.loads((path / "zarr.json").read_text())["attributes"]["commit"]


def _set_attrs(path, **kw):
    import json

    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"].update(kw)
    (path / "zarr.json").write_text(json.dumps(meta))


def test_commit_is_one_record(store):
    s, utts = store
    assert _commit(s.path) == {"n_frames": s.n_frames, "n_utterances": 20}
    import json

    attrs = json.loads((s.path / "zarr.json").read_text())["attributes"]
    assert "n_frames" not in attrs and "n_utterances" not in attrs and attrs["streamq_format"] == 2


@pytest.mark.parametrize("damage", ["frames_ahead", "utterances_ahead", "offsets_not_increasing", "arrays_short",
                                    "no_commit", "frames_disagree_with_duration"])
def test_open_refuses_an_inconsistent_store(tmp_path, rng, damage):
    p = tmp_path / "s"
    cfg = {"winlen": 0.025, "winstep": 0.01, "sample_rate": 16000}
    s = FrameStore.create(p, 3, feature_config=cfg, chunk_frames=64)
    s.append([{"id": f"u{i}", "frames": rng.normal(size=(50, 3)).astype(np.float32), "duration": 0.5}
              for i in range(4)])
    n, u = s.n_frames, s.n_utterances
    if damage == "frames_ahead":  # what the old per-key commit left after a kill
        _set_attrs(p, commit={"n_frames": n + 30, "n_utterances": u})
        s._frames.resize((n + 30, 3))
    elif damage == "utterances_ahead":
        _set_attrs(p, commit={"n_frames": n, "n_utterances": u + 1})
        for name in ("ids", "transcripts", "speakers", "paths", "durations"):
            s.group[name].resize((u + 1,))
        s.group["offsets"].resize((u + 2,))
    elif damage == "offsets_not_increasing":
        s.group["offsets"][2] = 10
    elif damage == "arrays_short":
        s.group["speakers"].resize((2,))
    elif damage == "no_commit":
        import json

        meta = json.loads((p / "zarr.json").read_text())
        del meta["attributes"]["commit"]
        (p / "zarr.json").write_text(json.dumps(meta))
    else:  # an utterance with other clips' frames in front of it (issue 9, after a re-run)
        s.group["durations"][1] = 0.2
    for mode in ("r", "a"):
        with pytest.raises(StoreError) as e:
            FrameStore.open(p, mode=mode)
        msg = str(e.value)
        assert "\n" not in msg and str(p) in msg
        assert "delete it and re-run the ingest" in msg


def test_crash_between_data_and_commit_is_invisible(tmp_path):
    """os._exit exactly between the data writes and the commit write of the second append: the store opens
    with the first append only, and the next append overwrites the dead rows."""
    import subprocess
    import sys

    p = tmp_path / "s"
    code = ("import numpy as np; from streamq.store import FrameStore\n"
            f"s = FrameStore.create({str(p)!r}, 2, chunk_frames=16)\n"
            "for b in range(3):\n"
            "    s.append([{'id': f'b{b}u{i}', 'frames': np.full((7 + i, 2), b * 10 + i, np.float32),"
            " 'speaker': 'x', 'transcript': 't'} for i in range(3)])\n")
    env = dict(os.environ, STREAMQ_CRASH_AT="append-before-commit:2")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 86, r.stderr
    s = FrameStore.open(p, mode="a")
    assert (s.n_utterances, s.n_frames) == (3, 7 + 8 + 9)
    assert s.group["frames"].shape[0] == 48 and s.group["ids"].shape[0] == 6  # the dead append's rows
    assert s.ids == ["b0u0", "b0u1", "b0u2"]
    s.append([{"id": "late", "frames": np.full((5, 2), -1, np.float32)}])
    s2 = FrameStore.open(p)
    assert s2.ids[-1] == "late" and s2.n_utterances == 4 and s2.group["frames"].shape[0] == 29
    np.testing.assert_array_equal(s2.utterance(3)[0], np.full((5, 2), -1, np.float32))
    np.testing.assert_array_equal(s2.utterance(2)[0], np.full((9, 2), 2, np.float32))


def test_crash_during_create_leaves_nothing_in_the_way(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "s"
    code = f"from streamq.store import FrameStore; FrameStore.create({str(p)!r}, 4)"
    env = dict(os.environ, STREAMQ_CRASH_AT="create-before-rename")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 86, r.stderr
    assert not p.exists() and len(list(tmp_path.glob(".s.creating-*"))) == 1
    s = FrameStore.create(p, 4, exist_ok=True)  # a later run creates it and sweeps the dead one's directory
    assert s.n_utterances == 0 and not list(tmp_path.glob(".s.creating-*"))


def test_racing_creates_make_one_store(tmp_path):
    import threading

    p, errors, stores = tmp_path / "s", [], []

    def make():
        try:
            stores.append(FrameStore.create(p, 5, feature_config={"a": 1}, exist_ok=True))
        except Exception as e:  # noqa: BLE001 - the test reports any
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(stores) == 8
    assert FrameStore.open(p).dim == 5 and not list(tmp_path.glob(".s.creating-*"))


# ------------------------------------------------------------------ the lock, zarr and xarray
def test_lock_lives_beside_the_group_and_nothing_warns(store):
    import warnings

    s, _ = store
    assert (s.path.parent / "s.lock").exists() and not (s.path / ".writer.lock").exists()
    (s.path / "zarr.0123abcd.partial").write_bytes(b"{")  # a Zarr write killed mid-way
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with s.writer_lock():
            FrameStore.open(s.path, mode="a")  # sweeps the dead temporary file
            g = zarr.open_group(str(s.path), mode="r")
            names = sorted(k for k, _ in g.members())
            FrameStore.open(s.path).info()
    assert names == ["durations", "frames", "ids", "offsets", "paths", "speakers", "transcripts"]
    assert not list(s.path.glob("*.partial"))


def test_xarray_reads_the_store(store):
    import warnings

    import xarray as xr

    s, utts = store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(s.path, consolidated=False)
    assert dict(ds.sizes) == {"frame": s.n_frames, "coef": 13, "utterance": 20, "boundary": 21}
    assert ds["frames"].dims == ("frame", "coef") and ds["ids"].dims == ("utterance",)
    np.testing.assert_array_equal(ds["frames"].values, s.read(0, s.n_frames))
    assert [str(x) for x in ds["ids"].values] == s.ids
    assert ds.attrs["commit"] == {"n_frames": s.n_frames, "n_utterances": 20}
    i = 7
    a, b = ds["offsets"].values[i:i + 2]
    np.testing.assert_array_equal(ds["frames"][a:b].values, utts[i]["frames"])
    with warnings.catch_warnings():  # default consolidated=None works too, warning that there is no consolidated
        warnings.simplefilter("ignore", RuntimeWarning)  # metadata (on purpose: it would hold stale shapes)
        assert xr.open_zarr(s.path)["frames"].shape == (s.n_frames, 13)


# ------------------------------------------------------------------ ids, speakers
def test_speakers_and_id_rules(tmp_path):
    s = FrameStore.create(tmp_path / "s", 2)
    f = np.ones((3, 2), np.float32)
    s.append([{"id": "a", "frames": f, "speaker": "spk1"}, {"id": "b", "frames": f}])
    assert FrameStore.open(s.path).speakers == ["spk1", ""]
    for bad, why in [("a", "already in the store"), ("x y", "without whitespace"), ("", "non-empty")]:
        with pytest.raises(StoreError, match=why):
            s.append([{"id": bad, "frames": f}])
    with pytest.raises(StoreError, match="'c' is already in the store"):
        s.append([{"id": "c", "frames": f}, {"id": "c", "frames": f}])
    assert FrameStore.open(s.path).ids == ["a", "b"]


# ------------------------------------------------------------------ format 1
def _v1_store(path, utts, lock_inside=True, n_frames=None):
    """A store laid out as streamq 0.1 wrote it: counts as two attributes, no speakers, no dimension names."""
    g = zarr.open_group(str(path), mode="w")
    frames = np.concatenate([u["frames"] for u in utts])
    fr = g.create_array("frames", shape=frames.shape, chunks=(100, frames.shape[1]), dtype="float32")
    fr[:] = frames
    off = g.create_array("offsets", shape=(len(utts) + 1,), chunks=(65536,), dtype="int64", fill_value=0)
    off[:] = np.concatenate([[0], np.cumsum([len(u["frames"]) for u in utts])])
    for name, key in (("ids", "id"), ("transcripts", "transcript"), ("paths", "path")):
        a = g.create_array(name, shape=(len(utts),), chunks=(65536,), dtype=str)
        a[:] = np.array([u[key] for u in utts], dtype=str)
    d = g.create_array("durations", shape=(len(utts),), chunks=(65536,), dtype="float64")
    d[:] = [u["duration"] for u in utts]
    g.attrs.update({"streamq_format": 1, "dim": frames.shape[1], "feature_config": {}})
    g.attrs["n_frames"] = len(frames) if n_frames is None else n_frames
    g.attrs["n_utterances"] = len(utts)
    if lock_inside:
        (path / ".writer.lock").write_text("")
    return frames


def test_format_1_store_opens_read_only_and_upgrades(tmp_path, rng):
    import warnings

    import xarray as xr

    utts = _utts(rng, 5, dim=4, hi=300)
    p = tmp_path / "old"
    frames = _v1_store(p, utts)
    s = FrameStore.open(p)
    assert s.format_version == 1 and s.n_utterances == 5 and s.speakers == [""] * 5
    assert s.ids == [u["id"] for u in utts] and s.transcripts[2] == utts[2]["transcript"]
    np.testing.assert_array_equal(s.utterance(3)[0], utts[3]["frames"])
    np.testing.assert_array_equal(np.concatenate(list(s.iter_minibatches(64, shuffle=False))), frames)
    with pytest.raises(StoreError, match=r"store format 1 \(streamq 0.1\) opens read-only; to append, upgrade it "
                       r"in place with: streamq upgrade .*old"):
        FrameStore.open(p, mode="a")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "streamq.cli", "upgrade", str(p)], capture_output=True, text=True)
    assert r.returncode == 0 and "format 2, 5 utterances" in r.stdout, r.stderr
    up = FrameStore.open(p, mode="a")
    assert up.format_version == 2 and up.writable and not (p / ".writer.lock").exists()
    assert _commit(p) == {"n_frames": len(frames), "n_utterances": 5}
    up.append([{"id": "new", "frames": np.ones((4, 4), np.float32), "speaker": "s9"}])
    s = FrameStore.open(p)
    assert s.ids[-1] == "new" and s.speakers == [""] * 5 + ["s9"]
    np.testing.assert_array_equal(s.read(0, len(frames)), frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(p, consolidated=False)
        list(zarr.open_group(str(p), mode="r").members())
    assert ds.sizes["utterance"] == 6 and ds.sizes["frame"] == len(frames) + 4


def test_format_1_store_damaged_by_the_old_commit_is_refused(tmp_path, rng):
    utts = _utts(rng, 3, dim=2, hi=50)
    p = tmp_path / "old"
    frames = _v1_store(p, utts, n_frames=None)
    g = zarr.open_group(str(p), mode="r+")
    g["frames"].resize((len(frames) + 40, 2))  # a killed append: frames written, n_frames committed, the rest not
    g.attrs["n_frames"] = len(frames) + 40
    with pytest.raises(StoreError, match=rf"inconsistent store: offsets\[0\] = 0, offsets\[3\] = {len(frames)}, "
                       rf"committed frames {len(frames) + 40}"):
        FrameStore.open(p)
    with pytest.raises(StoreError, match="inconsistent store"):
        FrameStore.upgrade(p)


# ------------------------------------------------------------------ UtteranceSource
def test_utterance_source_from_store_reads_blocks_of_consecutive_utterances(store):
    from streamq.store import UtteranceSource, as_utterances

    s, utts = store
    src = UtteranceSource.from_store(s, block_frames=1500)
    assert src.n == 20 and src.ids == s.ids and src.transcripts == s.transcripts and src.store is s
    assert src.dim == 13 and src.n_frames == s.n_frames and src.frame_step == 0.01
    np.testing.assert_array_equal(src.lengths, [len(u["frames"]) for u in utts])
    reads = []
    real_read = s.read
    s.read = lambda a, b: reads.append((a, b)) or real_read(a, b)
    try:
        idx = [0, 1, 2, 3, 5, 6, 9, 10, 11, 19]
        blocks = list(src.iter_blocks(idx))
    finally:
        del s.read
    got = [i for blk in blocks for i, _ in blk]
    assert got == idx
    for blk in blocks:
        ii = [i for i, _ in blk]
        assert ii == list(range(ii[0], ii[0] + len(ii)))  # consecutive utterances only
        assert len(blk) == 1 or sum(len(x) for _, x in blk) <= 1500
        for i, x in blk:
            np.testing.assert_array_equal(x, utts[i]["frames"])
            assert x.dtype == np.float32
    assert len(reads) == len(blocks)
    np.testing.assert_array_equal(src.utterance(9), utts[9]["frames"])
    assert src.frames() is s
    assert as_utterances(s.path).ids == s.ids and as_utterances(src) is src


def test_utterance_source_from_arrays(rng):
    from streamq.store import UtteranceSource, as_utterances

    arrays = [rng.normal(size=(t, 3)) for t in (5, 1, 700, 3000, 2)]
    src = UtteranceSource.from_arrays(arrays, list("abcde"), speakers=list("xxyyz"), frame_step=0.02)
    assert src.n == 5 and src.ids == [f"utt{i:06d}" for i in range(5)] and src.store is None
    np.testing.assert_array_equal(src.offsets, [0, 5, 6, 706, 3706, 3708])
    np.testing.assert_allclose(src.durations, np.array([5, 1, 700, 3000, 2]) * 0.02)
    assert src.speakers == list("xxyyz") and src.dim == 3 and src.utterance(2).dtype == np.float32
    blocks = list(src.iter_blocks(range(5)))
    assert [i for b in blocks for i, _ in b] == [0, 1, 2, 3, 4]
    fs = src.frames()
    allf = np.concatenate(arrays).astype(np.float32)
    assert fs.n_frames == 3708 and fs.dim == 3
    np.testing.assert_array_equal(fs.read(0, 3708), allf)
    np.testing.assert_array_equal(fs.read(4, 707), allf[4:707])
    got = np.concatenate(list(fs.iter_minibatches(100, seed=0)))
    np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(allf, axis=0))
    assert as_utterances(arrays, list("abcde"), ids=list("vwxyz")).ids == list("vwxyz")


@pytest.mark.parametrize("bad, match", [
    (lambda a: [a[0], a[1][:, :2]], r"utterance 1: frames have D = 2, utterance 0 has D = 3"),
    (lambda a: [a[0], a[1][0]], r"utterance 1: frames must be \(T, D\)"),
    (lambda a: [a[0], np.where(a[1] > 0, np.nan, a[1])], "utterance 1: frames hold NaN or inf"),
    (lambda a: [a[0], a[1].astype(int)], "utterance 1: expected float frames"),
    (lambda a: [], "empty list"),
])
def test_utterance_source_validation(rng, bad, match):
    from streamq.store import UtteranceSource

    a = [rng.normal(size=(4, 3)), rng.normal(size=(6, 3))]
    with pytest.raises(StoreError, match=match):
        UtteranceSource.from_arrays(bad(a), ["x", "y"][:len(bad(a))])
    with pytest.raises(StoreError, match=r"transcripts: need one transcript per utterance \(2\), got 1"):
        UtteranceSource.from_arrays(a, ["x"])
    with pytest.raises(StoreError, match="ids: 'q' is used more than once"):
        UtteranceSource.from_arrays(a, ["x", "y"], ids=["q", "q"])


def test_urls_are_recognised_read_only_and_configured_from_the_environment(tmp_path, monkeypatch):
    from streamq.store import is_url, storage_options

    assert is_url("s3://bucket/store.zarr") and is_url("gs://b/s") and is_url("s3a://b/s")
    assert not any(is_url(x) for x in ("store.zarr", "/abs/store", "file:///tmp/s", "C://x", tmp_path, "a:b"))
    for write in (lambda: FrameStore.create("s3://bucket/new.zarr", 13), lambda: FrameStore.open("s3://b/s", "a")):
        with pytest.raises(StoreError, match=r"s3://.*ingest locally, then copy the finished store"):
            write()
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert storage_options("s3://b/s") == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000",
                                                             "region_name": "eu-west-1"}}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    assert storage_options("s3://b/s")["client_kwargs"]["endpoint_url"] == "http://minio:9000"
    assert storage_options("gs://b/s") == {}


def test_sources_opened_from_paths_know_where_they_live(store, tmp_path, rng):
    from streamq.distributed import source_url

    s, _ = store
    assert source_url(FrameStore.open(s.path)) == str(s.path)
    np.save(tmp_path / "x.npy", rng.normal(size=(50, 3)).astype(np.float32))
    assert source_url(as_source(tmp_path / "x.npy")) == str(tmp_path / "x.npy")
    assert source_url(as_source(np.zeros((5, 2), np.float32))) is None

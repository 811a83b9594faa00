"""Scale-out on Dask: a LocalCluster of 2 worker processes gives the local results (statistics to 1e-9
relative, models to 1e-5, the same alignments, the same ingested store), also when a worker process is
SIGKILLed mid-pass or the ingesting client is killed; stores on a moto S3 server read like local copies."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import assert_same_store, make_cv, replicate_cv
from streamq import distributed as dd
from streamq.align import Aligner
from streamq.codebook import LBG
from streamq.features import AudioError
from streamq.gmm import DiagGMM
from streamq.ingest import ingest, shards_dir
from streamq.kernels.assign import assign, cluster_stats
from streamq.pipelines import run_align, run_fit, run_gmm, run_quantise
from streamq.store import FrameStore, StoreError

D = 6
SYMS = "abcde"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def _synth_corpus(path, n_utt=150, seed=0, chunk=256):
    """Utterances of words over a..e: each character a run of frames near its own mean (silence between
    words), so the aligner has something to find; chunked small so a pass has many ranges."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(SYMS) + 1, D)) * 3
    st = FrameStore.create(path, D, chunk_frames=chunk)
    utts = []
    for i in range(n_utt):
        words = ["".join(rng.choice(list(SYMS), int(rng.integers(1, 4)))) for _ in range(int(rng.integers(1, 4)))]
        parts = [np.repeat(means[:1], int(rng.integers(5, 12)), 0)]
        for w in words:
            for ch in w:
                parts.append(np.repeat(means[1 + SYMS.index(ch)][None], int(rng.integers(6, 14)), 0))
            parts.append(np.repeat(means[:1], int(rng.integers(3, 8)), 0))
        X = np.concatenate(parts)
        X = (X + rng.normal(size=X.shape) * 0.7).astype(np.float32)
        utts.append({"id": f"u{i:03d}", "frames": X, "transcript": " ".join(words)})
    st.append(utts)
    return FrameStore.open(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _synth_corpus(tmp_path_factory.mktemp("dist") / "s.zarr")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """~200k frames, so a pass over it takes long enough to kill a worker in the middle."""
    rng = np.random.default_rng(5)
    st = FrameStore.create(tmp_path_factory.mktemp("distbig") / "b.zarr", D, chunk_frames=4096)
    c = rng.normal(size=(32, D)) * 3
    for a in range(4):
        lab = rng.integers(0, 32, 50_000)
        st.append([{"id": f"b{a}", "frames": (c[lab] + rng.normal(size=(50_000, D))).astype(np.float32)}])
    return FrameStore.open(st.path)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _killer(client, pid_of, prefix):
    """A thread that SIGKILLs the first worker process seen running a task whose key starts with ``prefix``."""
    state = {"killed": None}

    def run():
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and state["killed"] is None:
            for addr, keys in client.processing().items():
                if any(str(k).startswith(prefix) for k in keys) and addr in pid_of:
                    os.kill(pid_of[addr], signal.SIGKILL)
                    state["killed"] = addr
                    return
            time.sleep(0.002)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, state


def _healthy(client):
    client.wait_for_workers(2, timeout=120)
    return client.run(os.getpid)


# ------------------------------------------------------------------------------------------ pure helpers
def test_partition_is_a_function_of_the_data_only():
    r = dd.partition(11_000_000, 65536)
    assert r[0] == (0, 196608) and r[-1][1] == 11_000_000 and len(r) == 56
    assert all(a % 65536 == 0 for a, _ in r)
    assert all(b == a2 for (_, b), (a2, _) in zip(r, r[1:]))
    assert dd.partition(40000, 1024) == [(a, min(a + 1024, 40000)) for a in range(0, 40000, 1024)]
    assert dd.partition(0, 1024) == [] and dd.partition(5, 1024) == [(0, 5)]
    assert max(b - a for a, b in dd.partition(10 ** 9, 4096)) <= dd.PART_FRAMES
    g = dd.utterance_groups(np.array([5, 500, 5, 5, 5, 5]), [0, 1, 2, 3, 5], max_part=10, min_parts=2)
    assert sum(g, []) == [0, 1, 2, 3, 5] and [1] in g


def test_estimators_holding_a_client_clone_with_it(client):
    from sklearn.base import clone

    c = dd.shared(client)
    assert c is client and dd.shared(c) is c and dd.shared(None) is None
    for est in (LBG(4, client=c), DiagGMM(3, client=c), Aligner(np.zeros((2, 2)), client=c)):
        cl = clone(est)
        assert cl is not est and cl.get_params()["client"] is c
    assert c.submit(sum, [1, 2]).result() == 3  # still the same working client


def test_unreachable_scheduler_is_one_line(tmp_path):
    t = time.monotonic()
    with pytest.raises(dd.DistributedError, match=r"tcp://127\.0\.0\.1:9: cannot reach the Dask scheduler") as e:
        with dd.connect("tcp://127.0.0.1:9", timeout=1.0):
            pass
    assert "\n" not in str(e.value) and time.monotonic() - t < 30
    with pytest.raises(dd.DistributedError, match="not both"):
        with dd.connect("tcp://127.0.0.1:9", 2):
            pass
    with dd.connect() as c:
        assert c is None
    r = subprocess.run([sys.executable, "-m", "streamq.cli", "fit", str(tmp_path / "none.zarr"), str(tmp_path / "o"),
                        "--k", "2", "--scheduler", "tcp://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot reach the Dask scheduler" in r.stderr
    r = subprocess.run([sys.executable, "-m", "streamq.cli", "fit", "x", "y", "--k", "2", "--scheduler", "a",
                        "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


# ------------------------------------------------------------------------------------------ full passes
def test_lloyd_pass_statistics_equal_the_local_pass(client, store):
    C = store.sample(16, seed=1)
    ex = np.sort(np.random.default_rng(3).choice(store.n_frames, 500, replace=False)).astype(np.int64)
    counts, sums, sse, frames = dd.lloyd_stats(client, store, C, ex, 4096)
    K = len(C)
    lc, ls, le = np.zeros(K), np.zeros((K, D)), np.zeros(K)
    for X in store.iter_minibatches(65536, shuffle=False, exclude=ex):
        lab, d2 = assign(X, C)
        st = cluster_stats(X, lab, K, d2=d2, second_order=False)
        lc += st.counts
        ls += st.sums
        le += st.sse
    assert len(dd.partition(store.n_frames, store.chunk_frames)) > 8  # really spread over many tasks
    assert frames == store.n_frames - len(ex)
    np.testing.assert_array_equal(counts, lc)
    assert _rel(sums, ls) < 1e-9 and _rel(sse, le) < 1e-9


@pytest.mark.parametrize("dot_dtype,gselect", [("float64", None), ("float32", None), ("float32", 3)])
def test_gmm_statistics_equal_the_local_pass(client, store, dot_dtype, gselect):
    C = store.sample(12, seed=2)
    loc = DiagGMM(12, dot_dtype=dot_dtype, gselect=gselect, batch_size=512).init_from_codebook(store, C)
    dis = DiagGMM(12, dot_dtype=dot_dtype, gselect=gselect, batch_size=512, client=client)
    dis.init_from_codebook(store, C)
    for name in ("weights_", "means_", "variances_"):
        assert _rel(getattr(dis, name), getattr(loc, name)) < 1e-9, name
    a, b = loc.accumulate(store), dis.accumulate(store)
    assert a[1] == b[1] == store.n_frames
    assert abs(a[0] - b[0]) <= 1e-9 * abs(a[0])
    for x, y in zip(a[2:], b[2:]):
        assert _rel(y, x) < 1e-9


def test_lbg_and_gmm_from_the_same_seed_equal_local_runs(client, store):
    kw = dict(seed=3, n_passes=2, max_stage_steps=30, batch_size=512)
    loc, dis = LBG(8, **kw).fit(store), LBG(8, client=client, **kw).fit(store)
    np.testing.assert_allclose(dis.codebook_, loc.codebook_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dis.counts_, loc.counts_, rtol=1e-9)
    assert dis.get_params()["client"] is client and "client" not in dis._config()
    g_loc = DiagGMM(8, max_iter=3, means_init=loc.codebook_, batch_size=512).fit(store)
    g_dis = DiagGMM(8, max_iter=3, means_init=loc.codebook_, batch_size=512, client=client).fit(store)
    for name in ("weights_", "means_", "variances_"):
        np.testing.assert_allclose(getattr(g_dis, name), getattr(g_loc, name), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose([r["train_loglik"] for r in g_dis.history_[1:]],
                               [r["train_loglik"] for r in g_loc.history_[1:]], rtol=1e-9)


def test_aligner_on_the_cluster_gives_the_same_alignments(client, store):
    g = DiagGMM(len(SYMS) + 1, max_iter=2, batch_size=512, seed=0).fit(store)
    kw = dict(states_per_symbol=2, max_iter=3)
    loc = Aligner(g, **kw).fit(str(store.path))
    dis = Aligner(g, client=client, **kw).fit(str(store.path))
    assert _rel(dis.unit_weights_, loc.unit_weights_) < 1e-9
    np.testing.assert_allclose([h["loglik"] for h in dis.history_], [h["loglik"] for h in loc.history_], rtol=1e-9)
    assert [h["aligned"] for h in dis.history_] == [h["aligned"] for h in loc.history_]
    la = list(loc.align_corpus(posteriors={0}))
    da = list(dis.align_corpus(posteriors={0}))
    assert [i for i, _ in la] == [i for i, _ in da] == list(range(store.n_utterances))
    differ = 0
    for (_, x), (_, y) in zip(la, da):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.utt_id == y.utt_id
            differ += not (np.array_equal(x.path, y.path) and x.words == y.words and x.chars == y.chars)
    # the in-process loop sums per utterance, the cluster per group then by a tree: float64 rounding apart,
    # which can flip a Viterbi tie (the next test shows the cluster's bits are the grouped sum's exactly)
    assert differ <= store.n_utterances // 30, differ
    np.testing.assert_allclose(da[0][1].posteriors, la[0][1].posteriors, atol=1e-6)
    assert sum(a is not None for _, a in da) > store.n_utterances // 2


def test_local_align_statistics_are_the_clusters_bits(client, store):
    """The in-process twin of the cluster's aligner statistics (same groups, same tree) gives the same bits,
    so an in-process loop built on it aligns exactly as the cluster does, ties included."""
    g = DiagGMM(len(SYMS) + 1, max_iter=1, batch_size=512, seed=0).fit(store)
    al = Aligner(g, states_per_symbol=3, max_iter=1).fit(str(store.path))
    todo = [i for i in range(al.corpus_.n) if al.chains_[i] is not None]
    here = dd.local_align_statistics(al, al.corpus_, todo)
    there = dd.align_statistics(client, al, al.corpus_, todo)
    assert len(dd.utterance_groups(al.corpus_.lengths, todo)) > 8
    np.testing.assert_array_equal(here[0], there[0])
    assert here[1:5] == there[1:5] and here[5] == there[5]


def test_pipelines_fit_gmm_align_quantise_with_a_client(client, store, tmp_path):
    run_fit(store.path, tmp_path / "f0", 8, seed=1, verbose=0)
    run_fit(store.path, tmp_path / "f1", 8, seed=1, verbose=0, client=client)
    c0, c1 = np.load(tmp_path / "f0" / "codebook.npy"), np.load(tmp_path / "f1" / "codebook.npy")
    np.testing.assert_allclose(c1, c0, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "f0" / "fit_config.json").read_text() == (tmp_path / "f1" / "fit_config.json").read_text()
    run_gmm(store.path, tmp_path / "f0", tmp_path / "g0", iters=2, verbose=0, batch_size=512)
    run_gmm(store.path, tmp_path / "f0", tmp_path / "g1", iters=2, verbose=0, batch_size=512, client=client)
    a, b = np.load(tmp_path / "g0" / "gmm.npz"), np.load(tmp_path / "g1" / "gmm.npz")
    np.testing.assert_allclose(b["means"], a["means"], rtol=1e-5, atol=1e-8)
    assert str(a["config"]) == str(b["config"])  # the client is not part of the saved settings
    run_quantise(store.path, tmp_path / "f0", tmp_path / "q0", verbose=0)
    run_quantise(store.path, tmp_path / "f0", tmp_path / "q1", verbose=0, client=client)
    import zarr

    q0, q1 = zarr.open_group(str(tmp_path / "q0"), mode="r"), zarr.open_group(str(tmp_path / "q1"), mode="r")
    np.testing.assert_array_equal(q0["labels"][:], q1["labels"][:])
    np.testing.assert_array_equal(q0["d2"][:], q1["d2"][:])
    s0 = run_align(store.path, tmp_path / "g0", tmp_path / "a0", iters=2, verbose=0)
    s1 = run_align(store.path, tmp_path / "g0", tmp_path / "a1", iters=2, verbose=0, client=client)
    assert s0["aligned"] == s1["aligned"] and s0["iterations"] == s1["iterations"]
    np.testing.assert_allclose(s1["loglik_per_frame"], s0["loglik_per_frame"], rtol=1e-9)

    def timings(d):  # utterance -> (start, duration, word) lines; the confidence column is left out
        out = {}
        for line in (tmp_path / d / "words.ctm").read_text().splitlines():
            f = line.split()
            out.setdefault(f[0], []).append((f[2], f[3], f[4]))
        return out

    t0, t1 = timings("a0"), timings("a1")
    assert t0.keys() == t1.keys()
    # float64 rounding of the reduction can flip an exact Viterbi tie: allow one utterance in 30 to differ
    same = sum(t0[u] == t1[u] for u in t0)
    assert same >= len(t0) - len(t0) // 30, (same, len(t0))


def test_cli_fit_on_a_scheduler(client, store, tmp_path):
    addr = client.scheduler.address
    for out, extra in (("c0", []), ("c1", ["--scheduler", addr])):
        r = subprocess.run([sys.executable, "-m", "streamq.cli", "fit", str(store.path), str(tmp_path / out),
                            "--k", "4", "--quiet", *extra], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "c1" / "codebook.npy"), np.load(tmp_path / "c0" / "codebook.npy"),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ faults
def test_worker_killed_mid_pass_gives_the_same_statistics(client, big_store):
    g = DiagGMM(32, batch_size=4096, dot_dtype="float64").init_from_codebook(big_store, big_store.sample(32, seed=4))
    ref = g.accumulate(big_store)
    g.client = client
    clean = g.accumulate(big_store)
    pid_of = _healthy(client)
    t, state = _killer(client, pid_of, "streamq-em")
    killed = g.accumulate(big_store)
    t.join(timeout=5)
    assert state["killed"] is not None, "no worker was running a pass task to kill"
    assert killed[1] == clean[1] == big_store.n_frames
    assert killed[0] == clean[0]
    for x, y in zip(clean[2:], killed[2:]):
        np.testing.assert_array_equal(x, y)  # the same bits: fixed ranges, fixed reduction order
    for x, y in zip(ref[2:], killed[2:]):
        assert _rel(y, x) < 1e-9
    new = _healthy(client)  # the nanny restarted the killed worker
    assert pid_of[state["killed"]] not in new.values()


# ------------------------------------------------------------------------------------------ ingest
@pytest.fixture(scope="module")
def cv48(tmp_path_factory, speech_dir):
    """48 clips (the six, eight times over) and one bad row: 16 shards of 3."""
    root = make_cv(tmp_path_factory.mktemp("dcv"), speech_dir, n=6)
    lines, path_col = replicate_cv(root, 8)
    header = lines[0]
    (root / "clips" / "broken.mp3").write_bytes(b"not audio at all")
    lines.insert(20, "\t".join("broken.mp3" if i == path_col else "x" for i in range(len(header.split("\t")))))
    (root / "validated.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def local48(cv48, tmp_path_factory):
    p = tmp_path_factory.mktemp("l48") / "local.zarr"
    ingest(cv48, p, jobs=1, quiet=True, chunk_frames=512)
    return p


def test_distributed_ingest_equals_local_ingest(client, cv48, local48, tmp_path):
    s = ingest(cv48, tmp_path / "d.zarr", quiet=True, chunk_frames=512, client=client)
    assert s["added"] == 48 and s["rejected"] == 1
    assert_same_store(tmp_path / "d.zarr", local48)
    assert not shards_dir(tmp_path / "d.zarr").exists()
    assert "broken.mp3" in (tmp_path / "d.zarr.rejects.tsv").read_text()
    with pytest.raises(AudioError, match="all 1 clips were rejected"):  # as locally: only the bad clip is left
        ingest(cv48, tmp_path / "d.zarr", quiet=True, client=client)
    assert_same_store(tmp_path / "d.zarr", local48)


def test_distributed_ingest_survives_a_worker_kill(client, cv48, local48, tmp_path):
    pid_of = _healthy(client)
    t, state = _killer(client, pid_of, "streamq-ingest-shard")
    ingest(cv48, tmp_path / "k.zarr", quiet=True, chunk_frames=512, client=client)
    t.join(timeout=5)
    assert state["killed"] is not None
    assert_same_store(tmp_path / "k.zarr", local48)
    _healthy(client)


def test_distributed_ingest_resumes_after_the_client_is_killed(client, cv48, local48, tmp_path):
    """SIGKILL a `streamq ingest --scheduler` client once some shards are done; the re-run reuses the finished
    shard files and ends with the local store."""
    out = tmp_path / "c.zarr"
    cmd = [sys.executable, "-m", "streamq.cli", "ingest", str(cv48), str(out), "--quiet", "--chunk-frames", "512",
           "--scheduler", client.scheduler.address]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    sd = shards_dir(out)
    t_end = time.monotonic() + 300
    while time.monotonic() < t_end and p.poll() is None and len(list(sd.glob("shard-*.npz"))) < 3:
        time.sleep(0.01)
    assert p.poll() is None, "the ingest finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    kept = {f.name for f in sd.glob("shard-*.npz")}
    assert kept
    if (out / "zarr.json").exists():
        assert FrameStore.open(out).n_utterances < 48
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert_same_store(out, local48)
    assert not sd.exists()


# ------------------------------------------------------------------------------------------ object storage
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 holding a copy of a test store (chunks of 4096 frames: every chunk is one
    HTTP request) at s3://streamq-test/s.zarr; yields (url, environment, the local store)."""
    store = _synth_corpus(tmp_path_factory.mktemp("s3src") / "s.zarr", chunk=4096)
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    fs.mkdir("streamq-test")
    fs.put(str(store.path), "streamq-test/s.zarr", recursive=True)
    yield "s3://streamq-test/s.zarr", env, store
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    srv.stop()


def test_store_on_s3_reads_like_the_local_copy(s3, tmp_path):
    url, _, store = s3
    r = FrameStore.open(url)
    assert (r.n_frames, r.n_utterances, r.ids, r.transcripts) == (store.n_frames, store.n_utterances, store.ids,
                                                                  store.transcripts)
    np.testing.assert_array_equal(r.read(0, r.n_frames), store.read(0, store.n_frames))
    assert r.info()["bytes_on_disk"] == store.info()["bytes_on_disk"]
    with pytest.raises(StoreError, match="ingest locally"):
        FrameStore.open(url, mode="a")
    with pytest.raises(StoreError, match="not a streamq frame store"):
        FrameStore.open("s3://streamq-test/nothing.zarr")
    for sub, where in (("l", store.path), ("s", url)):
        run_fit(where, tmp_path / f"fit_{sub}", 8, seed=2, verbose=0)
        run_gmm(where, tmp_path / f"fit_{sub}", tmp_path / f"gmm_{sub}", iters=2, verbose=0, batch_size=2048)
    np.testing.assert_array_equal(np.load(tmp_path / "fit_s" / "codebook.npy"), np.load(tmp_path / "fit_l" / "codebook.npy"))
    a, b = np.load(tmp_path / "gmm_l" / "gmm.npz"), np.load(tmp_path / "gmm_s" / "gmm.npz")
    for k in ("weights", "means", "variances"):
        np.testing.assert_array_equal(a[k], b[k])
    r = subprocess.run([sys.executable, "-m", "streamq.cli", "info", url, "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and f'"frames": {store.n_frames}' in r.stdout, r.stderr


def test_workers_read_the_store_from_s3(s3, client):
    url, env, store = s3
    client.run(lambda: os.environ.update(env))
    src = FrameStore.open(url)
    C = store.sample(8, seed=6)
    g = DiagGMM(8, batch_size=512).init_from_codebook(store, C)
    ref = g.accumulate(store)
    g.client = client
    got = g.accumulate(src)
    assert got[1] == ref[1]
    for x, y in zip(ref[2:], got[2:]):
        assert _rel(y, x) < 1e-9

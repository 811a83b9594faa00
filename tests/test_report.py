"""`streamq report`: one self-contained page, checked in a real headless browser (Debian's chromium).

scripts/test installs chromium when it is missing (as it does espeak-ng); a missing browser is a failure,
never a skip.
"""

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamq import plots
from streamq.cli import main
from streamq.report import write_report
from streamq.store import FrameStore
from test_plots import write_lbg_fit, write_trace

IMG_SRC = re.compile(r'<img [^>]*src="([^"]*)"')


def write_csv(path, rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def make_run(root, analysis=True, legacy=False):
    """A run directory of scripts/demo's shape, every part written to its data contract with small arrays;
    ``legacy``: the file names before they carried the command's prefix (history.csv, summary.json, ...)."""
    def name(new, old):
        return old if legacy else new

    rng = np.random.default_rng(0)
    st = FrameStore.create(root / "store", dim=13, feature_config={"winlen": 0.025, "winstep": 0.01})
    st.append([{"id": f"u{i}", "frames": rng.normal(size=(50 + 10 * i, 13)).astype(np.float32),
                "transcript": "the cat", "duration": 0.5 + 0.1 * i} for i in range(5)])
    (root / "compare").mkdir()
    recs = [{"method": m, "stage": 0, "step": s, "k": 16, "frames_seen": 256 * s, "wall_seconds": 0.1 * s + j,
             "loss": 5.0 / (1 + s) + j, "entropy": 2.0 + 0.1 * s, "log_k": np.log(16), "utilisation": 0.9,
             "dead": 0} for j, m in enumerate(("random", "lloyd", "lbg")) for s in range(1, 6)]
    write_csv(root / "compare" / name("compare_history.csv", "history.csv"), recs)
    plots.plot_compare(recs, root / "compare")
    write_lbg_fit(root / "codebook", legacy=legacy)
    np.save(root / "codebook" / name("codebook_counts.npy", "counts.npy"), np.arange(24, dtype=np.float64))
    (root / "codebook" / name("fit_config.json", "config.json")).write_text(json.dumps({"k": 24, "method": "lbg", "seed": 0}))
    (root / "gmm").mkdir()
    g = [{"iteration": i, "frames": 1000, "train_loglik": -20 + i, "heldout_loglik": -20.5 + i, "reseeded": int(i == 2),
          "min_occupancy": 3.0, "em_seconds": 0.1, "seconds": 0.2 * i} for i in range(5)]
    write_csv(root / "gmm" / name("gmm_history.csv", "history.csv"), g)
    plots.plot_gmm_history(g, root / "gmm" / name("gmm_history.png", "history.png"))
    a = root / "align"
    a.mkdir()
    (a / name("align_summary.json", "summary.json")).write_text(json.dumps({"utterances": 4, "aligned": 3, "unaligned": 1, "iterations": 3,
                                                "loglik_per_frame": -51.2}))
    write_csv(a / name("align_history.csv", "history.csv"), [{"iteration": i, "loglik": -1000 + i, "loglik_per_frame": -52 + i} for i in range(3)])
    (a / "unaligned.tsv").write_text("utterance_id\treason\nu3\ttoo few frames for the transcript\n")
    # u4: aligned, neither traced nor drawn: the report draws its CTM segments over the store's frames
    (a / "words.ctm").write_text("u0 1 0.05 0.10 the\nu4 1 0.05 0.15 the\nu4 1 0.25 0.40 cat\n")
    (a / "chars.ctm").write_text("".join(f"u4 1 {0.05 + 0.05 * k:.2f} 0.05 {c}\n" for k, c in enumerate("thecat")))
    for i, uid in enumerate(("u0", "u1")):
        write_trace(a, uid, n_iter=3, T=50 + 10 * i, seed=i)
    (a / "plots").mkdir()
    shutil.copy(root / "gmm" / name("gmm_history.png", "history.png"), a / "plots" / "u2.png")  # a static picture, no trace
    if analysis:
        write_csv(a / "alignment_analysis.csv",
                  [{"id": "u0", "loglik_per_frame": -50.0, "flagged": 0, "speaker": "hash" * 20},
                   {"id": "u1", "loglik_per_frame": -58.0, "flagged": 1},
                   {"id": "u2", "loglik_per_frame": -55.0, "flagged": 0},
                   {"id": "u3", "loglik_per_frame": "", "flagged": 1},
                   {"id": "u4", "loglik_per_frame": -56.0, "flagged": 1}])
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def report(run_dir):
    return write_report(run_dir, worst=4)


def images(page):
    return IMG_SRC.findall(page)


def test_report_is_self_contained_with_every_part(report, run_dir):
    assert report == str(run_dir / "report.html")
    page = open(report, encoding="utf-8").read()
    srcs = images(page)
    # compare: 2, codebook: the LBG animation, gmm: history.png, align: u1, u4, u2, u0 (worst first)
    assert len(srcs) == 8
    assert all(s.startswith(("data:image/png;base64,", "data:image/gif;base64,")) for s in srcs)
    assert "not run" not in page and "unreadable" not in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    worst = page[page.index("worst-scoring"):]
    assert worst.index(">u1<") < worst.index(">u4<") < worst.index(">u2<") < worst.index(">u0<")
    assert "u4: final segmentation" in page
    assert "hash" * 20 not in page  # the analysis table keeps to the columns worth reading
    assert "u3" in page  # listed among the unaligned
    assert "codeword usage" in page and "276" in page  # sum of the counts 0..23
    assert page.count("data:image/gif") == 3  # LBG, u1 and u0 from traces; u2 its static PNG, u4 its CTM


def test_usage_stats():
    from streamq.report import usage_stats

    u = usage_stats(np.array([0.0, 10, 10, 80, 0, 0, 0, 0, 0, 0, 0]))
    assert u["codewords (K)"] == 11 and u["used (count > 0)"] == 3 and u["frames counted"] == 100
    assert u["share of frames in the busiest 10 %"] == "90.0%"  # the top 2 of 11
    H = -(0.1 * np.log(0.1) * 2 + 0.8 * np.log(0.8))
    assert u["usage entropy / log K"] == f"{H:.3f} / {np.log(11):.3f}"
    assert u["count min / median / max"] == "0 / 0 / 80"
    with pytest.raises(ValueError, match="non-negative"):
        usage_stats(np.array([1.0, -1.0]))


def test_report_worst_ordering_and_count(run_dir):
    from streamq.report import worst_utterances

    rows = worst_utterances(run_dir / "align", 10)
    assert [r["id"] for r in rows] == ["u1", "u4", "u2", "u0", "u3"]  # no score sorts last
    assert [r["id"] for r in worst_utterances(run_dir / "align", 1)] == ["u1"]


def test_worst_utterances_keep_numeric_ids_as_text(tmp_path):
    from streamq.report import worst_utterances

    write_csv(tmp_path / "alignment_analysis.csv", [{"id": "007", "loglik_per_frame": -3.0, "flagged": 0},
                                                    {"id": "12", "loglik_per_frame": -4.0, "flagged": 1}])
    assert [r["id"] for r in worst_utterances(tmp_path, 5)] == ["12", "007"]
    write_csv(tmp_path / "alignment_analysis.csv", [{"utt": "a", "score": 1}])
    with pytest.raises(ValueError, match="needs columns 'id' and 'loglik_per_frame'"):
        worst_utterances(tmp_path, 5)


def test_report_says_not_run_for_missing_parts(tmp_path):
    page = open(write_report(tmp_path), encoding="utf-8").read()
    assert page.count("not run") == 5 and not images(page)
    make_run(tmp_path / "r", analysis=False)
    shutil.rmtree(tmp_path / "r" / "gmm")
    (tmp_path / "r" / "codebook" / "codebook_stages.npz").write_bytes(b"not a zip")
    page = open(write_report(tmp_path / "r", worst=5), encoding="utf-8").read()
    assert page.count("not run") == 1 and "gmm/gmm_history.csv not found" in page
    assert "unreadable" in page  # the damaged stages.npz: that section says so, the rest still renders
    assert "no alignment_analysis.csv" in page and page.count("data:image/gif") == 2  # the two traced ones


def test_report_reads_runs_with_the_older_file_names(tmp_path):
    page = open(write_report(make_run(tmp_path, legacy=True), worst=3), encoding="utf-8").read()
    assert len(images(page)) == 8  # 4 + u1, u4, u2 + u0 (traced) and "not run" not in page and "unreadable" not in page


def test_report_cli_prints_the_path(run_dir, tmp_path, capsys):
    shutil.copytree(run_dir, tmp_path / "r")
    (tmp_path / "r" / "report.html").unlink()
    assert main(["report", str(tmp_path / "r"), "--worst", "1"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "r" / "report.html")
    page = open(out, encoding="utf-8").read()
    assert len(images(page)) == 6  # 4 + the worst (u1, traced) + u0: traced, not among the worst
    assert "alignment over EM of the traced utterances" in page and page.count("data:image/gif") == 3
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------ in a real browser
PROBE = """<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('img').forEach(function (im) {
    out.push(im.complete + ':' + im.naturalWidth + 'x' + im.naturalHeight);
  });
  var p = document.createElement('pre'); p.id = 'probe'; p.textContent = out.join(' ');
  document.body.appendChild(p);
});
</script></body>"""


def chromium(args, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:  # a hard failure: scripts/test installs chromium
        raise RuntimeError("chromium is required by the report tests (apt-get install chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def probe(page_path, tmp_path):
    """naturalWidth x naturalHeight of every <img>, as the browser decoded them."""
    html = open(page_path, encoding="utf-8").read()
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", PROBE, 1), encoding="utf-8")
    dom = chromium(["--dump-dom", probed.as_uri()], tmp_path).stdout
    m = re.search(r'<pre id="probe">([^<]*)</pre>', dom)
    assert m, "the probe script did not run"
    return [tuple(int(v) for v in s.split(":")[1].split("x")) for s in m.group(1).split()]


def test_report_images_load_in_headless_chromium(report, tmp_path):
    sizes = probe(report, tmp_path)
    assert len(sizes) == 8
    assert all(w > 0 and h > 0 for w, h in sizes), sizes
    # the decoded sizes are the embedded files' own sizes
    for (w, h), src in zip(sizes, images(open(report, encoding="utf-8").read())):
        import base64
        import io

        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert (w, h) == im.size


def test_probe_sees_a_broken_image(tmp_path):
    # the control: the same probe reports 0 for an image the browser cannot decode
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA"></body></html>')
    assert probe(page, tmp_path) == [(0, 0)]


def test_report_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "shot.png"
    chromium([f"--screenshot={shot}", "--window-size=1200,2400", "--hide-scrollbars",
              Path(report).as_uri()], tmp_path)
    a = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert a.shape == (2400, 1200)
    assert a.var() > 200, f"screenshot looks blank (variance {a.var():.1f})"
    assert (a < 128).mean() > 0.02  # dark pixels: text, curves and images, not just a white page

#!/usr/bin/env python3
"""Kill-anywhere soak: SIGKILL real streamq commands at seeded random moments, re-run each to completion,
and check the result is byte-identical to an uninterrupted run.

Each entry of ``CASES`` is one command: how to build its inputs, its command line, what to check after
every kill (the partial output must open cleanly) and how to compare the final output with a clean run.
A case may need the output of an earlier case (``needs``: e.g. ``fit`` reads the store that ``ingest``
made); the clean outputs of earlier cases are its inputs. To cover a new command, add a ``Case``.

Per case: one clean run (timed, wall W), then ``--kills`` runs each killed after a delay drawn
uniformly from [0, W * --reach) by a seeded RNG. A run that ends before its kill time ends a round: its
output is compared with the clean run and removed, and the next run starts from nothing. The last round
is run to the end.

Usage::

    python scripts/soak_kill.py                         # every case, 50 kills each, data/commonvoice_demo
    python scripts/soak_kill.py --only ingest --kills 200 --seed 3 --corpus DIR --chunk-frames 256

Prints, per case, kills made / survived (a kill survives when the partial output then opened cleanly and
its round's final output is identical to the clean run) and rounds, and exits 1 when any kill did not
survive.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Ctx:
    """What a case's functions get: the work directory, the options, and the clean outputs of earlier cases."""

    work: Path
    args: argparse.Namespace
    clean: dict  # case name -> its clean output path


@dataclasses.dataclass
class Case:
    name: str
    argv: Callable[[Ctx, Path], list]           # the command line writing to OUT
    compare: Callable[[Path, Path], str | None]  # (clean OUT, killed OUT) -> None when identical, else why not
    check: Callable[[Path], str | None]          # partial OUT after a kill -> None when acceptable, else why not
    needs: tuple = ()


def streamq(*args) -> list:
    return [sys.executable, "-m", "streamq.cli", *map(str, args), "--quiet"]


# ------------------------------------------------------------------------------------------------ ingest
def ingest_argv(ctx: Ctx, out: Path) -> list:
    return streamq("ingest", ctx.args.corpus, out, "--chunk-frames", ctx.args.chunk_frames)


def check_store(out: Path) -> str | None:
    from streamq.store import FrameStore

    if not (out / "zarr.json").exists():
        return None  # killed before the store was renamed into place: nothing there is fine
    try:
        FrameStore.open(out)
    except Exception as e:  # noqa: BLE001 - any failure to open is what the soak looks for
        return f"{type(e).__name__}: {e}"
    return None


def compare_stores(a: Path, b: Path) -> str | None:
    from streamq.store import FrameStore

    A, B = FrameStore.open(a), FrameStore.open(b)
    for name in ("ids", "transcripts", "speakers", "paths"):
        if getattr(A, name) != getattr(B, name):
            return f"{name} differ"
    for name in ("offsets", "durations"):
        if getattr(A, name).tobytes() != getattr(B, name).tobytes():
            return f"{name} differ"
    if A.read(0, A.n_frames).tobytes() != B.read(0, B.n_frames).tobytes():
        return "frames differ"
    return None


# ------------------------------------------------------------------------------- fit, gmm, align
def fit_argv(ctx: Ctx, out: Path) -> list:
    return streamq("fit", ctx.clean["ingest"], out, "--k", ctx.args.k, "--seed", 1, "--resume")


def gmm_argv(ctx: Ctx, out: Path) -> list:
    return streamq("gmm", ctx.clean["ingest"], ctx.clean["fit"], out, "--iters", 5, "--resume")


def align_argv(ctx: Ctx, out: Path) -> list:
    return streamq("align", ctx.clean["ingest"], ctx.clean["gmm"], out, "--iters", 10, "--plot", 1)


def same_files(names):
    """compare(): the named files (or every file under a named directory) are byte-identical (.npz: their
    arrays)."""
    def compare(a: Path, b: Path) -> str | None:
        for n in names:
            fa = sorted(p.relative_to(a) for p in (a / n).rglob("*")) if (a / n).is_dir() else [Path(n)]
            fb = sorted(p.relative_to(b) for p in (b / n).rglob("*")) if (b / n).is_dir() else [Path(n)]
            if fa != fb:
                return f"{n}: different files"
            for f in fa:
                if not (b / f).exists():
                    return f"{f} missing"
                if f.suffix == ".npz":  # zip members carry timestamps: compare the arrays, bit for bit
                    with np.load(a / f) as za, np.load(b / f) as zb:
                        if sorted(za.files) != sorted(zb.files) or any(
                                za[k].tobytes() != zb[k].tobytes() for k in za.files):
                            return f"{f} differs"
                elif (a / f).read_bytes() != (b / f).read_bytes():
                    return f"{f} differs"
        return None
    return compare


def loadable(names):
    """check(): after a kill, each named file that exists is whole (np.load / text reads it)."""
    def check(out: Path) -> str | None:
        from streamq import artifacts as af

        for n in names:
            f = out / n
            if not f.exists():
                continue
            try:
                if f.suffix == ".npz":
                    af.load_npz(f)
                elif f.suffix == ".npy":
                    af.load_npy(f)
                else:
                    f.read_text(encoding="utf-8")
            except Exception as e:  # noqa: BLE001 - any unreadable file is what the soak looks for
                return f"{n}: {e}"
        return None
    return check


CASES = [
    Case("ingest", ingest_argv, compare_stores, check_store),
    Case("fit", fit_argv, same_files(["codebook.npy", "codebook_counts.npy", "codebook_stages.npz"]),
         loadable(["codebook.npy", "fit_checkpoint.npz", "codebook_stages.npz"]), needs=("ingest",)),
    Case("gmm", gmm_argv, same_files(["gmm.npz"]), loadable(["gmm.npz"]), needs=("ingest", "fit")),
    Case("align", align_argv, same_files(["words.ctm", "chars.ctm", "unaligned.tsv", "textgrids", "aligner.npz"]),
         loadable(["words.ctm", "aligner.npz", "align_summary.json"]), needs=("ingest", "gmm")),
]


# ------------------------------------------------------------------------------------------------ driver
def reset(out: Path) -> None:
    """Remove an output and its siblings (OUT.lock, OUT.rejects.tsv, .OUT.creating-*)."""
    shutil.rmtree(out, ignore_errors=True)
    for p in list(out.parent.glob(out.name + ".*")) + list(out.parent.glob("." + out.name + ".*")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def soak(case: Case, ctx: Ctx, rng: np.random.Generator) -> dict:
    """Kill runs of ``case`` into one output until a run completes; compare it with the clean run; start a
    new round from nothing; repeat for ``--kills`` attempts. A kill survives when the partial output then
    passed ``check`` and its round ended identical to the clean run."""
    base = ctx.work / case.name
    base.mkdir()
    clean, killed = base / "clean", base / "killed"
    t0 = time.perf_counter()
    r = subprocess.run(case.argv(ctx, clean), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{case.name}: the clean run failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    ctx.clean[case.name] = clean
    made = survived = rounds = 0
    pending, pending_ok, problems = 0, 0, []

    def end_round(rc, err):
        nonlocal survived, rounds, pending, pending_ok
        why = f"a run failed ({rc}): {err.strip()[-300:]}" if rc != 0 else case.compare(clean, killed)
        if why:
            problems.append(f"round {rounds + 1} ({pending} kills): {why}")
        else:
            survived += pending_ok
        rounds += 1
        pending = pending_ok = 0
        reset(killed)

    for _ in range(ctx.args.kills):
        p = subprocess.Popen(case.argv(ctx, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = p.communicate(timeout=float(rng.uniform(0.0, wall * ctx.args.reach)))
            end_round(p.returncode, err.decode())
            continue
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.communicate()
        made += 1
        pending += 1
        why = case.check(killed)
        if why:
            problems.append(f"kill {made}: {why}")
        else:
            pending_ok += 1
    if pending:
        r = subprocess.run(case.argv(ctx, killed), capture_output=True, text=True)
        end_round(r.returncode, r.stderr)
    return {"case": case.name, "kills": made, "survived": survived, "rounds": rounds, "clean_wall_s": wall,
            "final": "identical" if not problems else f"{len(problems)} problems", "problems": problems}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="kill attempts per case (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    ap.add_argument("--reach", type=float, default=0.3,
                    help="kill delays are uniform in [0, reach x clean wall) (default 0.3)")
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "commonvoice_demo",
                    help="ingest source (default data/commonvoice_demo)")
    ap.add_argument("--chunk-frames", type=int, default=256, help="ingest --chunk-frames: small = frequent commits")
    ap.add_argument("--k", type=int, default=64, help="fit --k (default 64)")
    ap.add_argument("--only", nargs="*", default=None, help="case names to run (default: all)")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temporary one)")
    a = ap.parse_args(argv)
    work = a.keep or Path(tempfile.mkdtemp(prefix="streamq_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx, rng = Ctx(work, a, {}), np.random.default_rng(a.seed)
    chosen = [c for c in CASES if a.only is None or c.name in a.only]
    ok = True
    try:
        print(f"{'command':<10} {'kills':>6} {'survived':>9} {'rounds':>7} {'clean s':>8}  final")
        for case in chosen:
            missing = [n for n in case.needs if n not in ctx.clean]
            if missing:
                raise SystemExit(f"{case.name}: needs the output of {', '.join(missing)}; run those cases too")
            res = soak(case, ctx, rng)
            ok &= res["survived"] == res["kills"] and res["final"] == "identical"
            print(f"{res['case']:<10} {res['kills']:>6} {res['survived']:>9} {res['rounds']:>7} "
                  f"{res['clean_wall_s']:>8.1f}  {res['final']}", flush=True)
            for p in res["problems"][:10]:
                print(f"    {p}")
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())

"""A sweep of small nets: ``hydra/launcher=population`` against Hydra's basic launcher, side by side.

    python benchmarks/bench_population.py                 # both cases, ~4 min on 2 CPU cores
    python benchmarks/bench_population.py --cases digits16
    python benchmarks/bench_population.py --smoke         # tiny, seconds: keeps the script alive

Cases (each the same sweep under both launchers, as a user types it):
  digits16  data=digits, relu_mlp, seed=1..8 x optimizer.lr=0.02,0.1, default epochs (16 jobs)
  mnist8    data=mnist, relu_mlp, seed=1..8, trainer.max_epochs=3 (8 jobs; real MNIST from
            ``$MLPLAB_DATA_DIR`` or ../shared/data, copied to a temp dir first)
  gpu64     on a CUDA machine only: data=mnist, 64 seeds, 3 epochs

Each command runs in its own process (``python src/train.py -m ...``), the two launchers
alternating over ``--rounds`` rounds (ABBA); figures are medians over rounds. Per command:
the whole wall time; its start (from the process start to Hydra's "Launching jobs" line:
Hydra and the sweeper's composition of every job, paid by either launcher; torch and
Lightning load after it, when the first job runs); peak RSS
(``wait4``); jobs per second of the whole command; and, for the population, the seconds
its training loop took and member-epochs per second (its own report line). The ratio of
the two launchers is given whole, after the start, and after the start and the imports
(loading torch, Lightning and the engines, timed apart in fresh interpreters): what is left
is what a launcher controls. Writes ``<out>/population.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MLPLAB_DATA_DIR") or REPO.parent / "shared" / "data")

CASES = {
    "digits16": ["seed=1,2,3,4,5,6,7,8", "optimizer.lr=0.02,0.1"],
    "mnist8": ["data=mnist", "seed=1,2,3,4,5,6,7,8", "trainer.max_epochs=3"],
    "gpu64": ["data=mnist", "trainer=gpu", f"seed={','.join(str(s) for s in range(1, 65))}", "trainer.max_epochs=3"],
}
SMOKE = {"digits16": ["seed=1,2", "trainer.max_epochs=3"]}
LAUNCHERS = {"basic": [], "population": ["hydra/launcher=population"]}
LAUNCH_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[HYDRA\] Launching ", re.MULTILINE)
TRAINED_LINE = re.compile(r"population of (\d+): trained in ([\d.]+) s")
EPOCH_LINE = re.compile(r"population of \d+: epoch \d+/(\d+),")


def run_command(args: list[str], root: Path, data_dir: Path) -> dict:
    """One sweep as a user runs it; its wall time, start, peak RSS and the population's training lines."""
    env = {**os.environ, "MLPLAB_ROOT": str(root), "MLPLAB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    started_wall, t0 = time.time(), time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "src" / "train.py"), "-m", *args],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # its own peak RSS, not the largest of all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(args)} failed (exit {proc.returncode}):\n{out[-3000:]}")
    launch = LAUNCH_LINE.search(out)
    start = datetime.strptime(launch.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - started_wall if launch else None
    trained = [(int(m), float(s)) for m, s in TRAINED_LINE.findall(out)]
    epochs = {int(e) for e in EPOCH_LINE.findall(out)}  # the jobs' own max_epochs (a recipe may set it)
    return {
        "wall_s": wall,
        "start_s": start,
        "trained": trained,
        "epochs": max(epochs, default=None),
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def import_seconds(rounds: int = 3) -> float:
    """Median seconds to load what a sweep's first job loads (torch, Lightning, mlplab's engines),
    beyond a bare interpreter's start: paid once by either launcher, after its start."""

    def wall(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - t0

    return statistics.median(
        wall("import mlplab.engines.lightning, mlplab.engines.population") - wall("pass") for _ in range(rounds)
    )


def bench_case(name: str, args: list[str], rounds: int, data_dir: Path, jobs: int, imports_s: float) -> dict:
    figures: dict[str, list[dict]] = {k: [] for k in LAUNCHERS}
    for r in range(rounds):
        order = list(LAUNCHERS) if r % 2 == 0 else list(reversed(LAUNCHERS))
        for launcher in order:
            root = Path(tempfile.mkdtemp(prefix=f"bench-pop-{name}-{launcher}-"))
            try:
                result = run_command([*LAUNCHERS[launcher], *args], root, data_dir)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            figures[launcher].append(result)
            print(
                f"bench: {name} {launcher} round {r + 1}: {result['wall_s']:.1f} s, "
                f"start {result['start_s']:.1f} s, peak {result['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    epochs = figures["population"][0]["epochs"]
    out: dict = {"args": args, "jobs": jobs, "epochs": epochs, "rounds": rounds}
    for launcher, runs in figures.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        entry = {
            "wall_s": round(wall, 2),
            "start_s": round(statistics.median(r["start_s"] for r in runs), 2),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)),
            "jobs_per_s": round(jobs / wall, 3),
            "walls": [round(r["wall_s"], 2) for r in runs],
        }
        if launcher == "population":
            train_s = statistics.median(sum(s for _, s in r["trained"]) for r in runs)
            entry["train_s"] = round(train_s, 2)
            entry["member_epochs_per_s"] = round(jobs * epochs / train_s, 1) if train_s and epochs else None
        out[launcher] = entry
    out["ratio"] = round(out["population"]["wall_s"] / out["basic"]["wall_s"], 3)
    after_start = [
        (p["wall_s"] - p["start_s"]) / (b["wall_s"] - b["start_s"])
        for p, b in zip(figures["population"], figures["basic"])
    ]
    out["ratio_after_start"] = round(statistics.median(after_start), 3)
    # What neither launcher can share out: the start, and loading torch + Lightning once.
    after_imports = [
        (p["wall_s"] - p["start_s"] - imports_s) / (b["wall_s"] - b["start_s"] - imports_s)
        for p, b in zip(figures["population"], figures["basic"])
    ]
    out["imports_s"] = round(imports_s, 2)
    out["ratio_after_imports"] = round(statistics.median(after_imports), 3)
    return out


def data_copy() -> Path:
    """Real MNIST in a temp dir (the shared folder is read-only), or exit if absent."""
    raw = SHARED_DATA / "MNIST" / "raw"
    if not raw.is_dir():
        raise SystemExit(f"bench: no MNIST raw files at {raw}; set MLPLAB_DATA_DIR or use --cases digits16")
    target = Path(tempfile.mkdtemp(prefix="bench-pop-data-"))
    shutil.copytree(raw, target / "MNIST" / "raw")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=None, choices=sorted(CASES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="one tiny digits sweep, one round")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    names = args.cases or [n for n in CASES if n != "gpu64" or cuda]
    cases = SMOKE if args.smoke else {n: CASES[n] for n in names}
    rounds = 1 if args.smoke else args.rounds
    needs_mnist = any("data=mnist" in a for c in cases.values() for a in c)
    data_dir = data_copy() if needs_mnist else Path(tempfile.mkdtemp(prefix="bench-pop-data-"))
    imports_s = import_seconds(rounds=1 if args.smoke else 3)
    print(f"bench: loading torch, Lightning and the engines takes {imports_s:.1f} s", flush=True)
    results: dict = {"cuda": cuda, "cases": {}, "imports_s": imports_s}
    try:
        for name, case in cases.items():
            results["cases"][name] = bench_case(name, case, rounds, data_dir, _count_jobs(case), imports_s)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "population-smoke.json" if args.smoke else "population.json"
    (args.out / name).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def _count_jobs(case: list[str]) -> int:
    n = 1
    for arg in case:
        value = arg.split("=", 1)[1]
        n *= len(value.split(",")) if "," in value and not value.startswith("[") else 1
    return n


def table(results: dict) -> str:
    lines = [
        "| case | launcher | whole command (s) | start (s) | peak RSS (MB) | jobs/s | training (s) | member-epochs/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, case in results["cases"].items():
        for launcher in LAUNCHERS:
            e = case[launcher]
            lines.append(
                f"| {name} | {launcher} | {e['wall_s']:.1f} | {e['start_s']:.1f} | {e['peak_rss_mb']} | "
                f"{e['jobs_per_s']:.2f} | {e.get('train_s', '')} | {e.get('member_epochs_per_s', '')} |"
            )
        lines.append(
            f"| {name} | population / basic | **{case['ratio']:.2f}** | | | | | "
            f"after the start: {case['ratio_after_start']:.2f}, after the imports: {case['ratio_after_imports']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

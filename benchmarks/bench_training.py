"""Seconds per MNIST epoch: mlplab against a bare PyTorch loop, a per-sample torchvision
pipeline and the ignite engine, on the same machine, data and nets.

    python benchmarks/bench_training.py                      # full run (15-30 min on 2 CPU cores)
    python benchmarks/bench_training.py --accelerator gpu
    python benchmarks/bench_training.py --smoke              # tiny, seconds: keeps the script alive

Engines, each in its own subprocess (so peak RSS is its own):
  bare         a bare PyTorch loop over the preprocessed tensors (the floor)
  mlplab       `python src/train.py` as a user runs it: Lightning, TensorBoard logging,
               progress bar, checkpoints, model summary (the default callbacks)
  torchvision  ToTensor + Normalize per sample through a DataLoader with 2 workers, bare loop
  ignite       `engine=ignite`

An epoch is one pass over the 55,000 training images plus validation on 5,000. Each case
runs ``--epochs`` epochs: 1 warm-up, the timed ones, and a last one that is not timed either
(it carries a run's end-of-training work: mlplab's final gradient-norm figure and weight
histograms, ~0.1 s; the same epochs are dropped for every engine). Its figure is the
median of the timed epochs. Every case runs ``--rounds`` times (default 4). Each round runs
the engines of one (model, batch size) back to back, in alternating order (ABBA: a drift of
the machine over the group's minute weighs on both sides alike), and a ratio is the median
over rounds of that round's ratio -- paired, because on a shared VM speed drifts by tens of
percent over minutes. Seconds are the median over rounds. Data:
real MNIST when found (``$MLPLAB_DATA_DIR`` or ``../shared/data``), else synthetic of
the same shape. Writes ``<out>/bench.json`` and ``<out>/bench.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAW = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


# --------------------------------------------------------------------------- data
def find_mnist() -> Path | None:
    """A data dir holding MNIST/raw (real files), or None."""
    for root in (os.environ.get("MLPLAB_DATA_DIR"), os.environ.get("MLPLAB_SHARED_DATA"), REPO.parent / "shared" / "data",
                 Path.home() / ".cache" / "mlplab" / "data"):
        if root and all((Path(root) / "MNIST" / "raw" / n).is_file() or (Path(root) / "MNIST" / "raw" / n[:-3]).is_file() for n in RAW):
            return Path(root)
    return None


def prepare_data(work: Path, smoke: bool) -> tuple[Path, str]:
    """A writable data dir with MNIST/raw for every engine; returns (dir, description)."""
    data_dir = work / "data"
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    src = None if smoke else find_mnist()
    if src is not None:
        for name in RAW:
            f = src / "MNIST" / "raw" / name
            if f.is_file():
                shutil.copy(f, raw / name)
            else:
                shutil.copy(f.with_suffix(""), raw / name[:-3])
        return data_dir, f"MNIST (real, from {src})"
    import numpy as np

    rng = np.random.default_rng(0)
    n_train, n_test = (1200, 200) if smoke else (60000, 10000)
    arrays = {
        RAW[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        RAW[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        RAW[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        RAW[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        with gzip.open(raw / name, "wb") as f:
            f.write(header + arr.tobytes())
    return data_dir, f"synthetic, MNIST-shaped ({n_train} train images)"


# --------------------------------------------------------------------------- one case
def _net(model: str):
    from mlplab.models import MLP, SimpleNet

    return SimpleNet(784, 10) if model == "simple_net" else MLP(784, 10, hidden_sizes=(256, 128))


def _bare_epochs(net, opt, train_batches, val_batches, epochs: int, device) -> list[float]:
    """The floor: forward, loss, backward, step; validation in eval mode; nothing else."""
    import torch

    crit = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        net.train()
        for x, y in train_batches():
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = crit(net(x), y)
            loss.backward()
            opt.step()
        net.eval()
        correct = torch.zeros((), device=device, dtype=torch.long)
        with torch.no_grad():
            for x, y in val_batches():
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                correct += (net(x).argmax(1) == y).sum()
        correct.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def run_case(engine: str, model: str, batch: int, epochs: int, data_dir: Path, accelerator: str, work: Path, val_size: int) -> dict:
    import torch

    torch.manual_seed(0)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    if engine in ("mlplab", "ignite"):
        from hydra import compose, initialize_config_dir
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict

        from mlplab.cli import register_resolvers
        from mlplab.training import train

        register_resolvers()
        out = work / f"{engine}-{model}-{batch}"
        timer_file = out / "epochs.json"
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", return_hydra_config=True, overrides=[
                "data=mnist", f"data.data_dir={data_dir}", f"data.val_size={val_size}", "data.download=false", f"model={model}",
                f"data.batch_size={batch}", f"trainer={accelerator}", f"trainer.max_epochs={epochs}",
                f"engine={'ignite' if engine == 'ignite' else 'lightning'}", "test=false",
                f"+callbacks.epoch_timer._target_=mlplab.callbacks.EpochTimer",
                f"+callbacks.epoch_timer.out_file={timer_file}",
            ])
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            del cfg["hydra"]
        out.mkdir(parents=True)
        if engine == "ignite":
            from mlplab.ignite_engine import fit_ignite
            from mlplab.training import build_datamodule, build_net

            dm = build_datamodule(cfg.data)
            seconds: list[float] = []
            fit_ignite(cfg, dm, build_net(cfg.model, dm), epoch_seconds=seconds)
        else:
            train(cfg)
            seconds = json.loads(timer_file.read_text())["epoch_seconds"]
    else:
        from mlplab.data import MNISTDataModule

        net = _net(model).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        if engine == "bare":
            dm = MNISTDataModule(data_dir=str(data_dir), download=False, batch_size=batch, val_size=val_size)
            dm.setup("fit")
            xt, yt = (t.to(device) for t in dm.data_train.tensors)  # on a GPU: moved once, like mlplab
            xv, yv = (t.to(device) for t in dm.data_val.tensors)

            def train_batches():
                perm = torch.randperm(len(yt), device=device)
                for i in range(0, len(yt), batch):
                    idx = perm[i : i + batch]
                    yield xt[idx], yt[idx]

            def val_batches():
                for i in range(0, len(yv), 1000):
                    yield xv[i : i + 1000], yv[i : i + 1000]
        else:  # per-sample torchvision pipeline, as the lessons and common templates do
            from torch.utils.data import DataLoader, Subset
            from torchvision import datasets, transforms

            tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.0,), (1.0,))])
            full = datasets.MNIST(str(data_dir), train=True, download=False, transform=tf)
            perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(42))
            n_val = val_size
            train_set, val_set = Subset(full, perm[n_val:].tolist()), Subset(full, perm[:n_val].tolist())
            train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, num_workers=2, persistent_workers=True)
            val_loader = DataLoader(val_set, batch_size=1000, num_workers=2, persistent_workers=True)

            def train_batches():
                return iter(train_loader)

            def val_batches():
                return iter(val_loader)

        seconds = _bare_epochs(net, opt, train_batches, val_batches, epochs, device)
    return {"epoch_seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def round_order(group: list, rnd: int) -> list:
    """A group's cases in round ``rnd``: as listed in even rounds, reversed in odd ones."""
    return group if rnd % 2 == 0 else group[::-1]


def paired_ratio(a: dict, b: dict) -> float:
    """The median over rounds of ``a``'s seconds / ``b``'s in the same round."""
    return statistics.median(x / y for x, y in zip(a["round_medians_s"], b["round_medians_s"], strict=True))


def timed_epochs(seconds: list[float]) -> list[float]:
    """The epochs a figure is the median of: all but the warm-up and the last (with fewer
    than 3 epochs, as in --smoke: all but the warm-up)."""
    return seconds[1:-1] if len(seconds) >= 3 else seconds[1:] or seconds


# --------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--epochs", type=int, default=5, help="1 warm-up + N-2 timed epochs + 1 final, untimed (>= 5)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 512])
    ap.add_argument("--pipeline-batch", type=int, default=128, help="batch size for the torchvision pipeline")
    ap.add_argument("--models", nargs="+", default=["simple_net", "relu_mlp"])
    ap.add_argument("--engines", nargs="+", default=["bare", "mlplab", "ignite", "torchvision"])
    ap.add_argument("--rounds", type=int, default=4, help="run every case this many times; ratios are paired per round")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic data, 2 epochs, 1 batch size")
    ap.add_argument("--val-size", type=int, default=5000, help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.case:  # child process: one case, JSON on the last line of stdout
        engine, model, batch = args.case.split(",")
        result = run_case(engine, model, int(batch), args.epochs, args.data_dir, args.accelerator, args.work, args.val_size)
        print(json.dumps(result))
        return

    if args.smoke:
        args.epochs, args.batch_sizes, args.pipeline_batch, args.models, args.rounds = 2, [64], 64, ["simple_net"], 1
        args.val_size = 100
    with tempfile.TemporaryDirectory(prefix="mlplab-bench-") as tmp:
        work = Path(tmp)
        data_dir, data_desc = prepare_data(work, args.smoke)
        # Cases of one (model, batch size) run back to back, so that their ratios see the
        # same machine: on a shared VM speed drifts by tens of percent over minutes.
        extra = {args.pipeline_batch} if "torchvision" in args.engines else set()
        groups = []
        for model in args.models:
            for bs in sorted(set(args.batch_sizes) | extra):
                group = []
                for engine in args.engines:
                    if engine == "torchvision" and bs != args.pipeline_batch:
                        continue
                    if bs not in args.batch_sizes and engine not in ("bare", "mlplab", "torchvision"):
                        continue  # bare and mlplab also at the pipeline's batch size, for its ratio
                    group.append((engine, model, bs))
                groups.append(group)
        runs: dict[tuple, list[dict]] = {case: [] for group in groups for case in group}
        for rnd in range(args.rounds):
            for engine, model, bs in (case for group in groups for case in round_order(group, rnd)):
                cmd = [sys.executable, __file__, "--case", f"{engine},{model},{bs}", "--epochs", str(args.epochs),
                       "--data-dir", str(data_dir), "--accelerator", args.accelerator, "--work", str(work / f"round{rnd}"),
                       "--val-size", str(args.val_size)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if proc.returncode != 0:
                    sys.exit(f"case {engine},{model},{bs} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                timed = timed_epochs(res["epoch_seconds"])
                res["median_s"] = statistics.median(timed)
                runs[(engine, model, bs)].append(res)
                print(f"round {rnd + 1}: {engine:12s} {model:10s} batch {bs:4d}: {res['median_s']:7.3f} s/epoch  "
                      f"peak RSS {res['peak_rss_mb']:6.0f} MB", flush=True)
        results = []
        for (engine, model, bs), rs in runs.items():
            results.append({"engine": engine, "model": model, "batch_size": bs,
                            "median_s": statistics.median(r["median_s"] for r in rs), "round_medians_s": [r["median_s"] for r in rs],
                            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "epoch_seconds": [r["epoch_seconds"] for r in rs]})

    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name()}" if args.accelerator == "gpu" else "")
    table = render(results, args, machine, data_desc)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps({"machine": machine, "data": data_desc, "accelerator": args.accelerator,
                                                     "epochs": args.epochs, "results": results}, indent=1))
    (args.out / "bench.md").write_text(table + "\n")


def render(results: list[dict], args, machine: str, data_desc: str) -> str:
    by = {(r["engine"], r["model"], r["batch_size"]): r for r in results}
    timed = len(timed_epochs([0.0] * args.epochs))
    lines = [f"Seconds per epoch (median of {timed} after 1 warm-up, the last epoch untimed; median of {args.rounds} rounds); "
             f"ratios paired: the median over rounds of the ratio within a round (engines back to back, ABBA order); "
             f"{args.accelerator}; {machine}; data: {data_desc}.",
             "", "| model | batch | bare | mlplab | ignite | torchvision per-sample | mlplab / bare | ignite / bare | per-sample / mlplab | per-sample / bare | mlplab peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        for bs in sorted({r["batch_size"] for r in results if r["model"] == model}):
            cell = lambda e: by.get((e, model, bs))  # noqa: E731
            fmt = lambda r: f"{r['median_s']:.3f}" if r else "-"  # noqa: E731
            ratio = lambda a, b: f"{paired_ratio(a, b):.2f}" if a and b else "-"  # noqa: E731
            bare, ml, ig, tv = cell("bare"), cell("mlplab"), cell("ignite"), cell("torchvision")
            lines.append(f"| {model} | {bs} | {fmt(bare)} | {fmt(ml)} | {fmt(ig)} | {fmt(tv)} | {ratio(ml, bare)} | "
                         f"{ratio(ig, bare)} | {ratio(tv, ml)} | {ratio(tv, bare)} | {ml['peak_rss_mb']:.0f} |" if ml else
                         f"| {model} | {bs} | {fmt(bare)} | - | {fmt(ig)} | {fmt(tv)} | - | {ratio(ig, bare)} | - | {ratio(tv, bare)} | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

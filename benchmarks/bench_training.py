"""Seconds per MNIST epoch: mlplab against a bare PyTorch loop, a per-sample torchvision
pipeline and the ignite engine, on the same machine, data and nets.

    python benchmarks/bench_training.py                      # full run (15-30 min on 2 CPU cores)
    python benchmarks/bench_training.py --accelerator gpu
    python benchmarks/bench_training.py --smoke              # tiny, seconds: keeps the script alive

Engines, each in its own subprocess (so peak RSS is its own):
  bare         a bare PyTorch loop over the preprocessed tensors (the floor); like mlplab it
               gathers rows with index_select, flushes denormal floats to zero and keeps
               freed memory on the heap
  mlplab       `python src/train.py` as a user runs it: Lightning, TensorBoard logging,
               progress bar, checkpoints, model summary (the default callbacks)
  torchvision  ToTensor + Normalize per sample through a DataLoader with 2 workers, bare loop
  ignite       `engine=ignite`
  mlplab-no-X  mlplab with one speed trick X removed (``--ablate`` runs them all: ABLATIONS
               says what each removes); its ratio to mlplab in the same round is that trick's worth

An epoch is one pass over the 55,000 training images plus validation on 5,000. Each case
runs ``--epochs`` epochs: 1 warm-up, the timed ones, and a last one that is not timed either
(it carries a run's end-of-training work: mlplab's final gradient-norm figure and weight
histograms, ~0.1 s; the same epochs are dropped for every engine). Its figure is the
median of the timed epochs.

The engines of one (model, batch size) run in lockstep: their processes start together,
set up, and then the driver lets one epoch run at a time -- epoch 1 of every engine, then
epoch 2 in the reverse order (ABBA), and so on -- while the others wait, idle, at their
epoch boundary. So the epochs compared are seconds apart, not minutes: on a shared VM
speed drifts by tens of percent over minutes. Every group runs ``--rounds`` times
(default 3); a ratio is the median over rounds of the ratio within a round, seconds the
median over rounds. Data: real MNIST when found (``$MLPLAB_DATA_DIR`` or
``../shared/data``), else synthetic of the same shape. Writes ``<out>/bench.json`` and
``<out>/bench.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, TextIO

REPO = Path(__file__).resolve().parents[1]
RAW = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


# --------------------------------------------------------------------------- data
def find_mnist() -> Path | None:
    """A data dir holding MNIST/raw (real files), or None."""
    for root in (
        os.environ.get("MLPLAB_DATA_DIR"),
        REPO.parent / "shared" / "data",
        Path.home() / ".cache" / "mlplab" / "data",
    ):
        if root and all(
            (Path(root) / "MNIST" / "raw" / n).is_file() or (Path(root) / "MNIST" / "raw" / n[:-3]).is_file()
            for n in RAW
        ):
            return Path(root)
    return None


def prepare_data(work: Path, smoke: bool) -> tuple[Path, str]:
    """A writable data dir with MNIST/raw for every engine; returns (dir, description).

    The archives are extracted here, once, by mlplab's own MNIST preparation: the engines
    of a group start together, and torchvision's MNIST (download=False) must not look
    while mlplab extracts them.
    """
    from mlplab.data import MNISTDataModule

    data_dir, desc = _raw_files(work, smoke)
    MNISTDataModule(data_dir=str(data_dir), download=False).prepare_data()
    return data_dir, desc


def _raw_files(work: Path, smoke: bool) -> tuple[Path, str]:
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
    # One image short of the official counts: mlplab (rightly) refuses an archive that claims
    # the official size with other content (md5), and random pixels are other content.
    n_train, n_test = (1200, 200) if smoke else (59_999, 9_999)
    arrays = {
        RAW[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        RAW[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        RAW[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        RAW[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        with gzip.open(raw / name, "wb", compresslevel=1) as f:
            f.write(header + arr.tobytes())
    return data_dir, f"synthetic, MNIST-shaped ({n_train} train images)"


# --------------------------------------------------------------------------- lockstep
class Pacer:
    """A case's side of the lockstep (``--pace GO_FD,READY_FD``; without it, no-ops).

    :meth:`turn` before every epoch: report ready (set up, or the last epoch done) and wait
    for the driver's go. :meth:`finish` after the last epoch.
    """

    def __init__(self, spec: str | None) -> None:
        self.go = self.ready = None
        if spec:
            go_fd, ready_fd = (int(fd) for fd in spec.split(","))
            self.go, self.ready = os.fdopen(go_fd, "r"), os.fdopen(ready_fd, "w")

    def finish(self) -> None:
        if self.ready is not None:
            self.ready.write("ready\n")
            self.ready.flush()

    def turn(self) -> None:
        self.finish()
        if self.go is not None and not self.go.readline():
            sys.exit("benchmark case: the driver went away")


def _paced_epoch_timer(pacer: Pacer):
    """mlplab's EpochTimer that takes its turn at every epoch boundary, outside the timed span."""
    from mlplab.callbacks import EpochTimer

    class PacedEpochTimer(EpochTimer):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._close_epoch(trainer)
            pacer.turn()
            self._start = time.perf_counter()

        def on_fit_end(self, trainer, pl_module) -> None:
            super().on_fit_end(trainer, pl_module)
            pacer.finish()

    return PacedEpochTimer


class _PacedSeconds(list):
    """The ignite engine's ``epoch_seconds``: each epoch's time is appended at its very end."""

    def __init__(self, pacer: Pacer, epochs: int) -> None:
        super().__init__()
        self.pacer, self.epochs = pacer, epochs

    def append(self, seconds: float) -> None:
        super().append(seconds)
        self.pacer.finish() if len(self) == self.epochs else self.pacer.turn()


class Child(NamedTuple):
    """One case's process in a lockstep group, its two pipes and its output files."""

    case: tuple
    proc: subprocess.Popen
    go: TextIO
    ready: TextIO
    out: TextIO
    err: TextIO


def run_group(group: list[tuple], args, data_dir: Path, work: Path) -> dict[tuple, dict]:
    """Run a group's cases in lockstep (module doc); returns each case's result."""
    children: list[Child] = []
    for case in group:
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        name = "-".join(map(str, case))
        log_out, log_err = open(work / f"{name}.out", "w+"), open(work / f"{name}.err", "w+")
        cmd = [
            sys.executable,
            __file__,
            "--case",
            ",".join(map(str, case)),
            "--epochs",
            str(args.epochs),
            "--data-dir",
            str(data_dir),
            "--accelerator",
            args.accelerator,
            "--work",
            str(work),
            "--val-size",
            str(args.val_size),
            "--pace",
            f"{go_r},{ready_w}",
        ]
        proc = subprocess.Popen(
            cmd,
            stdout=log_out,
            stderr=log_err,
            pass_fds=(go_r, ready_w),
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        os.close(go_r)
        os.close(ready_w)
        children.append(Child(case, proc, os.fdopen(go_w, "w"), os.fdopen(ready_r, "r"), log_out, log_err))

    def failed(child: Child, why: str = "") -> None:
        for other in children:
            other.proc.kill()
        child.err.seek(0)
        sys.exit(
            f"case {','.join(map(str, child.case))} failed (exit {child.proc.wait()}){why}:\n{child.err.read()[-3000:]}"
        )

    def wait_ready(child: Child) -> None:
        # A case reports after its set-up and after each epoch; one that neither reports
        # nor exits within --case-timeout is hung: the run stops instead of waiting forever.
        if not select.select([child.ready], [], [], args.case_timeout)[0]:
            failed(child, f"; no report within --case-timeout={args.case_timeout:g} s")
        if not child.ready.readline():
            failed(child)

    for child in children:  # all set up
        wait_ready(child)
    for epoch in range(args.epochs):
        for child in round_order(children, epoch):
            child.go.write("go\n")
            child.go.flush()
            wait_ready(child)
    results = {}
    for child in children:
        if child.proc.wait() != 0:
            failed(child)
        child.out.seek(0)
        results[child.case] = json.loads(child.out.read().strip().splitlines()[-1])
        for f in (child.go, child.ready, child.out, child.err):
            f.close()
    return results


# --------------------------------------------------------------------------- one case
#: The speed tricks of mlplab's Lightning path, each with how ``mlplab-no-<name>`` removes it:
#: config overrides, and a patch applied in the case's process before the run starts.
ABLATIONS: dict[str, tuple[list[str], str]] = {
    "fused": (["steps_per_call=1"], "fused steps: one optimizer step per training_step call"),
    "direct": ([], "direct steps: fused steps stepped through Lightning's strategy and closures"),
    "mallopt": ([], "mallopt: glibc's default mmap and trim thresholds"),
    "denormals": (["flush_denormal=false"], "denormal flushing off"),
}


def _remove_trick(name: str) -> None:
    """Patch one trick of :data:`ABLATIONS` out of mlplab, in this (a case's) process."""
    import mlplab.engines.run
    import mlplab.models.classifier

    if name == "direct":
        mlplab.models.classifier.direct_steps_possible = lambda trainer, module: False
    elif name == "mallopt":
        mlplab.engines.run.reuse_freed_memory = lambda: False
    elif name not in ABLATIONS:
        raise ValueError(f"unknown trick {name!r}; known: {', '.join(ABLATIONS)}")


def _net(model: str):
    from mlplab.models import MLP, SimpleNet

    return SimpleNet(784, 10) if model == "simple_net" else MLP(784, 10, hidden_sizes=(256, 128))


def _bare_epochs(net, opt, train_batches, val_batches, epochs: int, device, pacer: Pacer) -> list[float]:
    """The floor: forward, loss, backward, step; validation in eval mode; nothing else."""
    import torch

    crit = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(epochs):
        pacer.turn()
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
    pacer.finish()
    return times


def run_case(
    engine: str,
    model: str,
    batch: int,
    epochs: int,
    data_dir: Path,
    accelerator: str,
    work: Path,
    val_size: int,
    pacer: Pacer | None = None,
) -> dict:
    global _PACED_TIMER
    import torch

    from mlplab.lean import flush_denormals, reuse_freed_memory

    pacer = pacer or Pacer(None)
    if not engine.startswith("mlplab"):  # mlplab's train() does both by itself
        # Denormal floats flushed to zero before torch starts its threads, and freed memory
        # kept on the heap, as mlplab's runs do: the floor gets them too, so that the ratios
        # measure the frameworks, not denormal arithmetic or page faults (docs: Speed);
        # ignite is started below without train().
        flush_denormals()
        reuse_freed_memory()
    torch.manual_seed(0)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    trick = engine.removeprefix("mlplab-no-") if engine.startswith("mlplab-no-") else None
    if trick:
        _remove_trick(trick)
    if engine.startswith("mlplab") or engine == "ignite":
        from hydra import compose, initialize_config_dir
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict

        from mlplab.cli import register_resolvers
        from mlplab.engines import train

        register_resolvers()
        out = work / f"{engine}-{model}-{batch}"
        timer_file = out / "epochs.json"
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(
                "train",
                return_hydra_config=True,
                overrides=[
                    "data=mnist",
                    f"data.data_dir={data_dir}",
                    f"data.val_size={val_size}",
                    "data.download=false",
                    f"model={model}",
                    f"data.batch_size={batch}",
                    f"trainer={accelerator}",
                    f"trainer.max_epochs={epochs}",
                    f"engine={'ignite' if engine == 'ignite' else 'lightning'}",
                    "test=false",
                    f"+callbacks.epoch_timer.out_file={timer_file}",
                    *(ABLATIONS[trick][0] if trick else []),
                ],
            )
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            del cfg["hydra"]
            # an EpochTimer that takes its turns: a class made here, closing over this case's pacer
            cfg.callbacks.epoch_timer._target_ = f"{__name__}._PACED_TIMER"
        _PACED_TIMER = _paced_epoch_timer(pacer)
        out.mkdir(parents=True)
        if engine == "ignite":
            from mlplab.engines.build import build_datamodule, build_net
            from mlplab.engines.ignite import fit as fit_ignite

            dm = build_datamodule(cfg.data)
            seconds = _PacedSeconds(pacer, epochs)
            pacer.turn()  # ignite sets up inside fit_ignite: that runs on the driver's first go (untimed)
            fit_ignite(cfg, dm, build_net(cfg.model, dm), epoch_seconds=seconds)
            seconds = list(seconds)
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
                    yield xt.index_select(0, idx), yt.index_select(0, idx)  # 2-3x as fast as xt[idx] on a CPU

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

        seconds = _bare_epochs(net, opt, train_batches, val_batches, epochs, device, pacer)
    return {"epoch_seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def round_order(group: list, turn: int) -> list:
    """A group's cases at ``turn`` (an epoch): as listed at even turns, reversed at odd ones (ABBA)."""
    return group if turn % 2 == 0 else group[::-1]


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
    ap.add_argument(
        "--rounds", type=int, default=3, help="run every group this many times; ratios are paired per round"
    )
    ap.add_argument(
        "--ablate",
        action="store_true",
        help="engines bare, mlplab and mlplab-no-X for every trick X (ABLATIONS): what each trick is worth",
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic data, 2 epochs, 1 batch size")
    ap.add_argument(
        "--case-timeout",
        type=float,
        default=900,
        help="seconds a case may take to set up or to run one epoch before the run stops as hung",
    )
    ap.add_argument("--val-size", type=int, default=5000, help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--pace", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.case:  # child process: one case, JSON on the last line of stdout
        engine, model, batch = args.case.split(",")
        result = run_case(
            engine,
            model,
            int(batch),
            args.epochs,
            args.data_dir,
            args.accelerator,
            args.work,
            args.val_size,
            Pacer(args.pace),
        )
        print(json.dumps(result))
        return

    if args.ablate:
        args.engines = ["bare", "mlplab", *(f"mlplab-no-{t}" for t in ABLATIONS)]
    if args.smoke:
        args.epochs, args.batch_sizes, args.pipeline_batch, args.models, args.rounds = 2, [64], 64, ["simple_net"], 1
        args.val_size = 100
    with tempfile.TemporaryDirectory(prefix="mlplab-bench-") as tmp:
        work = Path(tmp)
        data_dir, data_desc = prepare_data(work, args.smoke)
        # The cases of one (model, batch size) form a group that runs in lockstep (module doc).
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
            (work / f"round{rnd}").mkdir()
            for group in groups:
                for (engine, model, bs), res in run_group(group, args, data_dir, work / f"round{rnd}").items():
                    res["median_s"] = statistics.median(timed_epochs(res["epoch_seconds"]))
                    runs[(engine, model, bs)].append(res)
                    print(
                        f"round {rnd + 1}: {engine:24s} {model:10s} batch {bs:4d}: {res['median_s']:7.3f} s/epoch  "
                        f"peak RSS {res['peak_rss_mb']:6.0f} MB",
                        flush=True,
                    )
        results = []
        for (engine, model, bs), rs in runs.items():
            results.append(
                {
                    "engine": engine,
                    "model": model,
                    "batch_size": bs,
                    "median_s": statistics.median(r["median_s"] for r in rs),
                    "round_medians_s": [r["median_s"] for r in rs],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                    "epoch_seconds": [r["epoch_seconds"] for r in rs],
                }
            )

    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name()}" if args.accelerator == "gpu" else ""
    )
    table = render(results, args, machine, data_desc)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "data": data_desc,
                "accelerator": args.accelerator,
                "epochs": args.epochs,
                "results": results,
            },
            indent=1,
        )
    )
    (args.out / "bench.md").write_text(table + "\n")


def render(results: list[dict], args, machine: str, data_desc: str) -> str:
    by = {(r["engine"], r["model"], r["batch_size"]): r for r in results}
    timed = len(timed_epochs([0.0] * args.epochs))
    lines = [
        f"Seconds per epoch (median of {timed} after 1 warm-up, the last epoch untimed; median of {args.rounds} rounds, "
        f"the engines of a row in lockstep, one epoch at a time, ABBA); ratios: the median over rounds of the ratio within a round; "
        f"{args.accelerator}; {machine}; data: {data_desc}.",
        "",
        "| model | batch | bare | mlplab | ignite | torchvision per-sample | mlplab / bare | ignite / bare | per-sample / mlplab | per-sample / bare | mlplab peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in args.models:
        for bs in sorted({r["batch_size"] for r in results if r["model"] == model}):
            cell = lambda e: by.get((e, model, bs))  # noqa: E731
            fmt = lambda r: f"{r['median_s']:.3f}" if r else "-"  # noqa: E731
            ratio = lambda a, b: f"{paired_ratio(a, b):.2f}" if a and b else "-"  # noqa: E731
            bare, ml, ig, tv = cell("bare"), cell("mlplab"), cell("ignite"), cell("torchvision")
            lines.append(
                f"| {model} | {bs} | {fmt(bare)} | {fmt(ml)} | {fmt(ig)} | {fmt(tv)} | {ratio(ml, bare)} | "
                f"{ratio(ig, bare)} | {ratio(tv, ml)} | {ratio(tv, bare)} | {ml['peak_rss_mb']:.0f} |"
                if ml
                else f"| {model} | {bs} | {fmt(bare)} | - | {fmt(ig)} | {fmt(tv)} | - | {ratio(ig, bare)} | - | {ratio(tv, bare)} | - |"
            )
    if any(r["engine"].startswith("mlplab-no-") for r in results):
        lines += ["", *render_ablation(by, args)]
    return "\n".join(lines)


def render_ablation(by: dict, args) -> list[str]:
    """What removing each trick costs: mlplab-no-X / mlplab, paired per round (> 1: the trick pays)."""
    tricks = [t for t in ABLATIONS if any(e == f"mlplab-no-{t}" for e, _, _ in by)]
    cols = [(m, bs) for m in args.models for bs in sorted({b for e, mm, b in by if mm == m and e == "mlplab"})]
    lines = [
        "Cost of removing each trick: seconds per epoch of mlplab without it / mlplab, paired per round "
        "(median over rounds; 1.05 = the trick saves 5 % of an epoch).",
        "",
        "| trick removed | " + " | ".join(f"{m} {bs}" for m, bs in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for t in tricks:
        cells = []
        for m, bs in cols:
            a, b = by.get((f"mlplab-no-{t}", m, bs)), by.get(("mlplab", m, bs))
            cells.append(f"{paired_ratio(a, b):.3f}" if a and b else "-")
        lines.append(f"| {t}: {ABLATIONS[t][1]} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()

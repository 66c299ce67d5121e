"""Per-step cost of Lightning dispatching its per-batch hooks to the diagnostics callbacks.

Lightning calls every hook of every callback on every batch. This times the six hooks of
a training step through Lightning's own dispatcher (``_call_callback_hooks``) with no
callbacks, with the six diagnostics of ``callbacks=default`` as they are (they opt out
of the per-batch hooks they do not use, see ``mlplab.callbacks.base``), and with the same
six dispatched on every hook (the opt-out undone). Off a gradient-norm logging step, as
on 49 steps of 50.

    python benchmarks/bench_callback_dispatch.py
"""

from __future__ import annotations

import statistics
import time
import warnings
from functools import partial

import lightning as L
import torch
from lightning.pytorch.trainer import call

from mlplab.callbacks import (
    DecisionBoundary,
    GradientNorms,
    MisclassifiedImages,
    SampleInputs,
    TestReport,
    WeightHistograms,
)
from mlplab.callbacks.base import PER_BATCH_HOOKS
from mlplab.data import DigitsDataModule
from mlplab.models import MLP, Classifier

warnings.filterwarnings("ignore")


def diagnostics(lean: bool) -> list[L.Callback]:
    cbs = [GradientNorms(), WeightHistograms(), SampleInputs(), TestReport(), MisclassifiedImages(), DecisionBoundary()]
    if not lean:
        for cb in cbs:
            for name in PER_BATCH_HOOKS:
                cb.__dict__.pop(name, None)  # back to the class's (no-op) hook
    return cbs


def main(n: int = 20000, reps: int = 7) -> None:
    torch.set_num_threads(1)
    dm = DigitsDataModule(batch_size=32)
    model = Classifier(MLP(64, 10), 10, optimizer=partial(torch.optim.SGD, lr=0.05))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)  # global_step 1: not a gradient-norm logging step
    batch = next(iter(dm.train_dataloader()))
    optimizer = trainer.optimizers[0]
    hooks = [
        ("on_train_batch_start", (batch, 0)),
        ("on_before_backward", (torch.tensor(1.0),)),
        ("on_after_backward", ()),
        ("on_before_optimizer_step", (optimizer,)),
        ("on_before_zero_grad", (optimizer,)),
        ("on_train_batch_end", (None, batch, 1)),
    ]
    cases = {
        "no callbacks": [],
        "6 diagnostics (lean)": diagnostics(True),
        "6 diagnostics, every hook": diagnostics(False),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, cbs in cases.items():
            trainer.callbacks = cbs
            t = time.perf_counter()
            for _ in range(n):
                for hook, args in hooks:
                    call._call_callback_hooks(trainer, hook, *args)
            times[name].append((time.perf_counter() - t) / n * 1e6)
    base = statistics.median(times["no callbacks"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} {med:7.1f} us per step (median of {reps})   +{med - base:6.1f} us")


if __name__ == "__main__":
    main()

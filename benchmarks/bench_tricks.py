"""What each per-call speed trick of the Lightning path saves in an MNIST epoch, counted.

The lockstep benchmark (``bench_training.py --ablate``) times whole epochs with each trick
removed; on a shared VM its epochs drift by more than the few percent these tricks are
worth. This measures them without that noise: it runs a short digits fit through mlplab
(fused steps, the default callbacks and logger, as ``python src/train.py`` does), counts
per Lightning loop iteration (one ``training_step`` call, a block of ``steps_per_call``
optimizer steps) how often each trick's code path runs, times each path with and without
the trick in a tight loop (median of ``--reps``), and multiplies:

    saved per MNIST epoch = count per iteration x seconds saved per call x iterations per epoch

An MNIST epoch (55,000 images, ``steps_per_call`` 16) has 215, 54 and 7 iterations at
batch 16, 64 and 512. ``--epoch-seconds`` (mlplab's seconds per epoch from a
``bench_training.py`` run, model:batch=seconds) turns the savings into percentages.

    python benchmarks/bench_tricks.py --epoch-seconds simple_net:16=2.57 simple_net:64=0.81 simple_net:512=0.26
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
MNIST_TRAIN = 55_000


def _time(fn, n: int, reps: int) -> float:
    """Median seconds per call of ``fn`` over ``reps`` loops of ``n`` calls."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def count_per_iteration(tmp: Path) -> tuple[dict[str, float], int]:
    """Run digits fits of 1 and 3 epochs; per Lightning training iteration, how often each path ran."""
    from mlplab.callbacks import base
    from mlplab.cli import register_resolvers
    from mlplab.engines import lightning as lightning_engine
    from mlplab.engines import run
    from mlplab.lightning_ext import fastpath
    from mlplab.models.classifier import Classifier

    register_resolvers()
    counts = {"profile": 0, "fx_name": 0, "signature": 0, "unset": 0, "iterations": 0}
    profile, setattr_ = fastpath.NullProfiler.profile, fastpath.HookNameAttribute.__setattr__
    signature, argspec = inspect.signature, inspect.getfullargspec
    trim, unset = lightning_engine.trim_dispatch, fastpath.unset_noop_hooks
    training_step = Classifier.training_step

    def counting_profile(self, name):
        counts["profile"] += 1
        return profile(self, name)

    def counting_setattr(self, name, value):
        counts["fx_name"] += name == "_current_fx_name"
        setattr_(self, name, value)

    def counting_argspec(obj):  # Lightning's is_param_in_hook_signature
        counts["signature"] += getattr(obj, "__name__", "") == "training_step"
        return argspec(obj)

    def counting_trim(trainer, module):
        trim(trainer, module)
        # Per-batch training hooks left unset (None) on the callbacks and the module: each
        # would be one dispatch per iteration (or per optimizer step, for the step hooks).
        objs = [*trainer.callbacks, module]
        counts["unset_per_iteration"] = sum(
            getattr(o, h, 0) is None for o in objs for h in ("on_train_batch_start", "on_train_batch_end")
        )
        counts["unset_per_step"] = sum(getattr(o, h, 0) is None for o in objs for h in fastpath.STEP_HOOKS)

    def counting_step(self, *args, **kwargs):
        counts["iterations"] += 1
        return training_step(self, *args, **kwargs)

    fastpath.NullProfiler.profile = counting_profile
    fastpath.HookNameAttribute.__setattr__ = counting_setattr
    inspect.getfullargspec = counting_argspec
    lightning_engine.trim_dispatch = counting_trim
    counting_step.__name__ = "training_step"  # what the signature lookup sees
    counting_step.__signature__ = signature(training_step)
    Classifier.training_step = counting_step
    per_run = []
    try:
        for epochs in (1, 3):
            for k in ("profile", "fx_name", "signature", "iterations"):
                counts[k] = 0
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                cfg = compose(
                    "train",
                    overrides=[
                        "data=digits",
                        "data.batch_size=1",  # 68 iterations an epoch: per-epoch work weighs little
                        f"trainer.max_epochs={epochs}",
                        "test=false",
                        f"paths.output_dir={tmp / str(epochs)}",
                        f"paths.log_dir={tmp}",
                    ],
                )
            run.fit(cfg)
            per_run.append(dict(counts))
    finally:
        fastpath.NullProfiler.profile, fastpath.HookNameAttribute.__setattr__ = profile, setattr_
        inspect.getfullargspec, lightning_engine.trim_dispatch, Classifier.training_step = argspec, trim, training_step
        del base, unset
    one, three = per_run
    iterations = three["iterations"] - one["iterations"]
    per_iteration = {k: (three[k] - one[k]) / iterations for k in ("profile", "fx_name", "signature")}
    per_iteration["unset_per_iteration"] = counts["unset_per_iteration"]
    per_iteration["unset_per_step"] = counts["unset_per_step"]
    return per_iteration, iterations


def call_costs(reps: int) -> dict[str, float]:
    """Seconds each path costs more without its trick, per call."""
    from lightning.pytorch.profilers import PassThroughProfiler
    from lightning.pytorch.trainer import call
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    from mlplab.lightning_ext.fastpath import NullProfiler
    from mlplab.models import MLP, Classifier

    model = Classifier(MLP(64, 10), 10)
    n = 20_000

    def with_profiler(profiler):
        def fn():
            with profiler.profile("[Callback]x.on_train_batch_start"):
                pass

        return fn

    def set_fx():
        model._current_fx_name = "training_step"

    def set_fx_module():
        torch.nn.Module.__setattr__(model, "_current_fx_name", "training_step")

    step = Classifier.training_step
    sig = step.__signature__

    def lookup():
        is_param_in_hook_signature(model.training_step, "batch_idx", min_args=2)

    costs = {}
    costs["profile"] = _time(with_profiler(PassThroughProfiler()), n, reps) - _time(
        with_profiler(NullProfiler()), n, reps
    )
    costs["fx_name"] = _time(set_fx_module, n, reps) - _time(set_fx, n, reps)
    with_sig = _time(lookup, n, reps)
    del step.__signature__
    try:
        costs["signature"] = _time(lookup, n, reps) - with_sig
    finally:
        step.__signature__ = sig

    # One no-op callback hook dispatched by Lightning (profiler action, lookup, call) against unset.
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=0)
    trainer.strategy.connect(model)
    trainer.callbacks = [L.Callback()]
    dispatched = _time(lambda: call._call_callback_hooks(trainer, "on_train_batch_start", None, 0), n, reps)
    trainer.callbacks[0].on_train_batch_start = None
    skipped = _time(lambda: call._call_callback_hooks(trainer, "on_train_batch_start", None, 0), n, reps)
    costs["unset_per_iteration"] = dispatched - skipped
    noop = L.Callback().on_before_backward
    costs["unset_per_step"] = _time(lambda: noop(trainer, model, None), n, reps)  # a direct call (StepHooks)
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps-per-call", type=int, default=16)
    ap.add_argument("--epoch-seconds", nargs="*", default=[], help="model:batch=seconds, mlplab's MNIST epochs")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mlplab-tricks-") as tmp:
        counts, iterations = count_per_iteration(Path(tmp))
    costs = call_costs(args.reps)
    epochs = {}
    for item in args.epoch_seconds:
        key, seconds = item.split("=")
        model, batch = key.split(":")
        epochs[(model, int(batch))] = float(seconds)
    tricks = {
        "unset-hooks": lambda b: (
            counts["unset_per_iteration"] * costs["unset_per_iteration"]
            + counts["unset_per_step"] * costs["unset_per_step"] * args.steps_per_call
        ),
        "null-profiler": lambda b: counts["profile"] * costs["profile"],
        "setattr": lambda b: counts["fx_name"] * costs["fx_name"],
        "signature": lambda b: counts["signature"] * costs["signature"],
    }
    print(f"per Lightning iteration ({iterations} iterations counted, digits, batch 16, fused):")
    for k, v in counts.items():
        print(f"  {k:20s} {v:8.2f} calls   {costs.get(k, math.nan) * 1e6:7.2f} us saved per call")
    print()
    batches = (16, 64, 512)
    header = "| trick | " + " | ".join(f"ms saved per MNIST epoch, batch {b}" for b in batches)
    header += "".join(f" | % of {m} {b}" for m, b in epochs) + " |"
    print(header)
    print("|---" * (1 + len(batches) + len(epochs)) + "|")
    for name, per_iteration in tricks.items():
        row = [name]
        for b in batches:
            its = math.ceil(MNIST_TRAIN / (b * args.steps_per_call))
            row.append(f"{per_iteration(b) * its * 1e3:.2f}")
        for (m, b), seconds in epochs.items():
            its = math.ceil(MNIST_TRAIN / (b * args.steps_per_call))
            row.append(f"{100 * per_iteration(b) * its / seconds:.2f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

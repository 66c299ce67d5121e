"""mlplab.lightning_ext.fastpath and mlplab.lean: Lightning's per-step dispatch trimmed, with the same results."""

from __future__ import annotations

import platform
import subprocess
import sys
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.profilers import SimpleProfiler

import mlplab.engines.run as engines_run
from conftest import QUICK, compose_cfg
from mlplab.data import DigitsDataModule
from mlplab.errors import ConfigError
from mlplab.lightning_ext.fastpath import direct_steps_possible
from mlplab.models import MLP, Classifier


def _module(**kwargs) -> Classifier:
    torch.manual_seed(0)
    return Classifier(MLP(64, 10, hidden_sizes=(32,)), 10, optimizer=partial(torch.optim.SGD, lr=0.1), **kwargs)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    kwargs = {"accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_model_summary": False, **kwargs}
    return L.Trainer(default_root_dir=tmp_path, **kwargs)


# -- fused steps: steps_per_call optimizer steps per training_step call --------------------------


def _fit_record(tmp_path, steps_per_call: int, *overrides: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / f"k{steps_per_call}"
    cfg = compose_cfg(
        [*QUICK, "data=digits", "data.batch_size=16", f"steps_per_call={steps_per_call}", *overrides], out
    )
    metrics = engines_run.fit(cfg)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents*")).parent))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return metrics, ckpt, scalars


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.max_epochs=2"],
        ["scheduler=onecycle", "trainer.max_epochs=2"],
        ["scheduler=onecycle", "+trainer.max_steps=100", "model.dropout=0.2"],
        ["model.batch_norm=true"],
    ],
    ids=["cosine per epoch", "onecycle per step", "max_steps mid-epoch, dropout", "batch_norm"],
)
def test_fused_steps_train_exactly_as_one_step_per_call(tmp_path, overrides):
    """The same minibatches, steps, schedule, RNG draws: the same weights, metrics and log steps."""
    plain_metrics, plain, plain_tb = _fit_record(tmp_path, 1, *overrides)
    fused_metrics, fused, fused_tb = _fit_record(tmp_path, 16, *overrides)
    assert fused["global_step"] == plain["global_step"] > 16
    assert fused["state_dict"].keys() == plain["state_dict"].keys()
    for key, value in plain["state_dict"].items():
        assert torch.equal(fused["state_dict"][key], value), key
    assert fused["lr_schedulers"] == plain["lr_schedulers"]
    assert fused_metrics == plain_metrics
    assert fused_tb.keys() == plain_tb.keys()
    for tag in ("train/loss", "val/acc", "~diagnostics/grad_norm/layer_01"):
        assert fused_tb[tag] == plain_tb[tag], tag  # same values at the same (optimizer) steps


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("+trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val"),
        ("+trainer.limit_train_batches=5", "trainer.limit_train_batches"),
        ("+trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
    ],
)
def test_fused_steps_fall_back_to_lightnings_loop_where_they_would_change_the_run(tmp_path, caplog, override, reason):
    seen = []
    original = Classifier.fuse_steps

    def spy(self, steps, batch_size):
        seen.append(steps)
        original(self, steps, batch_size)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level("INFO", logger="mlplab.engines.lightning"):
        mp.setattr(Classifier, "fuse_steps", spy)
        engines_run.fit(compose_cfg([*QUICK, "data=digits", "test=false", "steps_per_call=8", override], tmp_path))
    assert seen == [1]
    assert f"steps_per_call=8 -> 1 (one optimizer step per training_step) because of {reason}" in caplog.text


@pytest.mark.parametrize(("first", "then"), [(1, 16), (16, 1)])
def test_a_checkpoint_continues_under_another_steps_per_call(tmp_path, first, then):
    """ckpt_path= from a run with another steps_per_call: the step count carries over."""
    common = [*QUICK, "data=digits", "logger=none", "test=false"]
    engines_run.fit(compose_cfg([*common, f"steps_per_call={first}"], tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    steps = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    engines_run.fit(
        compose_cfg([*common, f"steps_per_call={then}", "trainer.max_epochs=2", f"ckpt_path={ckpt}"], tmp_path / "b")
    )
    assert (
        torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
        == 2 * steps
    )


class _StepSpy(L.Callback):
    """Records every per-step hook: its arguments, the step count and the hook name Lightning exposes."""

    def __init__(self) -> None:
        self.trace: list[tuple] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.trace.append(
            ("before_backward", trainer.global_step, pl_module._current_fx_name, loss.item(), loss.requires_grad)
        )

    def on_after_backward(self, trainer, pl_module):
        grad = next(pl_module.net.parameters()).grad
        self.trace.append(("after_backward", trainer.global_step, pl_module._current_fx_name, grad.norm().item()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.trace.append(("before_optimizer_step", trainer.global_step, pl_module._current_fx_name, type(optimizer)))


class _Probe(Classifier):
    def on_before_optimizer_step(self, optimizer):  # a module hook that logs, as users write them
        self.log("probe/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)


def _fused_trace(tmp_path, direct: bool, spy: L.Callback | None = None):
    L.seed_everything(0, verbose=False)
    spy = spy if spy is not None else _StepSpy()
    trainer = _trainer(tmp_path, callbacks=[spy], enable_progress_bar=False, max_epochs=2)
    torch.manual_seed(0)
    model = _Probe(MLP(64, 10, hidden_sizes=(32,)), 10, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    dm = DigitsDataModule(batch_size=32)
    model.fuse_steps(8, 32)
    dm.steps_per_call = 8
    with pytest.MonkeyPatch.context() as mp:
        if not direct:
            mp.setattr("mlplab.models.classifier.direct_steps_possible", lambda trainer, module: False)
        trainer.fit(model, datamodule=dm)
    assert model._direct_steps is direct
    return spy.trace, trainer, {k: v.clone() for k, v in model.net.state_dict().items()}


def test_direct_steps_make_lightnings_calls_in_lightnings_order(tmp_path):
    """Fused steps without Lightning's dispatch: the same hooks, arguments, step counts and
    hook names (self.log works in them), and the same weights."""
    direct, trainer, weights = _fused_trace(tmp_path / "direct", direct=True)
    lightning, lightning_trainer, lightning_weights = _fused_trace(tmp_path / "lightning", direct=False)
    steps = trainer.global_step
    assert steps == lightning_trainer.global_step > 16
    assert len(direct) == 3 * steps
    assert [t[0] for t in direct[:3]] == ["before_backward", "after_backward", "before_optimizer_step"]
    assert [t[1] for t in direct[::3]] == list(range(steps))  # the step count before each step, as in Lightning
    assert direct == lightning
    assert trainer.callback_metrics["probe/lr"] == lightning_trainer.callback_metrics["probe/lr"] == pytest.approx(0.1)
    assert all(torch.equal(weights[k], lightning_weights[k]) for k in weights)


def _described(value):
    """A value a hook received, as a comparable record (tensors by shape and sum)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), round(float(value.detach().double().sum()), 6) if value.numel() else 0.0)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_described(v) for v in value)
    if isinstance(value, dict):
        return ("dict", tuple(sorted(map(str, value))))  # a checkpoint: its keys
    return type(value).__name__


def _every_hook_spy() -> L.Callback:
    """A callback that overrides every hook of Lightning's ``Callback`` (whatever this version has)
    and records each call: the hook, the step count, the hook name the module exposes, the arguments."""
    hooks = sorted(n for n in vars(L.Callback) if n.startswith("on_") or n in ("setup", "teardown"))

    def recorder(name):
        def hook(self, trainer, pl_module, *args, **kwargs):
            self.trace.append(
                (
                    name,
                    trainer.global_step,
                    getattr(pl_module, "_current_fx_name", None),
                    _described(args),
                    _described(dict(sorted(kwargs.items()))),
                )
            )

        return hook

    def init(self):
        self.trace = []

    spy = type("EveryHook", (L.Callback,), {"__init__": init, **{n: recorder(n) for n in hooks}})()
    assert len(hooks) > 30  # Lightning 2.6 has ~40
    return spy


def test_canary_the_fast_path_calls_every_hook_lightning_calls(tmp_path):
    """A callback overriding every Lightning hook sees the same calls, in the same order, with the
    same arguments, through the fast path (trimmed dispatch, direct steps) and through Lightning's
    own dispatch. A hook a new Lightning version adds or moves fails here instead of being skipped."""
    fast, trainer, weights = _fused_trace(tmp_path / "fast", direct=True, spy=_every_hook_spy())
    own, own_trainer, own_weights = _fused_trace(tmp_path / "own", direct=False, spy=_every_hook_spy())
    assert trainer.global_step == own_trainer.global_step > 16
    called = {entry[0] for entry in own}
    assert {
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_train_batch_end",
        "on_validation_batch_end",
        "on_save_checkpoint",
        "on_train_epoch_end",
    } <= called
    assert len(fast) == len(own)
    for i, (a, b) in enumerate(zip(fast, own)):
        assert a == b, (i, a, b)
    assert all(torch.equal(weights[k], own_weights[k]) for k in weights)


@pytest.mark.parametrize("change", ["profiler", "precision", "backward"])
def test_direct_steps_only_where_they_change_nothing(tmp_path, change):
    class OwnBackward(Classifier):
        def backward(self, loss, *args, **kwargs):
            loss.backward(*args, **kwargs)

    plain = _trainer(tmp_path)
    assert direct_steps_possible(plain, _module())
    if change == "backward":
        torch.manual_seed(0)
        module = OwnBackward(MLP(64, 10, hidden_sizes=(32,)), 10, optimizer=partial(torch.optim.SGD, lr=0.1))
        assert not direct_steps_possible(plain, module)
    else:
        kwargs = {"profiler": SimpleProfiler()} if change == "profiler" else {"precision": "bf16-mixed"}
        assert not direct_steps_possible(_trainer(tmp_path, **kwargs), _module())


_BLOCK_MEMORY = """
import ctypes, sys, torch
from mlplab.lean import reuse_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert reuse_freed_memory()
x = torch.rand(20000, 784)
idx = torch.randperm(20000)[:8192]  # a fused block at batch 512 on MNIST: 25 MB
before = libc.mallinfo2()
block = x[idx]
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, after.arena - before.arena)
"""


def _glibc_with_mallinfo2() -> bool:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    return tuple(int(p) for p in platform.libc_ver()[1].split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc >= 2.33 only (mallopt, mallinfo2)")
def test_fused_blocks_come_from_the_heap_and_stay_there_for_the_next_block():
    """glibc's default serves a 25 MB block with a fresh mmap and unmaps it when freed (every
    page of the next block is a new, zeroed page: ~25,000 page faults an epoch at batch 512);
    after reuse_freed_memory() the block is carved from the heap and its memory stays there."""

    def block_memory(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _BLOCK_MEMORY, mode], capture_output=True, text=True, check=True)
        mmapped, kept = out.stdout.split()
        return int(mmapped), int(kept)

    block = 8192 * 784 * 4
    mmapped, kept = block_memory("default")
    assert mmapped >= block and kept < block  # what glibc does by itself
    mmapped, kept = block_memory("tuned")
    assert mmapped == 0 and kept >= block


_DENORMALS = """
import sys, torch
from mlplab.lean import flush_denormals
if sys.argv[1] == "late":  # torch's worker threads start here, before the flag is set
    torch.ones(1 << 20).mul_(2)
flushes = flush_denormals()
r = torch.full((1 << 20,), 1e-30).mul_(1e-10)  # 1e-40: a float32 denormal, split over all threads
print(flushes, int((r != 0).sum()), torch.get_num_threads())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="FTZ/DAZ checked on x86-64 only")
def test_denormals_are_flushed_in_every_thread_when_flushing_starts_before_torchs_threads():
    def run(mode: str) -> tuple[str, int, int]:
        out = subprocess.run([sys.executable, "-c", _DENORMALS, mode], capture_output=True, text=True, check=True)
        flushes, nonzero, threads = out.stdout.split()
        return flushes, int(nonzero), int(threads)

    assert run("first")[:2] == ("True", 0)
    flushes, nonzero, threads = run("late")  # only the calling thread's register is set
    if threads > 1:
        assert flushes == "False" and 0 < nonzero < 1 << 20


def test_runs_flush_denormals_unless_told_not_to_and_leave_the_callers_thread_as_it_was(tmp_path, monkeypatch, caplog):
    import mlplab.lean as lean

    seen = []
    real = lean.flush_denormals

    def spy():
        real()
        seen.append(lean._flushes_here())
        return False  # as when torch's worker threads were started before the run

    monkeypatch.setattr(lean, "flush_denormals", spy)
    original = engines_run.validate_train_config  # the run's first step, inside its flushing
    monkeypatch.setattr(
        engines_run, "validate_train_config", lambda cfg: seen.append(("in run", lean._flushes_here())) or original(cfg)
    )
    base = [*QUICK, "data=digits", "trainer.max_epochs=1", "test=false"]
    assert not lean._flushes_here()
    with caplog.at_level("INFO", logger="mlplab.engines.run"):
        engines_run.fit(compose_cfg(base, tmp_path / "a"))
    assert seen == [True, ("in run", True)]
    assert not lean._flushes_here()  # restored: numpy, hypothesis, the next cell compute as before
    assert "only the main thread flushes denormal floats" in caplog.text
    engines_run.fit(compose_cfg([*base, "flush_denormal=false"], tmp_path / "b"))
    assert seen[2:] == [("in run", False)]
    with pytest.raises(ConfigError, match="flush_denormal='yes' is invalid; allowed: true, false"):
        engines_run.fit(compose_cfg([*base, "flush_denormal=yes"], tmp_path / "c"))

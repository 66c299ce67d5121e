"""Jobs' configs -> a population; its training loop (see :mod:`mlplab.population`)."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mlplab.data import TensorDataModule
from mlplab.errors import ConfigError
from mlplab.population.optim import PopulationOptimizer
from mlplab.population.stacked import PopulationLoss, StackedNets


@dataclass
class Divergence:
    """Where a member's training loss first was not finite (``step``: its global optimizer step)."""

    epoch: int
    step: int
    lr: float


@dataclass
class MemberResult:
    """One member's training: per completed epoch ``epoch``, ``lr`` (the epoch's first),
    ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``; its final weights (the single
    net's ``state_dict``); and where it diverged, if it did."""

    history: list[dict[str, float]] = field(default_factory=list)
    state_dict: dict[str, Tensor] = field(default_factory=dict)
    diverged: Divergence | None = None


@dataclass
class Population:
    """Everything a population trains with (see :func:`build_population`).

    ``schedules[i]`` is member i's ``(scheduler, interval)`` on its shadow optimizer
    (``interval`` ``"step"`` or ``"epoch"``), or None without a schedule.
    """

    nets: StackedNets
    optimizer: PopulationOptimizer
    loss: PopulationLoss
    seeds: list[int]
    epochs: int
    schedules: list[tuple[Any, str] | None]

    @property
    def size(self) -> int:
        return self.nets.size


#: Values a member may differ in (dotted config keys); everything else that shapes training is shared.
MEMBER_KEYS = (
    "seed",
    "optimizer.lr",
    "optimizer.momentum",
    "optimizer.dampening",
    "optimizer.weight_decay",
    "optimizer.nesterov",
    "optimizer.betas",
    "optimizer.eps",
    "model.dropout",
    "model.init",
    "model.init_std",
    "loss.label_smoothing",
    "scheduler",  # each member's own schedule steps its own shadow optimizer; the type is shared
)
#: Config sections that must be equal across members (apart from MEMBER_KEYS).
SHARED_KEYS = (
    "engine",
    "data",
    "model",
    "loss",
    "optimizer._target_",
    "scheduler._target_",
    "trainer",
    "flush_denormal",
    "population",
    "callbacks.model_checkpoint.monitor",  # which epoch is a member's best
    "callbacks.model_checkpoint.mode",
)
#: The metrics a member's best epoch can be chosen by (its epoch records).
MONITORS = ("val/acc", "val/loss", "train/acc", "train/loss")
#: Trainer settings population training implements: only these values.
_TRAINER_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "devices": (1, "1", None, "auto"),
    "num_nodes": (1, None),
    "max_steps": (-1, None),
    "gradient_clip_val": (None, 0, 0.0),
    "accumulate_grad_batches": (1, None),
    "limit_train_batches": (None, 1.0),
    "limit_val_batches": (None, 1.0),
    "val_check_interval": (None, 1.0),
    "check_val_every_n_epoch": (1, None),
    "overfit_batches": (0, 0.0, None),
    "precision": (None, 32, "32", "32-true"),
}
# Set per job by Hydra: never part of what members share.
_TRAINER_PER_JOB = ("default_root_dir",)


def _without(node: Any, keys: Sequence[str]) -> Any:
    """``node`` as plain containers, without ``keys`` (dotted, relative to node)."""
    plain = copy.deepcopy(node)
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        holder = plain
        for part in parent.split(".") if parent else ():
            holder = holder.get(part) if isinstance(holder, dict) else None
        if isinstance(holder, dict):
            holder.pop(leaf, None)
    return plain


def shared_settings(plain: dict) -> dict[str, Any]:
    """What members must share, of a job's resolved config (plain containers): ``SHARED_KEYS``
    without ``MEMBER_KEYS`` and the trainer's per-job dir."""
    strip = [k for k in MEMBER_KEYS if "." in k] + [f"trainer.{k}" for k in _TRAINER_PER_JOB]
    stripped = _without(plain, strip)
    return {key: _select(stripped, key) for key in SHARED_KEYS}


def refusal(plain: dict) -> str | None:
    """Why a job's resolved config (plain containers) cannot train in a population: one line, or None."""
    for key, allowed in _TRAINER_DEFAULTS.items():
        value = (plain.get("trainer") or {}).get(key)
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            return f"trainer.{key}={value} is not supported by population training; allowed: {shown}"
    if plain.get("engine", "lightning") != "lightning":
        return f"engine={plain.get('engine')} is not supported by population training; allowed: lightning"
    for key in ("ckpt_path", "resume"):
        if plain.get(key) is not None:
            return f"{key}={plain.get(key)} is not supported by population training; allowed: null"
    if (plain.get("data") or {}).get("augment") is not None:
        return "data.augment is not supported by population training; allowed: augment=none"
    callbacks = plain.get("callbacks") or {}
    checkpoint = callbacks.get("model_checkpoint")
    if isinstance(checkpoint, dict):
        monitor, mode = checkpoint.get("monitor"), checkpoint.get("mode", "min")
        if monitor not in MONITORS:
            return (
                f"callbacks.model_checkpoint.monitor={monitor} is not supported by population training; "
                f"allowed: {', '.join(MONITORS)}"
            )
        if mode not in ("min", "max"):
            return f"callbacks.model_checkpoint.mode={mode} is not supported by population training; allowed: min, max"
    stoppers = [k for k, v in callbacks.items() if isinstance(v, dict) and "EarlyStopping" in str(v.get("_target_"))]
    if stoppers:
        return (
            f"callbacks.{stoppers[0]} (early stopping) is not supported by population training; "
            "allowed: callbacks without early stopping"
        )
    return None


def best_epoch_rule(cfg: DictConfig) -> tuple[str, str]:
    """The metric and mode that choose a member's best epoch: its ``callbacks.model_checkpoint``'s
    (``monitor``, ``mode``), or (``val/acc``, ``max``) without one."""
    node = OmegaConf.select(cfg, "callbacks.model_checkpoint")
    if not isinstance(node, DictConfig):
        return "val/acc", "max"
    return str(node.get("monitor")), str(node.get("mode", "min"))


def first_difference(a: dict, b: dict) -> str | None:
    """The first dotted key whose value differs between two :func:`shared_settings` (None: none)."""
    for key in SHARED_KEYS:
        if a.get(key) != b.get(key):
            return _first_difference(a.get(key), b.get(key), key)
    return None


def check_members(cfgs: Sequence[DictConfig]) -> None:
    """Raise :class:`ConfigError` unless the configs can train as one population."""
    if not cfgs:
        raise ConfigError("a population needs at least one job; allowed: one or more jobs")
    plain = [OmegaConf.to_container(c, resolve=True) for c in cfgs]
    first = shared_settings(plain[0])
    for i, p in enumerate(plain[1:], 1):
        diff = first_difference(first, shared_settings(p))
        if diff is not None:
            raise ConfigError(
                f"{diff}={_select(p, diff)!r} in job {i} differs from job 0's {_select(plain[0], diff)!r}: "
                f"population members share it; allowed: jobs that differ only in {', '.join(MEMBER_KEYS)}"
            )
    why = refusal(plain[0])
    if why is not None:
        raise ConfigError(why)


def _select(node: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _first_difference(a: Any, b: Any, key: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{key}.{k}")
    return key


def population_device(cfg: DictConfig) -> torch.device:
    """Where the population trains: ``trainer.accelerator`` (auto: a GPU when there is one)."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if accelerator != "auto":
            raise ConfigError(f"trainer.accelerator={accelerator} but no GPU is available; allowed: cpu, auto")
        return torch.device("cpu")
    if accelerator == "cpu":
        return torch.device("cpu")
    raise ConfigError(
        f"trainer.accelerator={accelerator} is not supported by population training; allowed: auto, cpu, gpu"
    )


def build_population(cfgs: Sequence[DictConfig]) -> tuple[TensorDataModule, Population]:
    """The shared data (loaded and split) and the population of ``cfgs``' jobs.

    Each member's net is built as :func:`mlplab.engines.run.fit` builds it:
    ``seed_everything(seed)``, then :func:`~mlplab.engines.build.build_net`.
    """
    from mlplab.config import validate_train_config
    from mlplab.engines.build import build_datamodule, build_loss, build_net, build_optimizer
    from mlplab.engines.run import load_data
    from mlplab.models.classifier import build_scheduler

    for cfg in cfgs:
        validate_train_config(cfg)
    check_members(cfgs)
    device = population_device(cfgs[0])
    dm = build_datamodule(cfgs[0].data)
    dm.check_available()
    load_data(dm)
    n_train = len(dm.data_train)
    epochs = int(cfgs[0].trainer.max_epochs)
    total_steps = math.ceil(n_train / dm.batch_size) * epochs

    nets, shadows, schedules, losses = [], [], [], []
    for cfg in cfgs:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        nets.append(build_net(cfg.model, dm).to(device))
        optimizer_factory, scheduler_factory = build_optimizer(cfg, nets[-1])
        shadow = optimizer_factory(params=[nn.Parameter(torch.zeros(()))])
        shadows.append(shadow)
        schedules.append(
            None
            if scheduler_factory is None
            else build_scheduler(scheduler_factory, shadow, total_steps=lambda: total_steps)
        )
        losses.append(build_loss(cfg))
    stacked = StackedNets(nets)
    population = Population(
        nets=stacked,
        optimizer=PopulationOptimizer(stacked.parameters(), shadows),
        loss=PopulationLoss(losses, device=device),
        seeds=[int(cfg.seed) for cfg in cfgs],
        epochs=epochs,
        schedules=schedules,
    )
    return dm, population


def epoch_orders(seeds: Sequence[int], epoch: int, n: int, device: torch.device) -> Tensor:
    """``[M, n]``: member i's order of the train split in ``epoch``, as
    :class:`~mlplab.data.BatchSliceSampler` draws it for a run with seed ``seeds[i]``."""
    return torch.stack(
        [
            torch.randperm(n, generator=torch.Generator(device=device).manual_seed(seed + epoch), device=device)
            for seed in seeds
        ]
    )


EpochCallback = Callable[[int, Population, list[dict[str, float] | None]], None]


def train_population(
    population: Population, dm: TensorDataModule, on_epoch_end: EpochCallback | None = None
) -> list[MemberResult]:
    """Train every member for ``population.epochs`` epochs; per member its history and weights.

    After each epoch's validation ``on_epoch_end(epoch, population, records)`` is called,
    ``records[i]`` being member i's history entry of that epoch, or None once it diverged.
    """
    if dm.data_train is None or dm.data_val is None:
        raise RuntimeError("set the DataModule up (mlplab.engines.run.load_data) before training")
    nets, optimizer, loss_fn = population.nets, population.optimizer, population.loss
    m, device = population.size, optimizer.device
    x_train, y_train = (t.to(device) for t in dm.data_train.tensors)
    n, batch_size = x_train.size(0), dm.batch_size
    active = torch.ones(m, dtype=torch.bool, device=device)
    diverged_step = torch.full((m,), -1, dtype=torch.long, device=device)
    results = [MemberResult() for _ in range(m)]
    step = 0
    for epoch in range(population.epochs):
        lrs = optimizer.hparams["lr"].tolist()
        orders = epoch_orders(population.seeds, epoch, n, device)
        loss_sum = torch.zeros(m, device=device)
        correct = torch.zeros(m, dtype=torch.long, device=device)
        nets.train()
        for start in range(0, n, batch_size):
            rows = orders[:, start : start + batch_size].reshape(-1)
            b = rows.numel() // m
            x = x_train.index_select(0, rows).view(m, b, *x_train.shape[1:])
            y = y_train.index_select(0, rows).view(m, b)
            outputs = nets(x)
            losses = loss_fn(outputs, y)
            optimizer.zero_grad()
            losses.sum().backward()
            finite = losses.detach().isfinite()
            diverged_step = torch.where(active & ~finite, step, diverged_step)
            active = active & finite
            optimizer.step(active)
            with torch.no_grad():
                loss_sum += losses.detach() * b
                correct += loss_fn.scores(outputs.detach()).argmax(dim=-1).eq(y).sum(dim=1)
            step += 1
            if _step_schedules(population.schedules, "step"):
                optimizer.refresh()
        if _step_schedules(population.schedules, "epoch"):
            optimizer.refresh()
        with torch.no_grad():  # a member whose weights are no longer finite diverged at the epoch's last step
            finite = torch.stack([p.isfinite().flatten(1).all(dim=1) for p in nets.parameters()]).all(dim=0)
            diverged_step = torch.where(active & ~finite, step - 1, diverged_step)
            active = active & finite
        val_loss, val_acc = evaluate(nets, loss_fn, dm.data_val.tensors, dm.eval_batch_size)
        records = _epoch_records(epoch, lrs, loss_sum / n, correct.float() / n, val_loss, val_acc, active)
        for i, (result, record) in enumerate(zip(results, records)):
            if record is not None:
                result.history.append(record)
            elif result.diverged is None:
                result.diverged = Divergence(epoch, int(diverged_step[i]), lrs[i])
        if on_epoch_end is not None:
            on_epoch_end(epoch, population, records)
    for i, result in enumerate(results):
        result.state_dict = nets.member_state_dict(i)
    return results


def run_population(
    cfgs: Sequence[DictConfig], on_epoch_end: EpochCallback | None = None
) -> tuple[Population, list[MemberResult]]:
    """Build and train the population of ``cfgs``' jobs under the run's ``threads`` and
    ``flush_denormal`` settings (as :func:`mlplab.engines.run.fit` trains one job)."""
    from mlplab.engines.run import denormals, threads

    with threads(cfgs[0]), denormals(cfgs[0]):
        dm, population = build_population(cfgs)
        return population, train_population(population, dm, on_epoch_end)


def _step_schedules(schedules: Sequence[tuple[Any, str] | None], interval: str) -> bool:
    """Step the schedules of this interval; whether any stepped."""
    stepped = False
    for schedule in schedules:
        if schedule is not None and schedule[1] == interval:
            with warnings.catch_warnings():  # "scheduler stepped before the optimizer": a shadow never steps
                warnings.simplefilter("ignore", UserWarning)
                schedule[0].step()
            stepped = True
    return stepped


def _epoch_records(
    epoch: int,
    lrs: list[float],
    train_loss: Tensor,
    train_acc: Tensor,
    val_loss: Tensor,
    val_acc: Tensor,
    active: Tensor,
) -> list[dict[str, float] | None]:
    """The epoch's history entry per member (None for a diverged one): one host sync."""
    columns = torch.stack([train_loss, train_acc, val_loss, val_acc, active.float()]).tolist()
    records: list[dict[str, float] | None] = []
    for i, (tl, ta, vl, va, alive) in enumerate(zip(*columns)):
        records.append(
            {"epoch": float(epoch), "lr": lrs[i], "train/loss": tl, "train/acc": ta, "val/loss": vl, "val/acc": va}
            if alive
            else None
        )
    return records


@torch.no_grad()
def evaluate(
    nets: StackedNets, loss_fn: PopulationLoss, split: Sequence[Tensor], batch_size: int
) -> tuple[Tensor, Tensor]:
    """Every member's mean loss and accuracy on a split (``(x, y)``), in evaluation mode: ``[M]`` each."""
    was_training = nets.training
    nets.eval()
    m = nets.size
    device = nets.parameters()[0].device
    x_all, y_all = (t.to(device) for t in split)
    loss_sum = torch.zeros(m, device=device)
    correct = torch.zeros(m, dtype=torch.long, device=device)
    for start in range(0, x_all.size(0), batch_size):
        x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
        outputs = nets(x.unsqueeze(0).expand(m, *x.shape))
        labels = y.unsqueeze(0).expand(m, -1)
        loss_sum += loss_fn(outputs, labels) * y.numel()
        correct += loss_fn.scores(outputs).argmax(dim=-1).eq(labels).sum(dim=1)
    nets.train(was_training)
    total = max(x_all.size(0), 1)
    return loss_sum / total, correct.float() / total

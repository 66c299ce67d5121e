"""The population engine: the jobs of a sweep that share one architecture, trained as one
stacked model (:mod:`mlplab.population`), each member then written out as the job it is.

:func:`train_group` trains the members' configs as one population and keeps, per member,
its training state at its best epoch (by its ``callbacks.model_checkpoint``'s ``monitor``
and ``mode``, default ``val/acc``, strictly better, as Lightning's ``ModelCheckpoint``
keeps it) and at its last completed epoch, then tests every member's
best weights at once. :func:`write_member` makes member i's job dir what its single run's
would be: the loggers' scalars (``train/*``, ``val/*``, ``val/acc_best``, ``test/*``, at the
steps Lightning logs them), the HPARAMS entry, the best and last checkpoints in Lightning's
format (``eval.py`` tests them, ``resume=`` continues them with Lightning), the result
line; :func:`mlplab.cli.run_job` around it writes ``run.json``. A member that diverged is
failed alone, with the single run's message. The test-stage figures (confusion matrix,
report, misclassified images, decision boundary) come from a real ``trainer.test`` of the
member's best checkpoint with its callbacks, for the members the launcher names
(``population.figures``); the others' test metrics are the population's.

What a member does not have: the diagnostics measured inside a single run's training
steps (gradient norms, weight histograms, epoch times) and the ``train/samples`` grid.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor

from mlplab.callbacks import AtomicCheckpointIO
from mlplab.data import TensorDataModule
from mlplab.engines.build import (
    _instantiate_checked,
    _instantiate_group,
    build_classifier,
    build_net,
    build_trainer,
)
from mlplab.errors import DivergenceError
from mlplab.hparams import flat_hparams, log_hparams
from mlplab.lightning_ext.checkpoint import ModelCheckpoint, epoch_end_loop_state, set_fit_progress
from mlplab.models import Classifier
from mlplab.population import Population, build_population, evaluate, train_population
from mlplab.population.train import MemberResult, best_epoch_rule
from mlplab.runs import mark_training_started

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """Every member's training state at one of its epoch ends (its best, or its last completed).

    ``tensors``: the stacked weights and buffers (:class:`~mlplab.population.StackedNets`'
    names) and the optimizer's state per parameter (``opt.<j>.<name>``), ``[M, ...]`` each;
    per member the epoch (-1: none yet), its monitored score there (NaN: none), its optimizer's
    hyper-parameters and its schedule's state.
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    groups: list[dict | None] = field(default_factory=list)
    schedules: list[dict | None] = field(default_factory=list)

    def update(self, population: Population, epoch: int, take: list[bool], scores: list[float]) -> None:
        """Take the current state of the members where ``take`` is true."""
        if not any(take):
            return
        m = population.size
        if not self.epoch:
            self.epoch, self.score = [-1] * m, [math.nan] * m
            self.groups, self.schedules = [None] * m, [None] * m
        current = _stacked_state(population)
        mask = torch.tensor(take, device=population.optimizer.device)
        for name, value in current.items():
            old = self.tensors.get(name)
            if old is None or old.shape != value.shape:
                self.tensors[name] = value.detach().clone()
            else:
                self.tensors[name] = torch.where(mask.view(-1, *([1] * (value.dim() - 1))), value.detach(), old)
        for i in (i for i in range(m) if take[i]):
            self.epoch[i], self.score[i] = epoch, scores[i]
            group = population.optimizer.shadows[i].param_groups[0]
            self.groups[i] = {k: v for k, v in group.items() if k != "params"}
            schedule = population.schedules[i]
            self.schedules[i] = None if schedule is None else schedule[0].state_dict()


def _stacked_state(population: Population) -> dict[str, Tensor]:
    nets, optimizer = population.nets, population.optimizer
    state = {**nets.params, **nets.buffers}
    for j, per_param in enumerate(optimizer.state):
        for name, value in per_param.items():
            state[f"opt.{j}.{name}"] = value
    return state


@dataclass
class GroupRun:
    """A trained population: its data, per member its history, snapshots and test metrics."""

    cfgs: list[DictConfig]
    dm: TensorDataModule
    population: Population
    results: list[MemberResult]
    best: Snapshot
    last: Snapshot
    test: list[dict[str, float]]
    steps_per_epoch: int
    val_batches: int


def train_group(cfgs: Sequence[DictConfig]) -> GroupRun:
    """Train the jobs' resolved configs as one population; test each member's best weights."""
    from mlplab.engines.run import denormals, threads

    best, last = Snapshot(), Snapshot()
    monitor, mode = best_epoch_rule(cfgs[0])
    sign = 1.0 if mode == "max" else -1.0  # compared as sign * score: larger is better

    def on_epoch_end(epoch: int, population: Population, records: list[dict[str, float] | None]) -> None:
        accs = [r["val/acc"] for r in records if r is not None]
        print(
            f"population of {population.size}: epoch {epoch + 1}/{population.epochs}, val/acc "
            + (f"{min(accs):.4f}..{max(accs):.4f}" if accs else "-")
            + (f", {population.size - len(accs)} diverged" if len(accs) < population.size else ""),
            flush=True,
        )
        alive = [r is not None for r in records]
        scores = [r[monitor] if r is not None else math.nan for r in records]
        before = best.score or [math.nan] * population.size
        better = [a and (math.isnan(b) or sign * s > sign * b) for a, s, b in zip(alive, scores, before)]
        best.update(population, epoch, better, scores)
        last.update(population, epoch, alive, scores)

    with threads(cfgs[0]), denormals(cfgs[0]):
        dm, population = build_population(cfgs)
        mark_training_started()
        t0 = time.perf_counter()
        results = train_population(population, dm, on_epoch_end)
        seconds = time.perf_counter() - t0
        print(
            f"population of {population.size}: trained in {seconds:.2f} s "
            f"({population.size * population.epochs / max(seconds, 1e-9):.1f} member-epochs/s)",
            flush=True,
        )
        test = _test_best(population, best, dm) if cfgs[0].get("test", True) else [{} for _ in cfgs]
    n_train, n_val = len(dm.data_train), len(dm.data_val)
    return GroupRun(
        cfgs=list(cfgs),
        dm=dm,
        population=population,
        results=results,
        best=best,
        last=last,
        test=test,
        steps_per_epoch=math.ceil(n_train / dm.batch_size),
        val_batches=math.ceil(n_val / dm.eval_batch_size),
    )


@torch.no_grad()
def _test_best(population: Population, best: Snapshot, dm: TensorDataModule) -> list[dict[str, float]]:
    """Every member's ``test/loss`` and ``test/acc`` with its best weights (empty: it has none)."""
    if not best.epoch or dm.data_test is None:
        return [{} for _ in range(population.size)]
    nets = population.nets
    saved = dict(nets.params)
    nets.params.update({k: best.tensors[k] for k in saved})
    try:
        loss, acc = evaluate(nets, population.loss, dm.data_test.tensors, dm.eval_batch_size)
    finally:
        nets.params.update(saved)
    return [
        {"test/loss": float(lo), "test/acc": float(ac)} if best.epoch[i] >= 0 else {}
        for i, (lo, ac) in enumerate(zip(loss.tolist(), acc.tolist()))
    ]


# -- one member's job dir ---------------------------------------------------------------------


def write_member(cfg: DictConfig, run: GroupRun, i: int, figures: bool = False) -> dict[str, float]:
    """Member ``i``'s outputs in its job dir (``cfg.paths.output_dir``), as its single run's;
    returns its final metrics and ``epochs``. A member that diverged raises its single run's
    :class:`~mlplab.errors.DivergenceError` once its checkpoints are written."""
    from mlplab.engines.run import report

    mark_training_started()
    result, s = run.results[i], run.steps_per_epoch
    log.info(
        "trained as member %d of a population of %d (hydra/launcher=population), with seed=%s",
        i,
        run.population.size,
        cfg.get("seed"),
    )
    model = _member_model(cfg, run.dm)
    loggers = _instantiate_group(cfg.get("logger"), "logger")
    log_hparams(loggers, flat_hparams(cfg))
    best_so_far = -math.inf
    metrics: dict[str, float] = {}
    for record in result.history:
        epoch = int(record["epoch"])
        best_so_far = max(best_so_far, record["val/acc"])
        metrics = {k: record[k] for k in ("train/loss", "train/acc", "val/loss", "val/acc")}
        metrics["val/acc_best"] = best_so_far
        for logger in loggers:
            logger.log_metrics({**metrics, "epoch": float(epoch)}, step=(epoch + 1) * s - 1)
    callbacks = _member_callbacks(cfg, every=figures)
    checkpoint = next((c for c in callbacks if isinstance(c, L.pytorch.callbacks.ModelCheckpoint)), None)
    if checkpoint is not None:
        _write_checkpoints(run, i, model, checkpoint)
    epochs = len(result.history)
    metrics["epochs"] = float(epochs)
    if result.diverged is not None:
        _finalize(loggers, "failed")
        d = result.diverged
        raise DivergenceError.training(
            f"loss at step {d.step}",
            d.epoch,
            d.lr,
            allowed="a smaller optimizer.lr (or gradient clipping, trainer.gradient_clip_val)",
        )
    if cfg.get("test", True) and run.test[i]:
        if figures:
            metrics.update(_test_with_figures(cfg, run, i, model, callbacks, loggers))
        else:
            metrics.update(run.test[i])
            for logger in loggers:
                logger.log_metrics({**run.test[i], "epoch": float(epochs)}, step=epochs * s)
    _finalize(loggers, "success")
    report(metrics, cfg)
    return metrics


def _member_callbacks(cfg: DictConfig, every: bool) -> list[Any]:
    """The ``callbacks`` group's objects: all of them, or (``every`` false) its checkpoint callbacks only."""
    from hydra.utils import get_class

    group = cfg.get("callbacks")
    if every or not group:
        return _instantiate_group(group, "callbacks")

    def is_checkpoint(node: Any) -> bool:
        try:
            return issubclass(get_class(str(node.get("_target_"))), L.pytorch.callbacks.ModelCheckpoint)
        except Exception:  # not a class: left to the instantiation's own checks
            return True

    return [
        _instantiate_checked(node, f"callbacks.{key}")
        for key, node in group.items()
        if isinstance(node, DictConfig) and "_target_" in node and is_checkpoint(node)
    ]


def _member_model(cfg: DictConfig, dm: TensorDataModule) -> Classifier:
    """The member's LightningModule, as :func:`mlplab.engines.lightning.fit` builds it."""
    return build_classifier(cfg, build_net(cfg.model, dm), dm.num_classes)


def _finalize(loggers: list[Any], status: str) -> None:
    for logger in loggers:
        logger.finalize(status)


def _write_checkpoints(run: GroupRun, i: int, model: Classifier, checkpoint: ModelCheckpoint) -> None:
    """The best and the last checkpoint (if any epoch completed), as the run's ``ModelCheckpoint`` names and fills them."""
    best_epoch, last_epoch = run.best.epoch[i], run.last.epoch[i]
    if best_epoch < 0 or last_epoch < 0:
        return
    io = AtomicCheckpointIO()
    dirpath = Path(str(checkpoint.dirpath))
    best_path = Path(
        checkpoint.format_checkpoint_name({"epoch": best_epoch, "step": (best_epoch + 1) * run.steps_per_epoch})
    )
    last_path = dirpath / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    best_score = torch.tensor(run.best.score[i])
    checkpoint.best_model_path = checkpoint.kth_best_model_path = str(best_path)
    checkpoint.best_model_score = checkpoint.kth_value = best_score
    checkpoint.best_k_models = {str(best_path): best_score}
    checkpoint.last_model_path = str(last_path) if checkpoint.save_last else ""
    for snapshot, path in ((run.best, best_path), (run.last, last_path)):
        if path == last_path and not checkpoint.save_last:
            continue
        checkpoint.current_score = torch.tensor(snapshot.score[i])
        io.save_checkpoint(_checkpoint(run, i, model, snapshot, checkpoint), path)


def _checkpoint(
    run: GroupRun, i: int, model: Classifier, snapshot: Snapshot, checkpoint: ModelCheckpoint
) -> dict[str, Any]:
    """Member ``i``'s checkpoint at ``snapshot``'s epoch, in the layout Lightning writes."""
    population, epoch = run.population, snapshot.epoch[i]
    weights = population.nets.member_state_dict(i, snapshot.tensors)
    model.net.load_state_dict(weights)
    model.val_acc_best.reset()
    history = run.results[i].history[: epoch + 1]
    model.val_acc_best.update(torch.tensor(max(r["val/acc"] for r in history)))
    params = list(model.parameters())
    state: dict[int, dict[str, Tensor]] = {}
    for j in range(len(population.optimizer.state)):
        names = [k for k in snapshot.tensors if k.startswith(f"opt.{j}.")]
        if names:
            state[j] = {k.rsplit(".", 1)[1]: snapshot.tensors[k][i].clone() for k in names}
            if population.optimizer.kind is torch.optim.Adam:
                state[j]["step"] = torch.tensor(float((epoch + 1) * run.steps_per_epoch))
    group = {**(snapshot.groups[i] or {}), "params": list(range(len(params)))}
    schedule = population.schedules[i]
    steps = (epoch + 1) * run.steps_per_epoch
    return {
        "epoch": epoch,
        "global_step": steps,
        "pytorch-lightning_version": L.__version__,
        "state_dict": model.state_dict(),
        "loops": epoch_end_loop_state(epoch + 1, run.steps_per_epoch, run.val_batches, schedule and schedule[1]),
        "callbacks": {checkpoint.state_key: checkpoint.state_dict()},
        "optimizer_states": [{"state": state, "param_groups": [group]}],
        "lr_schedulers": [] if snapshot.schedules[i] is None else [snapshot.schedules[i]],
        "hparams_name": "kwargs",
        "hyper_parameters": dict(model.hparams),
    }


def _test_with_figures(
    cfg: DictConfig,
    run: GroupRun,
    i: int,
    model: Classifier,
    callbacks: list[Any],
    loggers: list[Any],
) -> dict[str, float]:
    """Lightning's test stage on the member's best weights, with its test-stage callbacks
    (the figures) and loggers, at the step its single run tests at."""
    from mlplab.engines.lightning import as_floats, lightning_warnings_filtered

    model.net.load_state_dict(run.population.nets.member_state_dict(i, run.best.tensors))
    testers = [
        c
        for c in callbacks
        if not isinstance(c, (L.pytorch.callbacks.ModelCheckpoint, L.pytorch.callbacks.ProgressBar))
    ]
    with lightning_warnings_filtered():
        trainer: L.Trainer = build_trainer(
            cfg.trainer, callbacks=testers, logger=loggers or False, enable_progress_bar=False
        )
        epochs = len(run.results[i].history)
        set_fit_progress(trainer, epochs, epochs * run.steps_per_epoch)
        trainer.test(model, datamodule=run.dm, verbose=False)
    return {k: v for k, v in as_floats(trainer.callback_metrics).items() if k.startswith("test/")}

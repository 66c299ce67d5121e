"""Population training: the jobs of a sweep that share one architecture, trained as one stacked model.

A *population* is M member nets of one architecture (one net config, one data set, one
loss and optimizer type, one schedule type, one number of epochs, one device) that differ
only in values that change no tensor's shape: ``seed`` (initial weights, dropout masks,
batch order), the optimizer's hyper-parameters (``lr``, ``momentum``, ``dampening``,
``weight_decay``, ``nesterov``; Adam's ``betas``, ``eps``), the schedule's,
``model.dropout``, ``model.init``/``init_std`` and ``loss.label_smoothing``. One training
step of the population is one forward and one backward pass over all members at once, in
one process.

What is stacked (:mod:`~mlplab.population.stacked`)
    :class:`StackedNets` holds each parameter of the M nets as one tensor with a leading
    member dimension (as ``torch.func.stack_module_state`` would, matching the nets'
    tensors by position: a net without dropout layers names them ``layers.3`` where one
    with dropout says ``layers.4``). A net that is a chain of flatten, linear, elementwise
    and dropout layers (mlplab's nets, ``nn.Sequential``) runs as one batched matrix product
    a linear layer, its gradients computed in ``nn.Linear``'s order of operations (a member
    rounds as its sequential run does); any other net runs its own ``forward`` mapped over
    the member dimension (``torch.func.functional_call`` on a storage-less copy under
    ``torch.func.vmap(randomness="different")``). Every member draws its own dropout masks:
    each ``nn.Dropout`` becomes a dropout whose probability is a stacked buffer, so members
    differ in ``model.dropout`` too (0: the identity). Each net is built
    by :func:`mlplab.engines.build.build_net` right after
    ``lightning.seed_everything(member_seed)``, as :func:`mlplab.engines.run.fit` builds it,
    so member i starts from the weights its sequential job starts from, bit for bit.
    :meth:`StackedNets.member_state_dict` gives member i's weights as its single net's
    ``state_dict`` (the same keys, shapes and dtypes).

The loss (:mod:`~mlplab.population.stacked`)
    :class:`PopulationLoss`: per member the mean over its own minibatch (cross-entropy with
    its own ``label_smoothing``, torch's formula, or mlplab's squared error), summed over the
    members. The members share no parameter, so each member's gradient is exactly its own
    loss's.

The optimizer (:mod:`~mlplab.population.optim`)
    :class:`PopulationOptimizer` applies torch's SGD or Adam update to the stacked
    parameters with each hyper-parameter an ``[M]`` tensor broadcast over the member
    dimension: the few tensor ops of ``torch.optim.SGD``/``Adam``'s update, written out
    (torch's functional optimizers take one scalar per hyper-parameter). The hyper-parameters
    are read from one *shadow* ``torch.optim`` optimizer per member (built by the member's
    own ``optimizer`` config on a dummy parameter): torch validates the values, and the
    member's own schedule (``scheduler`` config) steps that shadow, so cosine and one-cycle
    schedules, momentum cycling included, are torch's own. Other optimizers and options
    (``amsgrad``, ``maximize``) are refused in one line.

Configs, data and the loop (:mod:`~mlplab.population.train`)
    :func:`build_population` builds the population of the jobs' configs once
    :func:`check_members` found that they can share one (else one line naming the first key
    that differs, or the trainer setting not implemented here); :func:`train_population` is
    a plain loop, no Lightning Trainer; :func:`run_population` does both under the jobs'
    ``threads`` and ``flush_denormal`` settings.

    Every member sees the batches its sequential run sees: the train split is shared (split
    by ``data.split_seed``), and each epoch member i's order is the permutation
    :class:`mlplab.data.BatchSliceSampler` draws for seed ``seed_i + epoch``. A step gathers
    the ``[M, batch, ...]`` inputs with one ``index_select`` from the shared train tensor.
    (``steps_per_call`` only changes how Lightning's loop hands out the same minibatches:
    the sequence of optimizer steps is the same.)

Divergence
    A member whose training loss is not finite is frozen from that step on (its update and
    optimizer state masked, with no host sync) and reported diverged with its epoch and
    step -- the step its sequential run's ``DivergenceError`` names; the others train on as
    if it were not there. Its history stops at the last epoch it completed, as a sequential
    run stops at the validation of the epoch where it diverged.

What equals the sequential run (tests/test_population.py)
    - initial weights: exactly;
    - the optimizer: torch.optim.SGD/Adam on the member alone, to float rounding (tested to
      max |delta| <= 1e-6 * max |w| over six steps; Adam is bit for bit, SGD within an ulp,
      torch fusing ``p - lr * d`` into one multiply-add);
    - without dropout, a member's weights after training equal its sequential mlplab run's
      to float rounding (the batched matmuls sum in another order): tested to max |delta|
      <= 1e-4 * max |w| after two digits epochs (SGD, cosine) and one (Adam, one-cycle);
      measured about 3e-7. Its epoch's val/acc is the run's;
    - with dropout the masks cannot be the sequential run's (they are drawn for all members
      at once): equal in distribution only (a slow test compares 8 seeds' accuracies).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Where each name lives. They load on first use (PEP 562), so that importing
#: :mod:`mlplab.population.launcher` -- which Hydra does for every command, to discover its
#: plugins -- does not load torch before the command line is checked.
_MODULES = {
    "OPTIMIZERS": "optim",
    "PopulationOptimizer": "optim",
    "PopulationLoss": "stacked",
    "StackedNets": "stacked",
    **dict.fromkeys(
        (
            "MEMBER_KEYS",
            "Divergence",
            "MemberResult",
            "Population",
            "build_population",
            "check_members",
            "epoch_orders",
            "evaluate",
            "population_device",
            "run_population",
            "train_population",
        ),
        "train",
    ),
}
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)

"""Torch's SGD and Adam on stacked parameters, with per-member hyper-parameters (see :mod:`mlplab.population`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mlplab.errors import ConfigError

# -- the optimizer --------------------------------------------------------------------------------

#: The optimizers population training implements, and each one's hyper-parameters.
OPTIMIZERS: dict[type, tuple[str, ...]] = {
    torch.optim.SGD: ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    torch.optim.Adam: ("lr", "beta1", "beta2", "eps", "weight_decay"),
}
_OPTIMIZER_NAMES = "torch.optim.SGD, torch.optim.Adam"
#: Options of torch's optimizers that change the update and are not implemented: the value they must have.
_REQUIRED = {"maximize": False, "amsgrad": False, "decoupled_weight_decay": False, "differentiable": False}


class PopulationOptimizer:
    """torch.optim.SGD or Adam on stacked parameters, with per-member hyper-parameters.

    ``shadows`` holds one ``torch.optim`` optimizer per member (all of one type, each on a
    dummy parameter): its ``param_groups[0]`` are that member's hyper-parameters, read by
    :meth:`refresh` (call it after a schedule stepped a shadow). :meth:`step` applies the
    update to the members where ``active`` is true and leaves the others, parameters and
    optimizer state, untouched.
    """

    def __init__(self, params: Sequence[Tensor], shadows: Sequence[torch.optim.Optimizer]) -> None:
        kinds = {type(s) for s in shadows}
        if len(kinds) != 1 or next(iter(kinds)) not in OPTIMIZERS:
            names = ", ".join(sorted(f"{k.__module__}.{k.__name__}" for k in kinds))
            raise ConfigError(
                f"optimizer._target_={names} is not supported by population training; "
                f"allowed: {_OPTIMIZER_NAMES} (the same for all members)"
            )
        self.kind = next(iter(kinds))
        self.params = list(params)
        self.shadows = list(shadows)
        self.size = len(self.shadows)
        if any(p.size(0) != self.size for p in self.params):
            raise ValueError(f"every stacked parameter needs a leading dimension of {self.size} members")
        self.device = self.params[0].device
        self.state: list[dict[str, Tensor]] = [{} for _ in self.params]
        self.steps = 0
        self.refresh()

    @classmethod
    def build(
        cls, params: Sequence[Tensor], kind: type[torch.optim.Optimizer], members: Sequence[dict[str, Any]]
    ) -> "PopulationOptimizer":
        """``kind(**members[i])`` for member i (e.g. ``torch.optim.SGD``, ``[{"lr": 0.1}, ...]``)."""
        return cls(params, [kind([nn.Parameter(torch.zeros(()))], **kwargs) for kwargs in members])

    def refresh(self) -> None:
        """Read every member's hyper-parameters from its shadow optimizer (torch validated them)."""
        groups = [s.param_groups[0] for s in self.shadows]
        for name, wanted in _REQUIRED.items():
            for i, group in enumerate(groups):
                if name in group and bool(group[name]) != wanted:
                    raise ConfigError(
                        f"optimizer.{name}={group[name]} is not supported by population training (member {i}); "
                        f"allowed: {str(wanted).lower()}"
                    )
        values: dict[str, list[float]] = {name: [] for name in OPTIMIZERS[self.kind]}
        for group in groups:
            for name in values:
                value = group["betas"][int(name[-1]) - 1] if name in ("beta1", "beta2") else group[name]
                values[name].append(float(value))
        # float64 on the device, as torch computes its scalars in Python floats; cast per use.
        h = {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in values.items()}
        if self.kind is torch.optim.SGD:
            self._momentum = any(values["momentum"])
            self._all_momentum = all(values["momentum"])
            h["neg_lr"] = -h["lr"]
            self._nesterov = any(values["nesterov"])
            h["one_minus_dampening"] = 1.0 - h["dampening"]
        else:
            h["one_minus_beta1"], h["one_minus_beta2"] = 1.0 - h["beta1"], 1.0 - h["beta2"]
        self._weight_decay = any(values["weight_decay"])
        self.hparams = h
        self._cast: dict[tuple[str, torch.dtype, int], Tensor] = {}

    def _h(self, name: str, like: Tensor) -> Tensor:
        """Hyper-parameter ``name`` as ``[M, 1, ...]`` in ``like``'s dtype (cached until refresh)."""
        key = (name, like.dtype, like.dim())
        if key not in self._cast:
            self._cast[key] = self.hparams[name].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
        return self._cast[key]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Tensor | None = None) -> None:
        """One update of every member where ``active`` ([M] bool; None: all)."""
        self.steps += 1
        # On the CPU a look at the mask costs nothing (no queue to wait for): skip the masking
        # passes over every tensor while all members train. On a GPU it would wait for the step.
        if active is not None and self.device.type == "cpu" and bool(active.all()):
            active = None
        if self.kind is torch.optim.Adam:  # the bias corrections of this step, [M]
            h = self.hparams
            self._step_size = h["lr"] / (1 - h["beta1"] ** self.steps)
            self._bias2_sqrt = (1 - h["beta2"] ** self.steps).sqrt()
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            keep = None if active is None else active.view(-1, *([1] * (p.dim() - 1)))
            if self.kind is torch.optim.SGD:
                scale, direction = self._h("neg_lr", p), self._sgd(p, p.grad, state, keep)
            else:
                scale, direction = self._adam(p, p.grad, state, keep)
            if keep is None:
                p.addcmul_(scale, direction)
            else:
                p.copy_(torch.where(keep, torch.addcmul(p, scale, direction), p))

    @staticmethod
    def _keep(state: dict[str, Tensor], name: str, value: Tensor, keep: Tensor | None) -> None:
        old = state.get(name)
        state[name] = value if keep is None or old is None else torch.where(keep, value, old)

    # The update rules return the step as ``(scale, direction)``: p <- p + scale * direction.
    # While every member trains (``keep`` None) the optimizer state is updated in place, as
    # torch.optim does: no new buffers each step.

    def _sgd(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], keep: Tensor | None) -> Tensor:
        # torch.optim.SGD: d = g + wd p; buf = d at the first step, then mu buf + (1 - damp) d;
        # d = d + mu buf (nesterov) or buf; p = p - lr d. A member without momentum: d as it is
        # (torch ignores its dampening).
        d = torch.addcmul(grad, self._h("weight_decay", p), p) if self._weight_decay else grad
        if self._momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d.clone()
            elif keep is None:
                buf.mul_(self._h("momentum", p)).addcmul_(self._h("one_minus_dampening", p), d)
            else:
                buf = torch.addcmul(buf * self._h("momentum", p), self._h("one_minus_dampening", p), d)
            self._keep(state, "momentum_buffer", buf, keep)
            with_buf = d + self._h("momentum", p) * buf if self._nesterov else buf
            if self._nesterov:
                with_buf = torch.where(self._h("nesterov", p) != 0, with_buf, buf)
            d = with_buf if self._all_momentum else torch.where(self._h("momentum", p) != 0, with_buf, d)
        return d

    def _adam(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], keep: Tensor | None) -> tuple[Tensor, Tensor]:
        # torch.optim.Adam: g = g + wd p; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g g;
        # p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
        g = torch.addcmul(grad, self._h("weight_decay", p), p) if self._weight_decay else grad
        m, v = state.get("exp_avg"), state.get("exp_avg_sq")
        if keep is None and m is not None and v is not None:
            m.lerp_(g, self._h("one_minus_beta1", p))
            v.mul_(self._h("beta2", p)).addcmul_(self._h("one_minus_beta2", p) * g, g)
        else:
            m = (m if m is not None else torch.zeros_like(p)).lerp(g, self._h("one_minus_beta1", p))
            v = (v if v is not None else torch.zeros_like(p)) * self._h("beta2", p) + (
                self._h("one_minus_beta2", p) * g
            ) * g
            self._keep(state, "exp_avg", m, keep)
            self._keep(state, "exp_avg_sq", v, keep)
        shape = (-1, *([1] * (p.dim() - 1)))
        denom = v.sqrt().div_(self._bias2_sqrt.to(p.dtype).view(shape)).add_(self._h("eps", p))
        return -self._step_size.to(p.dtype).view(shape), m / denom

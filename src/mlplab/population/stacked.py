"""The stacked nets and the per-member loss (see :mod:`mlplab.population`)."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mlplab.errors import ConfigError
from mlplab.models import ClassificationLoss, CrossEntropy
from mlplab.models.losses import SquaredError, smoothed_targets

# -- the stacked nets -----------------------------------------------------------------------------


class _MemberDropout(nn.Module):
    """``nn.Dropout`` whose probability is a buffer, so that each stacked member has its own
    (0 for a member whose net has no dropout: the identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("p", torch.zeros(()), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return _dropout(x, self.p) if self.training else x


def _dropout(x: Tensor, p: Tensor) -> Tensor:
    """Inverted dropout with probability ``p`` (a scalar, or one per member broadcast over ``x``)."""
    return x * (torch.rand_like(x) >= p) / (1 - p)


#: Layers a chain applies to ``[M, B, ...]`` as they are: elementwise, without parameters.
_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Identity)


class _StackedLinear(torch.autograd.Function):
    """``h @ W^T + b`` for every member (``h [M, B, in]``, ``W [M, out, in]``, ``b [M, out]``),
    its gradients computed as ``nn.Linear``'s backward computes them (``dW = g^T @ h``,
    ``dh = g @ W``): in ``W``'s own layout, which every optimizer pass then reads along the
    grain, and in the single net's order of operations, so that a member rounds as its
    sequential run does (a ReLU unit at the edge of zero flips on a last-bit difference)."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        w_t = weight.transpose(1, 2)
        return torch.bmm(h, w_t) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, w_t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        h, weight = ctx.saved_tensors
        grad_h = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), h) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(dim=1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b


def _chain(template: nn.Module) -> list[tuple[str, str, nn.Module]] | None:
    """The template's layers as ``(kind, state_dict name prefix, module)`` when the net is a
    chain of flatten, linear, elementwise and dropout layers (``nn.Sequential`` or mlplab's
    nets): the members are then applied with batched matrix products, not ``vmap`` (a third
    of a small net's step). None: another net, applied with ``vmap``."""
    from mlplab.models.nets import _LayerStack

    if isinstance(template, nn.Sequential):
        layers, prefix = template, ""
    elif type(template).forward is _LayerStack.forward and isinstance(getattr(template, "layers", None), nn.Sequential):
        layers, prefix = template.layers, "layers."
    else:
        return None
    chain = []
    for name, layer in layers.named_children():
        if isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1:
            kind = "flatten"
        elif type(layer) is nn.Linear:
            kind = "linear"
        elif type(layer) in _ELEMENTWISE:
            kind = "elementwise"
        elif isinstance(layer, _MemberDropout):
            kind = "dropout"
        else:
            return None
        chain.append((kind, f"{prefix}{name}.", layer))
    return chain


def _layout(net: nn.Module) -> list[type]:
    """The net's module types apart from dropout: what members must share."""
    return [type(m) for m in net.modules() if not isinstance(m, nn.Dropout)]


class StackedNets:
    """M nets of one architecture as one model: ``self(x)`` maps ``[M, B, ...]`` to ``[M, B, outputs]``.

    The nets may differ in their dropout (``model.dropout``: a net without dropout layers
    has other ``state_dict`` keys, ``layers.3`` for ``layers.4``; tensors are matched by
    position). ``self.params`` (name -> ``[M, ...]`` leaf tensors that require grad) are
    copies of the nets' own; the nets are not used afterwards.
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        if not nets:
            raise ValueError("a population needs at least one net")
        # The template: a net with dropout layers if any member has them.
        template_net = max(nets, key=lambda net: sum(isinstance(m, nn.Dropout) for m in net.modules()))
        layout = _layout(template_net)
        shapes = [(v.shape, v.dtype) for v in template_net.state_dict().values()]
        n_dropout = sum(isinstance(m, nn.Dropout) for m in template_net.modules())
        for i, net in enumerate(nets):
            dropouts = [m.p for m in net.modules() if isinstance(m, nn.Dropout)]
            if (
                _layout(net) != layout
                or [(v.shape, v.dtype) for v in net.state_dict().values()] != shapes
                or len(dropouts) not in (0, n_dropout)
            ):
                raise ValueError(f"net {i} ({type(net).__name__}) does not have the other nets' layers and shapes")
        self.size = len(nets)
        names = list(template_net.state_dict())
        param_names = {name for name, _ in template_net.named_parameters()}
        #: Each member's own state_dict keys, in the template's order.
        self._member_keys = [list(net.state_dict()) for net in nets]
        states = [list(net.state_dict().values()) for net in nets]
        stacked = {name: torch.stack([state[pos] for state in states]) for pos, name in enumerate(names)}
        self.params: dict[str, Tensor] = {
            k: v.detach().requires_grad_() for k, v in stacked.items() if k in param_names
        }
        self.buffers: dict[str, Tensor] = {k: v for k, v in stacked.items() if k not in param_names}
        self._keys = names
        # The architecture without storage: functional_call swaps in one member's tensors.
        self._template = copy.deepcopy(template_net).to("meta")
        device = next(iter(stacked.values())).device
        dropout_names = [name for name, m in self._template.named_modules() if isinstance(m, nn.Dropout)]
        for j, name in enumerate(dropout_names):
            parent, _, leaf = name.rpartition(".")
            self._template.get_submodule(parent).register_module(leaf, _MemberDropout())
            p = [
                0.0 if not ds else ds[j]
                for ds in ([m.p for m in net.modules() if isinstance(m, nn.Dropout)] for net in nets)
            ]
            self.buffers[f"{name}.p"] = torch.tensor(p, device=device)
        self._template.train()
        self._forward = vmap(self._member_forward, randomness="different")
        self._chain = _chain(self._template)

    def _member_forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self._template, (params, buffers), (x,))

    def __call__(self, x: Tensor) -> Tensor:
        if self._chain is None or (x.dim() != 3 and self._chain[0][0] != "flatten"):  # nn.Linear on more dims
            return self._forward(self.params, self.buffers, x)
        return self._chain_forward(x)

    def _chain_forward(self, x: Tensor) -> Tensor:
        """``self(x)`` for a chain (see :func:`_chain`): what ``vmap`` computes, one batched op per layer."""
        m, h = self.size, x
        for kind, prefix, layer in self._chain:
            if kind == "flatten":
                h = h.flatten(2)
            elif kind == "linear":
                h = _StackedLinear.apply(h, self.params[f"{prefix}weight"], self.params.get(f"{prefix}bias"))
            elif kind == "elementwise":
                h = layer(h)
            elif self.training:  # dropout, each member with its own rate
                h = _dropout(h, self.buffers[f"{prefix}p"].to(h.dtype).view(m, *([1] * (h.dim() - 1))))
        return h

    def train(self, mode: bool = True) -> "StackedNets":
        """Training mode (dropout on) or evaluation mode, for every member."""
        self._template.train(mode)
        return self

    def eval(self) -> "StackedNets":
        return self.train(False)

    @property
    def training(self) -> bool:
        return self._template.training

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def member_state_dict(self, i: int, stacked: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Member ``i``'s weights as its single net's ``state_dict`` (its keys, in its order; copies),
        from ``stacked`` (tensors by this population's names, e.g. a snapshot) or the current ones."""
        if not 0 <= i < self.size:
            raise IndexError(f"member {i} of a population of {self.size}")
        stacked = stacked if stacked is not None else {**self.params, **self.buffers}
        return {own: stacked[name][i].detach().clone() for own, name in zip(self._member_keys[i], self._keys)}


# -- the loss -------------------------------------------------------------------------------------


class PopulationLoss:
    """Each member's mean loss over its own minibatch: ``self(outputs [M, B, o], labels [M, B]) -> [M]``.

    Cross-entropy (each member with its own ``label_smoothing``, torch's formula) or
    mlplab's squared error (its smoothed targets); ``scores`` maps outputs to class scores as the single loss does.
    """

    def __init__(self, losses: Sequence[ClassificationLoss], device: torch.device | str = "cpu") -> None:
        kinds = {type(loss) for loss in losses}
        if len(kinds) != 1 or next(iter(kinds)) not in (CrossEntropy, SquaredError):
            names = ", ".join(sorted(k.__name__ for k in kinds))
            raise ConfigError(
                f"loss._target_={names} is not supported by population training; "
                "allowed: one of mlplab.models.CrossEntropy, mlplab.models.SquaredError for all members"
            )
        self.loss = losses[0]
        self.kind = "cross_entropy" if isinstance(self.loss, CrossEntropy) else "mse"
        smoothing = [float(getattr(loss, "label_smoothing", 0.0)) for loss in losses]
        self.smoothed = any(smoothing)
        self.label_smoothing = torch.tensor(smoothing, dtype=torch.float64, device=device)

    def scores(self, outputs: Tensor) -> Tensor:
        m, b = outputs.shape[:2]
        return self.loss.scores(outputs.reshape(m * b, -1)).view(m, b, -1)

    def __call__(self, outputs: Tensor, labels: Tensor) -> Tensor:
        scores = self.scores(outputs)
        if self.kind == "mse":
            e = self.label_smoothing.to(outputs.dtype).view(-1, 1, 1) if self.smoothed else 0.0
            target = smoothed_targets(labels, outputs.size(-1), e, outputs.dtype)
            return 0.5 * (outputs - target).pow(2).sum(dim=-1).mean(dim=-1)
        logp = scores.log_softmax(dim=-1)
        nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        if self.smoothed:  # torch: (1 - e) * nll + e / C * (-sum_c log p_c)
            e = self.label_smoothing.to(logp.dtype).unsqueeze(1)
            nll = (1 - e) * nll + (e / logp.size(-1)) * -logp.sum(dim=-1)
        return nll.mean(dim=-1)

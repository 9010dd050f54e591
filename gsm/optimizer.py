"""The Global Sparse Momentum SGD optimizer."""
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from gsm.denormals import flush_denormals
from gsm.selection import GlobalSelection, keep_count


class GSM(Optimizer):
    r"""Global Sparse Momentum SGD (Ding et al., NeurIPS 2019).

    Every step, the prunable elements (those of parameters with ``dim() > 1`` unless a param group sets
    ``prunable``) are ranked by the metric :math:`m = |w \odot g|`, where :math:`g` is the loss gradient,
    and only the :math:`Q = \lfloor \text{nonzero\_ratio} \cdot N \rfloor` most important of them, over all
    prunable parameters of all param groups together, receive the loss gradient. With :math:`\tau` the
    Q-th largest metric and :math:`M = [m \ge \tau]` (ties at :math:`\tau` are all kept), each parameter is
    updated with PyTorch's momentum convention (dampening 0, buffer = d at the first step):

    .. math::
        d = M \odot g + \lambda w, \qquad b \leftarrow \beta b + d, \qquad
        w \leftarrow w - \eta b \quad (\text{Nesterov: } w \leftarrow w - \eta (d + \beta b)).

    Non-prunable elements use :math:`M = 1`. Weight decay and momentum act on every weight, so the
    elements outside the mask only decay (and coast on their momentum) towards zero; after training the
    model is hard-pruned to the Q largest magnitudes. The metric uses the loss gradient before weight decay
    because it estimates how much the loss would change if the weight were removed (first-order Taylor),
    which weight decay does not affect. With ``nonzero_ratio=1`` this is exactly ``torch.optim.SGD``.

    Args:
        params: parameters or param groups; a group may set ``lr``, ``momentum``, ``weight_decay``,
            ``nesterov`` and ``prunable`` (True/False for the whole group; default: ``dim() > 1``).
        lr: learning rate :math:`\eta`.
        momentum: momentum factor :math:`\beta` in [0, 1).
        nonzero_ratio: fraction of prunable elements that receive loss gradients, in (0, 1];
            1 / compression ratio.
        weight_decay: L2 penalty :math:`\lambda`.
        nesterov: use Nesterov momentum.

    On the CPU the constructor turns on flush-to-zero for subnormal floats on every thread of torch
    (:func:`gsm.flush_denormals`): the passive weights decay towards 1e-35, and x86 processors compute the
    subnormal products they make many times slower; flushing changes only values below 1.2e-38. Training
    with another optimizer on the same weights (a ticket's retrain with SGD) gains from it too.

    After each step, ``last_threshold`` holds :math:`\tau` (a 0-d tensor; ``None`` when every element was
    active) and ``num_active`` the number of prunable elements that received gradients (reading it
    synchronises with the device).
    """

    def __init__(self, params: Iterable[Union[Tensor, Dict[str, Any]]], lr: float, momentum: float = 0.9,
                 nonzero_ratio: Optional[float] = None, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        if nonzero_ratio is None:
            raise ValueError("nonzero_ratio is required: 1 / compression ratio, in (0, 1]")
        if not 0.0 < nonzero_ratio <= 1.0:
            raise ValueError(f"Invalid nonzero_ratio: {nonzero_ratio} (must be in (0, 1])")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, prunable=None)
        self._check_hyperparameters(defaults)
        self.nonzero_ratio = nonzero_ratio
        self.last_threshold: Optional[Tensor] = None
        self._last_mask: Optional[Tensor] = None
        self._last_num_ranked = 0
        self._selection = GlobalSelection()
        super().__init__(params, defaults)
        if any(p.device.type == "cpu" for g in self.param_groups for p in g["params"]):
            flush_denormals()

    @staticmethod
    def _check_hyperparameters(group: Dict[str, Any]) -> None:
        if group["lr"] < 0.0:
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']} (must be in [0, 1))")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if group["nesterov"] and group["momentum"] == 0.0:
            raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum > 0")
        if group["prunable"] not in (None, True, False):
            raise ValueError(f"Invalid prunable: {group['prunable']} (must be True, False or None)")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_hyperparameters(self.param_groups[-1])

    @staticmethod
    def is_prunable(group: Dict[str, Any], p: Tensor) -> bool:
        """Whether `p` of `group` takes part in the ranking: the group's `prunable`, else `p.dim() > 1`."""
        return p.dim() > 1 if group["prunable"] is None else bool(group["prunable"])

    @property
    def num_prunable(self) -> int:
        """N, the number of prunable elements over all param groups."""
        return sum(p.numel() for g in self.param_groups for p in g["params"] if self.is_prunable(g, p))

    @property
    def keep_count(self) -> int:
        """Q, the number of prunable elements that receive loss gradients each step."""
        return keep_count(self.num_prunable, self.nonzero_ratio)

    @property
    def num_active(self) -> int:
        """How many prunable elements received loss gradients in the last step."""
        if self._last_mask is None:
            return self._last_num_ranked
        return int(self._last_mask.sum())

    def _select(self) -> Dict[Tensor, Tensor]:
        """Rank the prunable elements that have gradients; return {param: masked loss gradient} for those
        masked (new tensors, which the update may change in place)."""
        ranked = [p for g in self.param_groups for p in g["params"]
                  if p.grad is not None and self.is_prunable(g, p)]
        self._last_num_ranked = sum(p.numel() for p in ranked)
        self.last_threshold, self._last_mask = None, None
        q = self.keep_count
        if not ranked or q >= self._last_num_ranked:
            return {}
        if any(p.grad.is_sparse for p in ranked):
            raise RuntimeError("GSM does not support sparse gradients")
        self.last_threshold, self._last_mask, directions = self._selection(ranked, [p.grad for p in ranked], q)
        return dict(zip(ranked, directions))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one GSM step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masked = self._select()
        for group in self.param_groups:
            params: List[Tensor] = []
            directions: List[Tensor] = []
            owned: List[bool] = []  # whether a direction is this step's own tensor (not p.grad)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GSM does not support sparse gradients")
                params.append(p)
                direction = masked.get(p)
                directions.append(p.grad if direction is None else direction)
                owned.append(direction is not None)
            if params:
                self._update(group, params, directions, owned)
        return loss

    def _update(self, group: Dict[str, Any], params: List[Tensor], directions: List[Tensor],
                owned: List[bool]) -> None:
        """The momentum-SGD update of `params` along `directions` (the masked loss gradients); `owned`
        directions may be updated in place, the others are the parameters' gradients and are left alone."""
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if weight_decay != 0.0:
            # d = mask * g + wd * w, in place where d is already a new tensor (the masked gradient).
            mine = [i for i, own in enumerate(owned) if own]
            if mine:
                torch._foreach_add_([directions[i] for i in mine], [params[i] for i in mine], alpha=weight_decay)
            theirs = [i for i, own in enumerate(owned) if not own]
            if theirs:
                added = torch._foreach_add([directions[i] for i in theirs], [params[i] for i in theirs],
                                           alpha=weight_decay)
                for i, d in zip(theirs, added):
                    directions[i] = d
            owned = [True] * len(params)
        if momentum != 0.0:
            buffers = []
            old_buffers, old_directions = [], []
            for p, d in zip(params, directions):
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = torch.clone(d).detach()
                    state["momentum_buffer"] = buf
                else:
                    old_buffers.append(buf)
                    old_directions.append(d)
                buffers.append(buf)
            if old_buffers:
                torch._foreach_mul_(old_buffers, momentum)
                torch._foreach_add_(old_buffers, old_directions)
            if group["nesterov"] and all(owned):
                torch._foreach_add_(directions, buffers, alpha=momentum)
            elif group["nesterov"]:
                directions = torch._foreach_add(directions, buffers, alpha=momentum)
            else:
                directions = buffers
        torch._foreach_add_(params, directions, alpha=-lr)

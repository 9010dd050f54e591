"""The Global Sparse Momentum SGD optimizer."""
import math
import numbers
import os
import sys
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from gsm.wrappers import unwrap_model
from gsm import host_kernels, sharded
from gsm.denormals import flush_denormals
from gsm.pruning import global_magnitude_mask
from gsm.selection import GlobalSelection, Selection, check_nonzero_ratio, keep_count


def _user_stacklevel() -> int:
    """The `warnings.warn` stacklevel, for a warning issued by the caller of this function, that names the first
    frame outside this module and torch: the user's line that called `step`, however torch wraps it."""
    internal = (os.path.abspath(__file__), os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (frame.f_code.co_filename == internal[0]
                                        or frame.f_code.co_filename.startswith(internal[1])):
        frame, level = frame.f_back, level + 1
    return level


def _refuse_flat(p: Tensor) -> None:
    """FSDP1's flat parameters concatenate parts of many parameters, padded, in one tensor per rank: GSM cannot
    tell which elements are prunable or rank them with the other ranks' elements. Refused with a ValueError
    (FSDP2's DTensor parameters are ranked over all ranks: `gsm.sharded`)."""
    if getattr(p, "_is_flat_param", False):
        raise ValueError("GSM cannot optimise an FSDP flat parameter: its global ranking needs whole parameters "
                         "or DTensor shards. Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard), or "
                         "train with DistributedDataParallel (gradients are averaged before GSM ranks them)")


def _refuse_shared_memory(params: List[Tensor]) -> None:
    """Distinct parameters must not share storage: their updates would read and write the same memory (on the
    host path from several threads at once, with results that change from run to run). ValueError."""
    seen: Dict[int, int] = {}
    for i, p in enumerate(params):
        if p.numel() == 0 or p.is_meta:
            continue
        address = p.untyped_storage().data_ptr()
        if address in seen:
            raise ValueError(f"GSM: parameters {seen[address]} {tuple(params[seen[address]].shape)} and {i} "
                             f"{tuple(p.shape)} (in param group order) share memory; give each parameter storage "
                             f"of its own (tie weights by using one Parameter in both places)")
        seen[address] = i


def _check_step_state(p: Tensor, buffer: Any) -> None:
    """What a step will use with `p`, checked before it writes anything: a dense gradient of p's shape on p's
    device, and a momentum buffer (if any) of p's shape on p's device. RuntimeError, as torch.optim.SGD
    raises for a gradient or buffer that does not fit its parameter."""
    grad, shape, on_cpu = p.grad, p.shape, p.is_cpu
    if grad.is_sparse:
        raise RuntimeError("GSM does not support sparse gradients")
    if grad.shape != shape or not (on_cpu and grad.is_cpu or grad.device == p.device):
        raise RuntimeError(f"GSM: a gradient {tuple(grad.shape)} on {grad.device} does not fit its parameter "
                           f"{tuple(shape)} on {p.device}")
    if buffer is None:
        return
    if not isinstance(buffer, Tensor):
        raise RuntimeError(f"GSM: the momentum buffer of a parameter {tuple(shape)} is a {type(buffer).__name__}, "
                           f"not a tensor")
    if buffer.shape != shape or buffer.is_sparse or not (on_cpu and buffer.is_cpu or buffer.device == p.device):
        raise RuntimeError(f"GSM: the momentum buffer {tuple(buffer.shape)} on {buffer.device} does not fit its "
                           f"parameter {tuple(shape)} on {p.device}")


def _check_loadable(optimizer: "GSM", state_dict: Any) -> None:
    """Refuse, in one line (ValueError), an optimizer state that GSM's load_state_dict should not load into
    `optimizer`: not a GSM state, invalid hyperparameters, or per-parameter state that does not fit the
    parameters it would be given to."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError("GSM.load_state_dict: not an optimizer state (a dict with 'state' and 'param_groups')")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups) or any(
            not isinstance(saved, dict) or not isinstance(saved.get("params"), list)
            or len(saved["params"]) != len(group["params"])
            for saved, group in zip(saved_groups, optimizer.param_groups)):
        raise ValueError(f"GSM.load_state_dict: the state's param groups (sizes "
                         f"{[len(g.get('params', ())) if isinstance(g, dict) else '?' for g in saved_groups]}) do not "
                         f"match this optimizer's ({[len(g['params']) for g in optimizer.param_groups]})")
    ratios = set()
    for index, saved in enumerate(saved_groups):
        if "prunable" not in saved:
            raise ValueError(f"GSM.load_state_dict: param group {index} has no 'prunable': a state of another "
                             f"optimizer (torch.optim.SGD's?), which GSM does not load")
        try:
            GSM._check_hyperparameters({"nonzero_ratio": optimizer.nonzero_ratio, **saved})
        except (ValueError, KeyError) as exc:
            raise ValueError(f"GSM.load_state_dict: param group {index} of the state: {exc}") from None
        ratios.add(saved.get("nonzero_ratio", optimizer.nonzero_ratio))
    if len(ratios) > 1:
        raise ValueError(f"GSM.load_state_dict: the state's param groups have different nonzero_ratio {sorted(ratios)}")
    saved_ids = [i for saved in saved_groups for i in saved["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(set(saved_ids)) != len(saved_ids):
        raise ValueError("GSM.load_state_dict: the state lists a parameter twice")
    by_id = dict(zip(saved_ids, params))
    for key, value in state_dict["state"].items():
        p = by_id.get(key)
        if p is None:
            raise ValueError(f"GSM.load_state_dict: the state has an entry for {key!r}, which is no parameter of "
                             f"its param groups")
        if not isinstance(value, dict) or not set(value) <= {"momentum_buffer"}:
            names = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"GSM.load_state_dict: parameter {saved_ids.index(key)} {tuple(p.shape)} has state "
                             f"{names}; GSM keeps only a momentum_buffer")
        buffer = value.get("momentum_buffer")
        if buffer is not None and (not isinstance(buffer, Tensor) or buffer.shape != p.shape
                                   or not buffer.is_floating_point() or buffer.is_sparse):
            found = (f"{tuple(buffer.shape)} {buffer.dtype}" if isinstance(buffer, Tensor)
                     else type(buffer).__name__)
            raise ValueError(f"GSM.load_state_dict: the momentum buffer of parameter {saved_ids.index(key)} is "
                             f"{found}, its parameter {tuple(p.shape)} {p.dtype}")


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

    :math:`N` counts every element of the prunable parameters of the param groups, whether or not they have a
    gradient in a step; only those with a gradient are ranked. Leave frozen or unused parameters out of the
    optimizer (or in a group with ``prunable=False``): when the ranked elements number :math:`Q` or fewer, every
    one of them gets its gradient and the step is plain SGD (a warning says so, once, unless
    ``nonzero_ratio=1`` asked for SGD). Non-prunable elements use :math:`M = 1`. Weight decay and momentum act
    on every weight, so the elements outside the mask only decay (and coast on their momentum) towards zero;
    after training the model is hard-pruned to the Q largest magnitudes. The metric uses the loss gradient
    before weight decay because it estimates how much the loss would change if the weight were removed
    (first-order Taylor), which weight decay does not affect. With ``nonzero_ratio=1`` this is exactly
    ``torch.optim.SGD``.

    The metric is computed in float32 (for float16 and bfloat16 parameters too, whose products would
    underflow to ties at zero), and a NaN metric ranks above every number, as in ``torch.topk``: a non-finite
    gradient reaches the weights, as it does with SGD, so that a training loop's non-finite check sees it.

    The update follows ``torch.optim.SGD``'s arithmetic on :math:`d`. On the CPU, for float32 parameters, two
    compiled kernels (:mod:`gsm.host_kernels`, built with the package) do the work in two passes: one collects
    the few metrics above a bound derived from the previous steps' thresholds, among which :math:`\tau` is
    found, and one applies the update, recomputing :math:`M` element by element, so that a GSM step costs
    about what an SGD step costs. Elsewhere (GPUs, other dtypes and layouts, no C compiler at install) the step
    takes the generic path: a few multi-tensor operations that build :math:`M` and :math:`d`, the same up to
    rounding.

    DTensor parameters, as FSDP2's ``fully_shard`` makes them, are ranked over all ranks (:mod:`gsm.sharded`):
    each rank ranks its shards and the ranks sum the selection's counts, so that every rank keeps what
    unsharded GSM keeps. ``torch.compile`` traces a step whole, on the generic path.

    Every step checks every parameter, gradient and momentum buffer before anything is written: a gradient
    or a buffer of another shape or device than its parameter raises RuntimeError, as do sparse gradients,
    and parameters that share memory are refused (ValueError) when added and at each step (their updates
    would race on the host path).

    Args:
        params: parameters or param groups; a group may set ``lr``, ``momentum``, ``weight_decay``,
            ``nesterov`` and ``prunable`` (True/False for the whole group; default: ``dim() > 1``).
        lr: learning rate :math:`\eta`.
        momentum: momentum factor :math:`\beta` in [0, 1).
        nonzero_ratio: fraction of prunable elements that receive loss gradients, in (0, 1];
            1 / compression ratio. One value for all param groups (it is stored in each, so that
            ``state_dict`` carries it and ``load_state_dict`` restores it, as it restores ``lr``).
        weight_decay: L2 penalty :math:`\lambda`.
        nesterov: use Nesterov momentum.
        fused: the compiled host kernels for every parameter (True: an error where they cannot be used), never
            (False), or wherever they can be (None, the default).

    On the CPU the constructor turns on flush-to-zero for subnormal floats on every thread of torch
    (:func:`gsm.flush_denormals`): the passive weights decay towards 1e-35, and x86 processors compute the
    subnormal products they make many times slower; flushing changes only values below 1.2e-38. Training
    with another optimizer on the same weights (a ticket's retrain with SGD) gains from it too.

    After each step, ``last_threshold`` holds :math:`\tau` (a 0-d tensor; ``None`` when every element was
    active), ``num_active`` the number of prunable elements that received gradients (reading it
    synchronises with the device), and ``last_step_fused`` whether the step ran in the compiled kernels.
    """

    def __init__(self, params: Iterable[Union[Tensor, Dict[str, Any]]], lr: float, momentum: float = 0.9,
                 nonzero_ratio: Optional[float] = None, weight_decay: float = 0.0,
                 nesterov: bool = False, *, fused: Optional[bool] = None) -> None:
        if nonzero_ratio is None:
            raise ValueError("nonzero_ratio is required: 1 / compression ratio, in (0, 1]")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused} (must be True, False or None)")
        if fused and not host_kernels.available():
            raise RuntimeError(f"GSM(fused=True): the compiled host kernels are unavailable: {host_kernels.status()}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, prunable=None,
                        nonzero_ratio=nonzero_ratio)
        self._check_hyperparameters(defaults)
        self.fused = fused
        # What the last step found: in a dict, because torch.compile keeps a traced step's changes to a dict but
        # not to the optimizer's attributes.
        self._last: Dict[str, Any] = dict(threshold=None, fused=None, selection=None, ranked=0, host_active=0,
                                          warned_all_active=False)
        self._selection = GlobalSelection()
        self._reduce = None  # sums the selection's counts over the ranks of sharded parameters
        super().__init__(params, defaults)
        if any(p.device.type == "cpu" for g in self.param_groups for p in g["params"]):
            flush_denormals()
            if fused is None and not host_kernels.available():
                warnings.warn(f"GSM: the compiled host kernels are unavailable: {host_kernels.status()}. CPU steps take "
                              f"the generic path, which is slower", RuntimeWarning, stacklevel=2)

    @staticmethod
    def _check_hyperparameters(group: Dict[str, Any]) -> None:
        for name in ("lr", "momentum", "weight_decay"):
            value = group.get(name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
                raise ValueError(f"Invalid {name}: {value!r} (must be a number)")
        if group["lr"] < 0.0:
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']} (must be in [0, 1))")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if group.get("nesterov") not in (True, False):
            raise ValueError(f"Invalid nesterov: {group.get('nesterov')!r} (must be True or False)")
        if group["nesterov"] and group["momentum"] == 0.0:
            raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum > 0")
        if group.get("prunable", None) not in (None, True, False):
            raise ValueError(f"Invalid prunable: {group['prunable']!r} (must be True, False or None)")
        check_nonzero_ratio(group["nonzero_ratio"])

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group (see Optimizer.add_param_group); an invalid one raises and is not added."""
        if self.param_groups and "nonzero_ratio" in param_group \
                and param_group["nonzero_ratio"] != self.param_groups[0]["nonzero_ratio"]:
            raise ValueError("nonzero_ratio is one value for all param groups: GSM ranks them together")
        super().add_param_group(param_group)
        try:
            self._check_hyperparameters(self.param_groups[-1])
            for p in self.param_groups[-1]["params"]:
                _refuse_flat(p)
            everything = [p for g in self.param_groups for p in g["params"]]
            self._reduce = sharded.count_reducer(everything)
            if self._reduce is not None and self.fused:
                raise ValueError("GSM(fused=True) takes whole CPU tensors, not DTensors: leave fused unset")
            _refuse_shared_memory([sharded.local(p) for p in everything])
            if self.fused:
                for p in self.param_groups[-1]["params"]:
                    if not (p.is_cpu and p.dtype is torch.float32 and host_kernels.is_dense(p)):
                        raise RuntimeError(f"GSM(fused=True) takes dense float32 CPU parameters, not "
                                           f"{tuple(p.shape)} {p.dtype} on {p.device}")
        except (ValueError, RuntimeError):
            self.param_groups.pop()
            raise

    @property
    def nonzero_ratio(self) -> float:
        """The fraction of prunable elements that receive loss gradients: 1 / compression ratio."""
        return self.param_groups[0]["nonzero_ratio"] if self.param_groups else self.defaults["nonzero_ratio"]

    @staticmethod
    def is_prunable(group: Dict[str, Any], p: Tensor) -> bool:
        """Whether `p` of `group` takes part in the ranking: the group's `prunable`, else `p.dim() > 1`."""
        return p.dim() > 1 if group["prunable"] is None else bool(group["prunable"])

    def prunable_names(self, model: nn.Module) -> List[str]:
        """The names, in `model` (possibly wrapped in DDP or torch.compile: plain names), of the parameters this
        optimizer ranks, in the model's order: what the hard prune and the sparsity report should count, so that
        the prune keeps what GSM trained for, whatever the param groups say about `prunable`."""
        ranked = {id(p) for g in self.param_groups for p in g["params"] if self.is_prunable(g, p)}
        return [name for name, p in unwrap_model(model).named_parameters() if id(p) in ranked]

    def hard_mask(self, model: nn.Module) -> Dict[str, Tensor]:
        """The hard prune's mask (docs/design.md, section 1) of `model` over this optimizer's prunable parameters at its
        nonzero_ratio: {plain parameter name: bool tensor}."""
        return global_magnitude_mask(model, self.nonzero_ratio, names=self.prunable_names(model))

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
        selection = self._last["selection"]
        if selection is None:
            return self._last["ranked"]
        if selection.masked_grads is None:  # the host path: counted by the update
            return self._last["host_active"]
        return selection.num_active

    @property
    def last_threshold(self) -> Optional[Tensor]:
        """tau of the last step (a 0-d tensor), or None when every ranked element took its gradient."""
        return self._last["threshold"]

    @property
    def last_step_fused(self) -> Optional[bool]:
        """Whether the last step ran in the compiled host kernels (None before a step with gradients)."""
        return self._last["fused"]

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state saved by GSM's `state_dict` (see Optimizer.load_state_dict), after checking it against
        this optimizer's parameters: a state of another optimizer (torch.optim.SGD's groups have no
        ``prunable``), invalid hyperparameters, or a momentum buffer that does not fit its parameter raise
        ValueError in one line and leave the optimizer as it was. The saved ``nonzero_ratio`` is restored, as
        the saved ``lr`` is; a state saved before it was stored keeps this optimizer's."""
        _check_loadable(self, state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("nonzero_ratio", self.defaults["nonzero_ratio"])

    def _work(self) -> Tuple[List[Tuple[Dict[str, Any], Tensor]], List[Tensor], int]:
        """(group, parameter) for every parameter with a gradient, the prunable ones among them (to rank), and N,
        the prunable elements of all groups."""
        work, ranked, num_prunable = [], [], 0
        for group in self.param_groups:
            for p in group["params"]:
                prunable = self.is_prunable(group, p)
                if prunable:
                    num_prunable += p.numel()
                if p.grad is not None:
                    work.append((group, p))
                    if prunable:
                        ranked.append(p)
        return work, ranked, num_prunable

    def _warn_all_active(self, num_ranked: int, q: int, num_prunable: int) -> None:
        """Warn once that GSM was meant to mask (Q < N) yet every ranked element gets its gradient."""
        if self._last["warned_all_active"] or q >= num_prunable:
            return
        self._last["warned_all_active"] = True
        warnings.warn(
            f"GSM: only {num_ranked} prunable elements have gradients, no more than Q = {q} "
            f"(1/{1 / self.nonzero_ratio:g} of the {num_prunable} prunable elements of the param "
            f"groups, counted with or without gradients), so every ranked element gets its gradient: "
            f"this step is plain SGD. Leave parameters that get no gradient (frozen, unused) out of the "
            f"optimizer, or mark their group prunable=False", RuntimeWarning, stacklevel=_user_stacklevel())

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one GSM step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, ranked, num_prunable = self._work()
        num_ranked = sum(p.numel() for p in ranked)
        last = self._last
        last.update(ranked=num_ranked, threshold=None, selection=None, host_active=0)
        q = keep_count(num_prunable, self.nonzero_ratio)
        masking = bool(ranked) and q < num_ranked
        if ranked and not masking:
            self._warn_all_active(num_ranked, q, num_prunable)

        # The path, decided here for the whole step: the kernels rank when every ranked tensor fits them, and
        # then update every tensor that fits; a step without masking is SGD's own arithmetic (torch's
        # multi-tensor ops) unless fused=True asks for the kernels.
        compiling = torch.compiler.is_compiling()  # traced by torch.compile: the generic path, whole
        fits = {p: self.fused is not False and not compiling and self._reduce is None and host_kernels.available()
                and host_kernels.fits(p, p.grad) for _, p in work}
        if self.fused and not all(fits.values()):
            p = next(p for p, fit in fits.items() if not fit)
            raise RuntimeError(f"GSM(fused=True): a parameter {tuple(p.shape)} and its gradient do not fit the host "
                               f"kernels (float32 CPU tensors, stored alike)")
        host_ranking = masking and q > 0 and all(fits[p] for p in ranked)
        in_kernels = host_ranking or bool(self.fused and not masking)
        kernel_work = sorted((item for item in work if in_kernels and fits[item[1]]),
                             key=lambda item: not (host_ranking and self.is_prunable(*item)))  # ranked first
        generic_work = [item for item in work if not (in_kernels and fits[item[1]])]

        # Everything checked before anything is written: the generic path's tensors as SGD checks them, the
        # kernels' tensors at their boundary (gsm.host_kernels), and no two parameters sharing memory.
        for _, p in generic_work:
            state = self.state.get(p)
            _check_step_state(p, None if state is None else state.get("momentum_buffer"))
        batch = None
        if kernel_work:
            params = [p for _, p in kernel_work]
            buffers = [self._momentum_buffer_like(p) if group["momentum"] != 0.0 else None for group, p in kernel_work]
            batch = host_kernels.Batch(params, [p.grad for p in params], buffers)
        if not compiling:  # storage addresses are not traced; the param groups were checked when added
            _refuse_shared_memory([sharded.local(p) for _, p in work])

        masked_grads: Dict[Tensor, Tensor] = {}
        if host_ranking:
            last["threshold"] = self._selection.threshold(batch, len(ranked), q)
            last["selection"] = Selection(last["threshold"])
        elif masking:
            selection = self._selection.masked([sharded.local(p) for p in ranked],
                                               [sharded.local(p.grad) for p in ranked], q, self._reduce)
            last.update(selection=selection, threshold=selection.threshold)
            masked_grads = dict(zip(ranked, selection.masked_grads))
        if batch is not None:
            tau = float(last["threshold"]) if host_ranking else -math.inf
            thresholds = [tau if host_ranking and self.is_prunable(group, p) else -math.inf for group, p in kernel_work]
            groups = [group for group, _ in kernel_work]
            active = batch.update(thresholds, [g["lr"] for g in groups], [g["momentum"] for g in groups],
                                  [g["weight_decay"] for g in groups], [g["nesterov"] for g in groups])
            last["host_active"] = sum(count for count, limit in zip(active, thresholds) if limit != -math.inf)
        for group in self.param_groups:
            entries = [(p, masked_grads[p] if p in masked_grads else sharded.local(p.grad), p in masked_grads)
                       for g, p in generic_work if g is group]
            if entries:
                params, directions, owned = (list(column) for column in zip(*entries))
                self._update(group, params, directions, owned)
        last["fused"] = None if not work else not generic_work
        return loss

    def _update(self, group: Dict[str, Any], params: List[Tensor], directions: List[Tensor],
                owned: List[bool]) -> None:
        """The momentum-SGD update of `params` along `directions` (the loss gradients, masked or not), in
        torch.optim.SGD's arithmetic; `owned` directions may be updated in place, the others are the
        parameters' gradients and are left alone. The directions are local tensors (a DTensor parameter's local
        shard), and so is the arithmetic; the state keeps the momentum buffers as the parameters are (DTensors
        for DTensor parameters), so that it saves and loads as torch's optimizers' does."""
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        keys, params = params, [sharded.local(p) for p in params]
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
            for key, d in zip(keys, directions):
                state = self.state[key]
                buf = state.get("momentum_buffer")
                if buf is None:
                    if sharded.is_sharded(key):
                        state["momentum_buffer"] = torch.zeros_like(key)
                        buf = sharded.local(state["momentum_buffer"]).copy_(d)
                    else:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    buf = sharded.local(buf)
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

    def _momentum_buffer_like(self, p: Tensor):
        """p's momentum buffer for the kernels, stored like p (a buffer of p's shape loaded in another memory
        layout, dtype or device is copied into p's); a new one is zero, which makes the first step's buffer d,
        as torch.optim.SGD's first buffer is. One of another shape, or not a tensor, is left for the kernels'
        checks to refuse (a copy would broadcast it)."""
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(p)
        elif isinstance(buf, Tensor) and buf.shape == p.shape and (
                buf.stride() != p.stride() or buf.dtype != p.dtype or buf.device != p.device):
            buf = state["momentum_buffer"] = torch.empty_like(p).copy_(buf)
        return buf

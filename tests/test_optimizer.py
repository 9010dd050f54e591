"""Tests for the GSM optimizer against torch.optim.SGD and against a brute-force (sorting) version of the rule
(docs/design.md, section 1)."""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gsm.selection as selection
from base_model import build_model
from gsm import GSM
from gsm.selection import FlatLayout, GlobalSelection, keep_count, kth_largest
from reference import reference_selection


# These models are tiny: one intra-op thread is fastest, and immune to a busy machine's contention.
pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------------------
# Small models and data


class TinyNet(nn.Module):
    """conv 2->4 (3x3) + BN + ReLU, fc 64->16, ReLU, fc 16->5: prunable 72 + 1024 + 80 elements."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_batch(generator: torch.Generator, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 2, 6, 6, generator=generator), torch.randint(0, 5, (batch,), generator=generator)


def random_model(seed: int) -> nn.Sequential:
    """A conv-BN-MLP whose widths depend on the seed; input [B, 2, 5, 5], 4 classes."""
    g = torch.Generator().manual_seed(seed)
    channels = int(torch.randint(2, 6, (1,), generator=g))
    hidden = int(torch.randint(6, 24, (1,), generator=g))
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.Flatten(),
        nn.Linear(channels * 25, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def random_batch(generator: torch.Generator, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 2, 5, 5, generator=generator), torch.randint(0, 4, (batch,), generator=generator)


def loss_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y) * scale
    loss.backward()
    return loss


def assert_same_weights(a: nn.Module, b: nn.Module, atol: Optional[float] = None) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if atol is None:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=0.0, atol=atol, msg=name)


# ----------------------------------------------------------------------------------------------------------
# Brute force: the rule with the tests' reference selection, independent of gsm.selection


class BruteForceGSM:
    """Each step: m = |w * g| over all prunable elements, sorted descending; tau = sorted[Q - 1]; mask = m >= tau;
    d = mask * g + wd * w; buf = beta * buf + d (buf = d first); w -= lr * buf (Nesterov: lr * (d + beta * buf))."""

    def __init__(self, groups: list[dict], nonzero_ratio: float, **defaults) -> None:
        self.groups = [{**dict(lr=None, momentum=0.0, weight_decay=0.0, nesterov=False, prunable=None),
                        **defaults, **g} for g in groups]
        self.nonzero_ratio = nonzero_ratio
        self.buffers: dict[nn.Parameter, torch.Tensor] = {}
        self.tau: Optional[torch.Tensor] = None
        self.masks: dict[nn.Parameter, torch.Tensor] = {}
        self.num_active = 0

    @staticmethod
    def _prunable(group: dict, p: torch.Tensor) -> bool:
        return p.dim() > 1 if group["prunable"] is None else group["prunable"]

    @torch.no_grad()
    def step(self) -> None:
        prunable = [p for g in self.groups for p in g["params"] if self._prunable(g, p)]
        ranked = [p for p in prunable if p.grad is not None]
        masks, self.tau = reference_selection(ranked, [p.grad for p in ranked], self.nonzero_ratio,
                                              sum(p.numel() for p in prunable))
        self.masks = dict(zip(ranked, masks))
        self.num_active = sum(int(m.sum()) for m in masks)
        for g in self.groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad * self.masks[p] if p in self.masks else p.grad.clone()  # (all True: SGD)
                if g["weight_decay"]:
                    d = torch.add(d, p, alpha=g["weight_decay"])
                if g["momentum"]:
                    if p not in self.buffers:
                        self.buffers[p] = d.clone()
                    else:
                        self.buffers[p].mul_(g["momentum"]).add_(d)
                    buf = self.buffers[p]
                    d = torch.add(d, buf, alpha=g["momentum"]) if g["nesterov"] else buf
                p.add_(d, alpha=-g["lr"])


def grouped(model: nn.Sequential, layout: str, lr: float) -> list[dict]:
    """Param groups of a `random_model`: one group, or four with their own lr, weight decay, momentum and
    prunable overrides (a prunable=False matrix, prunable=True biases)."""
    if layout == "single":
        return [{"params": list(model.parameters())}]
    conv, bn, fc1, fc2 = model[0], model[1], model[4], model[6]
    return [
        {"params": [conv.weight, fc1.weight]},
        {"params": [conv.bias, bn.weight, bn.bias], "lr": 2 * lr, "weight_decay": 0.0},
        {"params": [fc2.weight], "lr": 0.5 * lr, "weight_decay": 1e-3, "prunable": False, "momentum": 0.5},
        {"params": [fc1.bias, fc2.bias], "prunable": True, "lr": 1.5 * lr},
    ]


@pytest.fixture
def search_log(monkeypatch) -> list[tuple[int, int, int, int, bool]]:
    """Records (bounds given, candidates searched, numel, k, whether they overflowed the kept candidates' room)
    of every kth_largest call of the host search."""
    calls: list[tuple[int, int, int, int, bool]] = []
    original = selection.kth_largest

    def spy(candidates, k, bounds):
        tau, searched = original(candidates, k, bounds)
        calls.append((len(bounds), searched, candidates.numel, k, candidates.overflowed))
        return tau, searched

    monkeypatch.setattr(selection, "kth_largest", spy)
    return calls


# ----------------------------------------------------------------------------------------------------------
# nonzero_ratio = 1 is torch.optim.SGD


SGD_CASES = [
    dict(momentum=0.9, weight_decay=0.0, nesterov=False),
    dict(momentum=0.9, weight_decay=5e-4, nesterov=False),
    dict(momentum=0.9, weight_decay=0.0, nesterov=True),
    dict(momentum=0.99, weight_decay=1e-3, nesterov=True),
    dict(momentum=0.0, weight_decay=1e-3, nesterov=False),
]


@pytest.mark.parametrize("per_group", [False, True])
@pytest.mark.parametrize("case", SGD_CASES)
@pytest.mark.parametrize("foreach", [False, True])
def test_ratio_one_equals_sgd(case, per_group, foreach):
    torch.manual_seed(0)
    model_gsm = TinyNet()
    model_sgd = copy.deepcopy(model_gsm)

    def groups(m: TinyNet) -> list[dict]:
        if not per_group:
            return [{"params": list(m.parameters())}]
        return [{"params": [m.conv.weight, m.fc1.weight, m.fc2.weight]},
                {"params": [m.conv.bias, m.fc1.bias, m.fc2.bias], "lr": 0.1, "weight_decay": 0.0},
                {"params": [m.bn.weight, m.bn.bias], "lr": 0.02, "weight_decay": 2e-3}]

    gsm_opt = GSM(groups(model_gsm), lr=0.05, nonzero_ratio=1.0, **case)
    sgd_opt = torch.optim.SGD(groups(model_sgd), lr=0.05, foreach=foreach, **case)
    data = torch.Generator().manual_seed(1)
    for _ in range(50):
        x, y = tiny_batch(data)
        loss_backward(model_gsm, x, y)
        loss_backward(model_sgd, x, y)
        gsm_opt.step()
        sgd_opt.step()
        assert gsm_opt.last_threshold is None
        assert gsm_opt.num_active == gsm_opt.num_prunable == 72 + 1024 + 80
        assert_same_weights(model_gsm, model_sgd, atol=1e-7)
    if case["momentum"]:
        for p_gsm, p_sgd in zip(model_gsm.parameters(), model_sgd.parameters()):
            torch.testing.assert_close(gsm_opt.state[p_gsm]["momentum_buffer"],
                                       sgd_opt.state[p_sgd]["momentum_buffer"], rtol=0.0, atol=1e-7)
    # The run went somewhere: 50 steps moved the weights well away from their start.
    torch.manual_seed(0)
    assert (TinyNet().fc1.weight - model_gsm.fc1.weight).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Against the brute force, step by step


BRUTE_CASES = [
    # (momentum, weight decay, nesterov, group layout)
    (0.9, 1e-3, False, "single"),
    (0.9, 5e-4, True, "multi"),
    (0.0, 1e-2, False, "multi"),
    (0.98, 0.0, True, "single"),
]
# Loss scales per step: x100 at step 12 (the hint is far too low), back to 1 (far too high: fallback),
# x0.01 at step 24 (fallback), back to 1.
LOSS_SCALE = {12: 100.0, 24: 0.01}


def run_against_brute_force(model: nn.Module, layout: str, nonzero_ratio: float, momentum: float,
                            weight_decay: float, nesterov: bool, seed: int, steps: int = 36,
                            device: str = "cpu", fused: Optional[bool] = None) -> tuple[GSM, int]:
    """Train `model` with GSM (`fused` chooses its path) and a copy with BruteForceGSM on the same batches,
    asserting after every step that masks, thresholds, active counts and weights are identical. Returns the
    optimizer and the number of steps that started with a positive previous threshold."""
    lr = 0.02
    model = model.to(device)
    reference = copy.deepcopy(model)
    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    opt = GSM(grouped(model, layout, lr), nonzero_ratio=nonzero_ratio, fused=fused, **hyper)
    brute = BruteForceGSM(grouped(reference, layout, lr), nonzero_ratio, **hyper)
    prunable = [p for g in opt.param_groups for p in g["params"] if GSM.is_prunable(g, p)]
    assert opt.keep_count == int(nonzero_ratio * sum(p.numel() for p in prunable))
    data = torch.Generator().manual_seed(100 + seed)
    positive_thresholds = 0  # steps after which the optimizer has a hint (a zero threshold bounds nothing)
    for step in range(steps):
        positive_thresholds += step > 0 and bool(opt.last_threshold > 0)
        x, y = (t.to(device) for t in random_batch(data))
        scale = LOSS_SCALE.get(step, 1.0)
        loss_backward(model, x, y, scale)
        loss_backward(reference, x, y, scale)
        opt.step()
        brute.step()
        assert opt.num_active == brute.num_active, f"step {step}"
        assert opt.num_active >= opt.keep_count
        assert torch.equal(opt.last_threshold, brute.tau), f"step {step}"
        if opt.last_step_fused:
            # The host path rounds like numpy (torch's vectorised ops may fuse multiply-adds): equal up to
            # rounding. The reference then takes the optimizer's weights and buffers, so that every step's
            # selection is compared on equal inputs.
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name}, step {step}")
                if momentum:
                    torch.testing.assert_close(opt.state[p]["momentum_buffer"], brute.buffers[q], rtol=1e-5,
                                               atol=1e-6, msg=f"{name} buffer, step {step}")
                    brute.buffers[q] = opt.state[p]["momentum_buffer"].clone()
                with torch.no_grad():
                    q.copy_(p)
        else:  # the generic path computes exactly what the brute force computes
            assert_same_weights(model, reference)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.isfinite(p).all()
        if momentum:
            assert torch.equal(opt.state[p]["momentum_buffer"], brute.buffers[q])
    return opt, positive_thresholds


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("nonzero_ratio", [0.5, 0.1, 0.02])
@pytest.mark.parametrize("momentum,weight_decay,nesterov,layout", BRUTE_CASES)
def test_matches_brute_force(seed, nonzero_ratio, momentum, weight_decay, nesterov, layout, search_log):
    steps = 36
    _, positive_thresholds = run_against_brute_force(
        random_model(seed), layout, nonzero_ratio, momentum, weight_decay, nesterov, seed, steps)
    # Both paths of the threshold search ran: the bound narrowed the search, and bounds above the new
    # threshold fell back to the full search (at the step after the loss scale drops 100x).
    # (The optimizer's first step has no bound yet, nor has a step after a zero threshold.)
    hinted = [c for c in search_log if c[0]]
    assert len(search_log) == steps and len(hinted) == positive_thresholds > 0
    assert any(searched < numel for _, searched, numel, _, _ in hinted)
    assert any(searched == numel for _, searched, numel, _, _ in hinted)


@dataclass(frozen=True)
class Path:
    """Where a test runs GSM's selection: a device, and the optimizer's `fused` argument."""
    device: str
    fused: Optional[bool]

    @property
    def host(self) -> bool:
        """Whether it is the host path (the compiled kernels), which this suite's install always builds."""
        return self.device == "cpu" and self.fused is not False


@pytest.fixture(params=["host", "generic", "cuda"])
def selection_path(request, monkeypatch) -> Path:
    """Each selection path: the host path on the CPU (the compiled kernels); the generic path (multi-tensor
    kernels and torch's and numpy's operations, no compiled code of ours) chosen on the CPU with fused=False, as a
    CPU without the kernels runs it; and on a CUDA device where one exists (cuDNN made deterministic, so that two
    copies of a model get the same gradients)."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        return Path("cuda", None)
    return Path("cpu", None if request.param == "host" else False)


def channels_last_model(seed: int) -> nn.Sequential:
    """`random_model` with its conv weight stored channels_last, as the fast GPU path stores the ResNets."""
    model = random_model(seed).to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    return model


@pytest.mark.parametrize("make_model", [random_model, channels_last_model], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum,weight_decay,nesterov,layout", BRUTE_CASES[:2])
def test_both_selection_paths_match_brute_force(make_model, momentum, weight_decay, nesterov, layout,
                                                selection_path, search_log):
    opt, _ = run_against_brute_force(make_model(3), layout, 0.1, momentum, weight_decay, nesterov, seed=3,
                                     steps=30, device=selection_path.device, fused=selection_path.fused)
    assert opt.last_step_fused is selection_path.host
    if not selection_path.host:
        # On the CPU the generic path narrows its search to the metrics above the last thresholds' bound,
        # as the host path does; on a device it ranks every metric (no host synchronisation).
        assert bool(search_log) == (selection_path.device == "cpu")


def test_flat_metric_layouts_round_trip(selection_path):
    """The flat metric holds each tensor's |w * g| in memory order when w and g share a dense layout (no
    copies), else in logical order; the layout's views of it map it back element for element."""
    gen = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(selection_path.device)

    pairs = [
        (rand(4, 3, 2, 2), rand(4, 3, 2, 2)),  # contiguous
        (rand(4, 3, 2, 2).to(memory_format=torch.channels_last),
         rand(4, 3, 2, 2).to(memory_format=torch.channels_last)),  # dense, memory order differs from logical
        (rand(5, 3).t(), rand(5, 3).t()),  # transposed: dense
        (rand(6, 8)[:, ::2], rand(6, 4)),  # a strided slice: not dense
        (rand(5, 7), rand(7, 5).t()),  # dense, but not the same strides
    ]
    params, grads = [p for p, _ in pairs], [g for _, g in pairs]
    layout = FlatLayout(params, grads)
    metric = GlobalSelection().metric(params, grads)
    assert metric.numel() == layout.numel == sum(p.numel() for p in params)
    in_memory_order = [True, True, True, False, False]
    for view, p, g, same_order in zip(layout.views(metric), params, grads, in_memory_order):
        assert view.shape == p.shape and view.data_ptr() >= metric.data_ptr()
        assert torch.equal(view, (p * g).abs())
        assert (view.stride() == p.stride()) == (same_order or p.is_contiguous())
    # The selection follows the same layouts (the mixed layouts take the generic path).
    chosen = GlobalSelection()(params, grads, metric.numel() // 3, fused=selection_path.fused)
    assert chosen.masked_grads is not None
    assert chosen.num_active == metric.numel() // 3  # no ties among random products
    for d, p, g in zip(chosen.masked_grads, params, grads):
        assert torch.equal(d, g * ((p * g).abs() >= chosen.threshold))


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per tensor (CPU)", "whole buffer (devices)"])
def test_masked_gradients_are_built_in_the_metric_buffer(per_tensor):
    """Both ways of turning the metric's buffer into the masked gradients (the device's runs here on the CPU too):
    g where |w * g| >= tau and 0 elsewhere, NaN metrics kept, in each tensor's layout."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(6, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last),
              torch.randn(40, 7, generator=gen), torch.randn(9, 4, generator=gen)[:, ::2]]
    grads = [torch.randn(p.shape, generator=gen).to(memory_format=torch.channels_last) if i == 0
             else torch.randn(p.shape, generator=gen) for i, p in enumerate(params)]
    grads[1][0, :3] = float("nan")
    chooser = GlobalSelection()
    metric = chooser.metric(params, grads)
    threshold_bits = metric.view(torch.int32).kthvalue(metric.numel() - 30).values
    tau = threshold_bits.view(torch.float32)
    expected = [g * ((p * g).abs() >= tau) for p, g in zip(params, grads)]
    expected[1][0, :3] = float("nan")  # a NaN metric ranks above tau: its NaN gradient is kept
    selection._mask_into_metric(metric, chooser._metric_views, grads, threshold_bits, per_tensor)
    for view, e in zip(chooser._metric_views, expected):
        assert torch.equal(view.isnan(), e.isnan()) and torch.equal(view.nan_to_num(), e.nan_to_num())


def chosen_masks(chosen: selection.Selection, params: list[torch.Tensor], grads: list[torch.Tensor]):
    """A selection's active elements as bool masks shaped like `params`: the metrics at or above its threshold (the
    rule both paths apply element by element)."""
    return [(p * g).abs() >= chosen.threshold for p, g in zip(params, grads)]


def test_selection_buffers_follow_layout_changes(selection_path):
    """The selection follows a tensor's layout from step to step (here the conv weight switches between
    contiguous and channels_last): the generic path lays its flat buffers out again, the host path walks memory."""
    gen = torch.Generator().manual_seed(12)
    chooser = selection.GlobalSelection()
    for memory_format in (torch.contiguous_format, torch.contiguous_format, torch.channels_last,
                          torch.channels_last, torch.contiguous_format):
        conv, conv_grad = (torch.randn(6, 3, 3, 3, generator=gen).to(selection_path.device,
                                                                      memory_format=memory_format)
                           for _ in range(2))
        linear, linear_grad = (torch.randn(10, 20, generator=gen).to(selection_path.device) for _ in range(2))
        params, grads = [conv, linear], [conv_grad, linear_grad]
        chosen = chooser(params, grads, 37, fused=selection_path.fused)
        assert chooser.on_host_path == selection_path.host
        if not chooser.on_host_path:  # the conv's segment of the flat buffers follows its layout
            assert chooser._layout.segments[0][1] == conv.stride()
        assert (chosen.masked_grads is None) == chooser.on_host_path
        expected, _ = reference_selection(params, grads, 37.5 / 362)  # Q = int(37.5 / 362 * 362) = 37
        masks = chosen_masks(chosen, params, grads)
        assert sum(int(m.sum()) for m in masks) == sum(int(m.sum()) for m in expected) == 37
        for mask, m in zip(masks, expected):
            assert torch.equal(mask, m)
        if chosen.masked_grads is not None:
            for d, g, m in zip(chosen.masked_grads, grads, expected):
                assert torch.equal(d, g * m)


def test_fallback_after_threshold_drop(search_log):
    """Metrics 2x and 100x smaller than the last step's: the bound admits fewer than Q candidates; a bound 4x
    lower catches the first drop, and the second falls back to the whole vector. Each step still finds the
    exact k-th largest."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(50, 40))
    opt = GSM([w], lr=0.0, momentum=0.0, nonzero_ratio=0.05)
    base = torch.randn(50, 40)
    scales = [1.0, 1.0, 0.5, 0.5, 0.005, 0.005, 0.5]
    for step, scale in enumerate(scales):
        w.grad = base * scale * (1 + 0.01 * step)
        bound = opt._selection.search.bound()
        opt.step()
        metric = (w * w.grad).abs().reshape(-1)
        expected = torch.sort(metric, descending=True).values[opt.keep_count - 1]
        assert torch.equal(opt.last_threshold, expected)
        searched = search_log[-1][1]
        if step == 2:  # the first bound admits too few; the retry, 4x lower, is the one searched
            assert int((metric >= bound).sum()) < opt.keep_count
            assert searched == int((metric >= bound * 0.25).sum()) < 2000
        if step == 4:
            assert searched == 2000  # the 200x drop: the full search
    assert [c[0] for c in search_log] == [0, 2, 2, 2, 2, 2, 2]
    assert search_log[1][1] < 2000  # a narrowed search
    assert search_log[5][1] < 2000
    assert search_log[6][1] < 2000  # a 100x jump up: the bound is low, the candidates many but still a subset


# ----------------------------------------------------------------------------------------------------------
# Ties, global selection, what is never masked


def integer_tensor(generator: torch.Generator, shape, low: int, high: int) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=generator).float()


@pytest.mark.parametrize("nonzero_ratio", [0.3, 0.55])
def test_ties_at_threshold_are_all_kept(nonzero_ratio):
    """|w * g| of small integers has many ties: every element equal to tau is active, so more than Q are."""
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 6, bias=False))
    reference = copy.deepcopy(model)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = GSM(model.parameters(), nonzero_ratio=nonzero_ratio, **hyper)
    brute = BruteForceGSM([{"params": list(reference.parameters())}], nonzero_ratio, **hyper)
    prunable = [model[0].weight, model[1].weight]
    data = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p, q in zip(model.parameters(), reference.parameters()):
            w, g = integer_tensor(data, p.shape, -3, 4), integer_tensor(data, p.shape, -3, 4)
            with torch.no_grad():
                p.copy_(w)
                q.copy_(w)
            p.grad, q.grad = g.clone(), g.clone()
        masks, _ = reference_selection(prunable, [p.grad for p in prunable], nonzero_ratio)
        opt.step()
        brute.step()
        assert opt.num_active > opt.keep_count  # the ties at tau
        assert opt.num_active == brute.num_active == sum(int(m.sum()) for m in masks)
        assert torch.equal(opt.last_threshold, brute.tau)
        assert float(brute.tau) == int(brute.tau)
        assert_same_weights(model, reference, atol=1e-6)  # the host path rounds in its own order


def test_zero_threshold_activates_everything():
    """When fewer than Q metrics are positive, tau = 0 and m >= 0 holds for every element."""
    w = nn.Parameter(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0]]))
    w.grad = torch.ones(2, 4)
    opt = GSM([w], lr=0.5, momentum=0.0, nonzero_ratio=0.5)  # Q = 4 > 3 positive metrics
    opt.step()
    assert float(opt.last_threshold) == 0.0
    assert opt.num_active == 8
    assert torch.equal(w.detach(), torch.tensor([[0.5, -0.5, 1.5, -0.5], [-0.5, 2.5, -0.5, -0.5]]))


def test_keep_count_zero_masks_every_prunable_element():
    torch.manual_seed(0)
    model = nn.Linear(10, 10)
    before = model.weight.detach().clone()
    bias_before = model.bias.detach().clone()
    opt = GSM(model.parameters(), lr=0.5, momentum=0.0, weight_decay=0.25, nonzero_ratio=0.005)  # Q = 0
    loss_backward(model, torch.randn(4, 10), torch.randint(0, 10, (4,)))
    bias_grad = model.bias.grad.clone()
    opt.step()
    assert opt.keep_count == 0 and opt.num_active == 0 and opt.last_threshold is None
    assert torch.equal(model.weight.detach(), before - 0.5 * (0.25 * before))
    assert torch.equal(model.bias.detach(), bias_before - 0.5 * (bias_grad + 0.25 * bias_before))


@pytest.mark.parametrize("extra", [0, 5])
def test_selection_is_global_not_per_layer(extra):
    """Layer A's metrics dwarf layer B's: all Q go to A (a per-layer rule would give B its share);
    with Q = |A| + extra, B gets exactly `extra`."""
    gen = torch.Generator().manual_seed(7)
    big = nn.Parameter(torch.randn(20, 10, generator=gen) * 10)
    small = nn.Parameter(torch.randn(30, 10, generator=gen) * 0.1)
    grads = [torch.randn(20, 10, generator=gen) * 10, torch.randn(30, 10, generator=gen) * 0.1]
    q = 150 if extra == 0 else 200 + extra
    nonzero_ratio = (q + 0.5) / 500
    assert keep_count(500, nonzero_ratio) == q
    before = [big.detach().clone(), small.detach().clone()]
    big.grad, small.grad = grads[0].clone(), grads[1].clone()
    masks, _ = reference_selection([big, small], grads, nonzero_ratio)
    opt = GSM([big, small], lr=1.0, momentum=0.0, nonzero_ratio=nonzero_ratio)
    opt.step()
    expected_counts = [min(q, 200), extra]
    assert [int(m.sum()) for m in masks] == expected_counts
    # The optimizer's own selection, seen in which elements moved (momentum 0, no weight decay).
    moved = [int((p.detach() != b).sum()) for p, b in zip([big, small], before)]
    assert moved == expected_counts
    assert opt.num_active == q
    # The moved elements are exactly those of the brute-force mask.
    metric = torch.cat([(b * g).abs().reshape(-1) for b, g in zip(before, grads)])
    tau = torch.sort(metric, descending=True).values[q - 1]
    for p, b, g in zip([big, small], before, grads):
        assert torch.equal(p.detach() != b, (b * g).abs() >= tau)


def test_biases_and_batchnorm_are_never_masked():
    """With a tiny nonzero_ratio, biases and BN parameters follow plain SGD (same momentum and decay; on the
    CPU's host path the compiled update rounds like numpy, torch's vectorised SGD may fuse multiply-adds)."""
    torch.manual_seed(0)
    model_gsm = TinyNet()
    model_sgd = copy.deepcopy(model_gsm)
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    gsm_opt = GSM(model_gsm.parameters(), nonzero_ratio=0.002, **hyper)
    sgd_opt = torch.optim.SGD(model_sgd.parameters(), **hyper)
    unmasked = ["conv.bias", "bn.weight", "bn.bias", "fc1.bias", "fc2.bias"]
    data = torch.Generator().manual_seed(2)
    for _ in range(10):
        # Start each step from the same weights, so that the gradients are the same.
        model_sgd.load_state_dict(model_gsm.state_dict())
        x, y = tiny_batch(data)
        loss_backward(model_gsm, x, y)
        loss_backward(model_sgd, x, y)
        gsm_opt.step()
        sgd_opt.step()
        assert gsm_opt.keep_count == 2 and 2 <= gsm_opt.num_active <= 3
        gsm_params, sgd_params = dict(model_gsm.named_parameters()), dict(model_sgd.named_parameters())
        for name in unmasked:
            torch.testing.assert_close(gsm_params[name], sgd_params[name], rtol=1e-6, atol=1e-8, msg=name)
        assert not torch.equal(gsm_params["fc1.weight"], sgd_params["fc1.weight"])


def test_passive_weights_only_decay():
    """Momentum 0: an inactive weight becomes w * (1 - lr * wd) exactly (dyadic values, so no rounding)."""
    gen = torch.Generator().manual_seed(5)
    w = nn.Parameter(torch.randint(-1000, 1000, (40, 25), generator=gen).float() / 1024)
    g = torch.randint(-1000, 1000, (40, 25), generator=gen).float() / 1024
    before = w.detach().clone()
    lr, wd = 0.5, 0.25
    opt = GSM([w], lr=lr, momentum=0.0, weight_decay=wd, nonzero_ratio=0.1)
    w.grad = g.clone()
    (mask,), _ = reference_selection([w], [g], 0.1)
    opt.step()
    passive = ~mask
    assert int(passive.sum()) == 1000 - opt.num_active > 800
    assert torch.equal(w.detach()[passive], before[passive] * (1 - lr * wd))
    assert torch.equal(w.detach()[mask], before[mask] - lr * (g[mask] + wd * before[mask]))


def test_passive_weights_coast_on_momentum():
    """A weight active at step 1 and passive at step 2 keeps moving by its momentum: buf = beta * buf + wd * w."""
    w = nn.Parameter(torch.tensor([[4.0, 1.0], [1.0, 1.0]]))
    opt = GSM([w], lr=0.5, momentum=0.5, weight_decay=0.0, nonzero_ratio=0.25)  # Q = 1
    w.grad = torch.tensor([[1.0, 0.5, ], [0.5, 0.5]])
    opt.step()  # only w[0, 0] is active: buf[0, 0] = 1
    assert torch.equal(w.detach(), torch.tensor([[3.5, 1.0], [1.0, 1.0]]))
    w.grad = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    opt.step()  # now only w[0, 1]: w[0, 0] coasts by lr * beta * 1 = 0.25
    assert torch.equal(w.detach(), torch.tensor([[3.25, 0.5], [1.0, 1.0]]))
    assert torch.equal(opt.state[w]["momentum_buffer"], torch.tensor([[0.5, 1.0], [0.0, 0.0]]))


# ----------------------------------------------------------------------------------------------------------
# Resume, closure, grads that are None


def test_state_dict_resume_is_exact():
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True, nonzero_ratio=0.1)
    torch.manual_seed(0)
    model = TinyNet()
    opt = GSM(model.parameters(), **hyper)
    data = torch.Generator().manual_seed(4)
    batches = [tiny_batch(data) for _ in range(12)]
    for x, y in batches[:5]:
        loss_backward(model, x, y)
        opt.step()
    for p in model.parameters():
        assert opt.state[p]["momentum_buffer"].shape == p.shape
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, saved)
    for x, y in batches[5:]:
        loss_backward(model, x, y)
        opt.step()

    saved.seek(0)
    checkpoint = torch.load(saved)
    torch.manual_seed(123)
    resumed = TinyNet()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = GSM(resumed.parameters(), **hyper)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    for p in resumed.parameters():
        assert "momentum_buffer" in resumed_opt.state[p]
    for x, y in batches[5:]:
        loss_backward(resumed, x, y)
        resumed_opt.step()
    assert_same_weights(model, resumed)

    # Without the optimizer state (fresh momentum) the run differs: the state is what made it exact.
    saved.seek(0)
    checkpoint = torch.load(saved)
    restarted = TinyNet()
    restarted.load_state_dict(checkpoint["model"])
    restarted_opt = GSM(restarted.parameters(), **hyper)
    for x, y in batches[5:]:
        loss_backward(restarted, x, y)
        restarted_opt.step()
    assert not torch.equal(restarted.fc1.weight, model.fc1.weight)


def test_step_with_closure_returns_its_loss():
    torch.manual_seed(0)
    model = TinyNet()
    opt = GSM(model.parameters(), lr=0.1, momentum=0.9, nonzero_ratio=0.5)
    x, y = tiny_batch(torch.Generator().manual_seed(0))
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        calls.append(loss)
        return loss

    before = model.fc1.weight.detach().clone()
    returned = opt.step(closure)
    assert len(calls) == 1 and returned is calls[0]
    assert returned.requires_grad  # computed with gradients enabled inside step's no_grad
    assert not torch.equal(model.fc1.weight, before)
    assert opt.num_active >= opt.keep_count == int(0.5 * (72 + 1024 + 80))
    assert opt.step() is None


def test_params_without_grad_are_skipped():
    torch.manual_seed(0)
    used, unused = nn.Linear(6, 4), nn.Linear(6, 4)
    sgd_used = copy.deepcopy(used)
    unused_before = [p.detach().clone() for p in unused.parameters()]
    opt = GSM(list(used.parameters()) + list(unused.parameters()), lr=0.1, momentum=0.9, weight_decay=1e-2,
              nonzero_ratio=1.0)
    sgd = torch.optim.SGD(sgd_used.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    for _ in range(3):
        loss_backward(used, x, y)
        loss_backward(sgd_used, x, y)
        opt.step()
        sgd.step()
    for p, before in zip(unused.parameters(), unused_before):
        assert p.grad is None
        assert torch.equal(p.detach(), before)
        assert p not in opt.state or "momentum_buffer" not in opt.state[p]
    assert_same_weights(used, sgd_used)


def test_params_without_grad_with_masking():
    """A masked step skips a grad-less parameter and ranks only the others."""
    gen = torch.Generator().manual_seed(9)
    a = nn.Parameter(torch.randn(10, 10, generator=gen))
    b = nn.Parameter(torch.randn(10, 10, generator=gen))
    b_before = b.detach().clone()
    a.grad = torch.randn(10, 10, generator=gen)
    opt = GSM([a, b], lr=0.1, momentum=0.0, nonzero_ratio=0.1)  # Q = 20 of N = 200
    opt.step()
    assert torch.equal(b.detach(), b_before)
    assert opt.num_active == 20


# ----------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-0.1), "learning rate"),
    (dict(momentum=-0.1), "momentum"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=1.5), "momentum"),
    (dict(nonzero_ratio=0.0), "nonzero_ratio"),
    (dict(nonzero_ratio=1.5), "nonzero_ratio"),
    (dict(nonzero_ratio=-0.1), "nonzero_ratio"),
    (dict(nonzero_ratio=None), "nonzero_ratio"),
    (dict(momentum=0.0, nesterov=True), "nesterov"),
    (dict(weight_decay=-1e-4), "weight_decay"),
])
def test_invalid_arguments(kwargs, name):
    args = dict(lr=0.1, momentum=0.9, nonzero_ratio=0.1, weight_decay=0.0, nesterov=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        GSM(nn.Linear(3, 3).parameters(), **args)


def test_nonzero_ratio_is_required():
    with pytest.raises(ValueError, match="nonzero_ratio"):
        GSM(nn.Linear(3, 3).parameters(), lr=0.1)


@pytest.mark.parametrize("override,name", [
    (dict(lr=-1.0), "learning rate"),
    (dict(momentum=1.0), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(momentum=0.0, nesterov=True), "nesterov"),
    (dict(prunable="yes"), "prunable"),
])
def test_invalid_param_group(override, name):
    layer = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=name):
        GSM([{"params": [layer.weight]}, {"params": [layer.bias], **override}], lr=0.1, momentum=0.9,
            nonzero_ratio=0.5)


def test_boundary_arguments_are_valid():
    params = list(nn.Linear(3, 3).parameters())
    GSM(params, lr=0.0, momentum=0.0, nonzero_ratio=1.0, weight_decay=0.0)
    opt = GSM(params, lr=0.1, momentum=0.999, nonzero_ratio=1e-9, nesterov=True)
    assert opt.keep_count == 0 and opt.num_prunable == 9


# ----------------------------------------------------------------------------------------------------------
# The operation count off the host, and the bounded search


class CountComputingOps(TorchDispatchMode):
    """Counts the ATen operations that compute (each one kernel launch on a GPU); views are free."""

    VIEWS = {"aten.as_strided", "aten.detach", "aten.slice", "aten.view", "aten._unsafe_view", "aten.alias"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func.overloadpacket) not in self.VIEWS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_accelerator_step_is_a_few_kernels_whatever_the_depth(memory_format):
    """Off the host (here the meta device: shapes only), a GSM step is a fixed number of operations: the
    metric, the mask and the update each take one or a few multi-tensor kernels, and the selection two rounds
    of a radix select (about 40 operations, most of them on its 2^15 and 2^16 counters), for 20 layers as for
    110, channels_last weights included (no per-parameter copies)."""
    counts = {}
    for name in ("rc20", "rc110"):
        model = build_model(name).to("meta").to(memory_format=memory_format)
        opt = GSM(model.parameters(), lr=0.01, momentum=0.98, weight_decay=1e-4, nonzero_ratio=0.1)
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        opt.step()  # the first step creates the momentum buffers
        with CountComputingOps() as ops:
            opt.step()
        counts[name] = ops.count
    assert counts["rc20"] == counts["rc110"] <= 60, counts


class NumpyCandidates:
    """A `selection.Candidates` in numpy: the values >= bound or NaN, selected by numpy's partition (which sorts
    NaN above every number); records the bounds it is given."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.numel = values.size
        self.bounds_seen: list[float] = []
        self.found = np.empty(0, dtype=np.float32)

    def collect(self, bound: float) -> int:
        self.bounds_seen.append(bound)
        self.found = self.values[~(self.values < bound)]
        return self.found.size

    def select(self, count: int, k: int) -> np.float32:
        assert count == self.found.size
        chosen = self.found.copy()
        chosen.partition(count - k)
        return chosen[count - k]


@pytest.mark.parametrize("n,k", [(1, 1), (10, 1), (10, 10), (1000, 3), (1000, 31), (1000, 32), (1000, 700),
                                 (5000, 156), (5000, 157)])
def test_kth_largest_equals_sorting(n, k):
    """The bounds in turn, then 0: the first that admits k is searched, whatever the others."""
    gen = np.random.default_rng(n + k)
    for values in (gen.random(n, dtype=np.float32), gen.integers(0, 5, n).astype(np.float32)):
        expected = np.sort(values)[::-1][k - 1]
        candidates = NumpyCandidates(values)
        count_at_least = lambda bound: int((values >= bound).sum())  # noqa: E731
        high = float(expected) + 1e-3  # admits fewer than k
        low = float(expected) * 0.9  # admits k or more
        for bounds, searched, tried in [((), n, 1), ((low,), count_at_least(low), 1), ((high,), n, 2),
                                        ((high, low), count_at_least(low), 2), ((high, high), n, 3)]:
            candidates.bounds_seen.clear()
            tau, searched_now = kth_largest(candidates, k, bounds)
            assert tau == expected
            assert searched_now == searched >= k
            assert len(candidates.bounds_seen) == tried and (tried == len(bounds) or candidates.bounds_seen[-1] == 0.0)


def test_kth_largest_ranks_nan_above_every_number_and_checks_k():
    """NaN metrics are candidates at any bound and rank first, as in torch.topk."""
    candidates = NumpyCandidates(np.array([np.nan, 3.0, np.nan, 1.0], dtype=np.float32))
    assert np.isnan(kth_largest(candidates, 2, (5.0,))[0])
    assert kth_largest(candidates, 3, (5.0, 2.0)) == (3.0, 3)
    assert kth_largest(candidates, 4, ()) == (1.0, 4)
    with pytest.raises(ValueError):
        kth_largest(candidates, 0, ())


def test_rank_in_histogram():
    """The bucket of the k-th largest counted element and its rank inside, counted from the top bucket down."""
    counts = np.array([4, 0, 3, 0, 2], dtype=np.int64)  # bucket 4 holds the largest
    expected = [(4, 1), (4, 2), (2, 1), (2, 2), (2, 3), (0, 1), (0, 4)]
    for k, want in zip([1, 2, 3, 4, 5, 6, 9], expected):
        assert selection.rank_in_histogram(counts, k) == want
    for k in (0, 10):
        with pytest.raises(ValueError):
            selection.rank_in_histogram(counts, k)


@pytest.mark.parametrize("threads", [1, 2])
def test_host_search_holds_about_2q_candidates(threads, search_log):
    """100k weights at ratio 0.01: the host search holds room for 2 Q + 4096 candidates and one histogram, not a
    float per weight. The first step (bound 0) and the second (a wide first bound) pass more than that room and
    take the second pass over the data; later steps keep their candidates. Every threshold is exact."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(400, 250))
        opt = GSM([w], lr=0.01, momentum=0.9, nonzero_ratio=0.01)
        for step in range(6):
            w.grad = torch.randn(400, 250) * (1 + 0.1 * step)
            opt.step()
        held = opt._selection._candidates
        q = opt.keep_count
        assert q == 1000 and held.found.size == 2 * q + 4096 and held.found.dtype == np.float32
        assert held.histogram.size == selection.LOW_BUCKETS and held.histogram.dtype == np.int64
        arrays = [v for v in vars(held).values() if isinstance(v, np.ndarray)]
        arrays += [v for v in vars(opt._selection).values() if isinstance(v, (np.ndarray, torch.Tensor))]
        assert sum(a.nbytes for a in arrays) <= 4 * (2 * q + 4096) + 8 * selection.LOW_BUCKETS
        assert opt._selection._metric is None  # nor a flat metric
        assert [overflowed for *_, overflowed in search_log] == [True, True, False, False, False, False]
        assert all(searched > 6096 for _, searched, *_ in search_log[:2])
    finally:
        torch.set_num_threads(previous)


def test_host_search_is_exact_on_both_routes():
    """The optimizer's thresholds equal a sort of the metric on the steps that take the second pass and on those
    that keep their candidates."""
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(300, 300))
    opt = GSM([w], lr=0.0, momentum=0.0, nonzero_ratio=0.02)
    routes = []
    for step, scale in enumerate([1.0, 1.0, 1.0, 50.0, 1.0, 0.001]):
        w.grad = torch.randn(300, 300) * scale
        opt.step()
        metric = (w.detach() * w.grad).abs().reshape(-1)
        assert torch.equal(opt.last_threshold, torch.sort(metric, descending=True).values[opt.keep_count - 1])
        routes.append(opt._selection._candidates.overflowed)
    assert routes[0] and not routes[2] and routes[3]  # 50x larger metrics: the bound admits nearly all of them

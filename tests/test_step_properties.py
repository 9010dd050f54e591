"""Property-based tests of the GSM step (hypothesis): drawn shapes, memory layouts (contiguous, transposed,
channels_last, strided slices), dtypes, thread counts, gradient scales from 1e-40 to 1e6 with zeros, ties and
NaN/inf, ratios and hyperparameters. Each step of the host path (`fused=None`) and of the generic path
(`fused=False`) is compared with a float64 reference of the rule computed from the state before that step:

    metric m = |w * g| in float32 (under the threads' flush-to-zero mode), NaN above every number;
    tau = the Q-th largest m; M = [m >= tau or m is NaN]; d = M * g + wd * w; b = beta * b + d; w -= lr * b
    (Nesterov: w -= lr * (d + beta * b)).

The threshold and the active count must be exact; the weights and buffers equal the reference up to the
rounding of a few float operations. On the first step, where both paths start from the same state, their
thresholds and active counts must be the same."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gsm import GSM
from gsm.host_kernels import is_dense
from reference import reference_selection

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEEN = set()  # what the property test's examples covered (checked by the test after it)
EPS = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@dataclass
class Case:
    shapes: list
    layouts: list
    dtype: torch.dtype
    threads: int
    log_scale: float
    specials: str
    nonzero_ratio: float
    momentum: float
    weight_decay: float
    nesterov: bool
    seed: int


@st.composite
def cases(draw) -> Case:
    """A drawn step. (No st.floats: GSM turns on flush-to-zero in this thread, under which hypothesis's float
    strategies fail their own checks.)"""
    count = draw(st.integers(1, 4))
    shapes, layouts = [], []
    for _ in range(count):
        dims = draw(st.sampled_from([1, 2, 2, 4]))
        shape = [draw(st.integers(1, 9)) for _ in range(dims)]
        options = ["contiguous", "sliced"] + (["transposed"] if dims >= 2 else []) + \
                  (["channels_last"] if dims == 4 else [])
        shapes.append(shape)
        layouts.append(draw(st.sampled_from(options)))
    if draw(st.integers(0, 7)) == 0:  # now and then a tensor that the kernels split over threads
        shapes.append([300, 240])
        layouts.append("contiguous")
    momentum = draw(st.sampled_from([0.0, 0.9, 0.99]))
    return Case(shapes=shapes, layouts=layouts,
                dtype=draw(st.sampled_from([torch.float32] * 5 + [torch.float64, torch.float16, torch.bfloat16])),
                threads=draw(st.integers(1, 3)), log_scale=draw(st.integers(-400, 60)) / 10,
                specials=draw(st.sampled_from(["none", "none", "zeros", "ties", "nan", "inf"])),
                nonzero_ratio=draw(st.sampled_from([0.01, 0.1, 0.3, 0.5, 0.9, 1.0])), momentum=momentum,
                weight_decay=draw(st.sampled_from([0.0, 5e-4, 1e-2])),
                nesterov=momentum > 0 and draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """`values` (float32) stored in `layout`: the same elements, other strides."""
    if layout == "transposed":
        return values.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # a strided view into a larger tensor: not dense
        wide = torch.zeros(*values.shape[:-1], values.shape[-1] * 2, dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    return values.contiguous()


def gradients(case: Case, gen: torch.Generator) -> list[torch.Tensor]:
    scale = 10.0 ** case.log_scale
    grads = []
    for shape in case.shapes:
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        if case.specials == "zeros":
            g[torch.rand(shape, generator=gen) < 0.5] = 0.0
        elif case.specials == "ties":
            g = torch.randint(-2, 3, shape, generator=gen).double() * scale
        elif case.specials in ("nan", "inf"):
            g.view(-1)[torch.randint(0, g.numel(), (max(1, g.numel() // 20),), generator=gen)] = float(case.specials)
        grads.append(g)
    return grads


def build(case: Case, weights: list[torch.Tensor]) -> list[nn.Parameter]:
    return [nn.Parameter(laid_out(w.to(case.dtype, copy=True), layout)) for w, layout in zip(weights, case.layouts)]


def set_grads(case: Case, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g, layout in zip(params, grads, case.layouts):
        p.grad = laid_out(g.to(case.dtype, copy=True), layout)


def reference_step(case: Case, params: list[nn.Parameter], buffers: list, first: bool, fused):
    """The rule in float64 from the current float32 (or lower) state: (weights, buffers, tau, active count),
    the selection by the tests' reference (tests/reference.py). The generic path masks the gradients by
    multiplying them with the mask: where at least Q metrics are NaN (tau is NaN), an inactive element with an
    infinite gradient gets NaN there (inf * 0), and 0 on the host path."""
    ranked = [p for p in params if p.dim() > 1]
    masks, tau = reference_selection(ranked, [p.grad for p in ranked], case.nonzero_ratio)
    count = sum(int(m.sum()) for m in masks)
    masks = iter(masks)
    new_ws, new_bs = [], []
    for i, p in enumerate(params):
        w, g = p.detach().double().numpy(), p.grad.double().numpy()
        on = next(masks).numpy() if p.dim() > 1 else np.ones(w.shape, dtype=bool)
        with np.errstate(all="ignore"):
            d = g * on if fused is False and tau is not None and tau.isnan() else np.where(on, g, 0.0)
            if case.weight_decay:  # as SGD: no decay term at 0 (0 * inf would be NaN)
                d = d + case.weight_decay * w
            if case.momentum == 0.0:
                new_ws.append(w - 0.05 * d)
                new_bs.append(None)
                continue
            b = d if first else case.momentum * buffers[i].detach().double().numpy() + d
            new_bs.append(b)
            new_ws.append(w - 0.05 * (d + case.momentum * b) if case.nesterov else w - 0.05 * b)
    return new_ws, new_bs, tau, count


def assert_near(actual: torch.Tensor, expected: np.ndarray, scale: np.ndarray, dtype: torch.dtype, what: str):
    """Equal up to a few roundings of float `dtype` at the magnitude `scale` of the terms, or below the smallest
    normal number of `dtype` (where results are flushed to zero or rounded to subnormal spacing), with NaN and
    inf exactly where the reference has them."""
    actual = actual.detach().double().numpy()
    same_special = np.array_equal(np.isnan(actual), np.isnan(expected)) and \
        np.array_equal(np.where(np.isinf(expected), expected, 0), np.where(np.isinf(actual), actual, 0))
    assert same_special, what
    finite = np.isfinite(expected)
    with np.errstate(all="ignore"):
        limit = 8 * EPS[dtype] * np.broadcast_to(scale, expected.shape)[finite] + torch.finfo(dtype).tiny
        error = np.abs(actual[finite] - expected[finite])
    worst = int(np.argmax(error / limit)) if error.size else 0
    assert (error <= limit).all(), f"{what}: error {error[worst]} where {limit[worst]} is allowed"


def run_path(case: Case, fused, weights: list[torch.Tensor], steps: list[list[torch.Tensor]]):
    params = build(case, weights)
    opt = GSM([{"params": params}], lr=0.05, momentum=case.momentum, nonzero_ratio=case.nonzero_ratio,
              weight_decay=case.weight_decay, nesterov=case.nesterov, fused=fused)
    first_step = None
    for number, grads in enumerate(steps):
        set_grads(case, params, grads)
        buffers = [opt.state[p].get("momentum_buffer") for p in params]
        want_w, want_b, tau, count = reference_step(case, params, buffers, number == 0, fused)
        # The magnitudes of the terms of each result, for the rounding allowed (NaN terms count as none).
        magnitude = [np.nan_to_num(np.abs(t.detach().double().numpy()), nan=0.0) for t in params]
        grads_abs = [np.nan_to_num(np.abs(p.grad.double().numpy()), nan=0.0) for p in params]
        old_b = [np.zeros(1) if b is None else np.nan_to_num(np.abs(b.detach().double().numpy()), nan=0.0)
                 for b in buffers]
        opt.step()
        if tau is None:
            assert opt.last_threshold is None
        else:
            found = float(opt.last_threshold)
            assert found == float(tau) or (np.isnan(found) and tau.isnan()), (found, tau)
        assert opt.num_active == count
        for i, p in enumerate(params):
            np.seterr(over="ignore")  # a magnitude past float64's range allows any rounding, as it should
            d_scale = grads_abs[i] + case.weight_decay * magnitude[i]
            if want_b[i] is not None:
                b_scale = case.momentum * old_b[i] + d_scale
                assert_near(opt.state[p]["momentum_buffer"], want_b[i], b_scale, case.dtype,
                            f"step {number} buffer {i}")
                step_scale = 0.05 * (d_scale + case.momentum * b_scale if case.nesterov else b_scale)
            else:
                step_scale = 0.05 * d_scale
            assert_near(p, want_w[i], magnitude[i] + step_scale, case.dtype, f"step {number} weight {i}")
        if first_step is None:
            first_step = (opt.last_threshold, opt.num_active, opt.last_step_fused)
    return first_step


@SETTINGS
@given(case=cases())
def test_both_paths_follow_the_float64_rule(case: Case):
    previous = torch.get_num_threads()
    torch.set_num_threads(case.threads)
    try:
        gen = torch.Generator().manual_seed(case.seed)
        weights = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in case.shapes]
        steps = [gradients(case, gen) for _ in range(2)]
        host = run_path(case, None, weights, steps)
        generic = run_path(case, False, weights, steps)
    finally:
        torch.set_num_threads(previous)
    (host_tau, host_active, host_fused), (generic_tau, generic_active, generic_fused) = host, generic
    SEEN.update({"host path"} if host_fused else set())
    SEEN.update({"generic path", case.specials, str(case.dtype).replace("torch.", ""), *case.layouts})
    SEEN.update({"subnormal gradients on 2+ threads"} if case.log_scale < -38 and case.threads > 1 else set())
    SEEN.update({"split over 3 threads"} if [300, 240] in case.shapes and case.threads == 3 else set())
    assert generic_fused is False
    fits = case.dtype is torch.float32 and all(is_dense(laid_out(torch.zeros(shape), layout))
                                               for shape, layout in zip(case.shapes, case.layouts))
    if host_tau is not None:
        assert host_fused is fits
    assert host_active == generic_active
    assert (host_tau is None) == (generic_tau is None)
    if host_tau is not None:
        assert torch.equal(host_tau.view(torch.int32), generic_tau.view(torch.int32)) or \
            bool(torch.isnan(host_tau) and torch.isnan(generic_tau))


def test_the_properties_covered_both_paths_and_the_special_values():
    """The examples the property test drew reached what the properties are about: both paths, NaN and
    subnormal-sized gradients, several threads and a tensor split over them."""
    if not SEEN:
        pytest.skip("runs after test_both_paths_follow_the_float64_rule, which records what it drew")
    assert {"host path", "generic path", "nan", "subnormal gradients on 2+ threads", "split over 3 threads",
            "float16", "bfloat16", "float64", "sliced", "channels_last", "transposed"} <= SEEN

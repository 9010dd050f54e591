"""The compiled host kernels against numpy, element for element: the candidates of the threshold search, and the
masked momentum-SGD update in torch.optim.SGD's order of operations (so equal to numpy's float32 arithmetic in
that order, bit for bit)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from gsm import GSM, host_kernels
from gsm.denormals import set_flush_denormals, subnormal_products_flushed


@pytest.fixture(autouse=True)
def kernels_built():
    """The package's install builds the kernels: every test here needs them (and says why they are missing)."""
    assert host_kernels.available(), host_kernels.status()


def test_status_names_the_library():
    assert host_kernels.status().startswith("loaded from ") and "_host_kernels" in host_kernels.status()


def test_without_the_extension(monkeypatch):
    """Without the compiled extension the loader says why, and GSM warns once and trains on the generic path."""
    monkeypatch.setitem(sys.modules, "gsm._host_kernels", None)  # makes its import fail
    lib, why, threaded = host_kernels._load()
    assert lib is None and not threaded and "not built" in why and "pip install -e ." in why
    monkeypatch.setattr(host_kernels, "_kernels", None)
    monkeypatch.setattr(host_kernels, "_why_not", why)
    w = torch.nn.Parameter(torch.randn(20, 10))
    with pytest.warns(RuntimeWarning, match="host kernels are unavailable: the compiled extension"):
        opt = GSM([w], lr=0.1, nonzero_ratio=0.1)
    w.grad = torch.randn(20, 10)
    before = w.detach().clone()
    opt.step()
    assert opt.num_active == 20 and opt.last_step_fused is False  # the generic path
    assert int((w.detach() != before).sum()) == 20


def random_tensors(sizes: list[int], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    return weights, grads


# Sizes around the 8-lane blocks of the vector version, an empty tensor, and several tensors at once.
SIZE_CASES = [[1], [7], [8], [9], [64], [1003], [0, 5, 16], [300, 0, 17, 2048]]


@pytest.mark.parametrize("sizes", SIZE_CASES)
def test_candidates_equal_numpy(sizes):
    weights, grads = random_tensors(sizes, seed=sum(sizes))
    metric = np.concatenate([(w * g).abs().numpy() for w, g in zip(weights, grads)])
    out = np.full(metric.size + 8, -1.0, dtype=np.float32)
    for bound in (0.0, 0.3, float(np.median(metric)) if metric.size else 1.0, 5.0, float("inf")):
        count = host_kernels.candidates(weights, grads, bound, out)
        expected = metric[metric >= bound]
        assert count == expected.size
        np.testing.assert_array_equal(out[:count], expected)  # in order, bit for bit


def test_candidates_include_ties_and_nan():
    """A NaN metric ranks above every number (as in torch.topk): it is a candidate at any bound."""
    w = torch.tensor([1.0, -2.0, 2.0, float("nan"), 0.5, 2.0, -1.0, 3.0, 2.0, float("nan")])
    g = torch.tensor([2.0, 1.0, -1.0, 1.0, 4.0, 1.0, 0.5, 1.0, 1.0, 0.0])
    out = np.zeros(w.numel() + 8, dtype=np.float32)
    count = host_kernels.candidates([w], [g], 2.0, out)
    assert np.array_equal(out[:count], [2.0, 2.0, 2.0, np.nan, 2.0, 2.0, 3.0, 2.0, np.nan], equal_nan=True)
    assert host_kernels.candidates([w], [g], 0.0, out) == 10
    assert host_kernels.candidates([w], [g], float("inf"), out) == 2  # the NaNs only


def test_candidates_refuse_a_short_buffer():
    weights, grads = random_tensors([20], seed=0)
    with pytest.raises(ValueError, match="at least 28"):
        host_kernels.candidates(weights, grads, 0.0, np.empty(27, dtype=np.float32))
    with pytest.raises(TypeError, match="float32"):
        host_kernels.candidates(weights, grads, 0.0, np.empty(40, dtype=np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        host_kernels.candidates(weights, grads, 0.0, np.empty(80, dtype=np.float32)[::2])  # not contiguous


@pytest.mark.parametrize("count", [1, 2, 9, 1000, 20000])
def test_kth_largest_equals_sorting(count):
    """The radix select against a sort: spread values, many ties, zeros and subnormal-sized numbers, values that
    differ in their last bits only, at the ends and the middle of the ranks."""
    gen = np.random.default_rng(count)
    cases = [
        (np.abs(gen.standard_normal(count)) * 10.0 ** gen.integers(-30, 5, count)).astype(np.float32),
        gen.integers(0, 4, count).astype(np.float32),  # ties, zeros
        np.float32(1.0) + np.arange(count, dtype=np.float32) * np.finfo(np.float32).eps,  # neighbours in ulps
        np.full(count, 3e-39, dtype=np.float32),  # subnormal
    ]
    nans = np.where(gen.random(count) < 0.3, np.float32(np.nan), gen.random(count)).astype(np.float32)
    for values in cases + [np.abs(nans), np.where(nans > 0.5, np.float32(np.inf), np.abs(nans)).astype(np.float32)]:
        expected_order = np.sort(values)[::-1]  # numpy sorts NaN above every number, as torch.topk ranks it
        for k in sorted({1, 2, count // 3 + 1, count // 2, count - 1, count} & set(range(1, count + 1))):
            scratch = np.concatenate([values, [7.0, 8.0]]).astype(np.float32)  # those past `count` are not read
            found = host_kernels.kth_largest(scratch, count, k)
            assert found == expected_order[k - 1] or np.isnan(found) and np.isnan(expected_order[k - 1]), (k, values[:5])


def test_kth_largest_refuses_bad_arguments():
    values = np.ones(5, dtype=np.float32)
    for count, k in ((5, 0), (5, 6), (6, 1)):
        with pytest.raises(ValueError):
            host_kernels.kth_largest(values, count, k)
    with pytest.raises(TypeError):
        host_kernels.kth_largest(values.astype(np.float64), 5, 1)


def numpy_update(w, g, b, tau, lr, momentum, weight_decay, nesterov):
    """The update in numpy float32, in the kernels' (torch.optim.SGD's) order of operations."""
    f = np.float32
    metric = np.abs(w * g)
    on = (metric >= f(tau)) | np.isnan(metric)
    d = np.where(on, g, f(0.0)) + f(weight_decay) * w
    if b is None:
        return w - f(lr) * d, None, int(on.sum())
    b = f(momentum) * b + d
    w = w - f(lr) * (d + f(momentum) * b) if nesterov else w - f(lr) * b
    return w, b, int(on.sum())


@pytest.mark.parametrize("momentum,weight_decay,nesterov", [(0.99, 5e-4, True), (0.9, 1e-3, False),
                                                             (0.0, 1e-2, False), (0.9, 0.0, True)])
@pytest.mark.parametrize("sizes", [[9, 9], [300, 0, 17, 2048]])
def test_update_equals_numpy(sizes, momentum, weight_decay, nesterov):
    weights, grads = random_tensors(sizes, seed=7)
    gen = torch.Generator().manual_seed(8)
    buffers = [torch.randn(n, generator=gen) for n in sizes] if momentum else None
    tau = float(np.quantile(np.concatenate([(w * g).abs().numpy() for w, g in zip(weights, grads)]), 0.9))
    thresholds = [tau] * len(sizes)
    thresholds[-1] = -np.inf  # the last tensor unmasked, as a bias beside prunable weights
    expected = [numpy_update(w.numpy().copy(), g.numpy(), None if buffers is None else buffers[i].numpy().copy(),
                             thresholds[i], 0.05, momentum, weight_decay, nesterov)
                for i, (w, g) in enumerate(zip(weights, grads))]
    active = host_kernels.update(weights, grads, buffers, thresholds, 0.05, momentum, weight_decay, nesterov)
    for i, (w_new, b_new, count) in enumerate(expected):
        np.testing.assert_array_equal(weights[i].numpy(), w_new)
        if buffers is not None:
            np.testing.assert_array_equal(buffers[i].numpy(), b_new)
        assert active[i] == count
    assert active[-1] == sizes[-1]
    assert 0 < sum(active[:-1]) < sum(sizes[:-1])  # the masked ones: some elements took their gradient, not all


@pytest.mark.parametrize("tau,active_elements", [(-np.inf, [0, 1, 2]), (0.5, [0, 1]), (np.inf, [0, 1]),
                                                  (np.nan, [0])])
def test_update_passes_a_nan_metric_at_any_threshold(tau, active_elements):
    """A NaN metric ranks above every number, so its element takes its gradient whatever the threshold, and the
    NaN reaches the weight as with SGD (-inf: every element; a NaN threshold: the NaN elements only)."""
    weights, grads = [torch.tensor([1.0, 2.0, 0.1])], [torch.tensor([float("nan"), float("inf"), 1.0])]
    active = host_kernels.update(weights, grads, None, [tau], 0.1, 0.0, 0.0, False)
    assert active == [len(active_elements)]
    assert torch.isnan(weights[0][0]) and bool(torch.isinf(weights[0][1])) == (1 in active_elements)
    assert float(weights[0][2]) == pytest.approx(0.1 - 0.1 * (2 in active_elements))


def test_update_zero_buffer_is_sgds_first_step():
    """A zero momentum buffer makes the first buffer d exactly, as torch.optim.SGD's first step does."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50))
    p.grad = torch.randn(50)
    sgd_p = torch.nn.Parameter(p.detach().clone())
    sgd_p.grad = p.grad.clone()
    torch.optim.SGD([sgd_p], lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, foreach=False).step()
    w, b = [p.detach().clone()], [torch.zeros(50)]
    host_kernels.update(w, [p.grad], b, [-np.inf], 0.1, 0.9, 1e-3, True)
    torch.testing.assert_close(w[0], sgd_p.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("shape,make", [((5, 6), lambda t: t.t()),
                                        ((2, 3, 4, 5), lambda t: t.to(memory_format=torch.channels_last))],
                         ids=["transposed", "channels_last"])
def test_update_in_memory_order(shape, make):
    """Dense tensors in another memory order than row-major: the kernels walk memory, and the result is the
    same element for element."""
    gen = torch.Generator().manual_seed(3)
    w, g, b = (make(torch.randn(*shape, generator=gen)) for _ in range(3))
    assert not w.is_contiguous() and host_kernels.fits(w, g)
    want_w, want_b, _ = numpy_update(w.numpy(), g.numpy(), b.numpy(), 0.5, 0.1, 0.9, 1e-3, True)
    host_kernels.update([w], [g], [b], [0.5], 0.1, 0.9, 1e-3, True)
    np.testing.assert_array_equal(w.numpy(), want_w)
    np.testing.assert_array_equal(b.numpy(), want_b)


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_change_nothing(threads):
    """Tensors large enough to be split over torch's threads (cuts inside tensors and across them): the same
    candidates in the same order, and the same update, bit for bit, as on one thread."""
    sizes = [70001, 3, 0, 40013, 9]
    results = []
    previous = torch.get_num_threads()
    try:
        for count in (1, threads):
            torch.set_num_threads(count)
            weights, grads = random_tensors(sizes, seed=5)
            gen = torch.Generator().manual_seed(6)
            buffers = [torch.randn(n, generator=gen) for n in sizes]
            out = np.empty(sum(sizes) + 8, dtype=np.float32)
            found = host_kernels.candidates(weights, grads, 1.0, out)
            active = host_kernels.update(weights, grads, buffers, [1.0, 1.0, 1.0, 1.0, -np.inf], 0.1, 0.9, 1e-3, True)
            results.append((out[:found].copy(), active, weights, buffers))
            assert host_kernels._kernels.last_threads() == (count if "OpenMP" in host_kernels.status() else 1)
    finally:
        torch.set_num_threads(previous)
    (found_1, active_1, weights_1, buffers_1), (found_n, active_n, weights_n, buffers_n) = results
    assert 1000 < found_1.size < 0.5 * sum(sizes)
    np.testing.assert_array_equal(found_1, found_n)
    assert active_1 == active_n and active_1[-1] == 9 and active_1[2] == 0
    for a, b in zip(weights_1 + buffers_1, weights_n + buffers_n):
        assert torch.equal(a, b)


def test_fits():
    a = torch.randn(4, 6)
    assert host_kernels.fits(a, torch.randn(4, 6))
    assert host_kernels.fits(a.t(), torch.randn(4, 6).t())  # dense, same strides
    assert not host_kernels.fits(a.t(), torch.randn(6, 4))  # same shape, other strides
    assert not host_kernels.fits(a.double(), torch.randn(4, 6).double())
    assert not host_kernels.fits(a[:, ::2], torch.randn(4, 6)[:, ::2])  # a strided slice: not dense
    assert not host_kernels.fits(a.half(), a.half())


@pytest.mark.parametrize("n", [16, 200_000])
def test_kernels_follow_the_threads_flush_to_zero_mode(n):
    """The kernels compute under the flush-to-zero mode of the threads they run on (the calling thread for
    small tensors, torch's pool for large ones, on 2 threads here): 1e-30 * 1e-10 decays to zero with the mode
    on, to a subnormal without it, on every thread."""
    before, threads = subnormal_products_flushed(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for flush in (True, False):
            set_flush_denormals(flush)
            assert subnormal_products_flushed() is flush
            w, g, b = [torch.full((n,), 1e-30)], [torch.zeros(n)], [torch.zeros(n)]
            host_kernels.update(w, g, b, [1.0], 0.0, 0.9, 1e-10, False)
            assert bool((b[0] == 0).all()) is flush and bool((b[0] != 0).all()) is not flush
            out = np.empty(n + 8, dtype=np.float32)
            host_kernels.candidates([torch.full((n,), 1e-30)], [torch.full((n,), 1e-10)], 0.0, out)
            assert bool((out[:n] == 0).all()) is flush and bool((out[:n] != 0).all()) is not flush
    finally:
        set_flush_denormals(bool(before))
        torch.set_num_threads(threads)

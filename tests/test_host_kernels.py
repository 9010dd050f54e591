"""The compiled host kernels against numpy, element for element: the candidates of the threshold search, and the
masked momentum-SGD update in torch.optim.SGD's order of operations (so equal to numpy's float32 arithmetic in
that order, bit for bit)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from gsm import GSM, host_kernels, selection
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


@pytest.fixture(params=["avx2", "portable"])
def vector_path(request):
    """Each version of the kernels: the AVX2 one (skipped on a processor without AVX2) and the portable one."""
    had = host_kernels._kernels.uses_avx2()
    if host_kernels._kernels.set_avx2(request.param == "avx2") != (request.param == "avx2"):
        pytest.skip("the processor has no AVX2")
    yield request.param
    host_kernels._kernels.set_avx2(had)


@pytest.fixture(params=[1, 2])
def threads(request):
    """torch's thread count for the kernels (large enough arrays are split between 2 threads)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def bits_of(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


def high_histogram(values: np.ndarray) -> np.ndarray:
    """numpy's count of the float32 `values` by the high 16 bits of their bit patterns."""
    return np.bincount(bits_of(values) >> 16, minlength=host_kernels.HIGH_BUCKETS)


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the float32 arrays hold the same bit patterns, in any order."""
    return np.array_equal(np.sort(bits_of(a)), np.sort(bits_of(b)))


# Sizes around the 8-lane blocks of the vector version, an empty tensor, and several tensors at once.
SIZE_CASES = [[1], [7], [8], [9], [64], [1003], [0, 5, 16], [300, 0, 17, 2048]]


@pytest.mark.parametrize("sizes", SIZE_CASES)
def test_candidates_equal_numpy(sizes, vector_path):
    """The candidates, their count and their histogram by high bits, with room for all of them."""
    weights, grads = random_tensors(sizes, seed=sum(sizes))
    metric = np.concatenate([(w * g).abs().numpy() for w, g in zip(weights, grads)])
    histogram = np.full(host_kernels.HIGH_BUCKETS, -5, dtype=np.int64)
    for bound in (0.0, 0.3, float(np.median(metric)) if metric.size else 1.0, 5.0, float("inf")):
        out = np.full(metric.size + 8, -1.0, dtype=np.float32)
        count = host_kernels.candidates(weights, grads, bound, out, histogram)
        expected = metric[metric >= bound]
        assert count == expected.size
        assert same_values(out[:count], expected)  # bit for bit, in the order the threads hand them over
        assert (out[count:] == -1.0).all()
        np.testing.assert_array_equal(histogram, high_histogram(expected))


def test_candidates_include_ties_and_nan(vector_path):
    """A NaN metric ranks above every number (as in torch.topk): it is a candidate at any bound."""
    w = torch.tensor([1.0, -2.0, 2.0, float("nan"), 0.5, 2.0, -1.0, 3.0, 2.0, float("nan")])
    g = torch.tensor([2.0, 1.0, -1.0, 1.0, 4.0, 1.0, 0.5, 1.0, 1.0, 0.0])
    out = np.zeros(w.numel() + 8, dtype=np.float32)
    count = host_kernels.candidates([w], [g], 2.0, out)
    assert same_values(out[:count], np.abs(np.array([2.0, 2.0, 2.0, np.nan, 2.0, 2.0, 3.0, 2.0, np.nan],
                                                    dtype=np.float32)))
    assert host_kernels.candidates([w], [g], 0.0, out) == 10
    assert host_kernels.candidates([w], [g], float("inf"), out) == 2  # the NaNs only


@pytest.mark.parametrize("capacity", [0, 1, 9, 1000, 30000])
def test_candidates_count_beyond_the_capacity(capacity, threads, vector_path):
    """More candidates than `out` holds: it is filled with candidates (no more), and the count and the histogram
    are those of every candidate, on one thread and split between two."""
    sizes = [70001, 3, 0, 40013, 9]
    weights, grads = random_tensors(sizes, seed=11)
    metric = np.concatenate([(w * g).abs().numpy() for w, g in zip(weights, grads)])
    expected = metric[metric >= 0.5]
    assert expected.size > 30000
    out = np.full(capacity + 3, -1.0, dtype=np.float32)
    histogram = np.empty(host_kernels.HIGH_BUCKETS, dtype=np.int64)
    count = host_kernels.candidates(weights, grads, 0.5, out[:capacity], histogram)
    assert count == expected.size
    np.testing.assert_array_equal(histogram, high_histogram(expected))
    assert (out[capacity:] == -1.0).all()  # nothing past the capacity
    kept = out[:capacity]
    assert (kept >= 0.5).all() and np.isin(bits_of(kept), bits_of(expected)).all()
    assert host_kernels._kernels.last_threads() == (threads if "OpenMP" in host_kernels.status() else 1)


def test_candidates_refuse_bad_buffers():
    """Every buffer a kernel writes is checked: type, size, contiguity, writability, and overlap with the tensors
    and with each other."""
    weights, grads = random_tensors([20], seed=0)
    histogram = np.empty(host_kernels.HIGH_BUCKETS, dtype=np.int64)
    out = np.empty(28, dtype=np.float32)
    with pytest.raises(TypeError, match="float32"):
        host_kernels.candidates(weights, grads, 0.0, np.empty(40, dtype=np.float64), histogram)
    with pytest.raises(ValueError, match="contiguous"):
        host_kernels.candidates(weights, grads, 0.0, np.empty(80, dtype=np.float32)[::2], histogram)
    read_only = np.empty(28, dtype=np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        host_kernels.candidates(weights, grads, 0.0, read_only, histogram)
    for bad, error in ((np.empty(host_kernels.HIGH_BUCKETS, dtype=np.int32), TypeError),
                       (np.empty(host_kernels.HIGH_BUCKETS, dtype=np.uint64), TypeError),
                       (np.empty(host_kernels.HIGH_BUCKETS, dtype=np.float64), TypeError),
                       (np.empty(host_kernels.HIGH_BUCKETS - 1, dtype=np.int64), ValueError),
                       (np.empty(host_kernels.LOW_BUCKETS, dtype=np.int64), ValueError),
                       (np.empty(2 * host_kernels.HIGH_BUCKETS, dtype=np.int64)[::2], ValueError)):
        with pytest.raises(error, match="histogram|contiguous"):
            host_kernels.candidates(weights, grads, 0.0, out, bad)
    histogram.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        host_kernels.candidates(weights, grads, 0.0, out, histogram)
    # Written memory that overlaps a tensor of the call, or the other written buffer.
    with pytest.raises(ValueError, match="gradient 0 and out 0 overlap|out 0 and gradient 0 overlap"):
        host_kernels.candidates(weights, grads, 0.0, grads[0].numpy(), None)
    shared = np.zeros(host_kernels.HIGH_BUCKETS + 16, dtype=np.int64)
    with pytest.raises(ValueError, match="overlap"):
        host_kernels.candidates(weights, grads, 0.0, shared[:8].view(np.float32),
                                shared[4:4 + host_kernels.HIGH_BUCKETS])
    counts = np.zeros(host_kernels.HIGH_BUCKETS, dtype=np.int64)
    inside = [torch.from_numpy(counts[100:110].view(np.float32))]  # a gradient in the histogram's memory
    with pytest.raises(ValueError, match="histogram"):
        host_kernels.candidates(weights, inside, 0.0, out, counts)
    assert not counts.any()  # nothing written


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
    candidates (in the order the threads hand them over), histogram, counts of one bucket's low bits, and the
    same update, bit for bit, as on one thread."""
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
            histogram = np.empty(host_kernels.HIGH_BUCKETS, dtype=np.int64)
            found = host_kernels.candidates(weights, grads, 1.0, out, histogram)
            lows = np.empty(host_kernels.LOW_BUCKETS, dtype=np.int64)
            in_bucket = host_kernels.bucket_lows(weights, grads, int(np.argmax(histogram)), lows)
            active = host_kernels.update(weights, grads, buffers, [1.0, 1.0, 1.0, 1.0, -np.inf], 0.1, 0.9, 1e-3, True)
            results.append((np.sort(out[:found]), active, weights, buffers, histogram, lows, in_bucket))
            assert host_kernels._kernels.last_threads() == (count if "OpenMP" in host_kernels.status() else 1)
    finally:
        torch.set_num_threads(previous)
    (found_1, active_1, weights_1, buffers_1, *counts_1), (found_n, active_n, weights_n, buffers_n, *counts_n) = results
    assert 1000 < found_1.size < 0.5 * sum(sizes)
    np.testing.assert_array_equal(found_1, found_n)
    for a, b in zip(counts_1, counts_n):
        np.testing.assert_array_equal(a, b)
    assert counts_1[2] > 100
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


def test_kth_in_bucket_equals_sorting(vector_path):
    """The rank-th largest of the values of one high-bit bucket, against a sort of those values, for every
    bucket and rank of a small set with ties and NaNs; fewer values in the bucket than the rank is refused."""
    gen = np.random.default_rng(4)
    values = np.concatenate([np.float32(1.0) + gen.integers(0, 300, 500).astype(np.float32) * np.float32(2 ** -23),
                             gen.random(97, dtype=np.float32), [np.inf, np.nan, 0.0, 0.0]]).astype(np.float32)
    values = np.abs(values)  # a NaN with its sign bit cleared, as the kernels write it
    for high in np.unique(bits_of(values) >> 16):
        in_bucket = np.sort(bits_of(values)[bits_of(values) >> 16 == high])[::-1]
        for rank in sorted({1, 2, in_bucket.size // 2, in_bucket.size} & set(range(1, in_bucket.size + 1))):
            scratch = np.concatenate([gen.permutation(values), [5.0, 6.0]]).astype(np.float32)
            tau = host_kernels.kth_in_bucket(scratch, values.size, int(high), rank)
            assert bits_of(np.array([tau]))[0] == in_bucket[rank - 1], (high, rank)
        with pytest.raises(ValueError, match="fewer than"):
            host_kernels.kth_in_bucket(values.copy(), values.size, int(high), in_bucket.size + 1)


def test_kth_in_bucket_split_between_threads(threads, vector_path):
    """Values enough to be split between the threads: the bucket's values of every share are gathered."""
    gen = np.random.default_rng(5)
    values = np.abs(gen.standard_normal(200_003)).astype(np.float32)
    for high in (bits_of(values[:3]) >> 16).tolist() + [int(bits_of(np.ones(1))[0] >> 16)]:
        in_bucket = np.sort(bits_of(values)[bits_of(values) >> 16 == high])[::-1]
        for rank in (1, in_bucket.size // 3 + 1, in_bucket.size):
            tau = host_kernels.kth_in_bucket(values.copy(), values.size, high, rank)
            assert bits_of(np.array([tau]))[0] == in_bucket[rank - 1]
            assert host_kernels._kernels.last_threads() == (threads if "OpenMP" in host_kernels.status() else 1)


def test_kth_in_bucket_refuses_bad_arguments():
    values = np.ones(5, dtype=np.float32)
    high = int(bits_of(values)[0] >> 16)
    for count, bucket, rank in ((5, high, 0), (5, high, 6), (6, high, 1), (5, -1, 1), (5, 1 << 15, 1)):
        with pytest.raises(ValueError):
            host_kernels.kth_in_bucket(values, count, bucket, rank)
    with pytest.raises(TypeError):
        host_kernels.kth_in_bucket(values.astype(np.float64), 5, high, 1)
    assert host_kernels.kth_in_bucket(values, 5, high, 5) == 1.0


@pytest.mark.parametrize("sizes", [[9], [300, 0, 17, 2048], [70001, 3, 40013]])
def test_bucket_lows_equal_numpy(sizes, threads, vector_path):
    """The counts of one bucket's metrics by their low 16 bits, for crowded and sparse buckets."""
    weights, grads = random_tensors(sizes, seed=len(sizes))
    grads[0][::3] = 1.0  # many metrics near |w| in the buckets of the weights
    metric = np.concatenate([(w * g).abs().numpy() for w, g in zip(weights, grads)])
    lows = np.full(host_kernels.LOW_BUCKETS, -1, dtype=np.int64)
    for high in {int(b) for b in bits_of(metric[:50]) >> 16} | {0, (1 << 15) - 1}:
        chosen = bits_of(metric)[bits_of(metric) >> 16 == high]
        assert host_kernels.bucket_lows(weights, grads, high, lows) == chosen.size
        np.testing.assert_array_equal(lows, np.bincount(chosen & 0xFFFF, minlength=host_kernels.LOW_BUCKETS))


def test_bucket_lows_refuse_bad_arguments():
    weights, grads = random_tensors([20], seed=0)
    lows = np.zeros(host_kernels.LOW_BUCKETS, dtype=np.int64)
    for high in (-1, 1 << 15):
        with pytest.raises(ValueError, match="high"):
            host_kernels.bucket_lows(weights, grads, high, lows)
    for bad, error in ((np.empty(host_kernels.HIGH_BUCKETS, dtype=np.int64), ValueError),
                       (np.empty(host_kernels.LOW_BUCKETS, dtype=np.float64), TypeError),
                       (np.empty(2 * host_kernels.LOW_BUCKETS, dtype=np.int64)[::2], ValueError)):
        with pytest.raises(error):
            host_kernels.bucket_lows(weights, grads, 0, bad)
    inside = [torch.from_numpy(lows[7:17].view(np.float32))]  # a weight in the histogram's memory
    with pytest.raises(ValueError, match="overlap"):
        host_kernels.bucket_lows(inside, [grads[0][:20]], 0, lows)
    assert not lows.any()


# ----------------------------------------------------------------------------------------------------------
# The threshold search of the host path, whole


def metric_cases(n: int, seed: int) -> dict:
    """(weights, gradients) of n elements whose metrics |w * g| are computed exactly alike by numpy and the
    kernels (no product is subnormal, so that flushing them to zero changes nothing)."""
    gen = np.random.default_rng(seed)
    f32 = np.float32
    ones = np.ones(n, dtype=f32)
    nan_payloads = (np.uint32(0x7FC00000) | gen.integers(0, 1 << 22, n).astype(np.uint32)).view(f32)
    cases = {
        "random products": (gen.standard_normal(n).astype(f32), gen.standard_normal(n).astype(f32)),
        "many ties": (gen.integers(-3, 4, n).astype(f32), gen.integers(-3, 4, n).astype(f32)),
        "all equal": (np.full(n, 0.75, dtype=f32), np.full(n, -2.0, dtype=f32)),
        "mostly zeros": (np.where(gen.random(n) < 0.005, gen.standard_normal(n), 0.0).astype(f32),
                         gen.standard_normal(n).astype(f32)),
        "NaN and inf": (np.where(gen.random(n) < 0.01, np.inf, gen.standard_normal(n)).astype(f32),
                        np.where(gen.random(n) < 0.01, 0.0, gen.standard_normal(n)).astype(f32)),
        "NaN payloads": (np.where(gen.random(n) < 0.3, nan_payloads, gen.standard_normal(n)).astype(f32), ones),
        "NaN payloads on both": (np.where(gen.random(n) < 0.3, nan_payloads, gen.standard_normal(n)).astype(f32),
                                 np.where(gen.random(n) < 0.3, gen.permutation(nan_payloads),
                                          gen.standard_normal(n)).astype(f32)),
        "smallest normals": ((np.finfo(f32).tiny * (1 + gen.random(n) * 100)).astype(f32), -ones),
        "one bucket": ((f32(1.0) + gen.integers(0, 1 << 16, n).astype(f32) * f32(2 ** -23)).astype(f32), ones),
        "one bucket with ties": ((f32(3.0) + gen.integers(0, 40, n).astype(f32) * f32(2 ** -22)).astype(f32), ones),
    }
    return cases


def kernel_metric(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """|w * g| as the kernels compute it: a NaN operand's payload, quieted, w's when both are NaN (the first
    operand's, as x86 multiplies), the default NaN for inf * 0."""
    quiet = np.uint32(0x00400000)
    with np.errstate(invalid="ignore"):  # inf * 0
        product = np.abs(w * g)
    bits = np.where(np.isnan(w), bits_of(np.abs(w)) | quiet,
                    np.where(np.isnan(g), bits_of(np.abs(g)) | quiet,
                             np.where(np.isnan(product), np.uint32(0x7FC00000), bits_of(product))))
    return bits.astype(np.uint32).view(np.float32)


def kth_largest_bits(metric: np.ndarray, k: int) -> np.float32:
    """The k-th largest by bit pattern (NaNs, whatever their payloads, above +inf, as the kernels rank them)."""
    return np.sort(bits_of(metric))[::-1][k - 1].view(np.float32)


CASE_NAMES = list(metric_cases(8, 0))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_threshold_search_equals_sorting(case, threads, vector_path):
    """GlobalSelection.threshold against a sort, bit for bit, over both routes of the search: the first step
    (bound 0) keeps fewer candidates than pass and counts the k-th's bucket in a second pass; later steps keep
    every candidate above the previous threshold's bound; with room for everything, the kept candidates alone.
    Where no metric is NaN, the answer is also numpy's sort by value."""
    n = 100_003
    w_np, g_np = metric_cases(n, CASE_NAMES.index(case))[case]
    w, g = torch.from_numpy(w_np), torch.from_numpy(g_np)
    metric = kernel_metric(w_np, g_np)
    for k in (1, 7, 1000, n // 10, n // 2, n):
        expected = kth_largest_bits(metric, k)
        if not np.isnan(metric).any():
            assert bits_of(np.array([expected])) == bits_of(np.sort(metric)[::-1][k - 1:k])
        for room in ("capacity", "everything"):
            chosen = selection.GlobalSelection()
            if room == "everything":
                chosen._candidates.attach = _with_capacity(chosen._candidates, n)
            routes = []
            for step in range(3):  # the same metrics again: the bound comes from the previous threshold
                tau = chosen.threshold(host_kernels.Batch([w], [g]), 1, k)
                assert bits_of(tau.numpy().reshape(1)) == bits_of(np.array([expected])), (k, room, step)
                routes.append(chosen._candidates.overflowed)
            held = chosen._candidates.found.size
            assert held == min(n, 2 * k + 4096) if room == "capacity" else held == n
            if room == "capacity" and held < n:
                assert routes[0]  # bound 0: every metric passes, more than the capacity
            if room == "everything":
                assert not any(routes)


def _with_capacity(candidates: "selection.HostCandidates", capacity: int):
    """`candidates.attach` with room for `capacity` candidates, whatever k."""
    attach = candidates.attach

    def attach_with_room(batch, count, k):
        attach(batch, count, k)
        candidates.found = np.empty(capacity, dtype=np.float32)
    return attach_with_room


@pytest.mark.parametrize("expect_many", [True, False], ids=["counted", "uncounted"])
def test_threshold_search_checks_both_routes_on_one_bound(expect_many):
    """One bound, far below the k-th largest: more candidates than the capacity, so the second pass; a bound
    just below it: the kept candidates. Both exact, and the same, whether the collect counted the candidates
    from the start (many expected) or not (few expected: a radix select among the kept ones, and a second
    collect that counts them when they overflow)."""
    n, k = 200_000, 500
    w, g = random_tensors([n], seed=21)
    metric = (w[0] * g[0]).abs().numpy()
    expected = kth_largest_bits(metric, k)
    candidates = selection.HostCandidates()
    candidates.attach(host_kernels.Batch(w, g), 1, k)
    assert candidates.found.size == 2 * k + 4096
    for bound, overflows in ((float(expected) * 0.01, True), (float(expected) * 0.99, False), (0.0, True)):
        candidates._expect_many = expect_many
        tau, searched = selection.kth_largest(candidates, k, (bound,))
        assert searched == int((metric >= bound).sum()) and candidates.overflowed is overflows
        assert candidates._counted is (expect_many or overflows)
        assert bits_of(np.array([tau])) == bits_of(np.array([expected]))
    candidates.detach()


def test_rank_in_histogram_equals_a_sum_from_the_top():
    gen = np.random.default_rng(5)
    for size in (host_kernels.HIGH_BUCKETS, host_kernels.LOW_BUCKETS, 100):
        counts = gen.integers(0, 3, size) * (gen.random(size) < 0.05)
        counts[size // 2] += 2  # at least two elements
        total = int(counts.sum())
        for k in sorted({1, 2, total // 3, total - 1, total} - {0}):
            from_top = np.cumsum(counts[::-1])
            position = int(np.searchsorted(from_top, k))
            bucket = size - 1 - position
            assert selection.rank_in_histogram(counts, k) == (bucket, k - int(from_top[position] - counts[bucket]))
        with pytest.raises(ValueError):
            selection.rank_in_histogram(counts, total + 1)


def test_second_pass_that_disagrees_on_nans_only(monkeypatch):
    """Should the second pass count fewer metrics in the bucket than the first (only NaN payloads could differ,
    where the processor does not fix a product's payload), a NaN threshold is returned (any NaN selects the NaN
    elements alone), and a numeric bucket raises instead of guessing."""
    w_np, g_np = metric_cases(100_003, 3)["NaN payloads"]
    w, g = torch.from_numpy(w_np), torch.from_numpy(g_np)

    def disagreeing(self, count, high, histogram):
        histogram[:] = 0
        return 0

    monkeypatch.setattr(host_kernels.Batch, "bucket_lows", disagreeing)
    for k, nan in ((10, True), (40_000, False)):  # 30% of the metrics are NaN
        candidates = selection.HostCandidates()
        candidates.attach(host_kernels.Batch([w], [g]), 1, k)
        if nan:
            tau, _ = selection.kth_largest(candidates, k, ())
            assert np.isnan(tau) and candidates.overflowed
        else:
            with pytest.raises(RuntimeError, match="changed between two passes"):
                selection.kth_largest(candidates, k, (1e-6,))

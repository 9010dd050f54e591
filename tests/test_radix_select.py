"""The generic path's exact k-th largest metric against torch.topk: the radix select `kth_largest_bits` on both of
its branches (eager CPU, and the fixed-shape one that devices and torch.compile take) and split over ranks, and
the eager CPU search among the metrics above a bound (`TensorCandidates`)."""
import threading

import pytest
import torch

import numpy as np

from gsm.selection import _ONE_NAN, TensorCandidates, kth_largest, kth_largest_bits


def metric_cases():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 9, 1000, 65537):
        product = (torch.randn(n, generator=gen) * torch.randn(n, generator=gen)).abs()
        yield f"products{n}", product
        half_zero = product.clone()
        half_zero[: n // 2] = 0
        yield f"half_zero{n}", half_zero
        yield f"all_equal{n}", torch.full((n,), 0.5)
        non_finite = product.clone()
        non_finite[::3] = float("nan")
        non_finite[1::5] = float("inf")
        yield f"non_finite{n}", non_finite
        yield f"subnormal{n}", torch.randint(0, 4, (n,), generator=gen).float() * 1e-39
        # many metrics that share their high 16 bits and differ only in the low ones
        yield f"one_bucket{n}", (torch.randint(0, 1 << 16, (n,), generator=gen, dtype=torch.int32)
                                 | (0x3F80 << 16)).view(torch.float32)


def bits_of(metric: torch.Tensor) -> torch.Tensor:
    return metric.view(torch.int32).clone().clamp_(max=_ONE_NAN)


def ks(n: int):
    return sorted(k for k in {1, 2, n // 10, n // 2, n - 1, n} if 1 <= k <= n)


@pytest.fixture(params=["cpu", "fixed_shape"])
def branch(request, monkeypatch):
    """The eager CPU branch (bincount, the bucket's few elements), or the one of devices and compiled code."""
    if request.param == "fixed_shape":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


@pytest.mark.parametrize("name,metric", list(metric_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_equals_topk(name, metric, branch):
    bits = bits_of(metric)
    for k in ks(bits.numel()):
        expected = bits.topk(k, sorted=False).values.min()
        found, count = kth_largest_bits(bits, k)
        assert found.dtype == torch.int32 and found.shape == () and count.shape == ()
        assert found.item() == expected.item(), (name, k)
        assert count.item() == int((bits >= expected).sum()) >= k


@pytest.fixture(params=[2, 3], ids=["2 threads", "3 threads"])
def threads(request):
    """torch's thread count, which chooses how the CPU search copies its candidates out (numpy's compress on up to
    two threads, torch's boolean indexing on more)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("name,metric", list(metric_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_candidates_above_a_bound_give_topk(name, metric, threads):
    """Bounds below, at and above tau (too few pass: the search falls back to every metric): the k-th largest and
    the count of those at least as large are topk's, and the metrics are left as they were (the select reorders
    a copy)."""
    bits = bits_of(metric)
    kept = bits.clone()
    scratch = np.empty(bits.numel(), dtype=np.bool_)
    for k in ks(bits.numel()):
        expected = bits.topk(k, sorted=False).values.min()
        tau_float = expected.view(torch.float32).item()
        for bound in (tau_float * 0.5, tau_float, tau_float * 2 + 1e-30):
            candidates = TensorCandidates(bits, scratch)
            tau, searched = kth_largest(candidates, k, [bound] if bound == bound else [])
            assert np.array(tau, dtype=np.float32).view(np.int32) == expected.item(), (name, k, bound)
            assert candidates.count.item() == int((bits >= expected).sum()) >= k
            assert searched >= k
            assert torch.equal(bits, kept)


@pytest.mark.parametrize("sizes", [(1000, 1, 0), (17, 4000, 333), (0, 2500)])
def test_ranks_agree_on_the_global_kth_largest(sizes, branch):
    """Elements split unevenly over ranks (one may hold none), counts summed across them as an all-reduce would:
    every rank finds the k-th largest of all elements."""
    gen = torch.Generator().manual_seed(sum(sizes))
    whole = bits_of((torch.randn(sum(sizes), generator=gen) * torch.randn(sum(sizes), generator=gen)).abs())
    whole[::7] = whole[3]  # ties
    parts = list(torch.split(whole, list(sizes)))
    barrier = threading.Barrier(len(parts))
    lock = threading.Lock()
    for k in ks(whole.numel()):
        totals, results = {}, [None] * len(parts)

        def reduce(counts, rank_round):
            # every rank adds its counts, waits for the others, then reads the sum
            with lock:
                totals[rank_round] = totals.get(rank_round, 0) + counts.clone()
            barrier.wait()
            counts.copy_(totals[rank_round])
            barrier.wait()

        def rank(i):
            rounds = iter(range(2))
            results[i] = kth_largest_bits(parts[i], k, reduce=lambda counts: reduce(counts, next(rounds)))

        threads = [threading.Thread(target=rank, args=(i,)) for i in range(len(parts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = whole.topk(k, sorted=False).values.min().item()
        assert [tuple(int(v) for v in r) for r in results] == [(expected, int((whole >= expected).sum()))] * len(parts)


def test_compiles_whole():
    """torch.compile traces it without a graph break (fullgraph), with topk's answer."""
    compiled = torch.compile(kth_largest_bits, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(1)
    bits = bits_of((torch.randn(5000, generator=gen) * torch.randn(5000, generator=gen)).abs())
    tau, count = compiled(bits, 500)
    assert tau.item() == bits.topk(500).values.min().item() and count.item() == int((bits >= tau).sum())

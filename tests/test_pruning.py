"""Tests for gsm.pruning: the global magnitude mask (the counts of docs/design.md, section 1, and a brute-force version), applying
masks, and sparsity reports."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from base_model import build_model
from gsm import GSM
from gsm.pruning import (apply_mask_to_grads, apply_mask_to_weights, global_magnitude_mask, mask_count,
                         prunable_parameters, sparsity_report)


# Small tensors: one intra-op thread is fastest, and immune to a busy machine's contention.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def seeded_models() -> dict[str, nn.Module]:
    models = {}
    for seed, name in enumerate(["lenet300", "lenet5", "rc56"]):
        torch.manual_seed(seed)
        models[name] = build_model(name)
    return models


# (model, compression ratio, prunable elements, hard-mask count, GSM keep_count Q): docs/design.md, section 1.
EXPECTED_COUNTS = [
    ("lenet300", 60, 266200, 4437, 4436),
    ("lenet5", 125, 430500, 3444, 3444),
    ("lenet5", 300, 430500, 1435, 1435),
    ("rc56", 10, 851504, 85151, 85150),
]


@pytest.mark.parametrize("name,ratio,num_prunable,hard_count,gsm_count", EXPECTED_COUNTS)
def test_expected_mask_counts(seeded_models, name, ratio, num_prunable, hard_count, gsm_count):
    model = seeded_models[name]
    mask = global_magnitude_mask(model, 1 / ratio)
    assert sum(m.numel() for m in mask.values()) == num_prunable
    assert mask_count(mask) == hard_count
    opt = GSM(model.parameters(), lr=0.1, nonzero_ratio=1 / ratio)
    assert opt.num_prunable == num_prunable
    assert opt.keep_count == gsm_count
    # The kept elements are the largest magnitudes: every kept |w| >= every dropped |w|.
    kept = torch.cat([p.detach().abs()[mask[n]] for n, p in prunable_parameters(model).items()])
    dropped = torch.cat([p.detach().abs()[~mask[n]] for n, p in prunable_parameters(model).items()])
    assert kept.min() >= dropped.max()


def brute_force_mask(tensors: dict[str, torch.Tensor], nonzero_ratio: float) -> dict[str, torch.Tensor]:
    """Sort every prunable |w| ascending; threshold = the num_zero-th (0-based); keep |w| >= threshold."""
    prunable = {k: v for k, v in tensors.items() if v.dim() > 1}
    ascending = torch.sort(torch.cat([v.detach().abs().reshape(-1) for v in prunable.values()])).values
    num_zero = int(ascending.numel() * (1 - nonzero_ratio))
    threshold = ascending[num_zero]
    return {k: v.detach().abs() >= threshold for k, v in prunable.items()}


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(24, 10),
                         nn.Linear(10, 5, bias=False))


@pytest.mark.parametrize("nonzero_ratio", [1.0, 0.5, 0.3, 0.1, 1 / 60, 0.001])
@pytest.mark.parametrize("with_ties", [False, True])
def test_global_magnitude_mask_equals_brute_force(nonzero_ratio, with_ties):
    torch.manual_seed(0)
    model = small_model()
    if with_ties:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randint(-4, 5, p.shape).float())
    mask = global_magnitude_mask(model, nonzero_ratio)
    expected = brute_force_mask(dict(model.named_parameters()), nonzero_ratio)
    assert list(mask) == ["0.weight", "3.weight", "4.weight"]  # only dim > 1, in registration order
    for name in expected:
        assert mask[name].dtype == torch.bool
        assert torch.equal(mask[name], expected[name]), name
    n = 162 + 240 + 50
    num_zero = int(n * (1 - nonzero_ratio))
    if with_ties:
        assert mask_count(mask) >= n - num_zero
    else:
        assert mask_count(mask) == n - num_zero
    # The same mask from a dict of tensors (1-D entries and buffers ignored).
    from_dict = global_magnitude_mask(model.state_dict(), nonzero_ratio)
    assert list(from_dict) == list(mask)
    assert all(torch.equal(from_dict[k], mask[k]) for k in mask)


def test_ties_keep_more_than_the_ratio():
    weights = {"a.weight": torch.tensor([[1.0, 2.0, 2.0], [2.0, 3.0, 0.5]]), "a.bias": torch.tensor([9.0, 9.0])}
    # num_zero = int(6 * 0.5) = 3; ascending |w| = 0.5, 1, 2, 2, 2, 3 -> threshold 2 keeps four.
    mask = global_magnitude_mask(weights, 0.5)
    assert list(mask) == ["a.weight"]
    assert torch.equal(mask["a.weight"], torch.tensor([[False, True, True], [True, True, False]]))


def test_global_magnitude_mask_arguments():
    model = small_model()
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="nonzero_ratio"):
            global_magnitude_mask(model, bad)
    with pytest.raises(ValueError, match="prunable"):
        global_magnitude_mask({"bias": torch.ones(3)}, 0.5)


def test_apply_mask_to_weights_zeros_exactly_the_pruned():
    torch.manual_seed(1)
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = global_magnitude_mask(model, 0.2)
    apply_mask_to_weights(model, mask)
    after = model.state_dict()
    for key, value in after.items():
        if key in mask:
            assert torch.equal(value[~mask[key]], torch.zeros(int((~mask[key]).sum())))
            assert torch.equal(value[mask[key]], before[key][mask[key]])
        else:
            assert torch.equal(value, before[key]), key  # biases, BN parameters and buffers untouched
    assert sum(int((after[k] != 0).sum()) for k in mask) == mask_count(mask) == int(452 * 0.2) + 1


def test_masked_grads_keep_pruned_weights_zero_under_sgd():
    torch.manual_seed(2)
    model = small_model()
    mask = global_magnitude_mask(model, 0.25)
    apply_mask_to_weights(model, mask)
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        opt.zero_grad()
        x, y = torch.randn(4, 3, 4, 4, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        apply_mask_to_grads(model, mask)
        for name, p in model.named_parameters():
            if name in mask:
                assert torch.count_nonzero(p.grad[~mask[name]]) == 0
        opt.step()
    params = dict(model.named_parameters())
    for name, m in mask.items():
        assert torch.count_nonzero(params[name].detach()[~m]) == 0, name
        assert (params[name].detach()[m] != start[name][m]).all(), name  # the kept ones trained
    assert not torch.equal(params["3.bias"].detach(), start["3.bias"])  # biases unmasked


def test_apply_mask_to_grads_skips_missing_grads():
    model = small_model()
    mask = global_magnitude_mask(model, 0.5)
    apply_mask_to_grads(model, mask)  # no gradients yet: nothing to do, no error
    assert all(p.grad is None for p in model.parameters())


KNOWN = {
    "conv.weight": torch.tensor([[[[1.0, 0.0], [0.0, -2.0]]], [[[0.0, 0.0], [3.0, 0.0]]]]),  # 8 elements, 3 nonzero
    "conv.bias": torch.tensor([1.0, 2.0]),  # 1-D: not counted
    "fc.weight": torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, -1.0]]),  # 10 elements, 2 nonzero
    "fc.bias": torch.tensor([0.0, 1.0]),
}


@pytest.mark.parametrize("as_numpy", [False, True])
def test_sparsity_report_numbers(as_numpy):
    tensors = {k: v.numpy() for k, v in KNOWN.items()} if as_numpy else KNOWN
    report = sparsity_report(tensors)
    assert [(layer.name, layer.elements, layer.nonzeros) for layer in report.layers] == [
        ("conv.weight", 8, 3), ("fc.weight", 10, 2)]
    assert report.layers[0].density == pytest.approx(3 / 8)
    assert report.layers[1].density == pytest.approx(0.2)
    assert report.elements == 18
    assert report.nonzeros == 5
    assert report.sparsity == pytest.approx(13 / 18)
    assert report.compression_ratio == pytest.approx(3.6)
    text = report.format()
    for expected in ["prunable parameters: 18", "non-zeros: 5", "sparsity: 0.722222", "compression ratio: 3.600"]:
        assert expected in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("conv.", "fc."))]
    assert rows == [["conv.weight", "8", "3", "0.3750"], ["fc.weight", "10", "2", "0.2000"]]
    assert "bias" not in text


def test_sparsity_report_of_a_module_and_edge_cases():
    torch.manual_seed(0)
    model = build_model("lenet300")
    mask = global_magnitude_mask(model, 1 / 60)
    apply_mask_to_weights(model, mask)
    report = sparsity_report(model)
    assert [layer.name for layer in report.layers] == ["linear1.weight", "linear2.weight", "linear3.weight"]
    assert report.elements == 266200 and report.nonzeros == 4437
    assert report.compression_ratio == pytest.approx(266200 / 4437)
    assert [layer.nonzeros for layer in report.layers] == [int(mask[n].sum()) for n in mask]
    empty = sparsity_report({"w": torch.zeros(3, 3)})
    assert empty.nonzeros == 0 and empty.sparsity == 1.0 and empty.compression_ratio == float("inf")
    assert "compression ratio: inf" in empty.format()
    dense = sparsity_report({"w": np.ones((2, 3), dtype=np.float32)})
    assert dense.sparsity == 0.0 and dense.compression_ratio == 1.0


def test_prune_readiness_of_a_hand_computed_case():
    """Ten prunable weights at ratio 0.3: the hard prune keeps the three largest; of the seven it removes, three
    are above 0.01 and five above 0.001. A 2-D weight in a group that GSM does not rank is not counted."""
    from gsm import prune_readiness

    model = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(2, 2, bias=False), "frozen": nn.Linear(2, 2)})
    with torch.no_grad():
        model["a"].weight.copy_(torch.tensor([[0.5, -0.02, 0.004], [0.0005, -0.3, 0.011]]))
        model["a"].bias.fill_(5.0)
        model["b"].weight.copy_(torch.tensor([[-0.2, 0.002], [0.0, -0.0101]]))
        model["frozen"].weight.fill_(7.0)
    optimizer = GSM([{"params": [model["a"].weight, model["b"].weight]},
                     {"params": [model["a"].bias, *model["frozen"].parameters()], "prunable": False}],
                    lr=0.1, nonzero_ratio=0.3)
    r = prune_readiness(model, optimizer)
    assert (r.prunable, r.kept, r.removed) == (10, 3, 7)
    assert (r.outside_above_1e_2, r.outside_above_1e_3) == (3, 5)
    assert r.share_above_1e_2 == pytest.approx(3 / 7) and r.share_above_1e_3 == pytest.approx(5 / 7)
    removed = np.sqrt(0.02 ** 2 + 0.011 ** 2 + 0.0101 ** 2 + 0.004 ** 2 + 0.002 ** 2 + 0.0005 ** 2)
    assert r.removed_norm == pytest.approx(removed, rel=1e-6)
    assert r.kept_norm == pytest.approx(np.sqrt(0.5 ** 2 + 0.3 ** 2 + 0.2 ** 2), rel=1e-6)
    assert r.norm_ratio == pytest.approx(removed / np.sqrt(0.38), rel=1e-6)
    # After the prune nothing is left outside.
    apply_mask_to_weights(model, optimizer.hard_mask(model))
    r = prune_readiness(model, optimizer)
    assert (r.outside_above_1e_2, r.outside_above_1e_3, r.removed_norm, r.share_above_1e_2) == (0, 0, 0.0, 0.0)

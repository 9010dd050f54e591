"""What GSM checks before a step writes anything, and what it refuses to load: gradients and momentum buffers
that do not fit their parameters, parameters that share memory, sparse gradients, foreign optimizer states,
non-finite and low-precision metrics. Each case on both paths (the compiled host kernels, `fused=None` on
float32 CPU tensors, and the generic path, `fused=False`), which must agree."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gsm import GSM

pytestmark = pytest.mark.usefixtures("single_thread")

PATHS = [pytest.param(None, id="host"), pytest.param(False, id="generic")]


def two_layer(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def backward(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(torch.randn(16, 64, generator=gen)), torch.randint(0, 10, (16,), generator=gen)
                                ).backward()


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("fused", PATHS)
def test_a_momentum_buffer_of_another_shape_is_refused_before_any_write(fused):
    """A buffer that the update would overrun (or broadcast) raises RuntimeError, as SGD's step raises, and
    no parameter of any group changes."""
    model = two_layer()
    opt = GSM([{"params": [model[0].weight, model[0].bias]}, {"params": [model[2].weight, model[2].bias]}], lr=0.1,
              momentum=0.9, nonzero_ratio=0.1, fused=fused)
    backward(model)
    opt.step()
    opt.state[model[2].weight]["momentum_buffer"] = torch.zeros(1, 256)  # (10, 256) weight; same strides
    backward(model, seed=2)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"momentum buffer.*\(1, 256\).*its parameter \(10, 256\)"):
        opt.step()
    assert unchanged(model, before)


@pytest.mark.parametrize("fused", PATHS)
def test_a_gradient_that_changed_shape_is_refused(fused):
    model = two_layer()
    opt = GSM(model.parameters(), lr=0.1, nonzero_ratio=0.1, fused=fused)
    backward(model)
    opt.step()
    backward(model, seed=2)
    model[0].weight.grad.data = torch.randn(1, 64)  # past autograd's own shape check
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"gradient \(1, 64\) .* does not fit its parameter \(256, 64\)"):
        opt.step()
    assert unchanged(model, before)


@pytest.mark.parametrize("fused", PATHS)
def test_a_sparse_gradient_in_a_later_group_leaves_the_first_group_alone(fused):
    model = two_layer()
    opt = GSM([{"params": [model[0].weight, model[0].bias]}, {"params": [model[2].weight, model[2].bias]}], lr=0.1,
              nonzero_ratio=0.1, fused=fused)
    backward(model)
    model[2].bias.grad = model[2].bias.grad.to_sparse()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert unchanged(model, before)


def test_parameters_that_share_memory_are_refused():
    """Two Parameters viewing one storage would race on the host path: refused when added, and at a step when
    they came to share memory later."""
    base = torch.randn(8, 6)
    with pytest.raises(ValueError, match="share memory"):
        GSM([nn.Parameter(base[:4]), nn.Parameter(base[4:])], lr=0.1, nonzero_ratio=0.5)
    a, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4, 6))
    opt = GSM([a], lr=0.1, nonzero_ratio=0.5)
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [nn.Parameter(a.detach()[:2])]})
    assert len(opt.param_groups) == 1  # nothing added
    opt.add_param_group({"params": [b]})
    b.data = a.data[2:]
    a.grad, b.grad = torch.randn(4, 6), torch.randn(2, 6)
    before = a.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(a.detach(), before)


def test_tied_weights_are_one_parameter_and_train():
    """Weights tied the usual way (one Parameter in two modules) are ranked once and update normally."""
    embedding, head = nn.Embedding(50, 8), nn.Linear(8, 50, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    opt = GSM(model.parameters(), lr=0.1, nonzero_ratio=0.25)
    assert opt.num_prunable == 400
    tokens = torch.randint(0, 50, (20,))
    nn.functional.cross_entropy(head(embedding(tokens)), tokens).backward()
    opt.step()
    assert opt.num_active >= opt.keep_count == 100


def nan_model(fused):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(40, 25))
    w.grad = torch.randn(40, 25)
    w.grad[3, 4] = float("nan")
    w.grad[7, 1] = float("inf")
    opt = GSM([w], lr=0.1, momentum=0.9, nonzero_ratio=0.1, fused=fused)
    opt.step()
    return w, opt


def test_a_nan_gradient_reaches_the_weights_on_both_paths():
    """NaN and inf metrics rank above every number (as in torch.topk), on both paths alike: the non-finite
    elements take their gradients, so a NaN shows in the weights as it would with SGD."""
    results = [nan_model(fused) for fused in (None, False)]
    for (w, opt), fused_step in zip(results, (True, False)):
        assert opt.last_step_fused is fused_step
        assert torch.isnan(w[3, 4]) and torch.isinf(w[7, 1])
        assert opt.num_active == opt.keep_count == 100  # no ties among the other products
        assert math.isfinite(float(opt.last_threshold))
    (w_host, opt_host), (w_generic, opt_generic) = results
    assert torch.equal(opt_host.last_threshold, opt_generic.last_threshold)
    torch.testing.assert_close(w_host, w_generic, rtol=3e-7, atol=1e-7, equal_nan=True)  # an ulp: torch fuses


@pytest.mark.parametrize("fused", PATHS)
def test_more_nan_metrics_than_q_make_only_them_active(fused):
    """When at least Q metrics are NaN, tau is NaN and exactly the NaN elements take their gradients."""
    w = nn.Parameter(torch.ones(10, 10))
    w.grad = torch.ones(10, 10)
    w.grad[0, :5] = float("nan")
    opt = GSM([w], lr=0.1, momentum=0.0, nonzero_ratio=0.03, fused=fused)
    opt.step()
    assert torch.isnan(opt.last_threshold) and opt.num_active == 5
    assert bool(torch.isnan(w[0, :5]).all()) and bool((w[1:] == 1.0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_metrics_are_ranked_in_float32(dtype):
    """w ~ 1e-3 and g ~ 1e-5 make products of 1e-8, which float16 flushes to ties at zero: the metric is
    computed in float32 (where the product of two such numbers is exact), so Q elements are active, and more
    only where the exact products tie."""
    torch.manual_seed(0)
    w = nn.Parameter((torch.rand(40, 100) * 1e-3 + 1e-4).to(dtype))
    w.grad = (torch.rand(40, 100) * 1e-5 + 1e-6).to(dtype)
    exact = (w.detach().double() * w.grad.double()).abs().flatten()
    expected = int((exact >= exact.sort(descending=True).values[399]).sum())
    opt = GSM([w], lr=0.1, nonzero_ratio=0.1)
    opt.step()
    assert opt.last_step_fused is False  # float16 and bfloat16 take the generic path
    assert opt.num_active == expected and 400 <= expected <= 402
    if dtype is torch.float16:
        assert int(((w.detach() * w.grad) == 0).sum()) > 3000  # what ranking in float16 would have seen


def test_fused_true_refuses_what_the_kernels_cannot_take():
    w = nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="fused=True"):
        GSM([w], lr=0.1, nonzero_ratio=0.5, fused=True)
    with pytest.raises(ValueError, match="Invalid fused"):
        GSM([w], lr=0.1, nonzero_ratio=0.5, fused="yes")
    v = nn.Parameter(torch.randn(6, 5))
    opt = GSM([v], lr=0.1, nonzero_ratio=0.5, fused=True)
    v.grad = torch.randn(5, 6).t()  # same shape, other strides: the kernels need the parameter's
    before = v.detach().clone()
    with pytest.raises(RuntimeError, match="fused=True"):
        opt.step()
    assert torch.equal(v.detach(), before)


# ----------------------------------------------------------------------------------------------------------
# Loading optimizer states


def trained(nonzero_ratio: float, seed: int = 0, momentum: float = 0.9) -> tuple[nn.Module, GSM]:
    model = two_layer(seed)
    opt = GSM(model.parameters(), lr=0.1, momentum=momentum, nonzero_ratio=nonzero_ratio)
    backward(model)
    opt.step()
    return model, opt


def test_load_state_dict_restores_the_saved_ratio_as_it_restores_lr():
    _, saved = trained(1 / 10)
    model, opt = trained(1 / 2, seed=1)
    state = saved.state_dict()
    assert all(group["nonzero_ratio"] == 1 / 10 for group in state["param_groups"])
    opt.load_state_dict(state)
    assert opt.nonzero_ratio == 1 / 10 and opt.keep_count == int(0.1 * (64 * 256 + 256 * 10))


def test_load_state_dict_of_an_older_gsm_state_keeps_the_ratio():
    """A state saved before the ratio was stored in the param groups loads, keeping the optimizer's ratio."""
    _, saved = trained(1 / 10)
    state = saved.state_dict()
    for group in state["param_groups"]:
        del group["nonzero_ratio"]
    model, opt = trained(1 / 4, seed=1)
    opt.load_state_dict(state)
    assert opt.nonzero_ratio == 1 / 4 and all(group["nonzero_ratio"] == 1 / 4 for group in opt.param_groups)
    backward(model)
    opt.step()
    assert opt.num_active == opt.keep_count


def sgd_state() -> dict:
    model = two_layer()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    backward(model)
    sgd.step()
    return sgd.state_dict()


def bad_buffer_state() -> dict:
    _, saved = trained(1 / 10)
    state = saved.state_dict()
    state["state"][2]["momentum_buffer"] = torch.zeros(1, 256)
    return state


def adam_state() -> dict:
    state = trained(1 / 10)[1].state_dict()
    state["state"][0] = {"exp_avg": torch.zeros(256, 64), "step": torch.tensor(1.0)}
    return state


def bad_hyperparameter_state() -> dict:
    state = trained(1 / 10)[1].state_dict()
    state["param_groups"][0]["momentum"] = 5.0
    return state


def stray_entry_state() -> dict:
    state = trained(1 / 10)[1].state_dict()
    state["state"][99] = {"momentum_buffer": torch.zeros(3)}
    return state


@pytest.mark.parametrize("make,message", [
    (sgd_state, "has no 'prunable': a state of another optimizer"),
    (bad_buffer_state, r"momentum buffer of parameter 2 is \(1, 256\) torch.float32, its parameter \(10, 256\)"),
    (adam_state, r"has state \['exp_avg', 'step'\]; GSM keeps only a momentum_buffer"),
    (bad_hyperparameter_state, "Invalid momentum value: 5.0"),
    (stray_entry_state, "an entry for 99, which is no parameter"),
    (lambda: {"state": {}}, "not an optimizer state"),
    (lambda: {"state": {}, "param_groups": []}, "do not match this optimizer's"),
], ids=["sgd", "buffer-shape", "adam", "hyperparameter", "stray-entry", "no-groups", "group-count"])
def test_load_state_dict_refuses_in_one_line_and_keeps_the_state(make, message):
    model, opt = trained(1 / 2, seed=1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message) as caught:
        opt.load_state_dict(make())
    assert "\n" not in str(caught.value)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i]["momentum_buffer"], before["state"][i]["momentum_buffer"])
               for i in before["state"])
    backward(model)
    opt.step()  # still usable


def test_size_one_dimensions_may_have_any_stride():
    """A 1x1 convolution's gradient may come with other strides on its size-1 dimensions (as DDP's buckets
    make them): the same memory layout, so the host kernels take it."""
    w = nn.Parameter(torch.randn(32, 16, 1, 1))
    w.grad = torch.randn(32, 16).as_strided((32, 16, 1, 1), (16, 1, 16, 16))
    opt = GSM([w], lr=0.1, nonzero_ratio=0.25)
    opt.step()
    assert opt.last_step_fused is True and opt.num_active == 128

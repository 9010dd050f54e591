"""Tests for base_model: state-dict keys against the released models, depth, forward shapes and the init."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from base_model import MODEL_NAMES, build_model, trains_channels_last

KEYS_FILE = Path(__file__).resolve().parent / "original-state-dict-keys.txt"
RELEASED_MODELS = ("lenet300", "lenet5", "rc56")
DTYPES = {"float32": torch.float32, "int64": torch.int64}


# Small tensors: one intra-op thread is fastest, and immune to a busy machine's contention.
pytestmark = pytest.mark.usefixtures("single_thread")


def parse_keys_file() -> tuple[dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]], dict[str, dict[str, int]]]:
    """({model: [(key, shape, dtype), ...] in file order}, {model: {'keys', 'prunable', 'total'}})."""
    entries: dict[str, list] = {}
    totals: dict[str, dict[str, int]] = {}
    total_pattern = re.compile(r"#\s*(\S+)\s+keys\s+(\d+)\s+prunable\(2D/4D\)\s+(\d+)\s+total\s+(\d+)\s*$")
    for line in KEYS_FILE.read_text().splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            match = total_pattern.match(line)
            if match:
                model, keys, prunable, total = match.groups()
                totals[model] = {"keys": int(keys), "prunable": int(prunable), "total": int(total)}
            continue
        model, key, rest = line.split(" ", 2)
        shape_text, dtype = rest.rsplit(" ", 1)
        shape = tuple(int(s) for s in shape_text.strip("()").split(",") if s.strip())
        entries.setdefault(model, []).append((key, shape, DTYPES[dtype]))
    return entries, totals


ENTRIES, TOTALS = parse_keys_file()


def test_keys_file_parsed_completely():
    assert set(ENTRIES) == set(RELEASED_MODELS)
    assert set(TOTALS) == set(RELEASED_MODELS)
    # The totals lines agree with the entries themselves.
    for model, rows in ENTRIES.items():
        assert len(rows) == TOTALS[model]["keys"]
        assert sum(math.prod(s) for _, s, _ in rows if len(s) > 1) == TOTALS[model]["prunable"]
        assert sum(math.prod(s) for _, s, _ in rows) == TOTALS[model]["total"]
    assert [TOTALS[m]["prunable"] for m in RELEASED_MODELS] == [266200, 430500, 851504]


@pytest.mark.parametrize("name", RELEASED_MODELS)
def test_state_dict_matches_released_models(name):
    state = build_model(name).state_dict()
    expected = ENTRIES[name]
    # Same keys in the same order, then the same shape and dtype for each.
    assert list(state) == [key for key, _, _ in expected]
    for key, shape, dtype in expected:
        assert tuple(state[key].shape) == shape, key
        assert state[key].dtype == dtype, key
    totals = TOTALS[name]
    assert len(state) == totals["keys"]
    assert sum(t.numel() for t in state.values() if t.dim() > 1) == totals["prunable"]
    assert sum(t.numel() for t in state.values()) == totals["total"]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnet_depth_and_forward(depth):
    torch.manual_seed(0)
    model = build_model(f"rc{depth}")
    n = (depth - 2) // 6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    main_path = [c for c in convs if c.kernel_size == (3, 3)]
    shortcuts = [c for c in convs if c.kernel_size == (1, 1)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    # 6n+2 layers = stem conv + 3 stages x n blocks x 2 convs + fc; the 1x1 projections are not counted.
    assert len(main_path) == 6 * n + 1
    assert len(main_path) + len(linears) == depth
    assert len(shortcuts) == 2  # 16->32 and 32->64
    assert [(c.in_channels, c.out_channels, c.stride) for c in shortcuts] == [(16, 32, (2, 2)), (32, 64, (2, 2))]
    assert len(linears) == 1 and linears[0].in_features == 64 and linears[0].out_features == 10
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6 * n + 1 + 2
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_lenet_forward(name):
    torch.manual_seed(0)
    model = build_model(name)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_lenet5_is_the_caffe_variant():
    model = build_model("lenet5")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 20, (5, 5)), (20, 50, (5, 5))]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(800, 500), (500, 10)]


def test_lenet300_accepts_flat_input():
    model = build_model("lenet300")
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), model(x.reshape(3, 784)))


def test_model_names_and_unknown_name():
    assert set(MODEL_NAMES) == {"lenet300", "lenet5", "rc20", "rc32", "rc44", "rc56", "rc110"}
    with pytest.raises(ValueError) as info:
        build_model("resnet56")
    message = str(info.value)
    assert "resnet56" in message
    for name in MODEL_NAMES:
        assert name in message


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "rc20"])
def test_init_xavier_uniform_zero_bias_unit_bn(name):
    torch.manual_seed(1)
    model = build_model(name)
    checked = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach().double()
            receptive = w[0, 0].numel() if w.dim() > 2 else 1
            fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert w.abs().max() <= bound + 1e-7
            # A uniform sample's std has relative standard error about sqrt(0.2 / n); allow 6 of them.
            tolerance = 6 * math.sqrt(0.2 / w.numel())
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=tolerance)
            # The spread reaches most of the bound, so it is not a narrower (e.g. Kaiming-default) init.
            assert w.abs().max() > 0.9 * bound
            if module.bias is not None:
                assert torch.count_nonzero(module.bias) == 0
            checked += 1
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight.detach(), torch.ones_like(module.weight))
            assert torch.equal(module.bias.detach(), torch.zeros_like(module.bias))
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean))
            assert torch.equal(module.running_var, torch.ones_like(module.running_var))
    assert checked >= 3


def test_build_model_is_fresh_each_call():
    torch.manual_seed(0)
    a = build_model("lenet300")
    torch.manual_seed(0)
    b = build_model("lenet300")
    c = build_model("lenet300")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.linear1.weight, c.linear1.weight)


def test_channels_last_lenet5_computes_what_the_default_layout_computes():
    """LeNet-5 trains in channels_last (on the CPU too): a layout, not another model. The same weights give
    the same logits and gradients as in the default layout, up to float rounding."""
    assert trains_channels_last("lenet5", "cpu") and trains_channels_last("rc56", "cuda")
    assert not trains_channels_last("lenet300", "cuda") and not trains_channels_last("rc56", "cpu")
    torch.manual_seed(0)
    plain = build_model("lenet5")
    fast = build_model("lenet5")
    fast.load_state_dict(plain.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    outputs = []
    for model, images in ((plain, x), (fast, x.contiguous(memory_format=torch.channels_last))):
        logits = model(images)
        nn.functional.cross_entropy(logits, y).backward()
        outputs.append((logits.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (plain_logits, plain_grads), (fast_logits, fast_grads) = outputs
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-5, atol=1e-6)
    for key, grad in plain_grads.items():  # summed in another order: compared to the gradient's scale
        assert float((fast_grads[key] - grad).abs().max()) <= 1e-5 * float(grad.abs().max()), key
    assert fast.stem.conv2.weight.grad.is_contiguous(memory_format=torch.channels_last)

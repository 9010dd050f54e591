"""Pruning one's own model with the library: the prunable set shared by GSM, the hard prune and the reports,
wrapped models, masks and compressed exports as files, the public param groups, argument and frozen-weight
rules, sharded parameters refused, and the example script."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gsm
from base_model import build_model
from gsm import GSM
from gsm.experiments.configs import LENET_BASE, RC_BASE
from gsm.pruned_io import SPARSE_FORMAT, file_format
from gsm.experiments.trainer import param_groups as trainer_param_groups

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


class Custom(nn.Module):
    """Not one of the project's networks: conv 2->6, BatchNorm, conv 6->6 (1x1), fc 150->12, fc 12->3."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(2, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.mix = nn.Conv2d(6, 6, 1)
        self.hidden = nn.Linear(150, 12)
        self.classifier = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.mix(torch.relu(self.norm(self.first(x)))))
        return self.classifier(torch.relu(self.hidden(x.flatten(1))))


def step(model: nn.Module, optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 2, 5, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("layout", ["first and classifier dense", "bias group ranked"])
def test_gsm_and_the_hard_prune_agree_on_what_is_prunable(layout):
    torch.manual_seed(0)
    model = Custom()
    m = model
    if layout == "first and classifier dense":
        groups = [{"params": [m.first.weight, m.classifier.weight], "prunable": False},
                  {"params": [m.mix.weight, m.hidden.weight]},
                  {"params": [m.first.bias, m.norm.weight, m.norm.bias, m.mix.bias, m.hidden.bias,
                              m.classifier.bias], "weight_decay": 0.0}]
        expected = ["mix.weight", "hidden.weight"]
    else:
        groups = [{"params": [m.first.weight, m.mix.weight, m.hidden.weight, m.classifier.weight]},
                  {"params": [m.hidden.bias], "prunable": True},
                  {"params": [m.first.bias, m.norm.weight, m.norm.bias, m.mix.bias, m.classifier.bias]}]
        expected = ["first.weight", "mix.weight", "hidden.weight", "hidden.bias", "classifier.weight"]
    optimizer = GSM(groups, lr=0.05, momentum=0.9, weight_decay=1e-3, nonzero_ratio=0.2)
    for i in range(3):
        step(model, optimizer, i)
    assert optimizer.prunable_names(model) == expected
    n = sum(dict(model.named_parameters())[name].numel() for name in expected)
    assert optimizer.num_prunable == n
    mask = optimizer.hard_mask(model)
    assert list(mask) == expected
    # Q (what GSM trained for) and the hard prune's kept count agree: N - int(N * 0.8) = Q or Q + 1.
    assert gsm.mask_count(mask) in (optimizer.keep_count, optimizer.keep_count + 1)
    report = gsm.sparsity_report(model, names=expected)
    assert report.elements == n and [layer.name for layer in report.layers] == expected
    gsm.apply_mask_to_weights(model, mask)
    assert gsm.sparsity_report(model, names=expected).nonzeros == gsm.mask_count(mask)
    # The default (every dim > 1) would count other parameters: why the optimizer's set is passed.
    assert gsm.sparsity_report(model).elements != n


def test_wrapped_models_give_plain_names():
    torch.manual_seed(0)
    model = build_model("lenet300")
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until called

    class DataParallelLike(nn.Module):  # what DistributedDataParallel looks like from outside: `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = DataParallelLike(compiled)
    assert list(dict(wrapped.named_parameters()))[0] == "module._orig_mod.linear1.weight"
    assert list(gsm.prunable_parameters(wrapped)) == ["linear1.weight", "linear2.weight", "linear3.weight"]
    mask = gsm.global_magnitude_mask(wrapped, 1 / 60)
    assert list(mask) == ["linear1.weight", "linear2.weight", "linear3.weight"] and gsm.mask_count(mask) == 4437
    gsm.apply_mask_to_weights(wrapped, mask)
    assert gsm.sparsity_report(wrapped).nonzeros == 4437
    optimizer = GSM(wrapped.parameters(), lr=0.1, nonzero_ratio=1 / 60)
    assert optimizer.prunable_names(wrapped) == ["linear1.weight", "linear2.weight", "linear3.weight"]


def test_wrapped_optimizers_give_the_gsm_inside():
    """What accelerate's AcceleratedOptimizer (an Optimizer subclass) and Lightning's wrapper look like from
    outside: the optimizer they wrap as `.optimizer`."""
    model = build_model("lenet300")
    optimizer = GSM(model.parameters(), lr=0.1, nonzero_ratio=0.1)

    class AcceleratedLike(torch.optim.Optimizer):
        def __init__(self, inner):
            self.optimizer = inner

    class Plain:
        optimizer = "not an optimizer"

    assert gsm.unwrap_optimizer(AcceleratedLike(AcceleratedLike(optimizer))) is optimizer
    assert gsm.unwrap_optimizer(optimizer) is optimizer
    plain = Plain()
    assert gsm.unwrap_optimizer(plain) is plain


def test_mask_file_round_trip_and_format(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5")
    mask = gsm.global_magnitude_mask(model, 1 / 125)
    mask["conv/odd"] = torch.tensor([[True, False]])  # a '/' in a name survives the file
    path = tmp_path / "mask.hdf5"
    gsm.save_mask(mask, path)
    loaded = gsm.load_mask(path)
    assert list(loaded) == list(mask)
    assert all(loaded[k].dtype == torch.bool and torch.equal(loaded[k], mask[k]) for k in mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.hdf5"]  # no temporary file left
    with pytest.raises(gsm.WeightsFileError, match="gsm-mask-v1 file, not a weights file"):
        gsm.read_hdf5(path)
    with pytest.raises(gsm.WeightsFileError, match="not gsm-sparse-v1"):
        gsm.load_sparse(path)


@pytest.mark.parametrize("name, ratio", [("lenet300", 60), ("rc20", 10)])
def test_compressed_export_round_trip_is_exact(tmp_path, name, ratio):
    torch.manual_seed(0)
    model = build_model(name)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.dtype.is_floating_point:
                buffer.uniform_(0.5, 1.5)  # BatchNorm statistics that are not the defaults
    mask = gsm.global_magnitude_mask(model, 1 / ratio)
    gsm.apply_mask_to_weights(model, mask)
    with torch.no_grad():
        model.state_dict()[next(iter(mask))].view(-1)[0] = -0.0  # a -0.0 that the hard prune can leave
    path, dense_path = tmp_path / "pruned.hdf5", tmp_path / "dense.hdf5"
    gsm.save_sparse(model, path)
    gsm.save_hdf5(model, dense_path)
    assert file_format(path) == SPARSE_FORMAT and file_format(dense_path) is None
    state = gsm.load_sparse(path)
    assert list(state) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    fresh = build_model(name)
    gsm.load_sparse(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    # Stored compressed: about 8 bytes per kept weight instead of 4 per weight.
    assert os.path.getsize(path) < os.path.getsize(dense_path) / (ratio / 3)
    # display_hdf5 reads the export as the dense model.
    import display_hdf5
    arrays = display_hdf5.read_arrays(str(path))
    assert all(np.array_equal(arrays[k], v.numpy()) for k, v in model.state_dict().items())


def test_public_param_groups_are_the_trainers():
    for name, config in (("lenet300", LENET_BASE), ("rc20", RC_BASE)):
        model = build_model(name)
        public = gsm.param_groups(model, config.weight_decay, config.bias_lr_factor)
        trainer = trainer_param_groups(model, config)
        assert [(g["lr_factor"], g["weight_decay"], [id(p) for p in g["params"]]) for g in public] == \
               [(g["lr_factor"], g["weight_decay"], [id(p) for p in g["params"]]) for g in trainer]
    groups = gsm.param_groups(build_model("rc20"), 1e-4, 2.0)
    assert [(g["lr_factor"], g["weight_decay"]) for g in groups] == [(1.0, 1e-4), (1.0, 0.0), (2.0, 0.0)]
    # Frozen parameters are left out.
    model = build_model("lenet300")
    model.linear1.weight.requires_grad_(False)
    assert all(p is not model.linear1.weight for g in gsm.param_groups(model, 5e-4) for p in g["params"])


def test_an_invalid_param_group_is_not_added():
    layer = nn.Linear(3, 3)
    optimizer = GSM([layer.weight], lr=0.1, nonzero_ratio=0.5)
    with pytest.raises(ValueError, match="momentum"):
        optimizer.add_param_group({"params": [layer.bias], "momentum": 2.0})
    assert len(optimizer.param_groups) == 1 and optimizer.num_prunable == 9
    optimizer.add_param_group({"params": [layer.bias], "momentum": 0.5})
    assert len(optimizer.param_groups) == 2


def test_a_warning_when_every_ranked_element_gets_its_gradient():
    torch.manual_seed(0)
    used, frozen = nn.Linear(10, 10), nn.Linear(10, 100)  # N = 1100, Q = 110 >= the 100 ranked elements
    optimizer = GSM(list(used.parameters()) + list(frozen.parameters()), lr=0.1, nonzero_ratio=0.1)
    x = torch.randn(4, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            optimizer.zero_grad()
            used(x).sum().backward()
            optimizer.step()
    warned = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1 and "only 100 prunable elements have gradients" in str(warned[0].message)
    assert warned[0].filename == __file__  # the line that called step, not torch's wrappers
    assert optimizer.num_active == 100
    # With nonzero_ratio=1, GSM is SGD by design: nothing to warn about.
    optimizer = GSM(list(used.parameters()) + list(frozen.parameters()), lr=0.1, nonzero_ratio=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.zero_grad()
        used(x).sum().backward()
        optimizer.step()
    # With enough ranked elements, no warning.
    optimizer = GSM(used.parameters(), lr=0.1, nonzero_ratio=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.zero_grad()
        used(x).sum().backward()
        optimizer.step()


def test_flat_parameters_and_dtensors_beside_plain_tensors_are_refused(tmp_path):
    """FSDP1's flat parameters cannot be ranked; a DTensor is ranked over its ranks (tests/test_fsdp2.py), but not
    beside plain tensors, whose elements the ranks would count once each."""
    flat = nn.Parameter(torch.zeros(10, 10))
    flat._is_flat_param = True  # how FSDP marks its flat parameters
    with pytest.raises(ValueError, match="FSDP flat parameter"):
        GSM([flat], lr=0.1, nonzero_ratio=0.5)

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        optimizer = GSM([nn.Parameter(torch.randn(4, 4))], lr=0.1, nonzero_ratio=0.5)
        with pytest.raises(ValueError, match="DTensor"):
            optimizer.add_param_group({"params": [sharded]})
        assert len(optimizer.param_groups) == 1
    finally:
        dist.destroy_process_group()


def test_the_example_prunes_its_own_model(tmp_path, capsys):
    """examples/prune_your_model.py, its main run in this process (on one thread, as the other tests here)."""
    example = runpy.run_path(str(REPO / "examples" / "prune_your_model.py"))  # its definitions, not __main__
    assert example["main"](["--quick", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "prunable, Q = 449 of 8992" in lines[1]
    assert "450 of 8992 prunable weights kept (20.0x)" in lines[2]
    assert "equal to the pruned model: True" in lines[4]
    accuracies = [float(line.split("top-1 ")[1].split("%")[0]) for line in lines[:3]]
    assert accuracies[2] > 80.0  # the pruned model still classifies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.hdf5", "pruned_dense.hdf5", "pruned_sparse.hdf5"]
    assert gsm.mask_count(gsm.load_mask(tmp_path / "mask.hdf5")) == 450


def test_the_library_imports_none_of_the_experiments(tmp_path):
    """`import gsm` is the library alone: none of the experiments, the model zoo, the datasets, matplotlib or
    TensorBoard comes with it (run from another folder, as a user's program runs)."""
    code = ("import sys, gsm; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('base_model', 'dataset', 'matplotlib', 'tensorboard', 'tensorflow') or m.startswith('gsm.experiments'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""

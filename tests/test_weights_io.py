"""Tests for gsm.weights_io: the hdf5 weights format (docs/design.md, section 3), load errors, and atomic writes."""
from __future__ import annotations

import os
import re

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import gsm
import hdf5_cases as cases
from base_model import build_model
from gsm.weights_io import WeightsFileError, load_hdf5, read_hdf5, save_hdf5


# Small tensors: one intra-op thread is fastest, and immune to a busy machine's contention.
pytestmark = pytest.mark.usefixtures("single_thread")


def trained_looking(name: str, seed: int) -> nn.Module:
    """A model whose BN buffers are not at their defaults, so a round trip that skipped them would show."""
    torch.manual_seed(seed)
    model = build_model(name)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                value.fill_(1234 + seed)
            elif key.endswith(("running_mean", "running_var", "bias")):
                value.copy_(torch.rand(value.shape) + 0.5)
    return model


@pytest.mark.parametrize("name", ["lenet5", "rc56"])
def test_round_trip(tmp_path, name):
    model = trained_looking(name, seed=0)
    path = tmp_path / "finish.hdf5"
    save_hdf5(model, path)
    state = model.state_dict()
    with h5py.File(path, "r") as f:
        # One dataset per key, in state-dict order, nothing else (no groups, no attributes).
        assert list(f.keys()) == list(state)
        assert len(f.attrs) == 0
        for key, value in state.items():
            dataset = f[key]
            assert isinstance(dataset, h5py.Dataset)
            assert len(dataset.attrs) == 0
            assert dataset.shape == tuple(value.shape)
            assert dataset.dtype == (np.int64 if key.endswith("num_batches_tracked") else np.float32)
            assert np.array_equal(dataset[()], value.numpy())
    arrays = read_hdf5(path)
    assert list(arrays) == list(state)
    fresh = build_model(name)
    assert not torch.equal(fresh.state_dict()[next(iter(state))], state[next(iter(state))])
    assert load_hdf5(path, fresh) is fresh
    loaded = fresh.state_dict()
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key
    if name == "rc56":
        assert int(loaded["conv1.bn.num_batches_tracked"]) == 1234
        assert sum(k.endswith("num_batches_tracked") for k in loaded) == 57


def test_channels_last_weights_are_stored_in_the_logical_layout(tmp_path):
    """The convolutional models train in channels_last; their files hold the same arrays as a contiguous
    model's (the released code's layout), and loading keeps the model's own layout."""
    model = trained_looking("lenet5", seed=1)
    fast = trained_looking("lenet5", seed=1).to(memory_format=torch.channels_last)
    assert not fast.stem.conv2.weight.is_contiguous()
    save_hdf5(model, tmp_path / "plain.hdf5")
    save_hdf5(fast, tmp_path / "fast.hdf5")
    plain_arrays, fast_arrays = read_hdf5(tmp_path / "plain.hdf5"), read_hdf5(tmp_path / "fast.hdf5")
    for key, array in plain_arrays.items():
        assert np.array_equal(fast_arrays[key], array), key
    target = build_model("lenet5").to(memory_format=torch.channels_last)
    load_hdf5(tmp_path / "plain.hdf5", target)
    assert target.stem.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(target.stem.conv2.weight, model.stem.conv2.weight)


def test_slash_in_key_is_stored_as_plus(tmp_path):
    tensors = {"stage1/block0/conv.weight": torch.ones(2, 3), "linear.bias": torch.arange(4, dtype=torch.float32),
               "count": torch.tensor(5, dtype=torch.int64)}
    path = tmp_path / "dict.hdf5"
    save_hdf5(tensors, path)
    with h5py.File(path, "r") as f:
        assert list(f.keys()) == ["stage1+block0+conv.weight", "linear.bias", "count"]
        assert isinstance(f["stage1+block0+conv.weight"], h5py.Dataset)
        assert f["count"].dtype == np.int64 and f["count"][()] == 5
    arrays = read_hdf5(path)
    assert list(arrays) == list(tensors)
    assert np.array_equal(arrays["stage1/block0/conv.weight"], np.ones((2, 3), dtype=np.float32))
    assert arrays["stage1/block0/conv.weight"].dtype == np.float32


def test_numpy_values_can_be_saved(tmp_path):
    path = tmp_path / "np.hdf5"
    save_hdf5({"w": np.full((2, 2), 0.25, dtype=np.float32)}, path)
    assert np.array_equal(read_hdf5(path)["w"], np.full((2, 2), 0.25, dtype=np.float32))


def write_raw(path, arrays: dict[str, np.ndarray]) -> None:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)


def lenet5_arrays() -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in build_model("lenet5").state_dict().items()}


def drop(key):
    return lambda arrays: arrays.pop(key)


def put(key, value):
    return lambda arrays: arrays.__setitem__(key, value)


@pytest.mark.parametrize("damage, message", [
    (drop("linear1.bias"), r"missing keys: linear1\.bias"),
    (put("linear3.weight", np.zeros((3, 3), dtype=np.float32)), r"unexpected keys: linear3\.weight"),
    (put("linear2.weight", np.zeros((10, 400), dtype=np.float32)),
     r"mis-shaped keys: linear2\.weight \(file \(10, 400\), model \(10, 500\)\)"),
], ids=["missing", "unexpected", "misshaped"])
def test_load_reports_a_key_that_does_not_fit(tmp_path, damage, message):
    arrays = lenet5_arrays()
    damage(arrays)
    write_raw(tmp_path / "w.hdf5", arrays)
    with pytest.raises(WeightsFileError, match=message):
        load_hdf5(tmp_path / "w.hdf5", build_model("lenet5"))


def test_load_reports_every_problem_and_changes_nothing(tmp_path):
    arrays = lenet5_arrays()
    del arrays["stem.conv1.weight"]
    del arrays["linear2.bias"]
    arrays["extra.weight"] = np.ones((2, 2), dtype=np.float32)
    arrays["stem.conv2.bias"] = np.ones(49, dtype=np.float32)
    write_raw(tmp_path / "w.hdf5", arrays)
    model = build_model("lenet5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsFileError) as info:
        load_hdf5(tmp_path / "w.hdf5", model)
    message = str(info.value)
    for name in ["stem.conv1.weight", "linear2.bias", "extra.weight", "stem.conv2.bias"]:
        assert name in message
    assert "\n" not in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unreadable_files_raise_weights_file_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    empty = tmp_path / "empty.hdf5"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.hdf5"
    folder.mkdir()
    grouped = tmp_path / "grouped.hdf5"
    with h5py.File(grouped, "w") as f:
        f.create_group("stem").create_dataset("w", data=np.ones(2))
    no_arrays = tmp_path / "no_arrays.hdf5"
    h5py.File(no_arrays, "w").close()
    cases = [(tmp_path / "missing.hdf5", "no such file"), (text, "not a readable hdf5"), (empty, "empty"),
             (folder, "folder"), (grouped, "group"), (no_arrays, "no arrays")]
    for path, reason in cases:
        with pytest.raises(WeightsFileError, match=reason) as info:
            read_hdf5(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)
        with pytest.raises(WeightsFileError):
            load_hdf5(path, build_model("lenet300"))


def crash_on_call(original, n: int):
    """A stand-in for h5py.Group.create_dataset that raises on its n-th call; counts calls in `.calls`."""

    def create_dataset(group, *args, **kwargs):
        create_dataset.calls += 1
        if create_dataset.calls == n:
            raise RuntimeError("simulated crash while saving")
        return original(group, *args, **kwargs)

    create_dataset.calls = 0
    return create_dataset


def test_crash_during_save_leaves_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "finish.hdf5"
    save_hdf5(trained_looking("lenet5", seed=1), path)
    original_bytes = path.read_bytes()
    crash = crash_on_call(h5py.Group.create_dataset, n=4)
    monkeypatch.setattr(h5py.Group, "create_dataset", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_hdf5(trained_looking("lenet5", seed=2), path)
    assert crash.calls == 4
    assert path.read_bytes() == original_bytes
    assert sorted(os.listdir(tmp_path)) == ["finish.hdf5"]  # no temporary file left behind
    monkeypatch.undo()
    model = build_model("lenet5")
    load_hdf5(path, model)
    assert torch.equal(model.linear1.bias, trained_looking("lenet5", seed=1).linear1.bias)


def test_crash_during_first_save_leaves_nothing(tmp_path, monkeypatch):
    class Exploding(dict):
        """A state dict whose fifth value cannot be converted."""

        def items(self):
            for i, item in enumerate(super().items()):
                if i == 4:
                    raise KeyboardInterrupt
                yield item

    tensors = Exploding(build_model("lenet5").state_dict())
    with pytest.raises(KeyboardInterrupt):
        save_hdf5(tensors, tmp_path / "init.hdf5")
    assert os.listdir(tmp_path) == []


def test_save_overwrites_and_accepts_str_path(tmp_path):
    path = str(tmp_path / "w.hdf5")
    save_hdf5({"a": torch.zeros(2, 2)}, path)
    save_hdf5({"b": torch.ones(3)}, path)
    assert list(read_hdf5(path)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["w.hdf5"]


# Damaged weights files (made by hdf5_cases): refused in one line naming the file and the entry, from the metadata.

# (mutation, target, parameters, message pattern) for weights files that read_hdf5 and load_hdf5 both refuse.
WEIGHTS_REFUSED = {
    "2^20 x 2^20, no data": ("unstored", "0.weight", {"how": "huge"},
                             r"'0\.weight' declares shape \(1048576, 1048576\) \(4\.00 TiB\) but stores 0 bytes$"),
    "2^20 x 2^20 chunked with a fill value": ("unstored", "0.weight", {"how": "huge with fill value"},
                                              r"\(4\.00 TiB\) but stores 0 bytes$"),
    "2^20 x 2^20 compressed, one chunk written": ("unstored", "0.weight", {"how": "huge compressed"},
                                                  r"\(4\.00 TiB\) but stores \d+ compressed bytes \(deflate expands "
                                                  r"at most 1032x\)$"),
    "never written": ("unstored", "0.weight", {"how": "never written"},
                      r"'0\.weight' declares shape \(3, 4\) \(48 bytes\) but stores 0 bytes$"),
    "one chunk of three written": ("unstored", "0.bias", {"how": "partly written"},
                                   r"declares shape \(3,\) \(12 bytes\) but stores 4 bytes$"),
    "a soft link": ("replace", "0.weight", {"what": "soft link"},
                    r"'0\.weight' is a soft link; a weights file holds its entries itself$"),
    "a dangling soft link": ("replace", "0.weight", {"what": "dangling soft link"}, "is a soft link"),
    "an external link": ("replace", "0.weight", {"what": "external link"}, "is an external link"),
    "external storage": ("replace", "0.weight", {"what": "external storage"},
                         r"'0\.weight' keeps its data in an external file \(.*raw\.bin\)"),
    "a virtual dataset": ("replace", "0.weight", {"what": "virtual"}, r"'0\.weight' is a virtual dataset"),
    "a group": ("replace", "0.weight", {"what": "group"}, r"'0\.weight' is a group; a weights file holds only arrays"),
    "a named datatype": ("replace", "0.weight", {"what": "named datatype"}, "is a named datatype"),
    "a null dataspace": ("replace", "0.bias", {"what": "null dataspace"}, "has a null dataspace"),
    "records": ("replace", "0.bias", {"what": "records"}, r"holds \[\('x', '<f4'\), \('y', '<i4'\)\] data; a weights"),
    "complex numbers": ("retype", "0.bias", {"dtype": "c8", "nan": False},
                        "holds complex64 data; a weights file holds only numeric arrays"),
    "a number as format": ("format attribute", None, {"change": "number"}, "attribute 'format' holds int64"),
    "a mask's format": ("format attribute", None, {"change": "other kind"}, "a gsm-sparse-v1 file, not a weights"),
    "truncated": ("truncate", None, {"removed": 1}, r"not a readable hdf5 file \(OSError\)$"),
}


@pytest.mark.parametrize("case", WEIGHTS_REFUSED)
def test_malformed_weights_file_is_refused(tmp_path, case):
    name, target, params, pattern = WEIGHTS_REFUSED[case]
    path, verdict = cases.damaged(tmp_path, "weights", name, target, **params)
    assert cases.check_outcome("weights", path, verdict) == "refused/refused"  # the model is left unchanged
    for read in (read_hdf5, lambda p: load_hdf5(p, cases.tiny_model(1))):
        with pytest.raises(WeightsFileError) as info:
            read(path)
        message = str(info.value)
        assert message.startswith(str(path)) and len(message.splitlines()) == 1
        assert re.search(pattern, message), message


@pytest.mark.parametrize("dtype, fits", [("f8", False), ("f2", False), ("bool", True), ("u1", True), ("i4", True)])
def test_num_batches_tracked_takes_integers_only(tmp_path, dtype, fits):
    """A float array in an integer buffer would be truncated: refused by name; integers and bools load."""
    path, verdict = cases.damaged(tmp_path, "weights", "retype", "1.num_batches_tracked", dtype=dtype, nan=False)
    assert cases.check_outcome("weights", path, verdict) == ("loaded/loaded" if fits else "loaded/refused")
    if not fits:
        with pytest.raises(WeightsFileError, match=rf"mis-typed keys: 1\.num_batches_tracked \(file "
                                                   rf"{np.dtype(dtype)}, model torch\.int64\)"):
            load_hdf5(path, cases.tiny_model(1))


def test_integers_out_of_an_integer_buffers_range_are_refused(tmp_path):
    model = nn.Module()
    model.register_buffer("codes", torch.zeros(3, dtype=torch.uint8))
    save_hdf5({"codes": torch.tensor([1, 300, 2])}, tmp_path / "w.hdf5")
    with pytest.raises(WeightsFileError, match=r"'codes' holds values from 1 to 300, outside the range of the "
                                               r"model's torch\.uint8"):
        load_hdf5(tmp_path / "w.hdf5", model)
    assert model.codes.tolist() == [0, 0, 0]
    save_hdf5({"codes": torch.tensor([1, 255, 2])}, tmp_path / "w.hdf5")
    assert load_hdf5(tmp_path / "w.hdf5", model).codes.tolist() == [1, 255, 2]


@pytest.mark.parametrize("name, target, params", [
    *[("restore", "0.weight", {"layout": layout}) for layout in cases.LAYOUTS],
    ("restore", "1.num_batches_tracked", {"layout": "big-endian"}),
    ("retype", "0.weight", {"dtype": "f8", "nan": True}), ("retype", "2.bias", {"dtype": "f2", "nan": False}),
    ("retype", "0.bias", {"dtype": "i4", "nan": False}), ("new values", "1.running_var", {"seed": 5}),
    ("format attribute", None, {"change": "missing"})])
def test_valid_weights_variants_load_exactly(tmp_path, name, target, params):
    """Compressed, chunked, big-endian or other numeric dtypes: what the file holds, bit for bit."""
    path, verdict = cases.damaged(tmp_path, "weights", name, target, **params)
    intact = cases.reference("weights", tmp_path / cases.SOURCE)
    assert cases.check_outcome("weights", path, verdict, intact) == "loaded/loaded"


@pytest.mark.parametrize("kind", ["weights", "sparse"])
def test_the_model_is_checked_before_any_data_is_read(tmp_path, monkeypatch, kind):
    def no_reading(*args, **kwargs):
        raise AssertionError("a dataset was read")

    path, _ = cases.damaged(tmp_path, kind, "reshape", "0.bias" if kind == "weights" else "dense/0.bias", how="row")
    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_reading)
    monkeypatch.setattr(h5py.Dataset, "read_direct", no_reading)
    with pytest.raises(WeightsFileError, match=r"mis-shaped keys: 0\.bias \(file \(1, 3\), model \(3,\)\)"):
        if kind == "weights":
            load_hdf5(path, cases.tiny_model(1))
        else:
            gsm.load_sparse(path, cases.tiny_model(1))


def test_messages_stay_on_one_line(tmp_path):
    path = tmp_path / "w.hdf5"
    with h5py.File(path, "w") as f:
        f["line one\nline two"] = np.array([b"text"])
    with pytest.raises(WeightsFileError) as info:
        read_hdf5(path)
    assert str(info.value) == f"{path}: 'line one line two' holds |S4 data; a weights file holds only numeric arrays"
    assert WeightsFileError("a\nb\r\nc").args == ("a b c",)


def test_the_old_argument_order_still_loads_with_a_deprecation_warning(tmp_path):
    """Every loader takes the path first (load_hdf5(path, model), load_sparse(path, model), load_mask(path));
    load_hdf5(model, path), the order of earlier versions, still works for a while."""
    model = build_model("lenet300")
    save_hdf5(model, tmp_path / "w.hdf5")
    fresh = build_model("lenet300")
    with pytest.warns(DeprecationWarning, match=r"call load_hdf5\(path, model\)"):
        assert load_hdf5(fresh, tmp_path / "w.hdf5") is fresh
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

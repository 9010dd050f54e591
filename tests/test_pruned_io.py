"""Tests for the readers of gsm.pruned_io on damaged files (made by hdf5_cases): a malformed mask or compressed
export is refused with a one-line WeightsFileError naming the file and the entry, found before its data is read or
allocated, a model is changed only by a file that passed every check, and valid variants load exactly."""
from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch

import gsm
import hdf5_cases as cases
from gsm.pruned_io import MASK_FORMAT, SPARSE_FORMAT, file_format
from gsm.weights_io import WeightsFileError

pytestmark = pytest.mark.usefixtures("single_thread")

# Exports that load_sparse refuses with and without a model: (mutation, target, parameters, message pattern).
EXPORT_REFUSED = {
    "shape (1, 4) for (3, 4)": ("shape attribute", "sparse/0.weight", {"change": "first dim 1"},
                                r"'sparse/0\.weight' holds 10 indices for shape \(1, 4\) of 4 elements"),
    "one value for 10 indices": ("reshape", "sparse/0.weight/values", {"how": "one value"},
                                 r"'sparse/0\.weight' holds 10 indices but 1 values"),
    "negative index": ("indices", "sparse/0.weight", {"change": "negative"},
                       r"'sparse/0\.weight/indices' holds positions outside \[0, 12\) \(from -1 to 11\)"),
    "index out of range": ("indices", "sparse/2.weight", {"change": "out of range"},
                           r"'sparse/2\.weight/indices' holds positions outside \[0, 6\) \(from 0 to 6\)"),
    "huge unsigned index": ("indices", "sparse/0.weight", {"change": "huge unsigned"}, r"outside \[0, 12\)"),
    "duplicate index": ("indices", "sparse/0.weight", {"change": "duplicate"}, "is not strictly increasing"),
    "unsorted indices": ("indices", "sparse/0.weight", {"change": "unsorted"}, "is not strictly increasing"),
    "one index fewer": ("indices", "sparse/0.weight", {"change": "one fewer"}, "holds 9 indices but 10 values"),
    "float indices": ("retype", "sparse/0.weight/indices", {"dtype": "f8", "nan": False},
                      r"'sparse/0\.weight/indices' holds float64 data; indices must be integers"),
    "2-D indices": ("reshape", "sparse/0.weight/indices", {"how": "row"}, r"has shape \(1, 10\), not one dimension"),
    "string values": ("retype", "sparse/0.weight/values", {"dtype": "S3", "nan": False}, r"holds \|S3 data"),
    "2^20 x 2^20 dense entry, no data": ("unstored", "dense/0.bias", {"how": "huge"},
                                         r"'dense/0\.bias' declares shape \(1048576, 1048576\) \(4\.00 TiB\) but "
                                         r"stores 0 bytes"),
    "2^20 x 2^20 with a fill value": ("unstored", "dense/0.bias", {"how": "huge with fill value"},
                                      r"\(4\.00 TiB\) but stores 0 bytes"),
    "2^20 x 2^20 values": ("unstored", "sparse/0.weight/values", {"how": "huge"}, r"\(4\.00 TiB\) but stores 0 bytes"),
    "values never written": ("unstored", "sparse/0.weight/values", {"how": "never written"},
                             r"declares shape \(10,\) \(40 bytes\) but stores 0 bytes"),
    "dense entry as a soft link": ("replace", "dense/0.bias", {"what": "soft link"}, r"'dense/0\.bias' is a soft link"),
    "indices as an external link": ("replace", "sparse/0.weight/indices", {"what": "external link"},
                                    "is an external link"),
    "values in external storage": ("replace", "sparse/0.weight/values", {"what": "external storage"},
                                   "keeps its data in an external file"),
    "virtual values": ("replace", "sparse/0.weight/values", {"what": "virtual"}, "is a virtual dataset"),
    "dense entry as a group": ("replace", "dense/0.bias", {"what": "group"}, r"'dense/0\.bias' is a group"),
    "keys listed twice": ("keys attribute", None, {"change": "duplicate"}, "attribute 'keys' lists '0.weight' twice"),
    "no keys": ("keys attribute", None, {"change": "missing"}, "attribute 'keys' is missing"),
    "keys as one string": ("keys attribute", None, {"change": "scalar"}, "attribute 'keys' holds str, not a 1-D"),
    "keys as integers": ("keys attribute", None, {"change": "integers"}, "holds an array of int64 of shape"),
    "keys in 2-D": ("keys attribute", None, {"change": "2-D"}, r"of shape \(1, 9\), not a 1-D array of strings"),
    "a key that is a path": ("keys attribute", None, {"change": "a path"},
                             "key 'dense/0.weight' is in neither of the groups"),
    "a key that is '.'": ("keys attribute", None, {"change": "the group itself"}, "key '.' is in neither"),
    "key not in its group": ("drop key", "dense/0.bias", {"where": "group"}, "key '0.bias' is in neither"),
    "entry not in the keys": ("drop key", "sparse/0.weight", {"where": "keys"},
                              "'sparse/0.weight' is not one of the keys"),
    "key in both groups": ("add key", "dense/0.bias", {"where": "other group"}, "key '0.bias' is in both"),
    "extra root member": ("members", "sparse/0.weight", {"change": "root member"}, "'extra' is neither the group"),
    "extra entry member": ("members", "sparse/0.weight", {"change": "entry member"},
                           r"holds \['extra', 'indices', 'values'\], not exactly"),
    "entry without values": ("members", "sparse/0.weight", {"change": "no values"}, r"holds \['indices'\]"),
    "entry as a dataset": ("members", "sparse/0.weight", {"change": "entry as dataset"},
                           "'sparse/0.weight' is not a group"),
    "dense group as a dataset": ("members", "sparse/0.weight", {"change": "dense as dataset"},
                                 "'dense' is not a group"),
    "negative size": ("shape attribute", "sparse/0.weight", {"change": "negative"},
                      r"attribute 'shape' of 'sparse/0\.weight' holds a negative size: \(-3, 4\)"),
    "float sizes": ("shape attribute", "sparse/0.weight", {"change": "floats"}, "not a 1-D array of integers"),
    "scalar shape": ("shape attribute", "sparse/0.weight", {"change": "scalar"}, "holds int64, not a 1-D array"),
    "2-D shape": ("shape attribute", "sparse/0.weight", {"change": "2-D"}, r"of shape \(1, 2\), not a 1-D array"),
    "string shape": ("shape attribute", "sparse/0.weight", {"change": "string"}, "holds str, not a 1-D array"),
    "65 dimensions": ("shape attribute", "sparse/0.weight", {"change": "65 dims"}, "has 65 sizes, more than 64"),
    "2^80 elements": ("shape attribute", "sparse/0.weight", {"change": "overflow"}, "more elements than an int64"),
    "shape ()": ("shape attribute", "sparse/0.weight", {"change": "empty"}, r"for shape \(\) of 1 elements"),
    "no shape": ("shape attribute", "sparse/0.weight", {"change": "missing"}, "attribute 'shape' of .* is missing"),
    "no format": ("format attribute", None, {"change": "missing"}, "holds plain weights, not gsm-sparse-v1"),
    "a mask's format": ("format attribute", None, {"change": "other kind"}, "holds gsm-mask-v1, not gsm-sparse-v1"),
    "a number as format": ("format attribute", None, {"change": "number"}, "attribute 'format' holds int64"),
    "truncated": ("truncate", None, {"removed": 100}, r"not a readable hdf5 file \(OSError\)"),
}

# Exports that hold valid arrays that do not fit tiny_model: loaded without a model, refused into it.
EXPORT_MISFITS = {
    "dense bias (1,) for (3,)": ("reshape", "dense/0.bias", {"how": "one value"},
                                 r"mis-shaped keys: 0\.bias \(file \(1,\), model \(3,\)\)"),
    "weight (4, 3) for (3, 4)": ("shape attribute", "sparse/0.weight", {"change": "swapped"},
                                 r"mis-shaped keys: 0\.weight \(file \(4, 3\), model \(3, 4\)\)"),
    "a key missing": ("drop key", "dense/0.bias", {"where": "both"}, r"missing keys: 0\.bias"),
    "a key more": ("add key", "sparse/2.weight", {"where": "keys"}, r"unexpected keys: 2\.weight\.again"),
    "float num_batches_tracked": ("retype", "dense/1.num_batches_tracked", {"dtype": "f8", "nan": False},
                                  r"mis-typed keys: 1\.num_batches_tracked \(file float64, model torch\.int64\)"),
}

# Exports that stay valid: they load exactly what they hold, into the model too.
EXPORT_VALID = {
    "keys reversed": ("keys attribute", None, {"change": "reversed"}),
    "keys as fixed-length bytes": ("keys attribute", None, {"change": "fixed-length bytes"}),
    "shape as uint64": ("shape attribute", "sparse/0.weight", {"change": "unsigned"}),
    "an index moved": ("indices", "sparse/0.weight", {"change": "moved"}),
    "other indices": ("new values", "sparse/2.weight/indices", {"seed": 3}),
    "indices compressed": ("restore", "sparse/0.weight/indices", {"layout": "shuffle+gzip"}),
    "big-endian values": ("restore", "sparse/0.weight/values", {"layout": "big-endian"}),
    "uint8 indices": ("retype", "sparse/0.weight/indices", {"dtype": "u1", "nan": False}),
    "float64 values with a NaN": ("retype", "sparse/2.weight/values", {"dtype": "f8", "nan": True}),
    "int32 num_batches_tracked": ("retype", "dense/1.num_batches_tracked", {"dtype": "i4", "nan": False}),
    "format as bytes": ("format attribute", None, {"change": "bytes"}),
}


def refusals(kind: str, path, models) -> list:
    """The messages of the reader of `kind` on `path` for each model (None: without one); each must refuse."""
    messages = []
    for model in models:
        with pytest.raises(WeightsFileError) as info:
            gsm.load_sparse(path, model) if kind == "sparse" else gsm.load_mask(path)
        messages.append(str(info.value))
    return messages


@pytest.mark.parametrize("case", EXPORT_REFUSED)
def test_malformed_export_is_refused(tmp_path, case):
    name, target, params, pattern = EXPORT_REFUSED[case]
    path, verdict = cases.damaged(tmp_path, "sparse", name, target, **params)
    assert cases.check_outcome("sparse", path, verdict) == "refused/refused"  # the model is left unchanged
    for message in refusals("sparse", path, [None, cases.tiny_model(1)]):
        assert message.startswith(str(path)) and len(message.splitlines()) == 1
        assert re.search(pattern, message), message


@pytest.mark.parametrize("case", EXPORT_MISFITS)
def test_export_that_does_not_fit_the_model_changes_nothing(tmp_path, case):
    name, target, params, pattern = EXPORT_MISFITS[case]
    path, verdict = cases.damaged(tmp_path, "sparse", name, target, **params)
    assert cases.check_outcome("sparse", path, verdict) == "loaded/refused"
    [message] = refusals("sparse", path, [cases.tiny_model(1)])
    assert message.startswith(f"{path} does not fit the model: ")
    assert re.search(pattern, message), message


@pytest.mark.parametrize("case", EXPORT_VALID)
def test_valid_export_variants_load_exactly(tmp_path, case):
    name, target, params = EXPORT_VALID[case]
    path, verdict = cases.damaged(tmp_path, "sparse", name, target, **params)
    intact = cases.reference("sparse", tmp_path / cases.SOURCE)
    assert cases.check_outcome("sparse", path, verdict, intact) == "loaded/loaded"


def test_a_shape_too_big_to_allocate_is_refused_without_a_model(tmp_path):
    path, verdict = cases.damaged(tmp_path, "sparse", "shape attribute", "sparse/0.weight",
                                  change="too big to allocate")
    assert cases.check_outcome("sparse", path, verdict) == "refused/refused"
    without, into_model = refusals("sparse", path, [None, cases.tiny_model(1)])
    assert without == (f"{path}: 'sparse/0.weight' declares shape (2147483648, 2147483648) (16.00 EiB), more than "
                       f"can be allocated")
    assert "mis-shaped keys: 0.weight (file (2147483648, 2147483648), model (3, 4))" in into_model


def test_nothing_is_loaded_when_the_last_entry_is_bad(tmp_path):
    """The first entries are valid and would fit: a bad last entry still leaves the model as it was."""
    path, _ = cases.damaged(tmp_path, "sparse", "indices", "sparse/2.weight", change="out of range")
    model = cases.tiny_model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsFileError, match="2.weight/indices"):
        gsm.load_sparse(path, model)
    assert all(np.array_equal(v.numpy(), before[k].numpy()) for k, v in model.state_dict().items())


# (mutation, target, parameters, message pattern) for masks that load_mask refuses.
MASK_REFUSED = {
    "float values": ("retype", "0.weight", {"dtype": "f8", "nan": False},
                     r"'0\.weight' holds float64 data; a mask file holds only bool arrays"),
    "NaN values": ("retype", "0.weight", {"dtype": "f4", "nan": True}, "holds float32 data"),
    "integer values": ("retype", "0.bias", {"dtype": "i8", "nan": False}, "holds int64 data"),
    "uint8 values": ("retype", "0.bias", {"dtype": "u1", "nan": False}, "holds uint8 data"),
    "a bool stored as 2": ("bool byte", "0.weight", {"value": 2}, "holds bool values other than 0 and 1"),
    "a bool stored as 255": ("bool byte", "2.bias", {"value": 255}, "holds bool values other than 0 and 1"),
    "a group": ("replace", "0.weight", {"what": "group"}, r"'0\.weight' is a group"),
    "a soft link": ("replace", "0.weight", {"what": "soft link"}, "is a soft link"),
    "an external link": ("replace", "0.weight", {"what": "external link"}, "is an external link"),
    "external storage": ("replace", "0.weight", {"what": "external storage"}, "keeps its data in an external file"),
    "never written": ("unstored", "0.weight", {"how": "never written"},
                      r"declares shape \(3, 4\) \(12 bytes\) but stores 0 bytes"),
    "strings": ("replace", "0.weight", {"what": "strings"}, r"holds \|S1 data"),
    "no format": ("format attribute", None, {"change": "missing"}, "holds plain weights, not gsm-mask-v1"),
    "an export's format": ("format attribute", None, {"change": "other kind"}, "holds gsm-sparse-v1, not gsm-mask"),
    "an array as format": ("format attribute", None, {"change": "array"}, "attribute 'format' holds an array"),
}


@pytest.mark.parametrize("case", MASK_REFUSED)
def test_malformed_mask_is_refused(tmp_path, case):
    name, target, params, pattern = MASK_REFUSED[case]
    path, verdict = cases.damaged(tmp_path, "mask", name, target, **params)
    assert cases.check_outcome("mask", path, verdict) == "refused"
    [message] = refusals("mask", path, [None])
    assert message.startswith(str(path)) and len(message.splitlines()) == 1
    assert re.search(pattern, message), message


@pytest.mark.parametrize("name, target, params", [("new values", "0.weight", {"seed": 1}),
                                                  ("restore", "0.weight", {"layout": "gzip"}),
                                                  ("reshape", "2.weight", {"how": "flat"}),
                                                  ("add", "0.bias", {"link": True}),
                                                  ("drop", "0.bias", {})])
def test_valid_mask_variants_load_exactly(tmp_path, name, target, params):
    path, verdict = cases.damaged(tmp_path, "mask", name, target, **params)
    assert cases.check_outcome("mask", path, verdict, cases.reference("mask", tmp_path / cases.SOURCE)) == "loaded"


def test_file_format(tmp_path):
    for kind, expected in (("weights", None), ("mask", MASK_FORMAT), ("sparse", SPARSE_FORMAT)):
        cases.write_valid(kind, tmp_path / f"{kind}.hdf5")
        assert file_format(tmp_path / f"{kind}.hdf5") == expected
    path, _ = cases.damaged(tmp_path / "number", "mask", "format attribute", change="number")
    text = tmp_path / "text.hdf5"
    text.write_text("not hdf5\n")
    for bad, pattern in ((path, "attribute 'format' holds int64, not a string"), (text, "not a readable hdf5 file"),
                         (tmp_path / "missing.hdf5", "no such file")):
        with pytest.raises(WeightsFileError, match=pattern) as info:
            file_format(bad)
        assert str(info.value).startswith(str(bad))


def test_writers_are_unchanged(tmp_path):
    """The files the writers make are laid out as before: what the readers check is what they write."""
    cases.write_valid("sparse", tmp_path / "s.hdf5")
    cases.write_valid("mask", tmp_path / "m.hdf5")
    with h5py.File(tmp_path / "s.hdf5", "r") as f:
        assert dict(f.attrs)["format"] == SPARSE_FORMAT
        assert list(f.attrs["keys"]) == list(cases.MODEL_STATE)
        assert list(f) == ["dense", "sparse"] and list(f["sparse"]) == ["0.weight", "2.weight"]
        group = f["sparse/0.weight"]
        assert list(group) == ["indices", "values"] and group.attrs["shape"].tolist() == [3, 4]
        assert group["indices"].dtype == np.int32 and group["indices"][()].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    with h5py.File(tmp_path / "m.hdf5", "r") as f:
        assert dict(f.attrs) == {"format": MASK_FORMAT} and all(f[name].dtype == bool for name in f)


class TiedLM(torch.nn.Module):
    """An embedding whose weight is also the output layer's, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.embed.weight


def pruned_tied_model(seed: int = 0) -> TiedLM:
    torch.manual_seed(seed)
    model = TiedLM()
    gsm.apply_mask_to_weights(model, gsm.global_magnitude_mask(model, 0.25))
    return model


def test_tied_weight_is_exported_once_and_loads_tied(tmp_path):
    model = pruned_tied_model()
    assert [name for name, _ in model.named_parameters()] == ["embed.weight", "hidden.weight", "hidden.bias"]
    gsm.save_sparse(model, tmp_path / "s.hdf5")
    with h5py.File(tmp_path / "s.hdf5", "r") as f:
        assert list(f.attrs["keys"]) == ["embed.weight", "hidden.weight", "hidden.bias", "lm_head.weight"]
        assert [list(pair) for pair in f.attrs["tied"]] == [["lm_head.weight", "embed.weight"]]
        assert list(f["sparse"]) == ["embed.weight", "hidden.weight"] and list(f["dense"]) == ["hidden.bias"]
        assert f["sparse/embed.weight/values"].shape == (int((model.embed.weight != 0).sum()),)
    state = gsm.load_sparse(tmp_path / "s.hdf5")
    assert state["lm_head.weight"] is state["embed.weight"]
    assert torch.equal(state["embed.weight"], model.embed.weight)
    fresh = TiedLM()
    gsm.load_sparse(tmp_path / "s.hdf5", fresh)
    assert fresh.lm_head.weight is fresh.embed.weight and torch.equal(fresh.embed.weight, model.embed.weight)
    # A name list that gives only the tied key still compresses the one stored copy.
    gsm.save_sparse(model, tmp_path / "by_head.hdf5", names=["lm_head.weight"])
    with h5py.File(tmp_path / "by_head.hdf5", "r") as f:
        assert list(f["sparse"]) == ["embed.weight"]
    assert torch.equal(gsm.load_sparse(tmp_path / "by_head.hdf5")["lm_head.weight"], model.embed.weight)


@pytest.mark.parametrize("tied, pattern", [
    ([["lm_head.weight", "nowhere"]], "attribute 'tied' names 'nowhere', not one of the keys"),
    ([["lm_head.weight", "lm_head.weight"]], "ties 'lm_head.weight' twice or to itself"),
    ([["lm_head.weight", "embed.weight"], ["lm_head.weight", "hidden.weight"]], "ties 'lm_head.weight' twice"),
    ([["lm_head.weight", "embed.weight"], ["hidden.weight", "lm_head.weight"]],
     "ties 'lm_head.weight', and ties another key to it"),
    ([["hidden.bias", "embed.weight"], ["lm_head.weight", "embed.weight"]],
     "key 'hidden.bias' is tied to 'embed.weight' but also stored"),
    (["lm_head.weight"], r"attribute 'tied' holds an array of object of shape \(1,\), not an \(n, 2\) array"),
    (None, "key 'lm_head.weight' is in neither of the groups"),
])
def test_malformed_tied_attribute_is_refused(tmp_path, tied, pattern):
    path = tmp_path / "s.hdf5"
    gsm.save_sparse(pruned_tied_model(), path)
    with h5py.File(path, "r+") as f:
        if tied is None:
            del f.attrs["tied"]
        else:
            f.attrs["tied"] = np.array(tied, dtype=h5py.string_dtype())
    model = TiedLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for target in (None, model):
        with pytest.raises(WeightsFileError, match=pattern):
            gsm.load_sparse(path, target)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

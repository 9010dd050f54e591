"""Resuming from a mutated checkpoint.pt: a GSM stage resumes exactly (the same final weights as from the intact
checkpoint) when the mutation keeps the state meaningful, and otherwise stops in one line naming the file
(CheckpointError) before training; it never crashes the process or trains on a state that is not the run's."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataset
from base_model import build_model
from gsm.experiments import layout
from gsm.experiments.checkpoint import CheckpointError
from gsm.experiments.configs import TrainConfig
from gsm.experiments.trainer import train_stage

CONFIG = TrainConfig(epochs=2, batch_size=64, lr=0.02, lr_drop_epochs=(), momentum=0.9, weight_decay=5e-4,
                     warmup_epochs=0, nesterov=True, optimizer="gsm", nonzero_ratio=0.1, bias_lr_factor=1.0)
STAGE = {"stage": "gsm", "train": CONFIG.to_dict()}


class StopAfterFirstEpoch(Exception):
    pass


def loaders(mnist_tensors, stop_at_epoch=None):
    train_images, train_labels, test_images, test_labels = mnist_tensors
    common = dict(normalize=dataset.MNIST_NORMALIZE, augment=False, device="cpu", seed=0)
    train = dataset.DeviceLoader(train_images, train_labels, 64, train=True, **common)
    test = dataset.DeviceLoader(test_images, test_labels, 1000, train=False, **common)
    if stop_at_epoch is not None:
        set_epoch = train.set_epoch

        def stopping(epoch):
            if epoch == stop_at_epoch:
                raise StopAfterFirstEpoch
            set_epoch(epoch)
        train.set_epoch = stopping
    return train, test


def model():
    torch.manual_seed(0)
    return build_model("lenet300")


@pytest.fixture(scope="module")
def interrupted(mnist_tensors, tmp_path_factory):
    """(a stage folder stopped after its first epoch with its checkpoint, the final weights of resuming it)."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("checkpoints") / "stage"
    with pytest.raises(StopAfterFirstEpoch):
        train_stage(model(), folder, CONFIG, *loaders(mnist_tensors, stop_at_epoch=1), stage_config=STAGE,
                    progress=False)
    reference = folder.parent / "reference"
    shutil.copytree(folder, reference)
    resumed = model()
    assert train_stage(resumed, reference, CONFIG, *loaders(mnist_tensors), stage_config=STAGE,
                       progress=False) == "resumed"
    return folder, [p.detach().clone() for p in resumed.parameters()]


# Each mutation edits the checkpoint's dict in place and says whether the state stays meaningful.
def buffer_of_another_shape(state, draw):
    state["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(draw(st.sampled_from([(1, 784), (784,), (300,)])))
    return False


def buffer_in_float64(state, draw):
    buffers = state["optimizer"]["state"]
    key = draw(st.sampled_from(sorted(buffers)))
    buffers[key]["momentum_buffer"] = buffers[key]["momentum_buffer"].double()  # cast back exactly on load
    return True


def buffer_transposed(state, draw):
    buffer = state["optimizer"]["state"][0]["momentum_buffer"]
    state["optimizer"]["state"][0]["momentum_buffer"] = buffer.t().contiguous().t()  # same values, other strides
    return True


def buffer_not_a_tensor(state, draw):
    state["optimizer"]["state"][0]["momentum_buffer"] = draw(st.sampled_from([[1.0, 2.0], 3, "buffer"]))
    return False


def buffer_of_integers(state, draw):
    state["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(300, 784, dtype=torch.int64)
    return False


def foreign_state_entry(state, draw):
    state["optimizer"]["state"][draw(st.sampled_from([0, 1]))]["exp_avg"] = torch.zeros(1)
    return False


def sgd_groups(state, draw):
    for group in state["optimizer"]["param_groups"]:
        group.pop("prunable")
    return False


def bad_hyperparameter(state, draw):
    name, value = draw(st.sampled_from([("momentum", 1.5), ("lr", -1.0), ("nonzero_ratio", 0.0),
                                        ("nesterov", "yes"), ("weight_decay", float("nan"))]))
    state["optimizer"]["param_groups"][0][name] = value
    return False


def group_missing(state, draw):
    state["optimizer"]["param_groups"].pop()
    return False


def model_key_missing(state, draw):
    state["model"].pop(draw(st.sampled_from(sorted(state["model"]))))
    return False


def model_tensor_reshaped(state, draw):
    key = draw(st.sampled_from(sorted(state["model"])))
    state["model"][key] = torch.zeros(3, 3)
    return False


def bad_counter(state, draw):
    state[draw(st.sampled_from(["next_epoch", "log_size"]))] = draw(st.sampled_from([-1, "2", 1.5, None, True]))
    return False


def bad_rng(state, draw):
    state["torch_rng"] = draw(st.sampled_from([torch.zeros(3), torch.zeros(5056, dtype=torch.float32), 7]))
    return False


def entry_missing(state, draw):
    state.pop(draw(st.sampled_from(["model", "optimizer", "torch_rng", "next_epoch", "log_size"])))
    return False


MUTATIONS = [buffer_of_another_shape, buffer_in_float64, buffer_transposed, buffer_not_a_tensor, buffer_of_integers,
             foreign_state_entry, sgd_groups, bad_hyperparameter, group_missing, model_key_missing,
             model_tensor_reshaped, bad_counter, bad_rng, entry_missing]


def resume(folder: Path, mnist_tensors):
    resumed = model()
    outcome = train_stage(resumed, folder, CONFIG, *loaders(mnist_tensors), stage_config=STAGE, progress=False)
    return outcome, [p.detach() for p in resumed.parameters()]


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_checkpoint_resumes_exactly_or_is_refused_in_one_line(interrupted, mnist_tensors, tmp_path, data):
    folder, expected = interrupted
    mutation = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    target = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, target)
    path = target / layout.CHECKPOINT
    state = torch.load(path, weights_only=True)
    meaningful = mutation(state, data.draw)
    torch.save(state, path)
    if meaningful:
        outcome, weights = resume(target, mnist_tensors)
        assert outcome == "resumed"
        assert all(torch.equal(a, b) for a, b in zip(weights, expected))
        return
    with pytest.raises(CheckpointError) as caught:
        resume(target, mnist_tensors)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "delete it" in message


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_damaged_checkpoint_file_never_crashes_the_resume(interrupted, mnist_tensors, tmp_path, data):
    """Truncated files and flipped bytes: refused in one line, or (a flip inside tensor data, which the file
    format does not checksum) resumed from the values the file holds."""
    folder, _ = interrupted
    target = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, target)
    path = target / layout.CHECKPOINT
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path.write_bytes(bytes(raw))
    try:
        outcome, _ = resume(target, mnist_tensors)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert outcome == "resumed"


def test_the_intact_checkpoint_round_trips(interrupted, mnist_tensors, tmp_path):
    """The fixture's own check: resuming an unchanged copy gives the reference weights (so a mutation that
    resumes exactly has changed nothing that matters)."""
    folder, expected = interrupted
    shutil.copytree(folder, tmp_path / "copy")
    state = copy.deepcopy(torch.load(tmp_path / "copy" / layout.CHECKPOINT, weights_only=True))
    assert set(state) == {"model", "optimizer", "next_epoch", "log_size", "stage_config", "torch_rng"}
    outcome, weights = resume(tmp_path / "copy", mnist_tensors)
    assert outcome == "resumed" and all(torch.equal(a, b) for a, b in zip(weights, expected))

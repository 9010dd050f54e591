"""One training stage: parameter groups, evaluation, files written, skip, resume, divergence, masks."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import dataset
import gsm
from base_model import build_model
from gsm.experiments import layout
from gsm.experiments.configs import LENET_BASE, LENET_GSM, TrainConfig, gsm_config
from gsm.experiments.trainer import StageConfigMismatch, TrainingDiverged, evaluate, param_groups, train_stage
from loader_hooks import BatchHookLoader, keyboard_interrupt, nan_images
from script_runs import entries

pytestmark = pytest.mark.usefixtures("single_thread")

# 8 iterations per epoch on the 512 fake training images; a warmup of one epoch and a drop at epoch 2.
SMALL = TrainConfig(epochs=3, batch_size=64, lr=0.05, lr_drop_epochs=(2,), momentum=0.9, weight_decay=5e-4,
                    warmup_epochs=1, bias_lr_factor=2.0)
STAGE = {"stage": "test", "train": SMALL.to_dict()}
EVAL_RE = re.compile(r" train INFO: (validate at epoch (\d+), top1=\S+, top5=\S+, loss=\S+)$")
DONE_RE = re.compile(r" train INFO: (epoch (\d+) done: mean loss \S+, lr \S+),")


def fresh_lenet300(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("lenet300")


def weights(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        a = torch.as_tensor(actual[key])
        e = torch.as_tensor(expected[key])
        assert torch.equal(a, e), key


def evaluations(log_path: Path):
    """[(epoch, 'validate at epoch ...')] of a log, timestamps dropped."""
    lines = log_path.read_text().splitlines()
    return [(int(m.group(2)), m.group(1)) for m in map(EVAL_RE.search, lines) if m]


def epochs_done(log_path: Path):
    """['epoch e done: mean loss X, lr Y'] of a log (timing dropped)."""
    return [m.group(1) for m in map(DONE_RE.search, log_path.read_text().splitlines()) if m]


# ---------------------------------------------------------------------------------------------------------
# param_groups


def _group_of(groups, param):
    found = [g for g in groups if any(p is param for p in g["params"])]
    assert len(found) == 1, "every parameter belongs to exactly one group"
    return found[0]


def test_param_groups_lenet_base():
    model = build_model("lenet300")
    groups = param_groups(model, LENET_BASE)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        group = _group_of(groups, p)
        if name.endswith("bias"):
            assert (group["lr_factor"], group["weight_decay"]) == (2.0, 0.0), name
        else:
            assert (group["lr_factor"], group["weight_decay"]) == (1.0, 5e-4), name


def test_param_groups_batchnorm_gets_no_decay():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    groups = param_groups(model, LENET_BASE)
    conv_w, bn_w, bn_b, fc_w, fc_b = (model[0].weight, model[1].weight, model[1].bias, model[3].weight,
                                      model[3].bias)
    assert (_group_of(groups, conv_w)["lr_factor"], _group_of(groups, conv_w)["weight_decay"]) == (1.0, 5e-4)
    assert (_group_of(groups, fc_w)["lr_factor"], _group_of(groups, fc_w)["weight_decay"]) == (1.0, 5e-4)
    # BatchNorm weight: no decay, no multiplier; biases (BatchNorm's too, as in the released code): 2x, no decay.
    assert (_group_of(groups, bn_w)["lr_factor"], _group_of(groups, bn_w)["weight_decay"]) == (1.0, 0.0)
    assert (_group_of(groups, bn_b)["lr_factor"], _group_of(groups, bn_b)["weight_decay"]) == (2.0, 0.0)
    assert (_group_of(groups, fc_b)["lr_factor"], _group_of(groups, fc_b)["weight_decay"]) == (2.0, 0.0)


def test_param_groups_gsm_stage_has_no_lr_multiplier():
    model = build_model("lenet300")
    groups = param_groups(model, gsm_config(LENET_GSM["paper"], 60))
    assert {g["lr_factor"] for g in groups} == {1.0}
    for name, p in model.named_parameters():
        assert _group_of(groups, p)["weight_decay"] == (0.0 if name.endswith("bias") else 5e-4), name


def test_param_groups_skip_frozen_parameters():
    model = build_model("lenet300")
    model.linear1.weight.requires_grad_(False)
    groups = param_groups(model, LENET_BASE)
    assert not any(p is model.linear1.weight for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == 5


# ---------------------------------------------------------------------------------------------------------
# evaluate


class Identity(nn.Module):
    """Logits = inputs; has a parameter so that `.eval()`/`.train()` matter only for the mode flag."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def test_evaluate_exact_numbers():
    # 6 classes, 5 samples in two batches. Label ranks: 1st (top1 hit), 3rd (top5 hit), 6th (miss),
    # 1st (top1 hit), 5th (top5 hit).
    logits = torch.tensor([
        [5.0, 1.0, 0.0, -1.0, 2.0, 0.5],   # label 0, rank 1
        [0.0, 4.0, 3.0, 2.0, -1.0, 1.0],   # label 3, rank 3
        [1.0, 2.0, 3.0, 4.0, 5.0, 0.0],    # label 5, rank 6
        [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0],  # label 5, rank 1
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],    # label 1, rank 5
    ])
    labels = torch.tensor([0, 3, 5, 5, 1])
    loader = [(logits[:3], labels[:3]), (logits[3:], labels[3:])]
    expected_loss = sum(math.log(sum(math.exp(v) for v in row)) - row[label]
                        for row, label in zip(logits.tolist(), labels.tolist())) / 5

    model = Identity()
    model.train()
    top1, top5, loss = evaluate(model, loader)
    assert top1 == pytest.approx(40.0, abs=1e-12)
    assert top5 == pytest.approx(80.0, abs=1e-12)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert model.training, "evaluate restores the training mode"
    model.eval()
    evaluate(model, loader)
    assert not model.training


def test_evaluate_linear_model_and_empty_loader():
    # A fixed linear classifier on inputs where class = argmax of the first 3 features.
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    x = torch.tensor([[3.0, 1.0, 0.0, 9.0], [0.0, 2.0, 1.0, 9.0], [0.0, 0.0, 1.0, 9.0], [2.0, 0.0, 1.0, 9.0]])
    y = torch.tensor([0, 2, 2, 1])  # right, wrong, right, wrong
    top1, top5, loss = evaluate(layer, [(x, y)])
    assert top1 == 50.0
    assert top5 == 100.0  # only 3 classes: top-5 is every class
    assert loss == pytest.approx(nn.functional.cross_entropy(x[:, :3], y).item(), rel=1e-6)
    with pytest.raises(ValueError, match="empty"):
        evaluate(layer, [])


def test_fake_mnist_is_learnable(mnist_loaders, tmp_path):
    train, test = mnist_loaders
    model = fresh_lenet300()
    before = evaluate(model, test)
    train_stage(model, tmp_path / "stage", SMALL, train, test, stage_config=STAGE, progress=False)
    after = evaluate(model, test)
    assert before[0] < 40.0  # an untrained net is near chance (10 %)
    assert after[0] > 90.0
    assert after[2] < before[2]


def test_bf16_autocast_trains_and_evaluates_like_float32(mnist_loaders, tmp_path):
    """--amp: forward passes under bf16 autocast (on the CPU here); the weights and gradients stay float32
    and the result is close to the float32 run."""
    train, test = mnist_loaders
    plain, amp = fresh_lenet300(), fresh_lenet300()
    train_stage(plain, tmp_path / "fp32", SMALL, train, test, stage_config=STAGE, progress=False)
    train_stage(amp, tmp_path / "bf16", SMALL, train, test, stage_config=STAGE, progress=False, amp=True)
    assert all(p.dtype == torch.float32 for p in amp.parameters())
    assert not torch.equal(weights(amp)["linear1.weight"], weights(plain)["linear1.weight"])  # bf16 rounding
    top1_amp = evaluate(amp, test)[0]
    assert top1_amp > 90.0 and abs(top1_amp - evaluate(plain, test)[0]) < 5.0


# ---------------------------------------------------------------------------------------------------------
# train_stage: files, skip, config check


def test_train_stage_writes_the_stage_files(mnist_loaders, tmp_path):
    train, test = mnist_loaders
    model = fresh_lenet300()
    start = weights(model)
    folder = tmp_path / "nested" / "stage"
    assert train_stage(model, folder, SMALL, train, test, stage_config=STAGE, progress=False) == "trained"

    assert entries(folder) == sorted(
        [layout.INIT_WEIGHTS, layout.FINISH_WEIGHTS, layout.LOG, layout.STAGE_CONFIG])
    assert not (folder / layout.CHECKPOINT).exists()
    assert_same_weights(gsm.read_hdf5(folder / layout.INIT_WEIGHTS), start)
    assert_same_weights(gsm.read_hdf5(folder / layout.FINISH_WEIGHTS), weights(model))
    assert not torch.equal(weights(model)["linear1.weight"], start["linear1.weight"])
    assert json.loads((folder / layout.STAGE_CONFIG).read_text()) == STAGE

    log = folder / layout.LOG
    # Every even epoch start (0, 2) and after the last epoch (3), in that order; the numbers are the model's.
    assert [e for e, _ in evaluations(log)] == [0, 2, 3]
    top1, top5, loss = evaluate(model, test)
    assert evaluations(log)[-1][1] == f"validate at epoch 3, top1={top1:.5f}, top5={top5:.5f}, loss={loss:.6f}"
    assert [line.split(":")[0] for line in epochs_done(log)] == ["epoch 0 done", "epoch 1 done", "epoch 2 done"]
    line_re = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} train INFO: ")
    assert all(line_re.match(line) for line in log.read_text().splitlines())
    # The last lr of each epoch: warmup over epoch 0 (7/8 of 0.05 at its last step), then 0.05, then 0.005.
    assert [float(line.rsplit("lr ", 1)[1]) for line in epochs_done(log)] == pytest.approx(
        [0.05 * 7 / 8, 0.05, 0.005], rel=1e-5)


def test_finished_stage_is_skipped_and_checked(mnist_loaders, tmp_path):
    train, test = mnist_loaders
    folder = tmp_path / "stage"
    trained = fresh_lenet300()
    train_stage(trained, folder, SMALL, train, test, stage_config=STAGE, progress=False)
    log = folder / layout.LOG
    log_bytes, log_mtime = log.read_bytes(), log.stat().st_mtime_ns
    finish_mtime = (folder / layout.FINISH_WEIGHTS).stat().st_mtime_ns

    other = fresh_lenet300(seed=1)
    assert train_stage(other, folder, SMALL, train, test, stage_config=STAGE, progress=False) == "skipped"
    assert_same_weights(weights(other), weights(trained))
    assert log.read_bytes() == log_bytes and log.stat().st_mtime_ns == log_mtime
    assert (folder / layout.FINISH_WEIGHTS).stat().st_mtime_ns == finish_mtime

    changed = {**STAGE, "train": {**STAGE["train"], "lr": 0.1}}
    with pytest.raises(StageConfigMismatch, match=r"differs in: train"):
        train_stage(fresh_lenet300(), folder, SMALL, train, test, stage_config=changed, progress=False)
    assert log.read_bytes() == log_bytes


def test_non_writer_writes_nothing(mnist_loaders, tmp_path):
    train, test = mnist_loaders
    folder = tmp_path / "stage"
    assert train_stage(fresh_lenet300(), folder, SMALL, train, test, stage_config=STAGE, writer=False,
                       progress=False) == "trained"
    assert not folder.exists()


# ---------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("optimizer", ["sgd", "gsm"])
def test_resume_after_interrupt_matches_uninterrupted_run(mnist_loaders, tmp_path, optimizer):
    train, test = mnist_loaders
    config = TrainConfig(epochs=4, batch_size=64, lr=0.02, lr_drop_epochs=(3,), momentum=0.9,
                         weight_decay=5e-4, warmup_epochs=1, nesterov=optimizer == "gsm", optimizer=optimizer,
                         nonzero_ratio=0.1 if optimizer == "gsm" else 1.0,
                         bias_lr_factor=2.0 if optimizer == "sgd" else 1.0)
    stage = {"stage": optimizer, "train": config.to_dict()}

    a = fresh_lenet300()
    assert train_stage(a, tmp_path / "A", config, train, test, stage_config=stage, progress=False) == "trained"

    # B: interrupted in the middle of epoch 2 (after its evaluation was logged), then resumed.
    b_folder = tmp_path / "B"
    interrupting = BatchHookLoader(train, 5, keyboard_interrupt, epoch=2)
    with pytest.raises(KeyboardInterrupt):
        train_stage(fresh_lenet300(), b_folder, config, interrupting, test, stage_config=stage, progress=False)
    checkpoint = torch.load(b_folder / layout.CHECKPOINT, weights_only=True)
    assert checkpoint["next_epoch"] == 2
    assert not (b_folder / layout.FINISH_WEIGHTS).exists()
    assert [e for e, _ in evaluations(b_folder / layout.LOG)] == [0, 2]  # epoch 2's, logged before the cut

    # Another configuration must not pick up this checkpoint.
    with pytest.raises(StageConfigMismatch):
        train_stage(fresh_lenet300(), b_folder, config, train, test, stage_config={**stage, "seed": 1},
                    progress=False)

    b = fresh_lenet300()
    assert train_stage(b, b_folder, config, train, test, stage_config=stage, progress=False) == "resumed"
    assert_same_weights(weights(b), weights(a))
    assert_same_weights(gsm.read_hdf5(b_folder / layout.FINISH_WEIGHTS),
                        gsm.read_hdf5(tmp_path / "A" / layout.FINISH_WEIGHTS))
    # The init is the stage's true start, not the fresh model handed to the resumed call.
    assert_same_weights(gsm.read_hdf5(b_folder / layout.INIT_WEIGHTS),
                        gsm.read_hdf5(tmp_path / "A" / layout.INIT_WEIGHTS))
    assert evaluations(b_folder / layout.LOG) == evaluations(tmp_path / "A" / layout.LOG)
    assert [e for e, _ in evaluations(b_folder / layout.LOG)] == [0, 2, 4]
    assert epochs_done(b_folder / layout.LOG) == epochs_done(tmp_path / "A" / layout.LOG)
    assert (b_folder / layout.LOG).read_text().count("resumed from checkpoint.pt at epoch 2") == 1
    assert not (b_folder / layout.CHECKPOINT).exists()


def test_interrupt_before_the_first_checkpoint_starts_over_without_doubled_lines(mnist_loaders, tmp_path):
    train, test = mnist_loaders
    folder = tmp_path / "stage"
    with pytest.raises(KeyboardInterrupt):
        interrupting = BatchHookLoader(train, 4, keyboard_interrupt, epoch=0)
        train_stage(fresh_lenet300(), folder, SMALL, interrupting, test, stage_config=STAGE, progress=False)
    assert not (folder / layout.CHECKPOINT).exists()
    model = fresh_lenet300()
    assert train_stage(model, folder, SMALL, train, test, stage_config=STAGE, progress=False) == "trained"
    clean = fresh_lenet300()
    train_stage(clean, tmp_path / "clean", SMALL, train, test, stage_config=STAGE, progress=False)
    assert_same_weights(weights(model), weights(clean))
    assert evaluations(folder / layout.LOG) == evaluations(tmp_path / "clean" / layout.LOG)
    assert [e for e, _ in evaluations(folder / layout.LOG)] == [0, 2, 3]
    assert (folder / layout.LOG).read_text().count("start training") == 1


def test_interrupt_after_the_last_checkpoint_finishes_without_training(mnist_loaders, tmp_path, monkeypatch):
    """Stopped after the last epoch's checkpoint but before finish.hdf5: the rerun only evaluates and saves."""
    import gsm.experiments.trainer as trainer
    train, test = mnist_loaders
    folder = tmp_path / "stage"
    original_save = trainer.save_hdf5

    def save_unless_finish(model, path):
        if Path(path).name == layout.FINISH_WEIGHTS:
            raise KeyboardInterrupt
        original_save(model, path)

    monkeypatch.setattr(trainer, "save_hdf5", save_unless_finish)
    interrupted = fresh_lenet300()
    with pytest.raises(KeyboardInterrupt):
        train_stage(interrupted, folder, SMALL, train, test, stage_config=STAGE, progress=False)
    monkeypatch.setattr(trainer, "save_hdf5", original_save)
    assert torch.load(folder / layout.CHECKPOINT, weights_only=True)["next_epoch"] == SMALL.num_epochs

    resumed = fresh_lenet300(seed=5)
    assert train_stage(resumed, folder, SMALL, train, test, stage_config=STAGE, progress=False) == "resumed"
    assert_same_weights(weights(resumed), weights(interrupted))
    assert_same_weights(gsm.read_hdf5(folder / layout.FINISH_WEIGHTS), weights(interrupted))
    assert [e for e, _ in evaluations(folder / layout.LOG)] == [0, 2, 3]
    assert len(epochs_done(folder / layout.LOG)) == 3


# ---------------------------------------------------------------------------------------------------------
# Divergence


def test_nan_loss_names_epoch_and_iteration_and_keeps_last_checkpoint(mnist_loaders, tmp_path):
    train, test = mnist_loaders
    folder = tmp_path / "stage"
    poisoned = BatchHookLoader(train, 3, nan_images, epoch=1)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at epoch 1, iteration 3 \(global iteration 11\)"):
        train_stage(fresh_lenet300(), folder, SMALL, poisoned, test, stage_config=STAGE, progress=False)
    assert not (folder / layout.FINISH_WEIGHTS).exists()
    checkpoint = torch.load(folder / layout.CHECKPOINT, weights_only=True)
    assert checkpoint["next_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())

    # With the data fixed, the same call resumes from that checkpoint and finishes like a clean run.
    resumed = fresh_lenet300()
    assert train_stage(resumed, folder, SMALL, train, test, stage_config=STAGE, progress=False) == "resumed"
    clean = fresh_lenet300()
    train_stage(clean, tmp_path / "clean", SMALL, train, test, stage_config=STAGE, progress=False)
    assert_same_weights(weights(resumed), weights(clean))
    assert [e for e, _ in evaluations(folder / layout.LOG)] == [0, 2, 3]


def test_huge_learning_rate_diverges(mnist_loaders, tmp_path):
    train, test = mnist_loaders
    config = TrainConfig(epochs=3, batch_size=64, lr=1e10, lr_drop_epochs=(), momentum=0.9, weight_decay=5e-4)
    folder = tmp_path / "stage"
    with pytest.raises(TrainingDiverged,
                       match=r"non-finite (loss at epoch 0, iteration [1-7] |weights after epoch 0)"):
        train_stage(fresh_lenet300(), folder, config, train, test, stage_config={"lr": 1e10}, progress=False)
    assert not (folder / layout.FINISH_WEIGHTS).exists()
    assert not (folder / layout.CHECKPOINT).exists()  # no epoch was good
    assert (folder / layout.INIT_WEIGHTS).exists()


# ---------------------------------------------------------------------------------------------------------
# Gradient mask and determinism


def test_grad_mask_keeps_pruned_weights_at_zero(mnist_loaders, tmp_path):
    train, test = mnist_loaders
    model = fresh_lenet300()
    generator = torch.Generator().manual_seed(3)
    mask = {name: torch.rand(p.shape, generator=generator) < 0.3
            for name, p in gsm.prunable_parameters(model).items()}
    gsm.apply_mask_to_weights(model, mask)
    start = weights(model)
    train_stage(model, tmp_path / "stage", SMALL, train, test, stage_config=STAGE, grad_mask=mask,
                progress=False)
    finish = gsm.read_hdf5(tmp_path / "stage" / layout.FINISH_WEIGHTS)
    for name, keep in mask.items():
        trained = torch.from_numpy(finish[name])
        assert torch.count_nonzero(trained[~keep]) == 0, name
        # Weight decay alone moves every kept (non-zero) weight, so all of them change.
        assert bool((trained[keep] != start[name][keep]).all()), name
    assert torch.count_nonzero(torch.from_numpy(finish["linear1.weight"])) == int(mask["linear1.weight"].sum())
    for bias in ("linear1.bias", "linear2.bias", "linear3.bias"):
        assert torch.count_nonzero(torch.from_numpy(finish[bias])) > 0, "biases are not masked"
    assert evaluate(model, test)[0] > 50.0  # the masked net still learns


def test_same_seed_gives_bitwise_equal_runs(mnist_tensors, tmp_path):
    def run(folder: Path, data_seed: int):
        images, labels, test_images, test_labels = mnist_tensors
        common = dict(normalize=dataset.MNIST_NORMALIZE, augment=False, device="cpu")
        train = dataset.DeviceLoader(images, labels, 64, train=True, seed=data_seed, **common)
        test = dataset.DeviceLoader(test_images, test_labels, 1000, train=False, **common)
        train_stage(fresh_lenet300(), folder, SMALL, train, test, stage_config=STAGE, progress=False)
        return gsm.read_hdf5(folder / layout.FINISH_WEIGHTS)

    first, second = run(tmp_path / "1", 0), run(tmp_path / "2", 0)
    assert_same_weights(first, second)
    assert evaluations(tmp_path / "1" / layout.LOG) == evaluations(tmp_path / "2" / layout.LOG)
    other = run(tmp_path / "3", 1)  # another data order: the runs differ, so the check above has teeth
    assert not torch.equal(torch.from_numpy(other["linear1.weight"]), torch.from_numpy(first["linear1.weight"]))


# ---------------------------------------------------------------------------------------------------------
# torch.compile: evaluation stays out of the compiled graph


class TinyBatchNormNet(nn.Module):
    """conv-BN-ReLU and a classifier: BatchNorm behaves differently in eval mode, which a compiled graph
    guards on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 36, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_evaluation_neither_compiles_nor_recompiles_the_training_graph(mnist_loaders, tmp_path):
    """A compiled model's stage compiles one graph, the training step's: the evaluations (at epoch 0, before
    any training, at every even epoch and after the last) run the plain module eagerly, so they compile no
    graph of their own and never make the training graph recompile for eval mode."""
    from torch._dynamo.utils import counters

    train, test = mnist_loaders
    torch.manual_seed(0)
    plain = TinyBatchNormNet()
    model = torch.compile(plain)
    config = TrainConfig(epochs=3, batch_size=64, lr=0.05, lr_drop_epochs=(), momentum=0.9, weight_decay=5e-4)
    torch._dynamo.reset()
    counters.clear()
    train_stage(model, tmp_path / "stage", config, train, test, stage_config={"test": "compile"}, progress=False)
    assert evaluations(tmp_path / "stage" / "log.txt")[-1][0] == 3  # it evaluated, also after the last epoch
    assert counters["frames"]["total"] == counters["stats"]["unique_graphs"] == 1
    assert evaluate(model, test) == evaluate(plain, test)  # the same eager module, in float32
    assert counters["frames"]["total"] == 1


# ---------------------------------------------------------------------------------------------------------
# TensorBoard scalars


def scalar_steps(folder: Path) -> dict:
    """{tag: [steps]} as TensorBoard reads the folder's event files (dropping the points a resumed writer
    purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_scalars_once_per_epoch_also_after_a_resume(mnist_loaders, tmp_path):
    train, test = mnist_loaders
    config = TrainConfig(epochs=4, batch_size=64, lr=0.02, lr_drop_epochs=(3,), momentum=0.9, weight_decay=5e-4,
                         nesterov=True, optimizer="gsm", nonzero_ratio=0.1)
    folder = tmp_path / "stage"
    interrupting = BatchHookLoader(train, 5, keyboard_interrupt, epoch=2)
    with pytest.raises(KeyboardInterrupt):
        train_stage(fresh_lenet300(), folder, config, interrupting, test, stage_config=STAGE, progress=False)
    before = scalar_steps(folder)
    assert before["train/loss"] == [0, 1] and before["test/top1"] == [0, 2]
    train_stage(fresh_lenet300(), folder, config, train, test, stage_config=STAGE, progress=False)
    steps = scalar_steps(folder)
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one per run of the stage
    for tag in ("train/loss", "train/lr", "train/seconds", "gsm/active", "gsm/threshold"):
        assert steps[tag] == [0, 1, 2, 3], tag
    assert steps["test/top1"] == steps["test/top5"] == steps["test/loss"] == [0, 2, 4]  # epoch 2: once
    for tag in ("readiness/removed_above_1e_2", "readiness/share_above_1e_2", "readiness/share_above_1e_3",
                "readiness/removed_kept_norm"):
        assert steps[tag] == [0, 2, 4], tag
    assert steps["pruned_copy/top1"] == steps["pruned_copy/loss"] == [3, 4]  # at the lr drop and the end
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    active = [event.value for event in accumulator.Scalars("gsm/active")]
    assert all(value >= int(0.1 * 266200) for value in active)  # the GSM count, Q = 26620 at least


READINESS_RE = re.compile(r" train INFO: prune readiness at epoch (\d+): (\d+) of (\d+) weights the hard prune "
                          r"removes have \|w\| > 0\.01 \(\S+%\), (\d+) > 0\.001 \(\S+%\); removed/kept norm (\S+)$")
COPY_RE = re.compile(r" train INFO: hard-pruned copy at epoch (\d+): kept (\d+) of (\d+), top1=(\S+), top5=(\S+), "
                     r"loss=(\S+)$")


def test_gsm_stage_logs_readiness_and_hard_pruned_copies(mnist_loaders, tmp_path):
    """Readiness at every evaluation and a hard-pruned copy at the lr drop and the end; the last ones are those of
    the finished weights, and the copy leaves the trained model untouched."""
    train, test = mnist_loaders
    config = TrainConfig(epochs=4, batch_size=64, lr=0.02, lr_drop_epochs=(3,), momentum=0.9, weight_decay=5e-4,
                         nesterov=True, optimizer="gsm", nonzero_ratio=0.1)
    folder = tmp_path / "gsm"
    model = fresh_lenet300()
    train_stage(model, folder, config, train, test, stage_config=STAGE, progress=False)
    lines = (folder / layout.LOG).read_text().splitlines()
    readiness = [m.groups() for m in map(READINESS_RE.search, lines) if m]
    copies = [m.groups() for m in map(COPY_RE.search, lines) if m]
    assert [int(r[0]) for r in readiness] == [0, 2, 4] and [int(c[0]) for c in copies] == [3, 4]
    finished = fresh_lenet300()
    gsm.load_hdf5(folder / layout.FINISH_WEIGHTS, finished)
    assert_same_weights(weights(model), weights(finished))  # the copies changed nothing
    optimizer = gsm.GSM(gsm.param_groups(finished, 5e-4), lr=0.02, nonzero_ratio=0.1)
    expected = gsm.prune_readiness(finished, optimizer)
    epoch, above_1e_2, removed, above_1e_3, norm_ratio = readiness[-1]
    assert (int(above_1e_2), int(removed), int(above_1e_3)) == (
        expected.outside_above_1e_2, expected.removed, expected.outside_above_1e_3)
    assert float(norm_ratio) == pytest.approx(expected.norm_ratio, rel=1e-5)
    assert expected.removed == 266200 - 26620 and 0 < expected.outside_above_1e_3 < expected.removed
    mask = optimizer.hard_mask(finished)
    gsm.apply_mask_to_weights(finished, mask)
    top1, top5, loss = evaluate(finished, test)
    assert copies[-1][1:] == (str(gsm.mask_count(mask)), "266200", f"{top1:.5f}", f"{top5:.5f}", f"{loss:.6f}")

    # Every epoch, or never; an SGD stage logs neither.
    for every, expected_epochs in ((1, [1, 2, 3, 4]), (0, [])):
        other = tmp_path / f"every{every}"
        train_stage(fresh_lenet300(), other, config, train, test, stage_config=STAGE, progress=False,
                    eval_pruned_every=every)
        lines = (other / layout.LOG).read_text().splitlines()
        assert [int(m.group(1)) for m in map(COPY_RE.search, lines) if m] == expected_epochs
    train_stage(fresh_lenet300(), tmp_path / "sgd", SMALL, train, test, stage_config=STAGE, progress=False)
    text = (tmp_path / "sgd" / layout.LOG).read_text()
    assert "prune readiness" not in text and "hard-pruned copy" not in text


def test_pruned_copy_epochs():
    from gsm.experiments.trainer import pruned_copy_epochs

    paper = gsm_config(LENET_GSM["paper"], 60)
    assert pruned_copy_epochs(paper, None) == {160, 200, 240}
    assert pruned_copy_epochs(paper.scaled(0.05), None) == {8, 10, 12}
    assert pruned_copy_epochs(paper, 50) == {50, 100, 150, 200, 240}
    assert pruned_copy_epochs(paper, 0) == set()
    assert pruned_copy_epochs(paper.scaled(0.001), None) == {1}  # drops scaled to epoch 0 fall away
    with pytest.raises(ValueError, match=">= 0"):
        pruned_copy_epochs(paper, -1)

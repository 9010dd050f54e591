"""The per-iteration learning rate (docs/design.md, section 2) and the training recipes, unscaled and scaled."""
import dataclasses

import pytest

from gsm.experiments.configs import (DEFAULT_RECIPE, LENET_BASE, LENET_GSM, RC_BASE, RC_GSM, RECIPES, TrainConfig,
                                   gsm_config)
from gsm.experiments.lr_schedule import learning_rate

MNIST_ITERS = 234  # floor(60000 / 256)
CIFAR_ITERS = 781  # floor(50000 / 64)


# ---------------------------------------------------------------------------------------------------------
# learning_rate


def test_warmup_rises_linearly_from_zero():
    base, warmup = 0.2, 100
    assert learning_rate(0, base, warmup, ()) == 0.0
    assert learning_rate(50, base, warmup, ()) == pytest.approx(0.1, rel=1e-12)
    assert learning_rate(25, base, warmup, ()) == pytest.approx(0.05, rel=1e-12)
    assert learning_rate(99, base, warmup, ()) == pytest.approx(0.198, rel=1e-12)
    # The warmup ends exactly at warmup_iters: from there on the base lr.
    assert learning_rate(100, base, warmup, ()) == base
    assert learning_rate(10_000, base, warmup, ()) == base


def test_each_drop_multiplies_by_a_tenth_from_its_boundary_on():
    base, drops = 1.0, (10, 20, 30)
    assert learning_rate(9, base, 0, drops) == 1.0
    assert learning_rate(10, base, 0, drops) == pytest.approx(0.1, rel=1e-12)  # exactly at the boundary: dropped
    assert learning_rate(19, base, 0, drops) == pytest.approx(0.1, rel=1e-12)
    assert learning_rate(20, base, 0, drops) == pytest.approx(0.01, rel=1e-12)
    assert learning_rate(29, base, 0, drops) == pytest.approx(0.01, rel=1e-12)
    assert learning_rate(30, base, 0, drops) == pytest.approx(0.001, rel=1e-12)
    assert learning_rate(10 ** 6, base, 0, drops) == pytest.approx(0.001, rel=1e-12)


def test_no_warmup_starts_at_the_base_rate():
    assert learning_rate(0, 0.03, 0, (5,)) == 0.03
    assert learning_rate(1, 0.03, 0, (5,)) == 0.03


def test_warmup_and_drops_combine():
    # A drop boundary inside the warmup: both factors apply.
    assert learning_rate(5, 1.0, 10, (4,)) == pytest.approx(0.5 * 0.1, rel=1e-12)
    assert learning_rate(4, 2.0, 8, (4, 6)) == pytest.approx(2.0 * 0.5 * 0.1, rel=1e-12)


def test_custom_gamma():
    assert learning_rate(7, 1.0, 0, (3, 5), gamma=0.5) == pytest.approx(0.25, rel=1e-12)


def _lr(config: TrainConfig, iteration: int, iters_per_epoch: int) -> float:
    return learning_rate(iteration, config.lr, config.warmup_iters(iters_per_epoch),
                         config.drop_iters(iters_per_epoch))


def test_lenet_base_schedule_on_mnist():
    # 234 iterations per epoch, 5 warmup epochs from 0, drops at epochs 40, 80, 120, 160.
    assert _lr(LENET_BASE, 0, MNIST_ITERS) == 0.0
    assert _lr(LENET_BASE, 5 * MNIST_ITERS // 2, MNIST_ITERS) == pytest.approx(0.015, rel=1e-12)
    assert _lr(LENET_BASE, 5 * MNIST_ITERS - 1, MNIST_ITERS) == pytest.approx(0.03 * 1169 / 1170, rel=1e-12)
    assert _lr(LENET_BASE, 5 * MNIST_ITERS, MNIST_ITERS) == pytest.approx(0.03, rel=1e-12)
    assert _lr(LENET_BASE, 40 * MNIST_ITERS - 1, MNIST_ITERS) == pytest.approx(0.03, rel=1e-12)
    assert _lr(LENET_BASE, 40 * MNIST_ITERS, MNIST_ITERS) == pytest.approx(0.003, rel=1e-12)
    assert _lr(LENET_BASE, 80 * MNIST_ITERS, MNIST_ITERS) == pytest.approx(3e-4, rel=1e-12)
    assert _lr(LENET_BASE, 120 * MNIST_ITERS, MNIST_ITERS) == pytest.approx(3e-5, rel=1e-12)
    assert _lr(LENET_BASE, 160 * MNIST_ITERS, MNIST_ITERS) == pytest.approx(3e-6, rel=1e-12)
    assert _lr(LENET_BASE, 200 * MNIST_ITERS - 1, MNIST_ITERS) == pytest.approx(3e-6, rel=1e-12)


def test_lenet_gsm_paper_schedule_has_no_warmup():
    paper = LENET_GSM["paper"]
    assert _lr(paper, 0, MNIST_ITERS) == pytest.approx(0.03, rel=1e-12)
    assert _lr(paper, 160 * MNIST_ITERS - 1, MNIST_ITERS) == pytest.approx(0.03, rel=1e-12)
    assert _lr(paper, 160 * MNIST_ITERS, MNIST_ITERS) == pytest.approx(0.003, rel=1e-12)
    assert _lr(paper, 200 * MNIST_ITERS, MNIST_ITERS) == pytest.approx(3e-4, rel=1e-12)


def test_lenet_gsm_released_schedule():
    released = LENET_GSM["released"]
    assert _lr(released, 0, MNIST_ITERS) == 0.0
    assert _lr(released, 5 * MNIST_ITERS, MNIST_ITERS) == pytest.approx(0.01, rel=1e-12)
    assert _lr(released, 240 * MNIST_ITERS, MNIST_ITERS) == pytest.approx(1e-5, rel=1e-12)


def test_rc56_schedules_on_cifar():
    assert _lr(RC_BASE, 0, CIFAR_ITERS) == 0.0
    assert _lr(RC_BASE, 5 * CIFAR_ITERS, CIFAR_ITERS) == pytest.approx(0.1, rel=1e-12)
    assert _lr(RC_BASE, 100 * CIFAR_ITERS - 1, CIFAR_ITERS) == pytest.approx(0.1, rel=1e-12)
    assert _lr(RC_BASE, 100 * CIFAR_ITERS, CIFAR_ITERS) == pytest.approx(0.01, rel=1e-12)
    assert _lr(RC_BASE, 400 * CIFAR_ITERS, CIFAR_ITERS) == pytest.approx(1e-5, rel=1e-12)
    assert _lr(RC_GSM, 5 * CIFAR_ITERS, CIFAR_ITERS) == pytest.approx(5e-3, rel=1e-12)
    assert _lr(RC_GSM, 400 * CIFAR_ITERS, CIFAR_ITERS) == pytest.approx(5e-4, rel=1e-12)
    assert _lr(RC_GSM, 500 * CIFAR_ITERS, CIFAR_ITERS) == pytest.approx(5e-5, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Scaling


def test_unscaled_iteration_counts():
    assert LENET_BASE.num_epochs == 200
    assert LENET_BASE.warmup_iters(MNIST_ITERS) == 1170
    assert LENET_BASE.drop_iters(MNIST_ITERS) == (9360, 18720, 28080, 37440)
    assert RC_BASE.drop_iters(CIFAR_ITERS) == (78100, 156200, 234300, 312400)


@pytest.mark.parametrize("scale", [0.1, 0.01])
def test_scaled_follows_the_rule(scale):
    """scaled(s): epochs round(E * s) (at least 1), warmup round(W * s * ipe), drops round(D * s * ipe)."""
    for config in (LENET_BASE, *LENET_GSM.values()):
        scaled = config.scaled(scale)
        assert scaled.num_epochs == max(1, round(config.epochs * scale))
        assert scaled.warmup_iters(MNIST_ITERS) == round(config.warmup_epochs * scale * MNIST_ITERS)
        assert scaled.drop_iters(MNIST_ITERS) == tuple(round(e * scale * MNIST_ITERS)
                                                         for e in config.lr_drop_epochs)
        # Everything else, including the unscaled epoch counts, stays.
        assert dataclasses.replace(scaled, scale=1.0) == config


def test_scaled_values_by_hand():
    tenth = LENET_BASE.scaled(0.1)
    assert tenth.num_epochs == 20
    assert tenth.warmup_iters(MNIST_ITERS) == 117  # 0.5 epoch
    assert tenth.drop_iters(MNIST_ITERS) == (936, 1872, 2808, 3744)  # epochs 4, 8, 12, 16

    hundredth = LENET_BASE.scaled(0.01)
    assert hundredth.num_epochs == 2
    assert hundredth.warmup_iters(MNIST_ITERS) == 12  # round(11.7)
    assert hundredth.drop_iters(MNIST_ITERS) == (94, 187, 281, 374)  # round(93.6), round(187.2), ...

    paper = LENET_GSM["paper"].scaled(0.01)
    assert paper.num_epochs == 2  # round(2.4)
    assert paper.warmup_iters(MNIST_ITERS) == 0
    assert paper.drop_iters(MNIST_ITERS) == (374, 468)

    released = LENET_GSM["released"].scaled(0.01)
    assert released.num_epochs == 3  # round(2.8)
    assert released.warmup_iters(MNIST_ITERS) == 12
    assert released.drop_iters(MNIST_ITERS) == (374, 468, 562)

    # The smoke run of the lottery test: 2 iterations per epoch (512 images at batch 256).
    assert hundredth.warmup_iters(2) == 0  # round(0.1): no warmup
    assert hundredth.drop_iters(2) == (1, 2, 2, 3)
    # A zero warmup must not divide by zero: the first step gets the base lr.
    assert learning_rate(0, hundredth.lr, hundredth.warmup_iters(2), hundredth.drop_iters(2)) == 0.03


def test_scaled_runs_at_least_one_epoch_and_leaves_the_original_alone():
    assert LENET_BASE.scaled(0.001).num_epochs == 1  # round(0.2) would be 0
    assert LENET_BASE.scale == 1.0
    assert LENET_BASE.scaled(0.5).scale == 0.5
    assert LENET_BASE.scaled(0.5).epochs == 200
    with pytest.raises(dataclasses.FrozenInstanceError):
        LENET_BASE.lr = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------
# The recipes of docs/design.md, section 2


def test_lenet_base_recipe():
    c = LENET_BASE
    assert (c.batch_size, c.optimizer, c.momentum, c.nesterov) == (256, "sgd", 0.9, False)
    assert (c.lr, c.lr_drop_epochs, c.epochs, c.weight_decay, c.warmup_epochs) == \
        (3e-2, (40, 80, 120, 160), 200, 5e-4, 5)
    assert c.bias_lr_factor == 2.0
    assert c.nonzero_ratio == 1.0


def test_lenet_gsm_recipes():
    assert RECIPES == ("paper", "released")
    assert DEFAULT_RECIPE == "paper"
    paper, released = LENET_GSM["paper"], LENET_GSM["released"]
    assert (paper.batch_size, paper.optimizer, paper.momentum, paper.nesterov) == (256, "gsm", 0.99, True)
    assert (paper.lr, paper.lr_drop_epochs, paper.epochs, paper.weight_decay, paper.warmup_epochs) == \
        (3e-2, (160, 200), 240, 5e-4, 0)
    assert (released.batch_size, released.optimizer, released.momentum, released.nesterov) == \
        (256, "gsm", 0.99, True)
    assert (released.lr, released.lr_drop_epochs, released.epochs, released.weight_decay,
            released.warmup_epochs) == (1e-2, (160, 200, 240), 280, 5e-4, 5)
    # GSM training: no lr multiplier for biases.
    assert paper.bias_lr_factor == released.bias_lr_factor == 1.0


def test_rc56_recipes():
    assert (RC_BASE.batch_size, RC_BASE.optimizer, RC_BASE.momentum, RC_BASE.lr, RC_BASE.lr_drop_epochs,
            RC_BASE.epochs, RC_BASE.weight_decay, RC_BASE.warmup_epochs, RC_BASE.bias_lr_factor) == \
        (64, "sgd", 0.9, 0.1, (100, 200, 300, 400), 500, 1e-4, 5, 2.0)
    assert (RC_GSM.batch_size, RC_GSM.optimizer, RC_GSM.momentum, RC_GSM.lr, RC_GSM.lr_drop_epochs,
            RC_GSM.epochs, RC_GSM.weight_decay, RC_GSM.warmup_epochs, RC_GSM.bias_lr_factor) == \
        (64, "gsm", 0.98, 5e-3, (400, 500), 600, 1e-4, 5, 1.0)
    assert RC_GSM.nesterov is False


def test_gsm_config_sets_the_nonzero_ratio_only():
    config = gsm_config(LENET_GSM["paper"], 60)
    assert config.nonzero_ratio == pytest.approx(1 / 60, rel=1e-15)
    assert dataclasses.replace(config, nonzero_ratio=1.0) == LENET_GSM["paper"]
    assert gsm_config(RC_GSM, 10).nonzero_ratio == pytest.approx(0.1, rel=1e-15)


def test_to_dict_is_json_ready_and_round_trips():
    d = LENET_GSM["released"].scaled(0.01).to_dict()
    assert d["lr_drop_epochs"] == [160, 200, 240]
    assert d["scale"] == 0.01
    assert TrainConfig(**{**d, "lr_drop_epochs": tuple(d["lr_drop_epochs"])}) == LENET_GSM["released"].scaled(0.01)

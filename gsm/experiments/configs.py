"""Training configurations: the released code's hyperparameters (docs/design.md, section 2) as dataclasses, and
the record that identifies each stage of an experiment."""
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional, Tuple

RECIPES = ("paper", "released")
DEFAULT_RECIPE = "paper"


@dataclass(frozen=True)
class TrainConfig:
    """One training stage. Epoch counts are in epochs of floor(N_train / batch_size) iterations; `scale`
    multiplies every epoch count, lr boundary and the warmup (a smoke run uses e.g. 0.01)."""
    epochs: int
    batch_size: int
    lr: float
    lr_drop_epochs: Tuple[int, ...]
    momentum: float
    weight_decay: float
    warmup_epochs: int = 0
    nesterov: bool = False
    optimizer: str = "sgd"  # "sgd" (base and retrain) or "gsm"
    nonzero_ratio: float = 1.0  # GSM only: 1 / compression ratio
    bias_lr_factor: float = 1.0  # base and retrain: biases train at 2x lr
    scale: float = 1.0

    @property
    def num_epochs(self) -> int:
        """Epochs to run after scaling (at least one)."""
        return max(1, round(self.epochs * self.scale))

    def warmup_iters(self, iters_per_epoch: int) -> int:
        return round(self.warmup_epochs * self.scale * iters_per_epoch)

    def drop_iters(self, iters_per_epoch: int) -> Tuple[int, ...]:
        return tuple(round(e * self.scale * iters_per_epoch) for e in self.lr_drop_epochs)

    def scaled(self, scale: float) -> "TrainConfig":
        return replace(self, scale=scale)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["lr_drop_epochs"] = list(d["lr_drop_epochs"])
        return d


# LeNet-300-100 and LeNet-5 on MNIST.
LENET_BASE = TrainConfig(epochs=200, batch_size=256, lr=3e-2, lr_drop_epochs=(40, 80, 120, 160), momentum=0.9,
                         weight_decay=5e-4, warmup_epochs=5, bias_lr_factor=2.0)
# The two recipes of the LeNet GSM stage (docs/design.md, section 2). `paper`: the first released version's schedule (lr 3e-2, drops
# at epochs 160 and 200, 240 epochs, no warmup) with momentum 0.99 and the final version's Nesterov momentum (the
# first version itself used plain momentum); it drives the passive weights to zero fast enough for a nearly
# lossless hard prune. `released`: the released code's final version.
LENET_GSM = {
    "paper": TrainConfig(epochs=240, batch_size=256, lr=3e-2, lr_drop_epochs=(160, 200), momentum=0.99,
                         weight_decay=5e-4, warmup_epochs=0, nesterov=True, optimizer="gsm"),
    "released": TrainConfig(epochs=280, batch_size=256, lr=1e-2, lr_drop_epochs=(160, 200, 240), momentum=0.99,
                            weight_decay=5e-4, warmup_epochs=5, nesterov=True, optimizer="gsm"),
}

# ResNet-56 on CIFAR-10.
RC_BASE = TrainConfig(epochs=500, batch_size=64, lr=0.1, lr_drop_epochs=(100, 200, 300, 400), momentum=0.9,
                      weight_decay=1e-4, warmup_epochs=5, bias_lr_factor=2.0)
RC_GSM = TrainConfig(epochs=600, batch_size=64, lr=5e-3, lr_drop_epochs=(400, 500), momentum=0.98,
                     weight_decay=1e-4, warmup_epochs=5, optimizer="gsm")


def gsm_config(base: TrainConfig, compression_ratio: float) -> TrainConfig:
    """A GSM stage config at the given compression ratio R (nonzero_ratio = 1 / R)."""
    return replace(base, nonzero_ratio=1.0 / compression_ratio)


def stage_config(stage: str, model: str, seed: int, train: TrainConfig, *, base: Optional[TrainConfig] = None,
                 **extra: Any) -> Dict[str, Any]:
    """What identifies a stage of an experiment (JSON-able; its folder's config.json): the stage's kind, the
    network, the seed, its training configuration, the base stage's (for the stages that start from it), and
    `extra` entries (a TrainConfig among them as its dict). A folder holding another is not reused."""
    record: Dict[str, Any] = {"stage": stage, "model": model, "seed": seed, "train": train.to_dict()}
    if base is not None:
        record["base"] = base.to_dict()
    record.update({key: value.to_dict() if isinstance(value, TrainConfig) else value for key, value in extra.items()})
    return record


@dataclass(frozen=True)
class RunOptions:
    """Options every experiment script takes."""
    scale: float = 1.0
    device: str = "cpu"
    seed: int = 0
    out_root: str = "."
    data_root: str = ""  # empty: the dataset module's MNIST_PATH / CIFAR10_PATH
    progress: bool = True  # tqdm bars (shown only on a terminal)
    eval_pruned_every: Optional[int] = None  # GSM stages: epochs between hard-pruned copies; None: at the lr drops

"""Model registry: `build_model(name)` returns a freshly initialised network by its short name."""
from typing import Callable, Dict, Union

import torch
from torch import nn

from base_model.lenet import LeNet300, LeNet5
from base_model.resnet_cifar import CifarResNet

_BUILDERS: Dict[str, Callable[[], nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "rc20": lambda: CifarResNet(20),
    "rc32": lambda: CifarResNet(32),
    "rc44": lambda: CifarResNet(44),
    "rc56": lambda: CifarResNet(56),
    "rc110": lambda: CifarResNet(110),
}

MODEL_NAMES = tuple(_BUILDERS)

# Which dataset each model is trained on.
MODEL_DATASETS = {name: ("mnist" if name.startswith("lenet") else "cifar10") for name in MODEL_NAMES}


def trains_channels_last(name: str, device: Union[str, torch.device]) -> bool:
    """Whether model `name` trains with weights and images in the channels_last memory layout on `device`: on
    the CPU LeNet-5 does (faster, gradients as precise) and the ResNets do not (faster, but channels_last
    BatchNorm is less precise there); on GPUs every convolutional model does (cuDNN's fastest convolutions are
    channels_last). LeNet-300-100 has no convolutions. `bench/bench_layout.py` measures it; the README has the
    figures."""
    if name == "lenet300":
        return False
    return name == "lenet5" or torch.device(device).type == "cuda"


def init_weights(model: nn.Module) -> None:
    """The released code's initialisation: Xavier-uniform for every weight of dim > 1, zero biases,
    BatchNorm weight 1 and bias 0."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_parameters()


def build_model(name: str) -> nn.Module:
    """Build and initialise the network called `name` (one of MODEL_NAMES)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    model = _BUILDERS[name]()
    init_weights(model)
    return model


__all__ = ["build_model", "init_weights", "trains_channels_last", "MODEL_NAMES", "MODEL_DATASETS", "LeNet300",
           "LeNet5", "CifarResNet"]

"""LeNet-300-100 and the Caffe variant of LeNet-5, named as in the released GSM models."""
from collections import OrderedDict

import torch
from torch import nn


class LeNet300(nn.Module):
    """784-300-100-10 fully connected network with ReLU; takes [B, 1, 28, 28] or [B, 784] input."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.linear1 = nn.Linear(784, 300)
        self.linear2 = nn.Linear(300, 100)
        self.linear3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.linear1(x.flatten(1)))
        x = torch.relu(self.linear2(x))
        return self.linear3(x)


class LeNet5(nn.Module):
    """Caffe LeNet-5: conv5x5 1->20, pool, conv5x5 20->50, pool, fc 800->500, fc 500->10 (ReLU after each)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, 20, kernel_size=5)),
            ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(20, 50, kernel_size=5)),
            ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
        ]))
        self.linear1 = nn.Linear(800, 500)
        self.linear2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(1)
        x = torch.relu(self.linear1(x))
        return self.linear2(x)

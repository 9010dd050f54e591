"""CIFAR ResNets (depth 6n+2) with conv-BN units and 1x1 projection shortcuts, named as in the released models."""
import torch
from torch import nn


class ConvBN(nn.Module):
    """A bias-free convolution followed by BatchNorm; state keys `conv.weight` and `bn.*`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN units; the shortcut is a 1x1 conv-BN projection where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        # Defined first so that the state-dict order matches the released models.
        self.shortcut = (ConvBN(in_channels, out_channels, 1, stride)
                         if stride != 1 or in_channels != out_channels else None)
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride)
        self.conv2 = ConvBN(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(out) + identity)


class CifarResNet(nn.Module):
    """3x3 conv-BN-ReLU stem of 16 channels, three stages of `blocks_per_stage` basic blocks
    (16, 32, 64 channels; stride 2 at the start of stages 2 and 3), global average pool, fc 64->classes."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = ConvBN(3, 16, 3)
        self.stage1 = self._make_stage(16, 16, blocks_per_stage, stride=1)
        self.stage2 = self._make_stage(16, 32, blocks_per_stage, stride=2)
        self.stage3 = self._make_stage(32, 64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels, 1) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.stage3(self.stage2(self.stage1(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.linear(x)

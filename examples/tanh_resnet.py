"""A user's own model for mpifedmeta, in the user's own file: a small residual network with
GroupNorm, GELU, LayerNorm and Tanh for (C, H, W) images. Used by configs/user-model.toml:

    [model]
    name = "examples/tanh_resnet.py:build"     # FILE.py:FUNCTION, relative to the current directory

The builder has the registry's signature, ``build(in_shape, num_classes, hidden) -> nn.Module``.
Nothing here is special to mpifedmeta: the block's stacked form (the fast default strategy) is
derived from the structure of ``forward`` (docs/extending.md lists what can be lifted).
"""

import torch
from torch import nn
from torch.nn import functional as F


class ResidualBlock(nn.Module):
    """tanh(x + GroupNorm(conv(GELU(GroupNorm(conv(x))))))."""

    def __init__(self, channels: int, groups: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)

    def forward(self, x):
        h = F.gelu(self.norm1(self.conv1(x)))
        return torch.tanh(x + self.norm2(self.conv2(h)))


class TanhResNet(nn.Module):
    """conv stem → residual block → 2×2 average pool → LayerNorm → tanh MLP head."""

    def __init__(self, in_shape: tuple, num_classes: int, width: int, channels: int = 8):
        super().__init__()
        c, height, wide = in_shape
        self.stem = nn.Conv2d(c, channels, 3, padding=1)
        self.block = ResidualBlock(channels)
        self.pool = nn.AvgPool2d(2)
        flat = channels * (height // 2) * (wide // 2)
        self.norm = nn.LayerNorm(flat)
        self.fc = nn.Linear(flat, width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.pool(self.block(torch.tanh(self.stem(x))))
        h = self.norm(h.flatten(1))
        return self.out(torch.tanh(self.fc(h)))


def build(in_shape, num_classes, hidden):
    """model.hidden's first entry is the width of the head (default 32)."""
    if len(in_shape) != 3:
        raise ValueError(f"needs image inputs (C, H, W), got feature shape {tuple(in_shape)}")
    return TanhResNet(tuple(in_shape), num_classes, (hidden or (32,))[0])

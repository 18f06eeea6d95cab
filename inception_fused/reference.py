"""Plain PyTorch Inception module: the reference every fused path is checked against.

Parameter and buffer names follow torchvision's ``Inception`` (``branch1.conv.weight``,
``branch2.0.bn.running_mean``, ``branch4.1.conv.weight`` ...), so state dicts move freely
between torchvision, this reference and :class:`~inception_fused.FusedInceptionModule`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # torchvision's BasicConv2d and the GoogLeNet paper's Caffe port use 1e-3


class ConvBlock(nn.Module):
    """Conv2d → BatchNorm2d(eps=1e-3) → ReLU, named like torchvision's ``BasicConv2d``.

    With ``batch_norm=False`` the conv carries a bias and there is no BN (the paper's form).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=kernel_size // 2,
            bias=not batch_norm,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x)


class InceptionModule(nn.Module):
    """GoogLeNet's Inception block (arXiv 1409.4842, Fig. 2b), four branches concatenated.

    Args follow the paper's table and torchvision's positional order. ``branch3_kernel`` is
    the "5x5" branch's kernel: 5 as in the paper, 3 as in torchvision (kept there for weight
    compatibility, torchvision issue 906). ``conv_block`` is accepted and ignored so the
    class drops into ``torchvision.models.GoogLeNet(blocks=[...])``.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        conv_block: Any = None,
        *,
        branch3_kernel: int = 5,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        sizes = (in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)
        if any(int(c) != c or c <= 0 for c in sizes):
            raise ValueError(f"channel counts must be positive integers, got {sizes}")
        if branch3_kernel <= 0 or branch3_kernel % 2 == 0:
            raise ValueError(
                f"branch3_kernel must be a positive odd size, got {branch3_kernel}"
            )
        self.in_channels = in_channels
        self.branch3_kernel = branch3_kernel
        self.batch_norm = batch_norm
        self.branch1 = ConvBlock(in_channels, ch1x1, 1, batch_norm)
        self.branch2 = nn.Sequential(
            ConvBlock(in_channels, ch3x3red, 1, batch_norm),
            ConvBlock(ch3x3red, ch3x3, 3, batch_norm),
        )
        self.branch3 = nn.Sequential(
            ConvBlock(in_channels, ch5x5red, 1, batch_norm),
            ConvBlock(ch5x5red, ch5x5, branch3_kernel, batch_norm),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            ConvBlock(in_channels, pool_proj, 1, batch_norm),
        )

    @property
    def out_channels(self) -> int:
        return sum(self.channel_splits())

    def channel_splits(self) -> tuple[int, int, int, int]:
        """Output channels of the four branches, in concatenation order."""
        return (
            self.branch1.conv.out_channels,
            self.branch2[1].conv.out_channels,
            self.branch3[1].conv.out_channels,
            self.branch4[1].conv.out_channels,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x))
        return torch.cat(branches, 1)

    def extra_repr(self) -> str:
        return f"branch3_kernel={self.branch3_kernel}, batch_norm={self.batch_norm}"

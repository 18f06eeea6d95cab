"""BatchNorm folding: conv → BN(running stats) becomes one conv with a bias.

Weights are packed in the layout the kernels read, an implicit-GEMM matrix
[KS*KS*C_in, C_out] (row = tap * C_in + input channel, output channels contiguous).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import ConvBlock, InceptionModule


@dataclass(frozen=True)
class FoldedInception:
    """Eval-mode weights of one Inception module, BN folded, packed for the kernels."""

    stem_w: torch.Tensor  # [C_in, c1 + r3 + r5]: the three 1x1 convs that read x
    stem_b: torch.Tensor
    pool_w: torch.Tensor  # [C_in, pool_proj]
    pool_b: torch.Tensor
    w3: torch.Tensor  # [k3*k3*r3, c3]
    b3: torch.Tensor
    w5: torch.Tensor  # [k5*k5*r5, c5]
    b5: torch.Tensor
    c1: int
    r3: int
    k3: int
    k5: int


def fold_conv_block(
    block: ConvBlock, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [KS*KS*C_in, C_out] in ``dtype``, bias [C_out] in the accumulator dtype)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = block.conv.weight.detach().to(acc)
    if block.bn is None:
        bias = block.conv.bias.detach().to(acc)
    else:
        bn = block.bn
        scale = torch.rsqrt(bn.running_var.detach().to(acc) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(acc)
        bias = -bn.running_mean.detach().to(acc) * scale
        if bn.bias is not None:
            bias = bias + bn.bias.detach().to(acc)
        w = w * scale[:, None, None, None]
    packed = w.permute(2, 3, 1, 0).reshape(-1, w.shape[0])  # [kh, kw, C_in, C_out]
    return packed.to(dtype).contiguous(), bias.contiguous()


def fold_inception(module: InceptionModule, dtype: torch.dtype) -> FoldedInception:
    parts = [
        fold_conv_block(b, dtype)
        for b in (module.branch1, module.branch2[0], module.branch3[0])
    ]
    pool_w, pool_b = fold_conv_block(module.branch4[1], dtype)
    w3, b3 = fold_conv_block(module.branch2[1], dtype)
    w5, b5 = fold_conv_block(module.branch3[1], dtype)
    return FoldedInception(
        stem_w=torch.cat([w for w, _ in parts], 1).contiguous(),
        stem_b=torch.cat([b for _, b in parts]),
        pool_w=pool_w,
        pool_b=pool_b,
        w3=w3,
        b3=b3,
        w5=w5,
        b5=b5,
        c1=module.branch1.conv.out_channels,
        r3=module.branch2[0].conv.out_channels,
        k3=module.branch2[1].conv.kernel_size[0],
        k5=module.branch3[1].conv.kernel_size[0],
    )

"""Train-mode forward, torch-op path: the contract's interface in plain PyTorch ops.

PROVISIONAL: stands in for the Triton train forward (branch `train`) so the backward and
the autograd op can be built and tested; it computes exactly what that kernel family must
return (pre-BN conv outputs, batch statistics, running-stat updates as nn.BatchNorm2d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..folding import BNParams, FoldedInception


@dataclass
class TrainForward:
    out: torch.Tensor  # [N, C_out, H, W] channels_last: relu(bn(z)) (or relu(z))
    z_out: torch.Tensor  # [M, C_out]: pre-BN conv outputs in output-channel order
    z_red: torch.Tensor  # [M, r3 + r5]: pre-BN reduce conv outputs
    mean_out: torch.Tensor | None  # [C_out], accumulator dtype; None without BN
    invstd_out: torch.Tensor | None
    mean_red: torch.Tensor | None  # [r3 + r5]
    invstd_red: torch.Tensor | None


def _unpack(packed: torch.Tensor, ks: int) -> torch.Tensor:
    """Implicit-GEMM matrix [ks*ks*C_in, C_out] -> conv weight [C_out, C_in, ks, ks]."""
    return packed.view(ks, ks, -1, packed.shape[1]).permute(3, 2, 0, 1)


def _statistics(
    z: torch.Tensor,
    bn: BNParams,
    eps: torch.Tensor,
    layers: tuple[tuple[int, int, int], ...],
    batch_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) of z's columns; running stats updated per layer (block, col0, col1)."""
    acc = eps.dtype
    if batch_stats:
        zf = z.to(acc)
        mean = zf.mean(0)
        var = zf.var(0, unbiased=False)
        m = z.shape[0]
        with torch.no_grad():
            for block, c0, c1 in layers:
                running_mean = bn.running_mean[block]
                if running_mean is None:
                    continue
                count = bn.num_batches_tracked[block]
                count.add_(1)
                momentum = bn.momentum[block]
                factor = 1.0 / float(count) if momentum is None else momentum
                unbiased = var[c0:c1] * (m / (m - 1))
                running_mean.mul_(1 - factor).add_(
                    mean[c0:c1].to(running_mean.dtype), alpha=factor
                )
                bn.running_var[block].mul_(1 - factor).add_(
                    unbiased.to(running_mean.dtype), alpha=factor
                )
    else:
        mean = torch.cat([bn.running_mean[b].to(acc) for b, _, _ in layers])
        var = torch.cat([bn.running_var[b].to(acc) for b, _, _ in layers])
    return mean, torch.rsqrt(var + eps)


def _activate(
    z: torch.Tensor,
    mean: torch.Tensor | None,
    invstd: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> torch.Tensor:
    if mean is None:
        return torch.relu(z)
    pre = (z.to(mean.dtype) - mean) * (invstd * gamma) + beta
    return torch.relu(pre).to(z.dtype)


def train_forward(
    x: torch.Tensor, w: FoldedInception, bn: BNParams | None, batch_stats: bool
) -> TrainForward:
    n, c_in, h, wd = x.shape
    m = n * h * wd
    c1, r3, c3, c5 = w.c1, w.r3, w.w3.shape[1], w.w5.shape[1]
    r = w.stem_w.shape[1] - c1
    c_out = c1 + c3 + c5 + w.pool_w.shape[1]
    rows = x.permute(0, 2, 3, 1).reshape(m, c_in)
    pooled = F.max_pool2d(x, 3, 1, 1).permute(0, 2, 3, 1).reshape(m, c_in)
    stem = torch.addmm(w.stem_b.to(x.dtype), rows, w.stem_w)
    z_red = stem[:, c1:].contiguous()
    mean_red = invstd_red = mean_out = invstd_out = None
    if bn is not None:
        red_layers = ((1, 0, r3), (2, r3, r))
        mean_red, invstd_red = _statistics(
            z_red, bn, bn.eps_red, red_layers, batch_stats
        )
    a_red = _activate(
        z_red,
        mean_red,
        invstd_red,
        None if bn is None else bn.gamma_red,
        None if bn is None else bn.beta_red,
    )
    a_red = a_red.view(n, h, wd, r).permute(0, 3, 1, 2)
    z_out = torch.empty((m, c_out), dtype=x.dtype, device=x.device)
    z_out[:, :c1] = stem[:, :c1]
    for col, a, packed, bias, ks in (
        (c1, a_red[:, :r3], w.w3, w.b3, w.k3),
        (c1 + c3, a_red[:, r3:], w.w5, w.b5, w.k5),
    ):
        z = F.conv2d(a, _unpack(packed, ks), bias.to(x.dtype), padding=ks // 2)
        z_out[:, col : col + packed.shape[1]] = z.permute(0, 2, 3, 1).reshape(m, -1)
    z_out[:, c1 + c3 + c5 :] = torch.addmm(w.pool_b.to(x.dtype), pooled, w.pool_w)
    if bn is not None:
        out_layers = (
            (0, 0, c1),
            (3, c1, c1 + c3),
            (4, c1 + c3, c1 + c3 + c5),
            (5, c1 + c3 + c5, c_out),
        )
        mean_out, invstd_out = _statistics(
            z_out, bn, bn.eps_out, out_layers, batch_stats
        )
    y = _activate(
        z_out,
        mean_out,
        invstd_out,
        None if bn is None else bn.gamma_out,
        None if bn is None else bn.beta_out,
    )
    out = y.view(n, h, wd, c_out).permute(0, 3, 1, 2)
    return TrainForward(out, z_out, z_red, mean_out, invstd_out, mean_red, invstd_red)

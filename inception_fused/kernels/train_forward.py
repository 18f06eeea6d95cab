"""Train-mode Inception forward: BatchNorm with batch statistics, in five launches.

1. Launch A (pointwise.py, TRAIN): stem GEMM and pool projection store the pre-activation
   z of branch 1, the pool branch and the two reduce layers, with per-tile statistics.
2. Finalize (batch_norm.py) the reduce layers' statistics.
3. Launch B (spatial.py, TRAIN): the 3x3/5x5 convs apply the reduce layers' BN+ReLU while
   loading their input and store their own z with per-tile statistics.
4. Finalize the output channels' statistics; update the running statistics.
5. One BN+ReLU pass over z_out writes the whole module output.

With ``batch_stats=False`` (eval-mode BN while gradients are needed) mean/invstd come from
the running statistics, no partials are written and nothing is updated. Without BN
(``bn=None``) z carries the conv bias and the output is relu(z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..folding import BLOCK_ORDER, BNParams, FoldedInception, accumulator_dtype
from .batch_norm import bn_relu_pass, finalize_stats
from .launch import ceil_div, compiled_for_gpu
from .pointwise import launch_pointwise
from .spatial import launch_spatial
from .tiles import rows_per_tile


@dataclass
class TrainForward:
    """What the train forward returns: the output and what the backward needs."""

    out: torch.Tensor  # [N, C_out, H, W] channels_last, x.dtype: relu(bn(z)) or relu(z)
    z_out: (
        torch.Tensor
    )  # [M, C_out] row-major, x.dtype: pre-BN conv outputs, output order
    z_red: torch.Tensor  # [M, r3 + r5] row-major, x.dtype: pre-BN reduce conv outputs
    mean_out: torch.Tensor | None  # [C_out] accumulator dtype; None without BN
    invstd_out: torch.Tensor | None  # [C_out]
    mean_red: torch.Tensor | None  # [r3 + r5]
    invstd_red: torch.Tensor | None  # [r3 + r5]


def _channel_ranges(w: FoldedInception, c_out: int) -> dict[str, tuple[int, int]]:
    """Each BN layer's (first column, width) in the statistics vectors [C_out | r3 + r5]."""
    c3, c5 = w.w3.shape[1], w.w5.shape[1]
    c_red = w.stem_w.shape[1] - w.c1
    return {
        "branch1": (0, w.c1),
        "red3": (c_out, w.r3),
        "red5": (c_out + w.r3, c_red - w.r3),
        "conv3": (w.c1, c3),
        "conv5": (w.c1 + c3, c5),
        "pool": (w.c1 + c3 + c5, w.pool_w.shape[1]),
    }


def _check_inputs(
    x: torch.Tensor, w: FoldedInception, bn: BNParams | None, batch_stats: bool
) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            "train_forward expects a 4-D floating-point tensor [N, C, H, W]"
        )
    if x.shape[1] != w.stem_w.shape[0]:
        raise ValueError(
            f"expected {w.stem_w.shape[0]} input channels, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )
    if x.dtype != w.stem_w.dtype or x.device != w.stem_w.device:
        raise TypeError(
            f"input ({x.dtype}, {x.device}) and packed weights ({w.stem_w.dtype}, "
            f"{w.stem_w.device}) must share dtype and device"
        )
    if bn is None:
        return
    m = x.shape[0] * x.shape[2] * x.shape[3]
    if batch_stats and m <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{list(x.shape)}"
        )
    if not batch_stats and any(
        rm is None or rv is None
        for rm, rv in zip(bn.running_mean, bn.running_var, strict=True)
    ):
        raise ValueError(
            "batch_stats=False normalises with running statistics, but a BatchNorm "
            "layer has none (track_running_stats=False)"
        )


def _running_stat_vectors(
    bn: BNParams, ranges: dict[str, tuple[int, int]], c_total: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and invstd over [C_out | r3 + r5] from the layers' running statistics."""
    mean = torch.empty(c_total, dtype=dtype, device=bn.gamma_out.device)
    var = torch.empty_like(mean)
    for i, name in enumerate(BLOCK_ORDER):
        lo, size = ranges[name]
        mean[lo : lo + size] = bn.running_mean[i]
        var[lo : lo + size] = bn.running_var[i]
    eps = torch.cat([bn.eps_out, bn.eps_red])
    return mean, torch.rsqrt(var + eps)


def _update_running_stats(
    bn: BNParams,
    ranges: dict[str, tuple[int, int]],
    mean: torch.Tensor,
    var_unbiased: torch.Tensor,
) -> None:
    """nn.BatchNorm2d's running-stat update, in place on the layers' buffers.

    Done with torch ops rather than in the finalize kernel: the six layers' buffers are
    separate tensors, possibly of another dtype than the statistics, and the update is a
    few vectors of at most C_out elements. In the usual case (one float momentum for all
    layers) it is three foreach ops; otherwise layer by layer, where a tensor weight keeps
    momentum=None (1 / num_batches_tracked) free of a host synchronisation.
    """
    layers = [
        (i, name)
        for i, name in enumerate(BLOCK_ORDER)
        if bn.running_mean[i] is not None  # else track_running_stats=False
    ]
    if not layers:
        return
    running_means = [bn.running_mean[i] for i, _ in layers]
    running_vars = [bn.running_var[i] for i, _ in layers]
    batch_means, batch_vars = [], []
    for k, (_, name) in enumerate(layers):
        lo, size = ranges[name]
        batch_means.append(mean[lo : lo + size].to(running_means[k].dtype))
        batch_vars.append(var_unbiased[lo : lo + size].to(running_vars[k].dtype))
    tracked = [bn.num_batches_tracked[i] for i, _ in layers]
    counters = [t for t in tracked if t is not None]
    if counters:
        torch._foreach_add_(counters, 1)
    momenta = {bn.momentum[i] for i, _ in layers}
    if len(momenta) == 1 and None not in momenta:
        momentum = momenta.pop()
        torch._foreach_lerp_(running_means, batch_means, momentum)
        torch._foreach_lerp_(running_vars, batch_vars, momentum)
        return
    for k, (i, _) in enumerate(layers):
        momentum = bn.momentum[i]
        if momentum is not None:
            factor: float | torch.Tensor = momentum
        elif tracked[k] is not None:  # cumulative moving average
            factor = tracked[k].to(running_means[k].dtype).reciprocal()
        else:
            factor = 0.0  # nn.BatchNorm2d's value for this (odd) combination
        running_means[k].lerp_(batch_means[k], factor)
        running_vars[k].lerp_(batch_vars[k], factor)


def train_forward(
    x: torch.Tensor,
    w: FoldedInception,
    bn: BNParams | None,
    batch_stats: bool,
) -> TrainForward:
    """Inception forward with BatchNorm as in training (see the module docstring).

    ``w`` holds raw packed weights (``pack_raw_inception``); ``bn`` the six BatchNorms
    (None for ``batch_norm=False``). With ``batch_stats`` the batch's statistics normalise
    and the layers' running statistics and num_batches_tracked are updated in place, as
    nn.BatchNorm2d does in training; without, the running statistics normalise.
    Statistics are fp32 (fp64 for fp64 input). x may have any strides.
    """
    _check_inputs(x, w, bn, batch_stats)
    n, _, h, wd = x.shape
    m = n * h * wd
    c3, c5, c_pool = w.w3.shape[1], w.w5.shape[1], w.pool_w.shape[1]
    c_red = w.stem_w.shape[1] - w.c1
    c_out = w.c1 + c3 + c5 + c_pool
    acc = accumulator_dtype(x.dtype)
    dev = x.device
    out = torch.empty(
        (n, c_out, h, wd), device=dev, dtype=x.dtype, memory_format=torch.channels_last
    )
    z_out = torch.empty((m, c_out), device=dev, dtype=x.dtype)
    z_red = torch.empty((m, c_red), device=dev, dtype=x.dtype)
    ranges = _channel_ranges(w, c_out)
    stats = bn is not None and batch_stats
    mean = invstd = None
    if bn is not None:
        if batch_stats:
            mean = torch.empty(c_out + c_red, device=dev, dtype=acc)
            invstd = torch.empty_like(mean)
            var_unbiased = torch.empty_like(mean)
        else:
            mean, invstd = _running_stat_vectors(bn, ranges, c_out + c_red, acc)
    result = TrainForward(
        out,
        z_out,
        z_red,
        *(
            (mean[:c_out], invstd[:c_out], mean[c_out:], invstd[c_out:])
            if mean is not None
            else (None,) * 4
        ),
    )
    if m == 0:
        return result

    rows = rows_per_tile(x.dtype, m, compiled_for_gpu(x))
    partials = None
    if stats:
        shape = (ceil_div(m, rows), c_out + c_red)
        partials = (
            torch.empty(shape, device=dev, dtype=acc),
            torch.empty(shape, device=dev, dtype=acc),
        )
    z_out_4d = z_out.view(n, h, wd, c_out).permute(0, 3, 1, 2)  # launchers' NCHW view
    launch_pointwise(
        x,
        w.stem_w,
        w.stem_b,
        w.pool_w,
        w.pool_b,
        z_out_4d,
        z_red,
        w.c1,
        train=True,
        partials=partials,
    )
    if stats:
        stats_out = (mean, invstd, var_unbiased)
        finalize_stats(partials, bn.eps_red, *stats_out, m, rows, c_out, c_red)
    red_bn = None
    if bn is not None:
        red_bn = (result.mean_red, result.invstd_red, bn.gamma_red, bn.beta_red)
    launch_spatial(
        z_red,
        w.w3,
        w.b3,
        w.w5,
        w.b5,
        z_out_4d,
        w.r3,
        w.k3,
        w.k5,
        w.c1,
        train=True,
        red_bn=red_bn,
        partials=partials,
    )
    if stats:
        finalize_stats(partials, bn.eps_out, *stats_out, m, rows, 0, c_out)
        _update_running_stats(bn, ranges, mean, var_unbiased)
    out_bn = None
    if bn is not None:
        out_bn = (result.mean_out, result.invstd_out, bn.gamma_out, bn.beta_out)
    bn_relu_pass(z_out, out, out_bn)
    return result

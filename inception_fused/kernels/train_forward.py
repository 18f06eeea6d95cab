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

from ..folding import OUT_THEN_RED, BNParams, FoldedInception, accumulator_dtype
from .batch_norm import bn_relu_pass, finalize_stats
from .launch import ceil_div, compiled_for_gpu, empty_channels_last, kernel_layout
from .pointwise import launch_pointwise
from .spatial import launch_spatial
from .tiles import rows_per_tile


@dataclass
class TrainForward:
    """What the train forward returns: the output and what the backward needs."""

    out: torch.Tensor | None  # [N, C_out, H, W] channels_last, x.dtype: relu(bn(z))
    z_out: torch.Tensor  # [M, C_out] row-major, x.dtype: pre-BN conv outputs
    z_red: torch.Tensor  # [M, r3 + r5] row-major, x.dtype: pre-BN reduce conv outputs
    mean_out: torch.Tensor | None  # [C_out] accumulator dtype; None without BN
    invstd_out: torch.Tensor | None  # [C_out]
    mean_red: torch.Tensor | None  # [r3 + r5]
    invstd_red: torch.Tensor | None  # [r3 + r5]
    # [mean | invstd], each over [C_out | r3 + r5]: the one buffer the four vectors
    # above view (what the autograd op saves); None without BN.
    stats: torch.Tensor | None = None

    @classmethod
    def viewing(
        cls,
        out: torch.Tensor | None,
        z_out: torch.Tensor,
        z_red: torch.Tensor,
        stats: torch.Tensor | None,
    ) -> TrainForward:
        """The fields from ``stats`` (None without BN)."""
        if stats is None:
            return cls(out, z_out, z_red, None, None, None, None)
        c_out, c_red = z_out.shape[1], z_red.shape[1]
        mean_out, mean_red, invstd_out, invstd_red = stats.split_with_sizes(
            [c_out, c_red, c_out, c_red]
        )
        return cls(out, z_out, z_red, mean_out, invstd_out, mean_red, invstd_red, stats)


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


# Where each BLOCK_ORDER layer sits among the pieces in the kernels' channel order.
_SPLIT_POSITION = tuple(OUT_THEN_RED.index(i) for i in range(len(OUT_THEN_RED)))


def _for_layers(
    parts: tuple[torch.Tensor, ...], layers: list[int], like: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Per-layer pieces in the kernels' channel order (OUT_THEN_RED), picked for the
    BLOCK_ORDER ``layers``, each in its ``like`` buffer's dtype."""
    picked = [parts[_SPLIT_POSITION[i]] for i in layers]
    return [
        t if t.dtype == r.dtype else t.to(r.dtype)
        for t, r in zip(picked, like, strict=True)
    ]


def _running_stat_vectors(
    bn: BNParams, mean: torch.Tensor, invstd: torch.Tensor
) -> None:
    """mean and invstd over [C_out | r3 + r5] from the layers' running statistics."""
    torch.cat([bn.running_mean[i] for i in OUT_THEN_RED], out=mean)
    var = torch.cat([bn.running_var[i] for i in OUT_THEN_RED]).to(mean.dtype)
    torch.rsqrt(var + torch.cat([bn.eps_out, bn.eps_red]), out=invstd)


def _update_running_stats(
    bn: BNParams,
    sizes: list[int],
    mean: torch.Tensor,
    var_unbiased: torch.Tensor,
) -> None:
    """nn.BatchNorm2d's running-stat update, in place on the layers' buffers.

    Done with torch ops rather than in the finalize kernel: the six layers' buffers are
    separate tensors, possibly of another dtype than the statistics, and the update is a
    few vectors of at most C_out elements. In the usual case (one float momentum for all
    layers) it is three foreach ops; otherwise layer by layer, where a tensor weight keeps
    momentum=None (1 / num_batches_tracked) free of a host synchronisation. ``sizes``:
    the layers' widths in the statistics' channel order (OUT_THEN_RED).
    """
    layers = [i for i, rm in enumerate(bn.running_mean) if rm is not None]
    if not layers:  # track_running_stats=False
        return
    running_means = [bn.running_mean[i] for i in layers]
    running_vars = [bn.running_var[i] for i in layers]
    batch_means = _for_layers(mean.split_with_sizes(sizes), layers, running_means)
    batch_vars = _for_layers(var_unbiased.split_with_sizes(sizes), layers, running_vars)
    tracked = [bn.num_batches_tracked[i] for i in layers]
    counters = [t for t in tracked if t is not None]
    if counters:
        torch._foreach_add_(counters, 1)
    momenta = {bn.momentum[i] for i in layers}
    if len(momenta) == 1 and None not in momenta:
        momentum = momenta.pop()
        torch._foreach_lerp_(running_means, batch_means, momentum)
        torch._foreach_lerp_(running_vars, batch_vars, momentum)
        return
    for k, i in enumerate(layers):
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
    x = kernel_layout(x)
    n, _, h, wd = x.shape
    m = n * h * wd
    c3, c5, c_pool = w.w3.shape[1], w.w5.shape[1], w.pool_w.shape[1]
    c_red = w.stem_w.shape[1] - w.c1
    c_out = w.c1 + c3 + c5 + c_pool
    c_all = c_out + c_red
    acc = accumulator_dtype(x.dtype)
    dev = x.device
    out = empty_channels_last((n, c_out, h, wd), x)
    z_out = torch.empty((m, c_out), device=dev, dtype=x.dtype)
    z_red = torch.empty((m, c_red), device=dev, dtype=x.dtype)
    stats = None if bn is None else torch.empty(2 * c_all, device=dev, dtype=acc)
    result = TrainForward.viewing(out, z_out, z_red, stats)
    if stats is not None:
        mean, invstd = stats.split_with_sizes([c_all, c_all])
        if not batch_stats:
            _running_stat_vectors(bn, mean, invstd)
    if m == 0:
        return result

    rows = rows_per_tile(x.dtype, m, compiled_for_gpu(x))
    partials = None
    batch = bn is not None and batch_stats
    if batch:
        shape = (ceil_div(m, rows), c_all)
        partials = (
            torch.empty(shape, device=dev, dtype=acc),
            torch.empty(shape, device=dev, dtype=acc),
        )
        var_unbiased = torch.empty(c_all, device=dev, dtype=acc)
    # The launchers' NCHW view of z_out.
    z_out_4d = z_out.as_strided(
        (n, c_out, h, wd), (h * wd * c_out, 1, wd * c_out, c_out)
    )
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
    if batch:
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
    if batch:
        finalize_stats(partials, bn.eps_out, *stats_out, m, rows, 0, c_out)
        sizes = [w.c1, c3, c5, c_pool, w.r3, c_red - w.r3]
        _update_running_stats(bn, sizes, mean, var_unbiased)
    out_bn = None
    if bn is not None:
        out_bn = (result.mean_out, result.invstd_out, bn.gamma_out, bn.beta_out)
    bn_relu_pass(z_out, out, out_bn)
    return result

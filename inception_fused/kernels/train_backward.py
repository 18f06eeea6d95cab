"""Train-mode backward of one Inception module: ReLU/BN backward, data and weight grads.

All data gradients live in one row-major matrix G [M, C_out + r3 + r5] whose columns are
ordered [c1 | r3 | r5 | c3 | c5 | cp]: the stem's three 1x1 convs then read one contiguous
K range (the three 1x1 data gradients are ONE GEMM), and no gradient is ever concatenated.

1. relu_bn_backward.py: dz of the output layers into G, and their BN (or bias) grads.
2. reduce_grad.py: data grads of the k3/k5 convs into G's reduce columns, with the reduce
   layers' partial sums in the epilogue; then relu_bn_backward turns them into dz_red.
3. input_grad.py: grad_x = G[:, stem] @ stem_w^T plus the max-pool backward fused with the
   pool projection's data gradient.

Weight gradients go through torch (matmul / aten.convolution_backward) on views of G.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..folding import BNParams, FoldedInception
from .input_grad import launch_input_grad
from .launch import aligned_rows, kernel_layout, nchw_strides
from .reduce_grad import launch_reduce_grad
from .relu_bn_backward import relu_bn_backward
from .train_forward import TrainForward


@dataclass
class InceptionGrads:
    """Gradients of one module; per-block lists in BLOCK_ORDER (None where no such param)."""

    grad_x: torch.Tensor | None
    conv_weight: list[torch.Tensor]  # [C_out, C_in, k, k] each
    conv_bias: list[torch.Tensor | None]
    bn_weight: list[torch.Tensor | None]
    bn_bias: list[torch.Tensor | None]


class FlatGrads(NamedTuple):
    """The gradients as computed, one tensor per GEMM or reduction (none aliases another):
    what the autograd op returns; split_grads views them per layer."""

    grad_x: torch.Tensor | None
    stem_w: torch.Tensor  # [c1 + r3 + r5, C_in]
    w3: torch.Tensor  # [c3, r3, k3, k3]
    w5: torch.Tensor
    pool_w: torch.Tensor  # [cp, C_in]
    sum_dy_out: torch.Tensor  # [C_out] column sums of dy' and dy' * xhat
    sum_dyx_out: torch.Tensor
    sum_dy_red: torch.Tensor  # [r3 + r5]
    sum_dyx_red: torch.Tensor


def _conv_weight_grad(dz: torch.Tensor, act: torch.Tensor, ks: int) -> torch.Tensor:
    """Weight grad [C_out, C_in, ks, ks] of a 'same' conv from NCHW-indexed views."""
    # Asked for the weight grad only, aten reads the weight's shape and nothing else: an
    # uninitialised contiguous one (no copy; slow_conv2d rejects non-contiguous ones).
    weight = torch.empty(
        (dz.shape[1], act.shape[1], ks, ks), dtype=dz.dtype, device=dz.device
    )
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        dz, act, weight, None, [1, 1], [ks // 2] * 2, [1, 1], False, [0, 0], 1,
        [False, True, False],
    )  # fmt: skip
    return grad_w


def train_backward_flat(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w: FoldedInception,
    bn: BNParams | None,
    batch_stats: bool,
    saved: TrainForward,
    needs_input_grad: bool = True,
) -> FlatGrads:
    """Gradients of one Inception module's train-mode (or frozen-BN) forward, unsplit.

    grad_out [N, C_out, H, W] and x may have any strides. ``needs_input_grad=False`` skips
    grad_x (the first layer of a network).
    """
    x = kernel_layout(x)  # grad_x comes back in this layout
    n, c_in, h, wd = x.shape
    m = n * h * wd
    c1, r3, k3, k5 = w.c1, w.r3, w.k3, w.k5
    r = w.stem_w.shape[1] - c1
    c3, c5, cp = w.w3.shape[1], w.w5.shape[1], w.pool_w.shape[1]
    c_out = c1 + c3 + c5 + cp
    if grad_out.shape != (n, c_out, h, wd):
        raise ValueError(
            f"grad_out has shape {tuple(grad_out.shape)}, expected {(n, c_out, h, wd)}"
        )
    gc = c_out + r
    col3 = c1 + r
    pool_col = col3 + c3 + c5
    dtype, dev = x.dtype, x.device
    g = aligned_rows(m, gc, dtype, dev)
    row = g.stride(0)
    g_strides = (h * wd * row, 1, wd * row, row)
    if bn is None:
        stats_out: tuple[torch.Tensor, ...] = ()
        stats_red: tuple[torch.Tensor, ...] = ()
    else:
        stats_out = (saved.mean_out, saved.invstd_out, bn.gamma_out, bn.beta_out)
        stats_red = (saved.mean_red, saved.invstd_red, bn.gamma_red, bn.beta_red)
    shape = (m, h, wd)

    # Output layers: dz into G's [c1 | . | c3 | c5 | cp] columns (skipping the reduce ones).
    sums_out = relu_bn_backward(
        grad_out, nchw_strides(grad_out), saved.z_out, stats_out, batch_stats, g,
        (c1, r), shape,
    )  # fmt: skip

    # Reduce layers: data grads of the k3/k5 convs, then their ReLU/BN backward in place,
    # which also recomputes their activations for the k3/k5 weight grads.
    partials = launch_reduce_grad(g, w, saved.z_red, stats_red, shape)
    g_red = g[:, c1:col3]
    a_red = torch.empty((m, r), dtype=dtype, device=dev)
    sums_red = relu_bn_backward(
        g_red, g_strides, saved.z_red, stats_red, batch_stats, g_red, (r, 0), shape,
        partials, a_red,
    )  # fmt: skip

    grad_x = launch_input_grad(g, w, x) if needs_input_grad else None

    # Weight grads: views of G against x, the pooled x and the reduce activations.
    rows = x.permute(0, 2, 3, 1).reshape(m, c_in)
    pooled = torch.max_pool2d(x, 3, 1, 1).permute(0, 2, 3, 1).reshape(m, c_in)
    # NCHW-indexed views of the [M, C] matrices.
    a_red = a_red.as_strided((n, r, h, wd), (h * wd * r, 1, wd * r, r))
    g4 = g.as_strided((n, gc, h, wd), g_strides)
    return FlatGrads(
        grad_x=grad_x,
        stem_w=g[:, :col3].t() @ rows,
        w3=_conv_weight_grad(g4[:, col3 : col3 + c3], a_red[:, :r3], k3),
        w5=_conv_weight_grad(g4[:, col3 + c3 : pool_col], a_red[:, r3:], k5),
        pool_w=g[:, pool_col:].t() @ pooled,
        sum_dy_out=sums_out[0],
        sum_dyx_out=sums_out[1],
        sum_dy_red=sums_red[0],
        sum_dyx_red=sums_red[1],
    )


def split_grads(flat: FlatGrads, c1: int, r3: int, has_bn: bool) -> InceptionGrads:
    """Per-layer views (no copies) of the flat gradients, in BLOCK_ORDER."""
    c3, c5 = flat.w3.shape[0], flat.w5.shape[0]
    c_stem, c_in = flat.stem_w.shape
    r5 = c_stem - c1 - r3
    out_sizes = [c1, c3, c5, flat.pool_w.shape[0]]

    def per_layer(out: torch.Tensor, red: torch.Tensor) -> list[torch.Tensor]:
        b1, conv3, conv5, pool = out.split_with_sizes(out_sizes)
        red3, red5 = red.split_with_sizes([r3, r5])
        return [b1, red3, red5, conv3, conv5, pool]

    b1, red3, red5 = flat.stem_w.view(c_stem, c_in, 1, 1).split_with_sizes([c1, r3, r5])
    pool = flat.pool_w.view(-1, c_in, 1, 1)
    conv_weight = [b1, red3, red5, flat.w3, flat.w5, pool]
    # The column sums are dbeta (or, without BN, the conv bias grad) and dgamma.
    sum_dy = per_layer(flat.sum_dy_out, flat.sum_dy_red)
    if not has_bn:
        return InceptionGrads(flat.grad_x, conv_weight, sum_dy, [None] * 6, [None] * 6)
    sum_dyx = per_layer(flat.sum_dyx_out, flat.sum_dyx_red)
    return InceptionGrads(flat.grad_x, conv_weight, [None] * 6, sum_dyx, sum_dy)


def train_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w: FoldedInception,
    bn: BNParams | None,
    batch_stats: bool,
    saved: TrainForward,
    needs_input_grad: bool = True,
) -> InceptionGrads:
    """Gradients of one Inception module's train-mode (or frozen-BN) forward, per layer."""
    flat = train_backward_flat(grad_out, x, w, bn, batch_stats, saved, needs_input_grad)
    return split_grads(flat, w.c1, w.r3, bn is not None)

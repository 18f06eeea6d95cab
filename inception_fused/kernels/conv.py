"""One conv + folded BN + ReLU layer into a channels_last output: GoogLeNet's stem.

The same implicit-GEMM conv tile as the Inception kernels, with the three things the stem
needs on top: a stride (conv1 is 7x7/2), the 3x3/s2 ceil-mode max pool taken while the
input is loaded (maxpool1, read by conv2's 1x1: the pooled map is never written), and
torchvision's transform_input applied to the image as it is loaded (an affine per input
channel; the conv's zero padding stays zero, as in the reference, which transforms first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv_tile import conv_tile, store_tile, tile_pixels
from .launch import (
    TileConfig,
    acc_dtype,
    ceil_div,
    empty_channels_last,
    input_precision,
    kernel_layout,
    nchw_strides,
)
from .tiles import TileKey, pick


@triton.jit
def conv_relu_kernel(
    x_ptr,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    w_ptr,  # [KS*KS*C_in, C_out] packed, BN folded
    b_ptr,
    out_ptr,  # [M, C_out] row-major: channels_last
    transform_ptr,  # [4, C_in]: 0, 1, scale, shift per input channel (TRANSFORM)
    M,
    H_OUT,
    W_OUT,
    H,
    W,
    C_in,
    C_OUT,
    KS,
    STRIDE: tl.constexpr,
    POOL: tl.constexpr,  # a 3x3/s2 ceil-mode max pool of x before a 1x1 conv
    TRANSFORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows, n, oh, ow, row_ok = tile_pixels(pid_m, M, H_OUT, W_OUT, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_OUT
    acc = conv_tile(
        x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, n, oh, ow, row_ok, H, W, C_in,
        w_ptr, C_in, C_OUT, 1, cols, col_ok, KS, transform_ptr, transform_ptr + C_in,
        transform_ptr + 2 * C_in, transform_ptr + 3 * C_in, POOL, False, TRANSFORM, BLOCK_M,
        BLOCK_N, BLOCK_K, USE_DOT, INPUT_PRECISION, ACC_DTYPE, STRIDE, 2,
    )  # fmt: skip
    store_tile(
        acc, b_ptr, cols, col_ok, out_ptr, C_OUT, rows, row_ok, pid_m, M, b_ptr, b_ptr,
        0, False, False, BLOCK_M,
    )  # fmt: skip


def pooled_size(size: int, kernel: int, stride: int = 2) -> int:
    """Output side of a ceil-mode max pool without padding (as nn.MaxPool2d: the last
    window must start inside the input)."""
    out = -(-(size - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= size else out


def launch_conv_relu(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    ks: int,
    stride: int = 1,
    pool: bool = False,
    transform: torch.Tensor | None = None,
) -> torch.Tensor:
    """relu(conv(x) + b) as a channels_last [N, C_out, H', W'] tensor.

    ``w``: packed [ks*ks*C_in, C_out] (folding.pack_weight), ``b`` in the accumulator
    dtype; padding ks // 2. ``pool``: x goes through a 3x3/s2 ceil-mode max pool first
    (``ks`` must be 1). ``transform``: [4, C_in] rows 0, 1, scale, shift: x * scale +
    shift per input channel while loading. x may have any strides (on a GPU an NCHW
    image is copied to channels_last first: read through its strides, conv1's 128-row
    tiles spill 24-96 B under Triton 3.6).
    """
    x = kernel_layout(x)
    n, c_in, h, wd = x.shape
    c_out = w.shape[1]
    if pool:
        h_out, w_out = pooled_size(h, 3), pooled_size(wd, 3)
    else:
        h_out, w_out = (h - 1) // stride + 1, (wd - 1) // stride + 1
    out = empty_channels_last((n, c_out, h_out, w_out), x)
    m = n * h_out * w_out
    if m == 0:
        return out

    def run(cfg: TileConfig) -> None:
        grid = (ceil_div(m, cfg.block_m), ceil_div(c_out, cfg.block_n))
        conv_relu_kernel[grid](
            x, *nchw_strides(x), w, b, out, b if transform is None else transform, m,
            h_out, w_out, h, wd, c_in, c_out, ks, STRIDE=stride, POOL=pool,
            TRANSFORM=transform is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot,
            INPUT_PRECISION=input_precision(x.dtype), ACC_DTYPE=acc_dtype(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    # A pooled 1x1 conv has the block's pool tiles' shape of work (nine loads per K
    # step): their tiles; the others are conv tiles.
    kernel = "pool" if pool else "conv"
    run(pick(TileKey.of(kernel, "eval", x.dtype, m, c_out, c_in, ks), x, run))
    return out

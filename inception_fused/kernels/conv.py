"""One conv + folded BN + ReLU layer into a channels_last output (or a channel slice of
one): GoogLeNet's stem, and every conv of Inception-v3.

The same implicit-GEMM conv tile as the Inception kernels, with what single layers need on
top: a stride (conv1 is 7x7/2), rectangular kernels and any zero padding (Inception-v3's
1x7, 7x1, 1x3, 3x1 and its unpadded 3x3/2 reductions), a 3x3 pool taken while the input
is loaded before a 1x1 conv (GoogLeNet's 3x3/s2 ceil-mode maxpool1 read by conv2, and
Inception-v3's pool branches: 3x3/s1/p1 average, with or without the padding counted, or
max; the pooled map is never written), torchvision's transform_input applied to the image
as it is loaded (an affine per input channel; the conv's zero padding stays zero, as in the
reference, which transforms first), and a destination that may be a channel slice of a
wider channels_last tensor (a block's concatenated output: torch.cat never runs).
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
    channels_last_destination,
    input_precision,
    kernel_layout,
    nchw_strides,
    pair,
)
from .tiles import TileKey, pick


@triton.jit
def conv_relu_kernel(
    x_ptr,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    w_ptr,  # [KH*KW*C_in, C_out] packed, BN folded
    b_ptr,
    out_ptr,  # [M, C_out] with row stride OUT_STRIDE: a channels_last (slice)
    transform_ptr,  # [4, C_in]: 0, 1, scale, shift per input channel (TRANSFORM)
    M,
    H_OUT,
    W_OUT,
    H,
    W,
    C_in,
    C_OUT,
    OUT_STRIDE,
    KH,
    KW,
    PH,
    PW,
    STRIDE: tl.constexpr,
    POOL: tl.constexpr,  # "" or the 3x3 pool of x before a 1x1 conv (conv_tile's)
    POOL_STRIDE: tl.constexpr,  # 2: GoogLeNet's ceil-mode max, no pad; 1: s1/p1
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
        w_ptr, C_in, C_OUT, 1, cols, col_ok, KH, KW, PH, PW, transform_ptr,
        transform_ptr + C_in, transform_ptr + 2 * C_in, transform_ptr + 3 * C_in, POOL,
        False, TRANSFORM, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, INPUT_PRECISION, ACC_DTYPE,
        STRIDE, POOL_STRIDE,
    )  # fmt: skip
    store_tile(
        acc, b_ptr, cols, col_ok, out_ptr, OUT_STRIDE, rows, row_ok, pid_m, M, b_ptr,
        b_ptr, 0, False, False, BLOCK_M,
    )  # fmt: skip


def pooled_size(size: int, kernel: int, stride: int = 2, ceil_mode: bool = True) -> int:
    """Output side of a max pool without padding, as nn.MaxPool2d: in ceil mode the last
    window must start inside the input."""
    if not ceil_mode:
        return (size - kernel) // stride + 1
    out = -(-(size - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= size else out


# The pools a 1x1 conv can take while loading its input: (conv_tile's POOL, window
# stride). All 3x3; the stride-1 ones are padded by 1, as F.max_pool2d(x, 3, 1, 1) and
# F.avg_pool2d(x, 3, 1, 1, count_include_pad=True / False).
POOLS = {
    "max_s2": ("max", 2),  # GoogLeNet's maxpool1: 3x3/s2, ceil mode, no padding
    "max": ("max", 1),
    "avg": ("avg", 1),
    "avg_exclude": ("avg_exclude", 1),
}


def launch_conv_relu(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    ks: int | tuple[int, int],
    stride: int = 1,
    pool: str | None = None,
    transform: torch.Tensor | None = None,
    *,
    padding: int | tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    out_channel: int = 0,
) -> torch.Tensor:
    """relu(conv(x) + b) as a channels_last [N, C_out, H', W'] tensor, or stored into
    channels [out_channel, out_channel + C_out) of ``out`` (returned).

    ``ks``: the kernel size, an int or (kh, kw); ``w``: packed [kh*kw*C_in, C_out]
    (folding.pack_weight), ``b`` in the accumulator dtype. ``padding``: an int or (ph, pw)
    of zeros; None: (kh // 2, kw // 2) (odd kernels: 'same'). H' = (H + 2 ph - kh) //
    stride + 1. ``pool`` (a 1x1 conv, stride 1, no padding): x goes through a 3x3 pool
    first, one of POOLS: "max_s2" (3x3/s2 ceil mode), "max", "avg" (count_include_pad),
    "avg_exclude" (3x3/s1/p1). ``transform``: [4, C_in] rows 0, 1, scale, shift: x * scale
    + shift per input channel while loading. x may have any strides (on a GPU an NCHW
    image is copied to channels_last first: read through its strides, conv1's 128-row
    tiles spill 24-96 B under Triton 3.6). ``out``: a channels_last [N, C_total, H', W']
    tensor of x's dtype and device, its other channels left as they are.
    """
    x = kernel_layout(x)
    n, c_in, h, wd = x.shape
    c_out = w.shape[1]
    kh, kw = pair(ks)
    ph, pw = (kh // 2, kw // 2) if padding is None else pair(padding)
    if w.shape[0] != kh * kw * c_in:
        raise ValueError(
            f"packed weight has {w.shape[0]} rows; a {kh}x{kw} conv of {c_in} input "
            f"channels needs {kh * kw * c_in}"
        )
    if pool is not None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {sorted(POOLS)}, got {pool!r}")
        if (kh, kw, stride, ph, pw) != (1, 1, 1, 0, 0):
            raise ValueError("a pool is taken before a 1x1 conv, stride 1, no padding")
        kind, pool_stride = POOLS[pool]
        if pool_stride == 2:
            h_out, w_out = pooled_size(h, 3), pooled_size(wd, 3)
        else:
            h_out, w_out = h, wd
    else:
        kind, pool_stride = "", 1
        h_out = (h + 2 * ph - kh) // stride + 1
        w_out = (wd + 2 * pw - kw) // stride + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"a {kh}x{kw}/{stride} conv with padding ({ph}, {pw}) of a {h}x{wd} input "
            "has no output pixels"
        )
    out, dest, row_stride = channels_last_destination(
        out, out_channel, (n, c_out, h_out, w_out), x
    )
    m = n * h_out * w_out
    if m == 0:
        return out

    def run(cfg: TileConfig) -> None:
        grid = (ceil_div(m, cfg.block_m), ceil_div(c_out, cfg.block_n))
        conv_relu_kernel[grid](
            x, *nchw_strides(x), w, b, dest, b if transform is None else transform, m,
            h_out, w_out, h, wd, c_in, c_out, row_stride, KH=kh, KW=kw, PH=ph, PW=pw,
            STRIDE=stride, POOL=kind, POOL_STRIDE=pool_stride, TRANSFORM=transform is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            USE_DOT=cfg.use_dot, INPUT_PRECISION=input_precision(x.dtype),
            ACC_DTYPE=acc_dtype(x.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip

    # A pooled 1x1 conv has the block's pool tiles' shape of work (nine loads per K
    # step): their tiles; the others are conv tiles, keyed by their kernel's shape.
    if pool is not None:
        key = TileKey.of("pool", "eval", x.dtype, m, c_out, c_in)
    else:
        key = TileKey.of("conv", "eval", x.dtype, m, c_out, c_in, kh, kw)
    run(pick(key, x, run))
    return out

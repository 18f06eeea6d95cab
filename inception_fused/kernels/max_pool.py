"""Stride-2 max pools without padding, written once into a channels_last map or a channel
slice of one: GoogLeNet's between stages (3x3 or 2x2, ceil mode), Inception-v3's 3x3/2
(floor mode: F.max_pool2d(x, 3, 2)), whose reduction blocks pass the pooled input through
as their last channels.

Taking them while the next block loads its input would multiply the reads: launch A reads
its input once per column tile (and the pool tiles take their own 3x3 window on top), so
each pooled value would be recomputed from 4-9 inputs several times; the pooled map is a
quarter of the input, and writing it once costs less (README, "bytes model").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv import pooled_size
from .conv_tile import tile_pixels
from .launch import (
    ceil_div,
    channels_last_destination,
    kernel_layout,
    nchw_strides,
    pow2_clamp,
)


@triton.jit
def max_pool_kernel(
    x_ptr,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    out_ptr,  # [M, C] with row stride OUT_STRIDE: a channels_last (slice)
    M,
    H_OUT,
    W_OUT,
    H,
    W,
    C,
    OUT_STRIDE,
    KERNEL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows, n, oh, ow, row_ok = tile_pixels(tl.program_id(0), M, H_OUT, W_OUT, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    chan = cols.to(tl.int64)[None, :] * stride_xc
    n64 = n.to(tl.int64) * stride_xn
    # A window's first tap is inside the input (ceil mode; in floor mode all of it), so
    # -inf never survives.
    best = tl.full((BLOCK_M, BLOCK_C), float("-inf"), x_ptr.dtype.element_ty)
    for dh in tl.static_range(KERNEL):
        for dw in tl.static_range(KERNEL):
            ih = oh * 2 + dh
            iw = ow * 2 + dw
            ok = row_ok & (ih < H) & (iw < W)
            pix = n64 + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
            v = tl.load(
                x_ptr + pix[:, None] + chan,
                mask=ok[:, None] & col_ok[None, :],
                other=float("-inf"),
            )
            best = tl.maximum(best, v, propagate_nan=tl.PropagateNan.ALL)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * OUT_STRIDE + cols[None, :],
        best.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def launch_max_pool(
    x: torch.Tensor,
    kernel: int,
    ceil_mode: bool = True,
    *,
    out: torch.Tensor | None = None,
    out_channel: int = 0,
) -> torch.Tensor:
    """max_pool2d(x, kernel, stride 2, ceil_mode=ceil_mode) as a channels_last tensor, or
    stored into channels [out_channel, out_channel + C) of ``out`` (a channels_last
    [N, C_total, H', W'] tensor of x's dtype and device; returned). On a GPU an NCHW x
    is copied to channels_last first (read through its strides, the 16-bit tiles spill
    56 B under Triton 3.6)."""
    x = kernel_layout(x)
    n, c, h, w = x.shape
    h_out = pooled_size(h, kernel, ceil_mode=ceil_mode)
    w_out = pooled_size(w, kernel, ceil_mode=ceil_mode)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"a {kernel}x{kernel}/2 max pool of a {h}x{w} map is empty")
    out, dest, row_stride = channels_last_destination(
        out, out_channel, (n, c, h_out, w_out), x
    )
    m = n * h_out * w_out
    if m == 0:
        return out
    # Elementwise work. On the GPU, 256-byte rows (16-byte vectors per thread) and 16 of
    # them: the nine loads of 32x128 16-bit tiles, all in flight, spilled 24 B (fp64:
    # 376 B). The interpreter takes its biggest tiles.
    if x.is_cuda or x.is_meta:
        block_m, block_c = 16, pow2_clamp(c, 16, 256 // x.element_size())
    else:
        block_m, block_c = pow2_clamp(m, 16, 256), pow2_clamp(c, 16, 128)
    grid = (ceil_div(m, block_m), ceil_div(c, block_c))
    max_pool_kernel[grid](
        x, *nchw_strides(x), dest, m, h_out, w_out, h, w, c, row_stride,
        KERNEL=kernel, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out

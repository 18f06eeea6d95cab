"""grad_x of one Inception module: the stem's three 1x1 data gradients as one GEMM, plus the
max-pool backward fused with the pool projection's data gradient.

Each input pixel gathers dz_pool @ pool_w^T from the (up to 9) windows whose argmax it
is, so nothing is scattered (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..folding import FoldedInception
from .conv_tile import nhwc_strides, stored_conv_tile, tile_pixels
from .launch import (
    TileConfig,
    acc_dtype,
    ceil_div,
    input_precision,
    nchw_strides,
)
from .relu_bn_backward import pixel_offsets
from .tiles import TileKey, pick


@triton.jit
def window_argmax(
    x_ptr,
    s_n,
    s_c,
    s_h,
    s_w,
    n,
    qh,
    qw,
    q_ok,
    cols,
    col_ok,
    H,
    W,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Tap (0..8, raster order) of each 3x3/s1/p1 window's maximum, as PyTorch picks it:
    the first maximum in raster order, or the last NaN, so ties - common after a ReLU - and
    NaNs go to the same input as in max_pool2d's own backward."""
    chan = cols.to(tl.int64)[None, :] * s_c
    n64 = n.to(tl.int64) * s_n
    best_v = tl.full((BLOCK_M, BLOCK_N), float("-inf"), x_ptr.dtype.element_ty)
    best_t = tl.full((BLOCK_M, BLOCK_N), -1, tl.int32)
    for t in tl.static_range(9):
        ih = qh + (t // 3 - 1)
        iw = qw + (t % 3 - 1)
        ok = q_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = n64 + ih.to(tl.int64) * s_h + iw.to(tl.int64) * s_w
        v = tl.load(
            x_ptr + pix[:, None] + chan,
            mask=ok[:, None] & col_ok[None, :],
            other=float("-inf"),
        )
        is_nan = v != v  # noqa: PLR0124
        take = ok[:, None] & ((v > best_v) | is_nan | (best_t < 0))
        best_v = tl.where(take, v, best_v)
        best_t = tl.where(take, t, best_t)
    return best_t


@triton.jit
def input_grad_kernel(
    g_ptr,  # G [M, *] with row stride GC: stem columns [0, K_STEM)
    dz_pool_ptr,  # G's first pool-projection column
    GC,
    K_STEM,
    C_POOL,
    stem_w_ptr,  # [C_in, K_STEM]: the forward's packed weights, read transposed
    STEM_W_STRIDE,
    pool_w_ptr,  # [C_in, C_POOL]
    x_ptr,
    sx_n,
    sx_c,
    sx_h,
    sx_w,
    gx_ptr,
    sg_n,
    sg_c,
    sg_h,
    sg_w,  # grad_x, NCHW-indexed, any strides
    M,
    H,
    W,
    C_in,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    _, n, oh, ow, row_ok = tile_pixels(tl.program_id(0), M, H, W, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_in
    s_n, s_c, s_h, s_w = nhwc_strides(H, W, GC)
    acc = stored_conv_tile(
        g_ptr, s_n, s_c, s_h, s_w, n, oh, ow, row_ok, H, W, K_STEM, stem_w_ptr, 0, 1,
        STEM_W_STRIDE, cols, col_ok, 1, "", BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT,
        INPUT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    # Pixel p sits at tap t of the window centred on q = p - (t // 3 - 1, t % 3 - 1); it
    # receives q's pooled gradient in the channels where q's window picked tap t.
    for t in range(9):  # not unrolled: one loop body keeps compile time down
        qh = oh - (t // 3 - 1)
        qw = ow - (t % 3 - 1)
        q_ok = row_ok & (qh >= 0) & (qh < H) & (qw >= 0) & (qw < W)
        best = window_argmax(
            x_ptr, sx_n, sx_c, sx_h, sx_w, n, qh, qw, q_ok, cols, col_ok, H, W,
            BLOCK_M, BLOCK_N,
        )  # fmt: skip
        dpooled = stored_conv_tile(
            dz_pool_ptr, s_n, s_c, s_h, s_w, n, qh, qw, q_ok, H, W, C_POOL, pool_w_ptr, 0,
            1, C_POOL, cols, col_ok, 1, "", BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT,
            INPUT_PRECISION, ACC_DTYPE,
        )  # fmt: skip
        acc += tl.where(best == t, dpooled, 0.0)
    tl.store(
        gx_ptr + pixel_offsets(n, oh, ow, cols, sg_n, sg_c, sg_h, sg_w),
        acc.to(gx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def launch_input_grad(
    g: torch.Tensor, w: FoldedInception, x: torch.Tensor
) -> torch.Tensor:
    """grad_x (x's shape and strides) from G [M, C_out + r3 + r5] (any row stride), whose
    columns are [c1 | r3 | r5 | c3 | c5 | cp] (the stem's dz first, the pool
    projection's last)."""
    n, c_in, h, wd = x.shape
    m = n * h * wd
    col3 = w.stem_w.shape[1]
    cp = w.pool_w.shape[1]
    pool_col = g.shape[1] - cp
    grad_x = torch.empty_like(x)

    def run(cfg: TileConfig) -> None:
        grid = (ceil_div(m, cfg.block_m), ceil_div(c_in, cfg.block_n))
        input_grad_kernel[grid](
            g, g[:, pool_col:], g.stride(0), col3, cp, w.stem_w, w.stem_w.stride(0),
            w.pool_w, x, *nchw_strides(x), grad_x, *nchw_strides(grad_x), m, h, wd,
            c_in, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            USE_DOT=cfg.use_dot, INPUT_PRECISION=input_precision(x.dtype),
            ACC_DTYPE=acc_dtype(x.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip

    key = TileKey.of("input_grad", "backward", x.dtype, m, c_in, max(col3, cp))
    run(pick(key, x, run))
    return grad_x

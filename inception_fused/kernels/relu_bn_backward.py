"""Backward of a group of ReLU(BatchNorm) layers over an [M, C] matrix of pre-BN z.

1. ``relu_bn_partials_kernel``: per-tile column sums of dy' = dy * relu'(.) and dy' * xhat
   (the ReLU mask and xhat recomputed from the saved pre-BN z).
2. ``partials_finalize_kernel``: those tiles summed in a fixed order (no float atomics, so
   the result is bitwise repeatable); the sums are also the BN (or conv bias) grads.
3. ``relu_bn_apply_kernel``: dz from dy, z and the sums; for the reduce layers also
   their activations relu(BN(z)), which the 3x3/5x5 weight gradients multiply by.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..folding import accumulator_dtype
from .conv_tile import div_rn, relu, tile_pixels
from .launch import ceil_div, compiled_for_gpu, pow2_clamp


@triton.jit
def pixel_offsets(n, oh, ow, cols, s_n, s_c, s_h, s_w):
    """64-bit element offsets of a [pixels, channels] tile of an NCHW-indexed tensor."""
    pix = n.to(tl.int64) * s_n + oh.to(tl.int64) * s_h + ow.to(tl.int64) * s_w
    return pix[:, None] + cols.to(tl.int64)[None, :] * s_c


@triton.jit
def masked_grad(
    dy, z, cols, col_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_BN: tl.constexpr
):
    """(dy', xhat, pre): dy through the ReLU, whose input ``pre`` is recomputed from the
    saved z exactly as the forward computes it; xhat = (z - mean) * invstd (z itself
    without BN)."""
    if HAS_BN:
        mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
        gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0)
        beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0)
        centred = z.to(mean.dtype) - mean[None, :]
        pre = centred * (invstd * gamma)[None, :] + beta[None, :]
        xhat = centred * invstd[None, :]
    else:  # sums in the accumulator dtype (the stats pointers are accumulator-typed)
        pre = z
        xhat = z.to(mean_ptr.dtype.element_ty)
    # ReLU's backward passes dy where its input is not <= 0: a NaN input passes it, as in
    # torch's threshold_backward.
    return tl.where(pre <= 0, 0.0, dy.to(xhat.dtype)), xhat, pre


@triton.jit
def load_masked_grad(
    dy_ptr, s_n, s_c, s_h, s_w, z_ptr, C, rows, n, oh, ow, row_ok, cols, col_ok,
    mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_BN: tl.constexpr,
):  # fmt: skip
    """masked_grad of a tile: dy read through its strides, z from the [M, C] matrix."""
    ok = row_ok[:, None] & col_ok[None, :]
    dy = tl.load(
        dy_ptr + pixel_offsets(n, oh, ow, cols, s_n, s_c, s_h, s_w), mask=ok, other=0.0
    )
    z = tl.load(
        z_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=ok, other=0.0
    )
    return masked_grad(
        dy, z, cols, col_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_BN
    )


@triton.jit
def store_partials(dyp, xhat, pid_m, cols, col_ok, part_dy_ptr, part_dyx_ptr, C):
    """Row pid_m of the [tiles, C] partials: column sums of dy' and dy' * xhat."""
    offs = pid_m.to(tl.int64) * C + cols
    tl.store(part_dy_ptr + offs, tl.sum(dyp, axis=0), mask=col_ok)
    tl.store(part_dyx_ptr + offs, tl.sum(dyp * xhat, axis=0), mask=col_ok)


@triton.jit
def relu_bn_partials_kernel(
    dy_ptr,
    s_n,
    s_c,
    s_h,
    s_w,  # dy: grad_out, NCHW-indexed, any strides
    z_ptr,  # [M, C] row-major
    mean_ptr,
    invstd_ptr,
    gamma_ptr,
    beta_ptr,
    part_dy_ptr,
    part_dyx_ptr,
    M,
    H,
    W,
    C,
    HAS_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows, n, oh, ow, row_ok = tile_pixels(pid_m, M, H, W, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    dyp, xhat, _ = load_masked_grad(
        dy_ptr, s_n, s_c, s_h, s_w, z_ptr, C, rows, n, oh, ow, row_ok, cols, col_ok,
        mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_BN,
    )  # fmt: skip
    store_partials(dyp, xhat, pid_m, cols, col_ok, part_dy_ptr, part_dyx_ptr, C)


@triton.jit
def partials_finalize_kernel(
    part_dy_ptr,
    part_dyx_ptr,
    sum_dy_ptr,
    sum_dyx_ptr,
    TILES,
    C,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    acc_dy = tl.zeros((BLOCK_N,), part_dy_ptr.dtype.element_ty)
    acc_dyx = tl.zeros((BLOCK_N,), part_dy_ptr.dtype.element_ty)
    for t0 in range(0, TILES, BLOCK_T):  # fixed order: bitwise repeatable
        t = t0 + tl.arange(0, BLOCK_T)
        offs = t.to(tl.int64)[:, None] * C + cols[None, :]
        ok = (t < TILES)[:, None] & col_ok[None, :]
        acc_dy += tl.sum(tl.load(part_dy_ptr + offs, mask=ok, other=0.0), axis=0)
        acc_dyx += tl.sum(tl.load(part_dyx_ptr + offs, mask=ok, other=0.0), axis=0)
    tl.store(sum_dy_ptr + cols, acc_dy, mask=col_ok)
    tl.store(sum_dyx_ptr + cols, acc_dyx, mask=col_ok)


@triton.jit
def relu_bn_apply_kernel(
    dy_ptr,
    s_n,
    s_c,
    s_h,
    s_w,  # dy, NCHW-indexed, any strides (may be dz_ptr itself: in place)
    z_ptr,  # [M, C] row-major
    mean_ptr,
    invstd_ptr,
    gamma_ptr,
    beta_ptr,
    sum_dy_ptr,
    sum_dyx_ptr,
    dz_ptr,
    dz_row_stride,
    act_ptr,  # [M, C] row-major: relu(pre), written when STORE_ACT
    SKIP_FROM,
    SKIP,  # column c of dz lands at c + SKIP when c >= SKIP_FROM
    M,
    H,
    W,
    C,
    HAS_BN: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    STORE_ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, n, oh, ow, row_ok = tile_pixels(tl.program_id(0), M, H, W, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    dz, xhat, pre = load_masked_grad(
        dy_ptr, s_n, s_c, s_h, s_w, z_ptr, C, rows, n, oh, ow, row_ok, cols, col_ok,
        mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_BN,
    )  # fmt: skip
    if STORE_ACT:  # what the forward's 3x3/5x5 convs read, rounded as they read it
        act = relu(pre).to(act_ptr.dtype.element_ty)
        tl.store(act_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], act, mask=ok)
    if HAS_BN:
        scale = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0) * tl.load(
            invstd_ptr + cols, mask=col_ok, other=0.0
        )
        if BATCH_STATS:  # the batch mean and variance depend on every z of the column
            mean_dy = div_rn(tl.load(sum_dy_ptr + cols, mask=col_ok, other=0.0), M)
            mean_dyx = div_rn(tl.load(sum_dyx_ptr + cols, mask=col_ok, other=0.0), M)
            dz = dz - mean_dy[None, :] - xhat * mean_dyx[None, :]
        dz = dz * scale[None, :]
    dst = cols + tl.where(cols >= SKIP_FROM, SKIP, 0)
    tl.store(
        dz_ptr + rows.to(tl.int64)[:, None] * dz_row_stride + dst[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=ok,
    )


def _elementwise_blocks(
    m: int, c: int, dtype: torch.dtype, on_gpu: bool
) -> tuple[int, int]:
    if on_gpu:  # fp64 64x64 tiles spill at four warps (sm90_report.py)
        return (32 if dtype == torch.float64 else 64), 64
    # The interpreter pays per program: the biggest tiles the problem fills.
    return (
        pow2_clamp(m, 16, 256),
        pow2_clamp(c, 16, 128),
    )


def relu_bn_backward(
    dy: torch.Tensor,
    dy_strides: tuple[int, int, int, int],
    z: torch.Tensor,
    stats: tuple[torch.Tensor, ...],
    batch_stats: bool,
    dz: torch.Tensor,
    skip: tuple[int, int],
    shape: tuple[int, int, int],
    partials: tuple[torch.Tensor, torch.Tensor] | None = None,
    act: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dz of one [M, C] group of ReLU(BN) layers into ``dz``; returns (sum dy', sum dy'xhat).

    ``partials``: per-tile sums already taken (by reduce_grad_kernel's epilogue); else
    relu_bn_partials_kernel takes them from dy. ``act``: an [M, C] matrix to receive the
    layers' activations.
    """
    m, h, w = shape
    c = z.shape[1]
    on_gpu = compiled_for_gpu(dy)
    block_m, block_n = _elementwise_blocks(m, c, z.dtype, on_gpu)
    has_bn = len(stats) == 4
    acc = accumulator_dtype(z.dtype)
    sums = (
        torch.empty(c, dtype=acc, device=z.device),
        torch.empty(c, dtype=acc, device=z.device),
    )
    # Where a pointer is never followed, any tensor of its type (as in the forward's
    # launchers): no allocation for it.
    unread = sums[0]
    vectors = stats if has_bn else (unread,) * 4
    grid = (ceil_div(m, block_m), ceil_div(c, block_n))
    if partials is None:
        partials = (
            torch.empty((grid[0], c), dtype=acc, device=z.device),
            torch.empty((grid[0], c), dtype=acc, device=z.device),
        )
        relu_bn_partials_kernel[grid](
            dy, *dy_strides, z, *vectors, *partials, m, h, w, c, HAS_BN=has_bn,
            BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
    tiles = partials[0].shape[0]
    block_t = 64 if on_gpu else pow2_clamp(tiles, 16, 1024)
    partials_finalize_kernel[(ceil_div(c, block_n),)](
        *partials, *sums, tiles, c, BLOCK_T=block_t, BLOCK_N=block_n
    )
    relu_bn_apply_kernel[grid](
        dy, *dy_strides, z, *vectors, *sums, dz, dz.stride(0),
        unread if act is None else act, *skip, m, h, w, c, HAS_BN=has_bn,
        BATCH_STATS=batch_stats, STORE_ACT=act is not None, BLOCK_M=block_m,
        BLOCK_N=block_n,
    )  # fmt: skip
    return sums

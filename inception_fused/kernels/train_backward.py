"""Train-mode backward of one Inception module: ReLU/BN backward, data and weight grads.

All data gradients live in one row-major matrix G [M, C_out + r3 + r5] whose columns are
ordered [c1 | r3 | r5 | c3 | c5 | cp]: the stem's three 1x1 convs then read one contiguous
K range (the three 1x1 data gradients are ONE GEMM), and no gradient is ever concatenated.

1. ``relu_bn_partials_kernel``: per-tile column sums of dy' = dy * relu'(.) and dy' * xhat
   over grad_out (the ReLU mask and xhat recomputed from the saved pre-BN z).
2. ``partials_finalize_kernel``: those tiles summed in a fixed order (no float atomics, so
   the result is bitwise repeatable); the sums are also the BN (or conv bias) grads.
3. ``relu_bn_apply_kernel``: dz from dy, z and the sums, into G.
4. ``reduce_grad_kernel``: data grads of the k3/k5 convs (a 'same' conv over dz with the
   flipped, transposed kernel) into G's reduce columns, with the reduce layers' partial sums
   taken in the epilogue; then 2. and 3. again turn them into dz_red in place.
5. ``input_grad_kernel``: grad_x = G[:, stem] @ stem_w^T, plus the max-pool backward fused
   with the pool projection's data gradient: each input pixel gathers dz_pool @ pool_w^T
   from the (up to 9) windows whose argmax it is, so nothing is scattered.

Weight gradients go through torch (matmul / aten.convolution_backward) on views of G.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..folding import BNParams, FoldedInception, accumulator_dtype, pack_weight
from .conv_tile import conv_tile, div_rn, nhwc_strides, tile_pixels
from .launch import acc_dtype, compiled_for_gpu, input_precision, tile_config
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


@triton.jit
def pixel_offsets(n, oh, ow, cols, s_n, s_c, s_h, s_w):
    """64-bit element offsets of a [pixels, channels] tile of an NCHW-indexed tensor."""
    pix = n.to(tl.int64) * s_n + oh.to(tl.int64) * s_h + ow.to(tl.int64) * s_w
    return pix[:, None] + cols.to(tl.int64)[None, :] * s_c


@triton.jit
def masked_grad(
    dy, z, cols, col_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_BN: tl.constexpr
):
    """(dy', xhat): dy through the ReLU, whose input is recomputed from the saved z exactly
    as the forward computes it; xhat = (z - mean) * invstd (z itself without BN)."""
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
    return tl.where(pre <= 0, 0.0, dy.to(xhat.dtype)), xhat


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
    dyp, xhat = load_masked_grad(
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
    SKIP_FROM,
    SKIP,  # column c of dz lands at c + SKIP when c >= SKIP_FROM
    M,
    H,
    W,
    C,
    HAS_BN: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, n, oh, ow, row_ok = tile_pixels(tl.program_id(0), M, H, W, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    dz, xhat = load_masked_grad(
        dy_ptr, s_n, s_c, s_h, s_w, z_ptr, C, rows, n, oh, ow, row_ok, cols, col_ok,
        mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_BN,
    )  # fmt: skip
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
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def reduce_grad_kernel(
    g_ptr,  # G [M, GC]: reads the dz3 / dz5 columns, writes the reduce columns
    GC,
    RED_COL,
    COL3,  # G's first reduce column and first dz3 column
    w3t_ptr,  # [K3*K3*C3, R3]: conv3's kernel flipped and transposed
    w5t_ptr,
    z_red_ptr,  # [M, R3 + R5]
    mean_ptr,
    invstd_ptr,
    gamma_ptr,
    beta_ptr,
    part_dy_ptr,
    part_dyx_ptr,
    M,
    H,
    W,
    R3,
    R5,
    C3,
    C5,
    K3,
    K5,
    HAS_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, n, oh, ow, row_ok = tile_pixels(pid_m, M, H, W, BLOCK_M)
    tiles3 = tl.cdiv(R3, BLOCK_N)
    # Selects, not if/else, as in inception_spatial_kernel: the ints keep their alignment.
    is3 = pid_n < tiles3
    in_col = tl.where(is3, COL3, COL3 + C3)
    c_in = tl.where(is3, C3, C5)
    ks = tl.where(is3, K3, K5)
    w_ptr = tl.where(is3, w3t_ptr, w5t_ptr)
    n_cols = tl.where(is3, R3, R5)
    red0 = tl.where(is3, 0, R3)
    cols = tl.where(is3, pid_n, pid_n - tiles3) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    s_n, s_c, s_h, s_w = nhwc_strides(H, W, GC)
    # A 'same' conv's data gradient is the 'same' conv of dz with the flipped kernel.
    acc = conv_tile(
        g_ptr + in_col,
        s_n,
        s_c,
        s_h,
        s_w,
        n,
        oh,
        ow,
        row_ok,
        H,
        W,
        c_in,
        w_ptr,
        cols,
        col_ok,
        n_cols,
        ks,
        w_ptr,
        w_ptr,
        w_ptr,
        w_ptr,  # no input activation: read as stored
        False,
        False,
        False,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        USE_DOT,
        INPUT_PRECISION,
        ACC_DTYPE,
    )
    red_cols = red0 + cols
    c_red = R3 + R5
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    tl.store(
        g_ptr + rows64 * GC + RED_COL + red_cols[None, :],
        acc.to(g_ptr.dtype.element_ty),
        mask=ok,
    )
    z = tl.load(z_red_ptr + rows64 * c_red + red_cols[None, :], mask=ok, other=0.0)
    dyp, xhat = masked_grad(
        acc, z, red_cols, col_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_BN
    )
    store_partials(dyp, xhat, pid_m, red_cols, col_ok, part_dy_ptr, part_dyx_ptr, c_red)


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
    g_ptr,  # G [M, GC]: stem columns [0, K_STEM), pool columns [POOL_COL, GC)
    GC,
    K_STEM,
    POOL_COL,
    C_POOL,
    stem_wt_ptr,  # [K_STEM, C_in]
    pool_wt_ptr,  # [C_POOL, C_in]
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
    acc = conv_tile(
        g_ptr,
        s_n,
        s_c,
        s_h,
        s_w,
        n,
        oh,
        ow,
        row_ok,
        H,
        W,
        K_STEM,
        stem_wt_ptr,
        cols,
        col_ok,
        C_in,
        1,
        stem_wt_ptr,
        stem_wt_ptr,
        stem_wt_ptr,
        stem_wt_ptr,  # no input activation: read as stored
        False,
        False,
        False,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        USE_DOT,
        INPUT_PRECISION,
        ACC_DTYPE,
    )
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
        dpooled = conv_tile(
            g_ptr + POOL_COL,
            s_n,
            s_c,
            s_h,
            s_w,
            n,
            qh,
            qw,
            q_ok,
            H,
            W,
            C_POOL,
            pool_wt_ptr,
            cols,
            col_ok,
            C_in,
            1,
            pool_wt_ptr,
            pool_wt_ptr,
            pool_wt_ptr,
            pool_wt_ptr,  # no input activation: read as stored
            False,
            False,
            False,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            USE_DOT,
            INPUT_PRECISION,
            ACC_DTYPE,
        )
        acc += tl.where(best == t, dpooled, 0.0)
    tl.store(
        gx_ptr + pixel_offsets(n, oh, ow, cols, sg_n, sg_c, sg_h, sg_w),
        acc.to(gx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _elementwise_blocks(m: int, c: int, on_gpu: bool) -> tuple[int, int]:
    if on_gpu:
        return 64, 64
    # The interpreter pays per program: the biggest tiles the problem fills.
    return (
        max(16, min(256, triton.next_power_of_2(m))),
        max(16, min(128, triton.next_power_of_2(c))),
    )


def _nchw_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _relu_bn_backward(
    dy: torch.Tensor,
    dy_strides: tuple[int, int, int, int],
    z: torch.Tensor,
    stats: tuple[torch.Tensor, ...],
    batch_stats: bool,
    dz: torch.Tensor,
    skip: tuple[int, int],
    shape: tuple[int, int, int],
    partials: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dz of one [M, C] group of ReLU(BN) layers into ``dz``; returns (sum dy', sum dy'xhat).

    ``partials``: per-tile sums already taken (by reduce_grad_kernel's epilogue); else
    relu_bn_partials_kernel takes them from dy.
    """
    m, h, w = shape
    c = z.shape[1]
    on_gpu = compiled_for_gpu(dy)
    block_m, block_n = _elementwise_blocks(m, c, on_gpu)
    has_bn = len(stats) == 4
    acc = accumulator_dtype(z.dtype)
    dummy = torch.empty(0, dtype=acc, device=z.device)
    vectors = stats if has_bn else (dummy,) * 4
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_n))
    if partials is None:
        partials = (
            torch.empty((grid[0], c), dtype=acc, device=z.device),
            torch.empty((grid[0], c), dtype=acc, device=z.device),
        )
        relu_bn_partials_kernel[grid](
            dy, *dy_strides, z, *vectors, *partials, m, h, w, c, HAS_BN=has_bn,
            BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
    sums = (
        torch.empty(c, dtype=acc, device=z.device),
        torch.empty(c, dtype=acc, device=z.device),
    )
    tiles = partials[0].shape[0]
    block_t = 64 if on_gpu else max(16, min(1024, triton.next_power_of_2(tiles)))
    partials_finalize_kernel[(triton.cdiv(c, block_n),)](
        *partials, *sums, tiles, c, BLOCK_T=block_t, BLOCK_N=block_n
    )
    relu_bn_apply_kernel[grid](
        dy, *dy_strides, z, *vectors, *sums, dz, dz.stride(0), *skip, m, h, w, c,
        HAS_BN=has_bn, BATCH_STATS=batch_stats, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return sums


def _flipped_transposed(packed: torch.Tensor, ks: int) -> torch.Tensor:
    """Packed kernel of the data gradient: [ks*ks*C_out, C_in], flipped in space."""
    weight = packed.view(ks, ks, -1, packed.shape[1]).permute(3, 2, 0, 1)
    return pack_weight(weight.transpose(0, 1).flip(2, 3), packed.dtype)


def _conv_weight_grad(
    dz: torch.Tensor, act: torch.Tensor, packed: torch.Tensor, ks: int
) -> torch.Tensor:
    """Weight grad [C_out, C_in, ks, ks] of a 'same' conv from NCHW-indexed views."""
    weight = packed.view(ks, ks, -1, packed.shape[1]).permute(3, 2, 0, 1)
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
    g = torch.empty((m, gc), dtype=dtype, device=dev)
    g_strides = (h * wd * gc, 1, wd * gc, gc)
    on_gpu = compiled_for_gpu(x)
    if bn is None:
        stats_out: tuple[torch.Tensor, ...] = ()
        stats_red: tuple[torch.Tensor, ...] = ()
    else:
        stats_out = (saved.mean_out, saved.invstd_out, bn.gamma_out, bn.beta_out)
        stats_red = (saved.mean_red, saved.invstd_red, bn.gamma_red, bn.beta_red)
    shape = (m, h, wd)

    # Output layers: dz into G's [c1 | . | c3 | c5 | cp] columns (skipping the reduce ones).
    sums_out = _relu_bn_backward(
        grad_out, _nchw_strides(grad_out), saved.z_out, stats_out, batch_stats, g,
        (c1, r), shape,
    )  # fmt: skip

    # Reduce layers: data grads of the k3/k5 convs, then their ReLU/BN backward in place.
    acc = accumulator_dtype(dtype)
    cfg = tile_config(dtype, m, max(r3, r - r3), max(c3, c5), on_gpu)
    tiles_m = triton.cdiv(m, cfg.block_m)
    partials = (
        torch.empty((tiles_m, r), dtype=acc, device=dev),
        torch.empty((tiles_m, r), dtype=acc, device=dev),
    )
    vectors = (
        stats_red if bn is not None else (torch.empty(0, dtype=acc, device=dev),) * 4
    )
    grid = (tiles_m, triton.cdiv(r3, cfg.block_n) + triton.cdiv(r - r3, cfg.block_n))
    reduce_grad_kernel[grid](
        g, gc, c1, col3, _flipped_transposed(w.w3, k3), _flipped_transposed(w.w5, k5),
        saved.z_red, *vectors, *partials, m, h, wd, r3, r - r3, c3, c5, k3, k5,
        HAS_BN=bn is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot, INPUT_PRECISION=input_precision(dtype),
        ACC_DTYPE=acc_dtype(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    g_red = g[:, c1:col3]
    sums_red = _relu_bn_backward(
        g_red, g_strides, saved.z_red, stats_red, batch_stats, g_red, (r, 0), shape,
        partials,
    )  # fmt: skip

    grad_x = None
    if needs_input_grad:
        grad_x = torch.empty_like(x)
        cfg = tile_config(dtype, m, c_in, max(col3, cp), on_gpu)
        if on_gpu:  # four [BLOCK_M, BLOCK_N] tiles live at once (acc, dpooled, argmax)
            cfg = dataclasses.replace(cfg, block_m=min(cfg.block_m, 64))
        else:  # interpreter: fewer, wider programs (fp64's [256, 16, 256] product
            # is still within Triton's 2**20-element cap)
            cfg = dataclasses.replace(
                cfg, block_n=min(256, triton.next_power_of_2(c_in))
            )
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(c_in, cfg.block_n))
        input_grad_kernel[grid](
            g, gc, col3, pool_col, cp, w.stem_w.t().contiguous(),
            w.pool_w.t().contiguous(), x, *_nchw_strides(x), grad_x,
            *_nchw_strides(grad_x), m, h, wd, c_in, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot,
            INPUT_PRECISION=input_precision(dtype), ACC_DTYPE=acc_dtype(dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    # Weight grads: views of G against x, the pooled x and the recomputed reduce activations.
    rows = x.permute(0, 2, 3, 1).reshape(m, c_in)
    pooled = F.max_pool2d(x, 3, 1, 1).permute(0, 2, 3, 1).reshape(m, c_in)
    z_red = saved.z_red
    if bn is None:
        a_red = torch.relu(z_red)
    else:
        a_red = torch.relu(
            (z_red.to(acc) - saved.mean_red) * (saved.invstd_red * bn.gamma_red)
            + bn.beta_red
        ).to(dtype)
    nchw = (0, 3, 1, 2)
    a_red = a_red.view(n, h, wd, r).permute(nchw)
    g4 = g.view(n, h, wd, gc).permute(nchw)
    return FlatGrads(
        grad_x=grad_x,
        stem_w=g[:, :col3].t() @ rows,
        w3=_conv_weight_grad(g4[:, col3 : col3 + c3], a_red[:, :r3], w.w3, k3),
        w5=_conv_weight_grad(g4[:, col3 + c3 : pool_col], a_red[:, r3:], w.w5, k5),
        pool_w=g[:, pool_col:].t() @ pooled,
        sum_dy_out=sums_out[0],
        sum_dyx_out=sums_out[1],
        sum_dy_red=sums_red[0],
        sum_dyx_red=sums_red[1],
    )


def split_grads(flat: FlatGrads, c1: int, r3: int, has_bn: bool) -> InceptionGrads:
    """Per-layer views (no copies) of the flat gradients, in BLOCK_ORDER."""
    c3, c5 = flat.w3.shape[0], flat.w5.shape[0]
    stem = flat.stem_w
    c_in = stem.shape[1]

    def per_layer(out: torch.Tensor, red: torch.Tensor) -> list[torch.Tensor]:
        return [
            out[:c1],
            red[:r3],
            red[r3:],
            out[c1 : c1 + c3],
            out[c1 + c3 : c1 + c3 + c5],
            out[c1 + c3 + c5 :],
        ]

    conv_weight = [
        stem[:c1].view(c1, c_in, 1, 1),
        stem[c1 : c1 + r3].view(r3, c_in, 1, 1),
        stem[c1 + r3 :].view(-1, c_in, 1, 1),
        flat.w3,
        flat.w5,
        flat.pool_w.view(-1, c_in, 1, 1),
    ]
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

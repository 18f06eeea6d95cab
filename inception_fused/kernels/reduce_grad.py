"""Data gradients of the 3x3 and "5x5" convs into the reduce layers' columns of G.

A 'same' conv's data gradient is the 'same' conv of dz with the flipped, transposed
kernel, read in place from the forward's packed weights: one implicit-GEMM grid over both
branches, as in launch B, whose epilogue also takes the reduce layers' per-tile ReLU/BN
partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..folding import FoldedInception, accumulator_dtype
from .conv_tile import nhwc_strides, stored_conv_tile, tile_pixels
from .launch import TileConfig, acc_dtype, ceil_div, input_precision
from .relu_bn_backward import masked_grad, store_partials
from .tiles import TileKey, pick


@triton.jit
def reduce_grad_kernel(
    dz_red_ptr,  # G's first reduce column: written
    dz3_ptr,
    dz5_ptr,  # G's first dz3 and dz5 columns: read
    GC,  # G's row stride
    w3_ptr,  # [K3*K3*R3, C3]: conv3's packed kernel, as the forward reads it
    w5_ptr,
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
    c_in = tl.where(is3, C3, C5)
    ks = tl.where(is3, K3, K5)
    n_cols = tl.where(is3, R3, R5)
    # Tap t, dz channel c, reduce channel r reads the packed [tap, r, c] at the mirrored
    # tap: the flipped, transposed kernel without a copy.
    tap_size = n_cols * c_in
    w_ptr = tl.where(is3, w3_ptr, w5_ptr) + (ks * ks - 1) * tap_size
    red0 = tl.where(is3, 0, R3)
    cols = tl.where(is3, pid_n, pid_n - tiles3) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    s_n, s_c, s_h, s_w = nhwc_strides(H, W, GC)
    # A 'same' conv's data gradient is the 'same' conv of dz with the flipped kernel.
    acc = stored_conv_tile(
        tl.where(is3, dz3_ptr, dz5_ptr), s_n, s_c, s_h, s_w, n, oh, ow, row_ok, H, W,
        c_in, w_ptr, -tap_size, 1, c_in, cols, col_ok, ks, "", BLOCK_M, BLOCK_N,
        BLOCK_K, USE_DOT, INPUT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    red_cols = red0 + cols
    c_red = R3 + R5
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    tl.store(
        dz_red_ptr + rows64 * GC + red_cols[None, :],
        acc.to(dz_red_ptr.dtype.element_ty),
        mask=ok,
    )
    z = tl.load(z_red_ptr + rows64 * c_red + red_cols[None, :], mask=ok, other=0.0)
    dyp, xhat, _ = masked_grad(
        acc, z, red_cols, col_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, HAS_BN
    )
    store_partials(dyp, xhat, pid_m, red_cols, col_ok, part_dy_ptr, part_dyx_ptr, c_red)


def launch_reduce_grad(
    g: torch.Tensor,
    w: FoldedInception,
    z_red: torch.Tensor,
    stats_red: tuple[torch.Tensor, ...],
    shape: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """G[:, c1 : c1 + r3 + r5] from G's dz3/dz5 columns; returns the per-tile partials.

    ``g`` is G [M, C_out + r3 + r5] (columns [c1 | r3 | r5 | c3 | c5 | cp], any row
    stride; each column group is passed as its own pointer, so that the runtime sees its
    alignment); ``stats_red``
    the reduce layers' (mean, invstd, gamma, beta), or () without BN; ``shape`` (M, H, W).
    """
    m, h, wd = shape
    c1, r3, k3, k5 = w.c1, w.r3, w.k3, w.k5
    r = w.stem_w.shape[1] - c1
    c3, c5 = w.w3.shape[1], w.w5.shape[1]
    dtype, dev = g.dtype, g.device
    acc = accumulator_dtype(dtype)
    key = TileKey.of("reduce_grad", "backward", dtype, m, max(r3, r - r3), max(c3, c5),
                  max(k3, k5))  # fmt: skip

    def run(cfg: TileConfig) -> tuple[torch.Tensor, torch.Tensor]:
        tiles_m = ceil_div(m, cfg.block_m)
        partials = (
            torch.empty((tiles_m, r), dtype=acc, device=dev),
            torch.empty((tiles_m, r), dtype=acc, device=dev),
        )
        grid = (tiles_m, ceil_div(r3, cfg.block_n) + ceil_div(r - r3, cfg.block_n))
        vectors = stats_red or (partials[0],) * 4  # without BN: never read
        reduce_grad_kernel[grid](
            g[:, c1:], g[:, c1 + r :], g[:, c1 + r + c3 :], g.stride(0), w.w3, w.w5,
            z_red, *vectors, *partials, m, h, wd, r3, r - r3, c3, c5, k3, k5,
            HAS_BN=bool(stats_red), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot,
            INPUT_PRECISION=input_precision(dtype), ACC_DTYPE=acc_dtype(dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return partials

    return run(pick(key, g, run))

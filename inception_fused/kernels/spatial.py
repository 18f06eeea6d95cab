"""Launch B: the 3x3 and "5x5" convs of branches 2 and 3, in one grid, over the scratch.

Tiles of both branches share the grid's column axis; each tile picks its branch's input
columns, kernel size, weights and output slice, then runs the same implicit-GEMM conv tile.

Eval reads activated reduce outputs and stores relu(acc + folded bias). Train (TRAIN) reads
the reduce layers' pre-activation z and applies their BN+ReLU (or ReLU alone without BN)
while loading it, stores the pre-activation z, and with STATS per-tile statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv_tile import conv_tile, nhwc_strides, store_tile, tile_pixels
from .launch import TileConfig, acc_dtype, ceil_div, input_precision
from .tiles import TileKey, check_partial_rows, pick


@triton.jit
def inception_spatial_kernel(
    red_ptr,  # scratch [M, R3 + R5]: the two reduce outputs side by side
    RED_STRIDE,  # its row stride (padded to 16 elements on a GPU)
    red_mean_ptr,
    red_invstd_ptr,
    red_gamma_ptr,
    red_beta_ptr,  # [R3 + R5] BN vectors of the reduce layers, read when IN_BN
    w3_ptr,
    b3_ptr,
    w5_ptr,
    b5_ptr,
    out_ptr,
    part_mean_ptr,
    part_m2_ptr,  # train statistics [num_m_tiles, C_OUT + R3 + R5]
    M,
    H,
    W,
    R3,
    R5,
    C3,
    C5,
    K3,
    K5,
    C_OUT,
    COL3,  # output row stride and branch 2's first output channel
    TRAIN: tl.constexpr,
    STATS: tl.constexpr,
    IN_BN: tl.constexpr,
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
    tiles3 = tl.cdiv(C3, BLOCK_N)
    # The branch's parameters by select, not if/else: no do_not_specialize is needed for
    # the arms' types to agree (an int equal to 1 arrives as a constexpr), so the ints keep
    # their divisible-by-16 facts and the loads stay vectorised and asynchronous.
    is3 = pid_n < tiles3
    red0 = tl.where(is3, 0, R3)  # branch's first column in the scratch and BN vectors
    c_in = tl.where(is3, R3, R5)
    ks = tl.where(is3, K3, K5)
    w_ptr = tl.where(is3, w3_ptr, w5_ptr)
    b_ptr = tl.where(is3, b3_ptr, b5_ptr)
    n_cols = tl.where(is3, C3, C5)
    col0 = tl.where(is3, COL3, COL3 + C3)
    cols = tl.where(is3, pid_n, pid_n - tiles3) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    c_red = R3 + R5
    s_n, s_c, s_h, s_w = nhwc_strides(H, W, RED_STRIDE)
    acc = conv_tile(
        red_ptr + red0,
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
        c_in,
        n_cols,
        1,
        cols,
        col_ok,
        ks,
        ks,
        ks // 2,
        ks // 2,
        red_mean_ptr + red0,
        red_invstd_ptr + red0,
        red_gamma_ptr + red0,
        red_beta_ptr + red0,
        "",
        TRAIN,
        IN_BN,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        USE_DOT,
        INPUT_PRECISION,
        ACC_DTYPE,
        1,
        1,
    )
    store_tile(
        acc,
        b_ptr,
        cols,
        col_ok,
        out_ptr + col0,
        C_OUT,
        rows,
        row_ok,
        pid_m,
        M,
        part_mean_ptr + col0,
        part_m2_ptr + col0,
        C_OUT + c_red,
        TRAIN,
        STATS,
        BLOCK_M,
    )


def launch_spatial(
    reduced: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    w5: torch.Tensor,
    b5: torch.Tensor,
    out: torch.Tensor,
    r3: int,
    k3: int,
    k5: int,
    col3: int,
    train: bool = False,
    red_bn: tuple[torch.Tensor, ...] | None = None,
    partials: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Fill out[..., col3 : col3 + c3 + c5] from the reduce scratch [N*H*W, r3 + r5].

    Eval (``train=False``): the scratch holds activated values; stores relu(acc + bias).
    ``train=True``: the scratch holds the reduce layers' pre-activation z, activated on load
    with ReLU, after BN when ``red_bn`` = (mean, invstd, gamma, beta) over [r3 + r5]; the
    pre-activation is stored, with per-tile statistics when ``partials`` = (mean, m2), each
    [cdiv(M, rows_per_tile), C_out + r3 + r5].
    """
    n, c_out, h, w = out.shape
    m = n * h * w
    r5 = reduced.shape[1] - r3
    c3, c5 = w3.shape[1], w5.shape[1]
    bn_vectors = red_bn if red_bn is not None else (b3,) * 4
    part_mean, part_m2 = partials if partials is not None else (b3, b3)

    def run(cfg: TileConfig) -> None:
        check_partial_rows(partials, m, cfg)
        grid = (
            ceil_div(m, cfg.block_m),
            ceil_div(c3, cfg.block_n) + ceil_div(c5, cfg.block_n),
        )
        inception_spatial_kernel[grid](
            reduced, reduced.stride(0), *bn_vectors, w3, b3, w5, b5, out, part_mean,
            part_m2, m, h, w, r3, r5, c3, c5, k3, k5, c_out, col3, TRAIN=train,
            STATS=partials is not None, IN_BN=red_bn is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot,
            INPUT_PRECISION=input_precision(out.dtype), ACC_DTYPE=acc_dtype(out.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    mode = "train" if train else "eval"
    key = TileKey.of(
        "spatial", mode, out.dtype, m, max(c3, c5), max(r3, r5), max(k3, k5)
    )
    run(pick(key, out, run))

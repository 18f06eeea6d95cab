"""Launch A: everything that reads x.

Two kinds of tile, compiled as variants of one kernel (TILES) and launched one after the
other, since a pool tile's nine loads per step need other tile sizes than a stem tile's
one (in one compile the pool path's pipeline buffers would set the shared memory and
registers of both). Small evals (``MERGED_ROWS``) launch both kinds at once (TILES="both"):

* stem tiles: x @ [W_1x1 | W_red3 | W_red5] + bias. Branch-1 columns land in their slice
  of the module output; the reduce columns land in a small scratch matrix for launch B.
* pool tiles: max-pool 3x3/s1/p1 taken while x is loaded, @ W_pool + bias, into the
  pool branch's slice. The pooled tensor is never written.

Eval stores relu(acc + folded bias). Train (TRAIN) stores the pre-activation z instead, and
with STATS the per-tile channel statistics BatchNorm needs (see conv_tile.store_tile).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .conv_tile import store_tile, stored_conv_tile, tile_pixels
from .launch import TileConfig, acc_dtype, ceil_div, input_precision
from .tiles import TileKey, check_partial_rows, pick

# At most this many pixels (every block of a 224x224 image), an eval's stem and pool tiles
# are one launch: each alone is a few dozen tiles, too few to fill a GPU, and a CUDA
# graph of a batch-1 network is mostly launches. Both kinds then take the pool's tiles.
MERGED_ROWS = 1024


@triton.jit
def _stem_tile(
    x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, stem_w_ptr, STEM_W_STRIDE,
    stem_b_ptr, out_ptr, scratch_ptr, SCRATCH_STRIDE, part_mean_ptr, part_m2_ptr, pid_m,
    pid_n, rows, n, oh, ow, row_ok, M, H, W, C_in, C1, C_RED, C_OUT,
    TRAIN: tl.constexpr, STATS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C1 + C_RED
    acc = stored_conv_tile(
        x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, n, oh, ow, row_ok, H, W,
        C_in, stem_w_ptr, C_in, STEM_W_STRIDE, 1, cols, col_ok, 1, "", BLOCK_M,
        BLOCK_N, BLOCK_K, USE_DOT, INPUT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    # Columns [0, C1) are branch 1's output; [C1, C1 + C_RED) feed launch B. Their
    # statistics go to partial columns [0, C1) and [C_OUT, C_OUT + C_RED).
    part_stride = C_OUT + C_RED
    store_tile(
        acc, stem_b_ptr, cols, col_ok & (cols < C1), out_ptr, C_OUT, rows, row_ok,
        pid_m, M, part_mean_ptr, part_m2_ptr, part_stride, TRAIN, STATS, BLOCK_M,
    )  # fmt: skip
    store_tile(
        acc, stem_b_ptr, cols,
        col_ok & (cols >= C1),  # not ~(cols < C1): Triton 3.3 interpreter cannot invert
        scratch_ptr - C1, SCRATCH_STRIDE, rows, row_ok, pid_m, M,
        part_mean_ptr + C_OUT - C1, part_m2_ptr + C_OUT - C1, part_stride, TRAIN, STATS,
        BLOCK_M,
    )  # fmt: skip


@triton.jit
def _pool_tile(
    x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, pool_w_ptr, pool_b_ptr, out_ptr,
    part_mean_ptr, part_m2_ptr, pid_m, pid_n, rows, n, oh, ow, row_ok, M, H, W, C_in,
    C_RED, C_POOL, C_OUT, POOL_COL,
    TRAIN: tl.constexpr, STATS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_POOL
    acc = stored_conv_tile(
        x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, n, oh, ow, row_ok, H, W,
        C_in, pool_w_ptr, C_in, C_POOL, 1, cols, col_ok, 1, "max", BLOCK_M, BLOCK_N,
        BLOCK_K, USE_DOT, INPUT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    store_tile(
        acc, pool_b_ptr, cols, col_ok, out_ptr + POOL_COL, C_OUT, rows, row_ok, pid_m, M,
        part_mean_ptr + POOL_COL, part_m2_ptr + POOL_COL, C_OUT + C_RED, TRAIN, STATS,
        BLOCK_M,
    )  # fmt: skip


@triton.jit
def inception_pointwise_kernel(
    x_ptr,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stem_w_ptr,
    STEM_W_STRIDE,  # stem_w's row stride (padded to 16 elements on a GPU)
    stem_b_ptr,
    pool_w_ptr,
    pool_b_ptr,
    out_ptr,
    scratch_ptr,
    SCRATCH_STRIDE,
    part_mean_ptr,
    part_m2_ptr,  # train statistics [num_m_tiles, C_OUT + C_RED]: output, then reduce
    M,
    H,
    W,
    C_in,
    C1,
    C_RED,
    C_POOL,  # branch-1 width, reduce width (r3 + r5), pool-projection width
    C_OUT,
    POOL_COL,  # output row stride and the pool slice's first channel
    TILES: tl.constexpr,  # this launch's tiles: "stem", "pool", or "both" (see above)
    TRAIN: tl.constexpr,
    STATS: tl.constexpr,
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
    pool_tiles = TILES == "pool"
    stem_col_tiles = 0
    if TILES == "both":  # the stem's column tiles, then the pool's
        stem_col_tiles = tl.cdiv(C1 + C_RED, BLOCK_N)
        pool_tiles = pid_n >= stem_col_tiles
    if pool_tiles:
        _pool_tile(
            x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, pool_w_ptr, pool_b_ptr,
            out_ptr, part_mean_ptr, part_m2_ptr, pid_m, pid_n - stem_col_tiles, rows, n,
            oh, ow, row_ok, M, H, W, C_in, C_RED, C_POOL, C_OUT, POOL_COL, TRAIN, STATS,
            BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, INPUT_PRECISION, ACC_DTYPE,
        )  # fmt: skip
    else:
        _stem_tile(
            x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, stem_w_ptr, STEM_W_STRIDE,
            stem_b_ptr, out_ptr, scratch_ptr, SCRATCH_STRIDE, part_mean_ptr, part_m2_ptr,
            pid_m, pid_n, rows, n, oh, ow, row_ok, M, H, W, C_in, C1, C_RED, C_OUT, TRAIN,
            STATS, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, INPUT_PRECISION, ACC_DTYPE,
        )  # fmt: skip


def launch_pointwise(
    x: torch.Tensor,
    stem_w: torch.Tensor,
    stem_b: torch.Tensor,
    pool_w: torch.Tensor,
    pool_b: torch.Tensor,
    out: torch.Tensor,
    scratch: torch.Tensor,
    c1: int,
    train: bool = False,
    partials: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Fill out[..., :c1], out[..., -pool:] and scratch from x (any strides, NCHW logical).

    ``out`` is [N, C_out, H, W] channels_last (an [M, C_out] row-major matrix). Eval
    (``train=False``) stores relu(acc + bias); ``train=True`` stores the pre-activation,
    and with ``partials`` = (mean, m2), each [cdiv(M, rows_per_tile), C_out + C_red] in
    the accumulator dtype, the per-tile statistics of every column it writes. Stem and
    pool tiles are two launches, each with its own tiles (kernels/tiles.py), or one
    (``pointwise_pool``) for an eval of at most ``MERGED_ROWS`` pixels.
    """
    n, c_in, h, w = x.shape
    m = n * h * w
    c_red = scratch.shape[1]
    c_pool = pool_w.shape[1]
    c_out = out.shape[1]
    part_mean, part_m2 = partials if partials is not None else (stem_b, stem_b)
    mode = "train" if train else "eval"

    def run(tiles: TileConfig, kind: str) -> None:
        check_partial_rows(partials, m, tiles)
        col_tiles = ceil_div(c1 + c_red, tiles.block_n) if kind != "pool" else 0
        if kind != "stem":
            col_tiles += ceil_div(c_pool, tiles.block_n)
        inception_pointwise_kernel[(ceil_div(m, tiles.block_m), col_tiles)](
            x, *x.stride(), stem_w, stem_w.stride(0), stem_b, pool_w, pool_b, out,
            scratch, scratch.stride(0), part_mean, part_m2, m, h, w, c_in, c1, c_red,
            c_pool, c_out, c_out - c_pool,
            TILES=kind, TRAIN=train, STATS=partials is not None,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            USE_DOT=tiles.use_dot, INPUT_PRECISION=input_precision(x.dtype),
            ACC_DTYPE=acc_dtype(x.dtype), num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )  # fmt: skip

    if train or m > MERGED_ROWS:
        launches = (("stem", "pointwise", c1 + c_red), ("pool", "pool", c_pool))
    else:
        launches = (("both", "pointwise_pool", c1 + c_red + c_pool),)
    for kind, kernel, n_cols in launches:
        launch = functools.partial(run, kind=kind)
        launch(pick(TileKey.of(kernel, mode, x.dtype, m, n_cols, c_in), x, launch))

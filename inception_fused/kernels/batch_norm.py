"""BatchNorm's two small train-mode kernels: statistics finalize and the last BN+ReLU pass.

The conv epilogues leave per-tile partial statistics (mean and centred M2 of each tile's
valid rows, one row per M tile). ``finalize_stats`` merges them per channel, chunk by chunk
of tiles in a fixed order, with Chan's parallel formula: deterministic (no atomics) and
free of the cancellation of E[z^2] - E[z]^2. ``bn_relu_pass`` then normalises the whole [M, C_out] pre-activation into
the module output, all four branches in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv_tile import bn_relu, div_rn, finite_or_zero
from .launch import acc_dtype, ceil_div, compiled_for_gpu, pow2_clamp


@triton.jit
def finalize_stats_kernel(
    part_mean_ptr,
    part_m2_ptr,  # [num_tiles, part_stride] per-tile mean and centred sum of squares
    eps_ptr,  # [n_cols]
    mean_ptr,
    invstd_ptr,
    var_ptr,  # [part_stride] outputs: mean, 1/sqrt(biased var + eps), unbiased var
    M,  # rows in all
    num_tiles,
    part_stride,
    col0,
    n_cols,  # the column range [col0, col0 + n_cols) this launch finalises
    BLOCK_M: tl.constexpr,  # rows per tile of the launch that wrote the partials
    BLOCK_T: tl.constexpr,  # tiles merged per step
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = idx < n_cols
    cols = col0 + idx
    # Means are kept relative to tile 0's so the weighted sums stay at the spread's scale.
    shift = finite_or_zero(tl.load(part_mean_ptr + cols, mask=ok, other=0.0))
    mean = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    n_a = tl.zeros((BLOCK_C,), ACC)  # rows merged so far
    for t0 in range(0, num_tiles, BLOCK_T):
        # A chunk of BLOCK_T tiles: its own mean and M2 (a fixed-shape tree, so the
        # result does not depend on scheduling), then Chan's merge into the running total.
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < num_tiles
        n_t = tl.where(t_ok, tl.minimum(M - t * BLOCK_M, BLOCK_M), 0).to(ACC)
        offs = t.to(tl.int64)[:, None] * part_stride + cols[None, :]
        both_ok = t_ok[:, None] & ok[None, :]
        mean_t = tl.load(part_mean_ptr + offs, mask=both_ok, other=0.0) - shift[None, :]
        m2_t = tl.load(part_m2_ptr + offs, mask=both_ok, other=0.0)
        n_b = tl.sum(n_t, axis=0)
        mean_b = div_rn(tl.sum(n_t[:, None] * mean_t, axis=0), n_b)
        d = tl.where(both_ok, mean_t - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2_t, axis=0) + tl.sum(n_t[:, None] * d * d, axis=0)
        n_ab = n_a + n_b
        delta = mean_b - mean
        mean += delta * div_rn(n_b, n_ab)
        m2 += m2_b + delta * delta * div_rn(n_a * n_b, n_ab)
        n_a = n_ab
    eps = tl.load(eps_ptr + idx, mask=ok, other=1.0)
    var_eps = div_rn(m2, n_a) + eps
    if ACC == tl.float64:
        std = tl.sqrt(var_eps)  # fp64 sqrt is correctly rounded; sqrt_rn is fp32 only
    else:
        std = tl.sqrt_rn(var_eps)  # fp32 tl.sqrt may be approximate on the GPU
    tl.store(mean_ptr + cols, shift + mean, mask=ok)
    tl.store(invstd_ptr + cols, div_rn(1.0, std), mask=ok)
    tl.store(var_ptr + cols, div_rn(m2, n_a - 1.0), mask=ok)


@triton.jit
def bn_relu_pass_kernel(
    z_ptr,
    out_ptr,  # both [M, C] row-major
    mean_ptr,
    invstd_ptr,
    gamma_ptr,
    beta_ptr,  # [C], read when BN
    M,
    C,
    BN: tl.constexpr,  # False: out = relu(z)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]  # 64-bit: M*C may pass 2**31
    z = tl.load(z_ptr + offs, mask=ok, other=0.0)
    y = bn_relu(
        z, ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, cols, col_ok, BN, ACC, True
    )
    tl.store(out_ptr + offs, y, mask=ok)


def _block(n: int, on_gpu: bool, gpu_block: int, cpu_cap: int) -> int:
    # The interpreter pays per program, so it gets one block as wide as the problem.
    if on_gpu:
        return gpu_block
    return pow2_clamp(n, 16, cpu_cap)


def finalize_stats(
    partials: tuple[torch.Tensor, torch.Tensor],
    eps: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    var_unbiased: torch.Tensor,
    m: int,
    block_m: int,
    col0: int,
    n_cols: int,
) -> None:
    """Merge per-tile partials of columns [col0, col0 + n_cols) into per-channel statistics.

    ``partials`` = (mean, m2), each [cdiv(m, block_m), C]; ``eps`` is [n_cols]; results go
    to the same columns of ``mean``, ``invstd`` (biased variance, for normalising) and
    ``var_unbiased`` (for running_var), all [C] in the accumulator dtype. Needs m >= 2.
    """
    part_mean, part_m2 = partials
    on_gpu = compiled_for_gpu(part_mean)
    block_c = _block(n_cols, on_gpu, 64, 1024)
    # 16 tiles per step in the interpreter too, so CPU tests merge several chunks.
    block_t = 64 if on_gpu else 16
    finalize_stats_kernel[(ceil_div(n_cols, block_c),)](
        part_mean,
        part_m2,
        eps,
        mean,
        invstd,
        var_unbiased,
        m,
        part_mean.shape[0],
        part_mean.shape[1],
        col0,
        n_cols,
        BLOCK_M=block_m,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        ACC=acc_dtype(mean.dtype),
    )


def bn_relu_pass(
    z: torch.Tensor,
    out: torch.Tensor,
    bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> None:
    """out = relu(gamma * (z - mean) * invstd + beta), or relu(z) when ``bn`` is None.

    ``z`` is [M, C] row-major; ``out`` has the same memory layout (an [N, C, H, W]
    channels_last tensor is one); ``bn`` = (mean, invstd, gamma, beta), each [C].
    """
    m, c = z.shape
    if m == 0:
        return
    on_gpu = compiled_for_gpu(z)
    block_c = _block(c, on_gpu, 128, 1024)
    block_m = _block(m, on_gpu, 32, (1 << 18) // block_c)
    vectors = bn if bn is not None else (z,) * 4
    grid = (ceil_div(m, block_m), ceil_div(c, block_c))
    bn_relu_pass_kernel[grid](
        z,
        out,
        *vectors,
        m,
        c,
        BN=bn is not None,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        ACC=acc_dtype(z.dtype),
    )

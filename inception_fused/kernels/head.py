"""GoogLeNet's head in one launch: the global average pool and the FC (eval dropout is the
identity). Each program averages its images' channels over the map while loading them as
the GEMM's A tile, so the pooled [N, C] matrix is never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv_tile import div_rn
from .launch import TileConfig, acc_dtype, ceil_div, input_precision, nchw_strides
from .tiles import TileKey, pick


@triton.jit
def avg_pool_fc_kernel(
    x_ptr,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    w_ptr,  # FC weight [CLASSES, C], any strides
    stride_wn,
    stride_wk,
    b_ptr,  # [CLASSES], the accumulator dtype
    out_ptr,  # [N, CLASSES] row-major
    N,
    H,
    W,
    C,
    CLASSES,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < CLASSES
    n64 = rows.to(tl.int64)[:, None] * stride_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < C
        ok = row_ok[:, None] & k_ok[None, :]
        base = x_ptr + n64 + kk.to(tl.int64)[None, :] * stride_xc
        total = tl.zeros((BLOCK_M, BLOCK_K), ACC_DTYPE)
        for p in range(H * W):
            pix = (p // W).to(tl.int64) * stride_xh + (p % W).to(tl.int64) * stride_xw
            total += tl.load(base + pix, mask=ok, other=0.0).to(ACC_DTYPE)
        # The pooled value rounded to x's dtype, as the reference's avgpool output is.
        a = div_rn(total, H * W).to(x_ptr.dtype.element_ty)
        b = tl.load(
            w_ptr + cols[None, :] * stride_wn + kk[:, None] * stride_wk,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if USE_DOT:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        else:
            acc += tl.sum(a[:, :, None].to(ACC_DTYPE) * b[None, :, :].to(ACC_DTYPE), 1)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
    out = acc + bias[None, :].to(ACC_DTYPE)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * CLASSES + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def launch_avg_pool_fc(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """fc(flatten(adaptive_avg_pool2d(x, 1))): [N, classes] logits in x's dtype.

    ``weight`` [classes, C] in x's dtype (any strides), ``bias`` in the accumulator
    dtype; x any strides.
    """
    n, c, h, w = x.shape
    classes = weight.shape[0]
    out = torch.empty((n, classes), dtype=x.dtype, device=x.device)
    if n == 0:
        return out

    def run(cfg: TileConfig) -> None:
        grid = (ceil_div(n, cfg.block_m), ceil_div(classes, cfg.block_n))
        avg_pool_fc_kernel[grid](
            x, *nchw_strides(x), weight, *weight.stride(), bias, out, n, h, w, c,
            classes, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            USE_DOT=cfg.use_dot, INPUT_PRECISION=input_precision(x.dtype),
            ACC_DTYPE=acc_dtype(x.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip

    run(pick(TileKey.of("head", "eval", x.dtype, n, classes, c), x, run))
    return out

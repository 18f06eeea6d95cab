"""The one piece of arithmetic every Inception kernel shares: an implicit-GEMM conv tile.

A tile is BLOCK_M output pixels × BLOCK_N output channels. A KSxKS 'same' conv over an
NHWC-strided input is a GEMM whose K dimension runs over (tap, input channel); a 1x1 conv is
the KS=1 case, and the pool projection is the KS=1 case with a 3x3/s1/p1 max taken while the
input tile is loaded, so the pooled tensor never exists in memory.
"""

import triton
import triton.language as tl


@triton.jit
def conv_tile(
    x_ptr,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,  # input, element strides
    n,
    oh,
    ow,
    row_ok,  # [BLOCK_M] output pixel coordinates of this tile and their mask
    H,
    W,
    C_in,
    w_ptr,
    cols,
    col_ok,  # packed weight [KS*KS*C_in, n_cols] with row stride n_cols
    n_cols,
    KS,  # odd kernel size, 'same' padding; a runtime value so one grid serves 3x3 and 5x5
    POOL: tl.constexpr,  # take the 3x3/s1/p1 max of the input while loading it
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,  # False for float64: tl.dot has no fp64
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 tl.dot
    ACC_DTYPE: tl.constexpr,
):
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    pad = KS // 2
    n64 = n.to(tl.int64) * stride_xn  # 64-bit: N*H*W*C may pass 2**31
    for tap in range(KS * KS):
        ih = oh + tap // KS - pad
        iw = ow + tap % KS - pad
        tap_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = n64 + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
        for k0 in range(0, C_in, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < C_in
            chan = kk.to(tl.int64) * stride_xc
            if POOL:
                # The window's centre is the output pixel itself, so every valid row sees at
                # least one real value and the -inf padding never survives the max.
                a = tl.full((BLOCK_M, BLOCK_K), float("-inf"), x_ptr.dtype.element_ty)
                for dh in tl.static_range(3):
                    for dw in tl.static_range(3):
                        ph = oh + (dh - 1)
                        pw = ow + (dw - 1)
                        ok = row_ok & (ph >= 0) & (ph < H) & (pw >= 0) & (pw < W)
                        p = (
                            n64
                            + ph.to(tl.int64) * stride_xh
                            + pw.to(tl.int64) * stride_xw
                        )
                        v = tl.load(
                            x_ptr + p[:, None] + chan[None, :],
                            mask=ok[:, None] & k_ok[None, :],
                            other=float("-inf"),
                        )
                        a = tl.maximum(a, v)
                a = tl.where(row_ok[:, None] & k_ok[None, :], a, 0.0)
            else:
                a = tl.load(
                    x_ptr + pix[:, None] + chan[None, :],
                    mask=tap_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
            b = tl.load(
                w_ptr + (tap * C_in + kk)[:, None] * n_cols + cols[None, :],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if USE_DOT:
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            else:
                acc += tl.sum(
                    a[:, :, None].to(ACC_DTYPE) * b[None, :, :].to(ACC_DTYPE), axis=1
                )
    return acc


@triton.jit
def tile_pixels(pid_m, M, H, W, BLOCK_M: tl.constexpr):
    """Rows of an output tile as (flat row, n, h, w, in-bounds mask)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hw = rows % (H * W)
    return rows, rows // (H * W), hw // W, hw % W, rows < M


@triton.jit
def store_bias_relu(acc, bias_ptr, cols, col_ok, out_ptr, out_row_stride, rows, row_ok):
    """Epilogue: + folded BN bias, ReLU, store into a column slice of a row-major matrix."""
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
    y = tl.maximum(acc + bias[None, :].to(acc.dtype), 0.0)
    offs = rows.to(tl.int64)[:, None] * out_row_stride + cols[None, :]
    tl.store(
        out_ptr + offs,
        y.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )

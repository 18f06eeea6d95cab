"""The one piece of arithmetic every Inception kernel shares: an implicit-GEMM conv tile.

A tile is BLOCK_M output pixels × BLOCK_N output channels. A KHxKW conv (padding PH, PW,
stride STRIDE) over an NHWC-strided input is a GEMM whose K dimension runs over (tap, input
channel); a 1x1 conv is the KH=KW=1 case, and the pool projection is the 1x1 case with a
3x3 pool taken while the input tile is loaded (a 3x3/s1/p1 max as in GoogLeNet's block or
Inception-v3's FID variant, a 3x3/s1/p1 average with or without the padding in its count
as in Inception-v3's pool branches, or GoogLeNet's stem's 3x3/s2 ceil-mode max before
conv2), so the pooled tensor never exists in memory. The weight is read through strides:
the forward passes its packed [KH*KW*C_in, C_out] matrix (C_in rows per tap, taps row by
row, row stride C_out), the backward the same matrix flipped or transposed in place, so no
gradient step repacks a weight.

Train mode adds two switches: a prologue that applies the producing layer's BN+ReLU to the
input while loading it (the 3x3/5x5 convs read pre-activation reduce outputs), and an
epilogue that stores the pre-activation z with per-tile channel statistics for BatchNorm.
The same prologue without the ReLU applies torchvision's transform_input to the image
GoogLeNet's first conv reads.
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
    W,  # the input's height and width
    C_in,
    w_ptr,
    w_tap_rows,
    w_s_k,
    w_s_n,  # weight [KH*KW, C_in, n]: (tap * w_tap_rows + k) * w_s_k + n * w_s_n
    cols,
    col_ok,
    KH,
    KW,  # kernel height and width: runtime values, so one grid serves 3x3 and 5x5
    PH,
    PW,  # zero padding above/below and left/right
    in_mean_ptr,
    in_invstd_ptr,
    in_gamma_ptr,
    in_beta_ptr,  # per input channel BN vectors, read only when IN_BN
    POOL: tl.constexpr,  # "" or a 3x3 pool taken while loading: "max", "avg", "avg_exclude"
    IN_RELU: tl.constexpr,  # input is pre-activation: apply (BN +) ReLU while loading
    IN_BN: tl.constexpr,  # (x - mean) * invstd * gamma + beta while loading
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,  # False for float64: tl.dot has no fp64
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 tl.dot
    ACC_DTYPE: tl.constexpr,
    STRIDE: tl.constexpr,  # the conv's
    POOL_STRIDE: tl.constexpr,  # 1: 3x3/s1/p1 windows; 2: 3x3/s2, ceil mode, no pad
):
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    n64 = n.to(tl.int64) * stride_xn  # 64-bit: N*H*W*C may pass 2**31
    for tap in range(KH * KW):
        ih = oh * STRIDE + tap // KW - PH
        iw = ow * STRIDE + tap % KW - PW
        tap_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = n64 + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
        for k0 in range(0, C_in, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < C_in
            chan = kk.to(tl.int64) * stride_xc
            if POOL != "":
                # 3x3 windows, stride POOL_STRIDE (1: padded by 1; 2: ceil mode, no
                # padding). Every window holds a real value (s1: its centre, the output
                # pixel; s2 in ceil mode: its first tap), so the max's -inf padding never
                # survives; averages sum in ACC_DTYPE.
                if POOL == "max":
                    a = tl.full((BLOCK_M, BLOCK_K), float("-inf"), x_ptr.dtype.element_ty)
                else:
                    a = tl.zeros((BLOCK_M, BLOCK_K), ACC_DTYPE)
                for dh in tl.static_range(3):
                    for dw in tl.static_range(3):
                        ph = oh * POOL_STRIDE + (dh - 2 + POOL_STRIDE)
                        pw = ow * POOL_STRIDE + (dw - 2 + POOL_STRIDE)
                        ok = row_ok & (ph >= 0) & (ph < H) & (pw >= 0) & (pw < W)
                        p = (
                            n64
                            + ph.to(tl.int64) * stride_xh
                            + pw.to(tl.int64) * stride_xw
                        )
                        mask = ok[:, None] & k_ok[None, :]
                        if POOL == "max":
                            v = tl.load(x_ptr + p[:, None] + chan[None, :], mask=mask,
                                        other=float("-inf"))  # fmt: skip
                            a = tl.maximum(a, v, propagate_nan=tl.PropagateNan.ALL)
                        else:
                            v = tl.load(x_ptr + p[:, None] + chan[None, :], mask=mask,
                                        other=0.0)  # fmt: skip
                            a += v.to(ACC_DTYPE)
                if POOL == "max":
                    a = tl.where(row_ok[:, None] & k_ok[None, :], a, 0.0)
                elif POOL == "avg_exclude":  # the in-image taps (at least the centre)
                    rows_in = tl.minimum(oh + 1, H - 1) - tl.maximum(oh - 1, 0) + 1
                    cols_in = tl.minimum(ow + 1, W - 1) - tl.maximum(ow - 1, 0) + 1
                    count = (rows_in * cols_in).to(ACC_DTYPE)
                    a = div_rn(a, tl.broadcast_to(count[:, None], (BLOCK_M, BLOCK_K)))
                else:  # count_include_pad: always nine
                    a = div_rn(a, tl.full((BLOCK_M, BLOCK_K), 9.0, ACC_DTYPE))
                a = a.to(x_ptr.dtype.element_ty)  # bf16 max/where come back as fp32
            else:
                a = tl.load(
                    x_ptr + pix[:, None] + chan[None, :],
                    mask=tap_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                if IN_RELU or IN_BN:
                    a = bn_relu(
                        a,
                        tap_ok[:, None] & k_ok[None, :],
                        in_mean_ptr,
                        in_invstd_ptr,
                        in_gamma_ptr,
                        in_beta_ptr,
                        kk,
                        k_ok,
                        IN_BN,
                        ACC_DTYPE,
                        IN_RELU,
                    )
            b = tl.load(
                w_ptr
                + (tap * w_tap_rows + kk)[:, None] * w_s_k
                + cols[None, :] * w_s_n,
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
def stored_conv_tile(
    x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, n, oh, ow, row_ok, H, W, C_in,
    w_ptr, w_tap_rows, w_s_k, w_s_n, cols, col_ok, KS, POOL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """conv_tile of an input read as stored: no BN/ReLU prologue, so no BN vectors; a
    KSxKS 'same' conv (padding KS // 2), stride 1; POOL as conv_tile's, s1 windows."""
    return conv_tile(
        x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, n, oh, ow, row_ok, H, W, C_in,
        w_ptr, w_tap_rows, w_s_k, w_s_n, cols, col_ok, KS, KS, KS // 2, KS // 2, w_ptr,
        w_ptr, w_ptr, w_ptr,
        POOL, False, False, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, INPUT_PRECISION, ACC_DTYPE,
        1, 1,
    )  # fmt: skip


@triton.jit
def bn_relu(
    a,
    ok,
    mean_ptr,
    invstd_ptr,
    gamma_ptr,
    beta_ptr,
    kk,
    k_ok,
    BN: tl.constexpr,
    ACC,
    RELU: tl.constexpr,
):
    """relu(gamma * (a - mean) * invstd + beta) (or relu(a); without RELU the affine
    alone) on in-bounds taps only.

    The conv's zero padding lives in the activated tensor, so out-of-bounds taps must stay
    0 rather than become relu(beta - gamma * mean * invstd).
    """
    v = a.to(ACC)
    if BN:
        mean = tl.load(mean_ptr + kk, mask=k_ok, other=0.0).to(ACC)
        invstd = tl.load(invstd_ptr + kk, mask=k_ok, other=0.0).to(ACC)
        gamma = tl.load(gamma_ptr + kk, mask=k_ok, other=0.0).to(ACC)
        beta = tl.load(beta_ptr + kk, mask=k_ok, other=0.0).to(ACC)
        v = (v - mean[None, :]) * (invstd * gamma)[None, :] + beta[None, :]
    if RELU:
        v = relu(v)
    v = tl.where(ok, v, 0.0)
    return v.to(a.dtype)


@triton.jit
def relu(v):
    """max(v, 0) with ReLU(NaN) = NaN, as torch.relu (tl.maximum alone drops NaN)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nhwc_strides(H, W, C):
    """Element strides (n, c, h, w) of an [N*H*W, C] row-major matrix read as NHWC, in
    64 bits: an image's H*W*C may pass 2**31."""
    c = tl.cast(C, tl.int64)
    return H * W * c, 1, W * c, c


@triton.jit
def div_rn(x, y):
    """x / y rounded to nearest, as torch divides: fp32 `/` compiles to div.full.f32 (up
    to 2 ulp) on NVIDIA GPUs; fp64 `/` is already correctly rounded."""
    q = x / y  # dead code for fp32; keeps Triton's type promotion for the check
    if q.dtype == tl.float32:
        q = tl.math.div_rn(tl.cast(x, q.dtype), tl.cast(y, q.dtype))
    return q


@triton.jit
def finite_or_zero(v):
    """v where finite, else 0: a shift for centred sums. An infinite shift would turn an
    infinite mean (torch's for a column holding inf) into inf - inf = NaN."""
    return tl.where(tl.abs(v) < float("inf"), v, 0.0)


@triton.jit
def tile_pixels(pid_m, M, H, W, BLOCK_M: tl.constexpr):
    """Rows of an output tile as (flat row, n, h, w, in-bounds mask)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hw = rows % (H * W)
    return rows, rows // (H * W), hw // W, hw % W, rows < M


@triton.jit
def store_tile(
    acc,
    bias_ptr,
    cols,
    col_ok,
    z_ptr,
    z_row_stride,
    rows,
    row_ok,
    pid_m,
    M,
    part_mean_ptr,
    part_m2_ptr,
    part_row_stride,
    TRAIN: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Epilogue: store acc + bias into a column slice of a row-major matrix.

    Eval (bias = folded BN): the ReLU is applied. TRAIN: the pre-activation z (bias = conv
    bias, or zeros before a BN) is stored, for BatchNorm and for the backward. With STATS,
    also write the tile's per-channel mean and centred sum of squares (M2) over its valid
    rows to row pid_m of the partials matrices. Statistics are taken of z as stored
    (rounded to z's dtype), the values BatchNorm sees; centring per tile keeps M2 accurate
    when |mean| >> std, where sum(z^2) - n*mean^2 would cancel.
    """
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
    z = acc + bias[None, :].to(acc.dtype)
    if not TRAIN:
        z = relu(z)
    z = z.to(z_ptr.dtype.element_ty)
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * z_row_stride + cols[None, :]
    tl.store(z_ptr + offs, z, mask=ok)
    if STATS:
        # Shift by the tile's first row (always valid) so the sums run over values of the
        # size of the spread, not of the mean: the mean keeps its precision too.
        zf = z.to(acc.dtype)
        shift = finite_or_zero(
            tl.sum(tl.where((tl.arange(0, BLOCK_M) == 0)[:, None], zf, 0.0), axis=0)
        )
        d = tl.where(row_ok[:, None], zf - shift[None, :], 0.0)
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(acc.dtype)
        d_mean = div_rn(tl.sum(d, axis=0), count)
        d = tl.where(row_ok[:, None], d - d_mean[None, :], 0.0)
        part = pid_m.to(tl.int64) * part_row_stride + cols
        tl.store(part_mean_ptr + part, shift + d_mean, mask=col_ok)
        tl.store(part_m2_ptr + part, tl.sum(d * d, axis=0), mask=col_ok)

"""The C++ backend's Winograd F(m x m, 3x3) convs (csrc/winograd.cpp), m = 2 and 4,
against a float64 reference, within a forward error bound derived for the algorithm.

Bound. With n = m + 2, the kernels compute per tile y = A^T [sum_c U_c ⊙ V_c] A + bias,
U_c = G g_c G^T (in double, rounded once to float), V_c = B^T d_c B. In the standard
rounding model (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3) every
computed linear combination is off by at most gamma_k = k eps / (1 - k eps) times the
same combination taken over absolute values, k the number of roundings on the longest
path, so to first order (Barabasz et al., "Error analysis and improving the accuracy of
Winograd convolution for deep neural networks", TOMS 2020):

    |y_computed - y| <= gamma_k (|A^T| [sum_c (|G||g_c||G^T|) ⊙ (|B^T||d_c||B|)] |A| + |bias|)

with k <= 6 (input transform: two 1-D passes of at most 3 roundings) + 2 (the weight,
rounded once, plus double's own error) + C (the GEMM's FMA chain over channels) + 6
(output transform: two passes of at most 3) + 1 (bias) = C + 15. The absolute-value
term runs over the whole n x n tile, not only the output's 3x3 window: cancellation
makes y exact in exact arithmetic, not the rounding errors of the other taps. It grows
with m (F(4x4)'s B^T and A^T hold 4s, 5s and 8s), which is why F(4x4) in float32 has
10-30x F(2x2)'s error. ReLU is 1-Lipschitz. The kernels stay below 2% of the bound (the
bound adds every rounding error at full size); one transform coefficient off by 4e-5
(F(4x4)'s 1/6 written 0.1666) already gives 3-10x the bound.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from inception_fused.cpu import load_extension
from inception_fused.folding import pack_weight

EPS = 2.0**-24  # float32 unit roundoff

# Lavin & Gray's matrices (arXiv 1509.09308), written out independently of the C++.
MATRICES = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],  # B^T
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],  # G
        [[1, 1, 1, 0], [0, 1, -1, -1]],  # A^T
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [
            [1, 1, 1, 1, 1, 0],
            [0, 1, -1, 2, -2, 0],
            [0, 1, 1, 4, 4, 0],
            [0, 1, -1, 8, -8, 1],
        ],
    ),
}


def conv_program(weight, bias, pad, m, dtype=torch.float32):
    """One 3x3 conv + bias + ReLU as a C++ Program (csrc/program.h's encoding): the
    input map (border pad), the result map, the conv as Winograd F(m x m, 3x3) or, for
    m None, direct."""
    ext = load_extension()
    k, c = weight.shape[:2]
    w = pack_weight(weight, dtype)
    tensors = [w, bias.to(dtype)]
    if m is not None:
        tensors.append(ext.winograd_weights(w, m))
    ints = [2, c, pad, 0, k, 0, -1]  # maps: (channels, border, slot)
    ints += [0, 0, -1]  # input op into map 0, no affine
    ints += [1, 1, 0, 1, 0, 3, 3, 1, pad, pad, 0, 0, 1, 0, k, -1 if m is None else 2]
    return ext.Program(tensors, ints)


def error_bound(x, weight, bias, pad, m):
    """gamma_(C+15) times the absolute-value term of the module docstring, per output."""
    bt, g, at = (torch.tensor(a, dtype=torch.float64).abs() for a in MATRICES[m])
    n = m + 2
    h_out, w_out = (s + 2 * pad - 2 for s in x.shape[2:])
    tiles_h, tiles_w = math.ceil(h_out / m), math.ceil(w_out / m)
    # The map the kernels read: the conv's zero border, and zeros past the last tile.
    bottom = tiles_h * m + 2 - x.shape[2] - pad
    right = tiles_w * m + 2 - x.shape[3] - pad
    d = F.pad(x.double().abs(), (pad, right, pad, bottom))
    d = d.unfold(2, n, m).unfold(3, n, m)  # [N, C, tiles_h, tiles_w, n, n]
    v = torch.einsum("ai,nchwij,bj->nchwab", bt, d, bt)
    u = torch.einsum("ai,kcij,bj->kcab", g, weight.double().abs(), g)
    y = torch.einsum(
        "ia,nkhwab,jb->nkhwij", at, torch.einsum("nchwab,kcab->nkhwab", v, u), at
    )
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(*y.shape[:2], tiles_h * m, tiles_w * m)
    k = x.shape[1] + 15
    gamma = k * EPS / (1 - k * EPS)
    return gamma * (y[..., :h_out, :w_out] + bias.double().abs()[:, None, None])


def reference(x, weight, bias, pad):
    return F.conv2d(x.double(), weight.double(), bias.double(), padding=pad).relu()


def inputs(scale, shape, generator):
    x = torch.randn(shape, generator=generator)
    if scale == "mixed":  # every element its own magnitude, 1e-3 ... 1e3
        return x * 10 ** (6 * torch.rand(shape, generator=generator) - 3)
    return x * scale


def conv_case(shape, c_out, pad, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c_in = shape[1]
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen) / math.sqrt(9 * c_in)
    bias = torch.randn(c_out, generator=gen) * 0.1
    return inputs(scale, shape, gen), weight, bias


SCALES = [1e-3, 1.0, 1e3, "mixed"]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_error_within_bound(m, scale):
    # 35 input channels: the AVX-512 vector body and a scalar tail; 21 outputs likewise.
    x, weight, bias = conv_case((2, 35, 17, 13), 21, 1, scale)
    out = conv_program(weight, bias, 1, m).forward(x)
    err = (out.double() - reference(x, weight, bias, 1)).abs()
    bound = error_bound(x, weight, bias, 1, m)
    worst = (err / bound).max().item()
    assert worst <= 1, f"F({m}x{m}) error {worst:.3g} times the bound"


# Output sides m does not divide, smaller than a tile, and exact multiples; padding 1
# (the blocks) and 0 (Inception-v3's stem); more than one tile block (kWinogradTiles).
SHAPES = [(1, 1), (2, 3), (5, 7), (6, 6), (7, 7), (9, 11), (8, 8), (1, 9), (29, 23)]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("pad", [1, 0])
@pytest.mark.parametrize("size", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tile_edges(m, pad, size):
    h, w = (s + 2 - 2 * pad for s in size)  # the input that gives outputs of `size`
    # 12 images: at least 12 tiles, so even a 1x1 output runs Winograd (runs_winograd).
    x, weight, bias = conv_case((12, 11, h, w), 10, pad, 1.0)
    out = conv_program(weight, bias, pad, m).forward(x)
    assert out.shape == (12, 10, *size)
    err = (out.double() - reference(x, weight, bias, pad)).abs()
    assert (err <= error_bound(x, weight, bias, pad, m)).all()


def test_float64():
    x, weight, bias = conv_case((2, 9, 11, 10), 12, 1, 1.0)
    out = conv_program(weight.double(), bias, 1, 4, torch.float64).forward(x.double())
    torch.testing.assert_close(
        out, reference(x, weight, bias, 1), atol=1e-12, rtol=1e-12
    )


def test_f4_error_against_f2():
    """At unit-scale outputs (GoogLeNet's 3a branch 2 shape), F(4x4)'s float32 error is
    about 10-20x F(2x2)'s (the transforms' larger coefficients: ~15x measured), still
    inside the modules' float32 parity tolerance (1e-4)."""
    x, weight, bias = conv_case((2, 96, 28, 28), 128, 1, 1.0)
    expected = reference(x, weight, bias, 1)
    err = {
        m: (conv_program(weight, bias, 1, m).forward(x).double() - expected)
        .abs()
        .max()
        .item()
        for m in (2, 4)
    }
    assert err[2] < err[4] < min(40 * err[2], 1e-4), err


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("where", [(0, 0), (4, 5), (8, 10)], ids=str)
def test_nonfinite_input_takes_the_direct_conv(m, value, where):
    """A tile whose n x n input holds an inf or NaN is redone as the direct conv: the
    non-finite outputs are exactly the reference's (not the whole m x m block's)."""
    x, weight, bias = conv_case((2, 11, 9, 11), 10, 1, 1.0)  # 18 tiles of 4x4
    x[0, 3, where[0], where[1]] = value
    out = conv_program(weight, bias, 1, m).forward(x)
    expected = F.conv2d(x, weight, bias, padding=1).relu()
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("m", [2, 4])
def test_few_tiles_run_the_direct_conv(m):
    """A map of fewer tiles than a micro-tile's rows (6 or 12 by build) runs the direct
    conv (4x the weight bytes for a handful of GEMM rows would be slower), bitwise the
    Program without Winograd weights; one of more tiles runs Winograd (other roundings)."""
    few = 7 if m == 4 else 3  # 4 tiles of m x m
    x, weight, bias = conv_case((1, 16, few, few), 24, 1, 1.0)
    assert torch.equal(
        conv_program(weight, bias, 1, m).forward(x),
        conv_program(weight, bias, 1, None).forward(x),
    )
    x, weight, bias = conv_case((1, 16, 6 * m, 6 * m), 24, 1, 1.0)  # 36 tiles
    winograd = conv_program(weight, bias, 1, m).forward(x)
    direct = conv_program(weight, bias, 1, None).forward(x)
    assert not torch.equal(winograd, direct)
    torch.testing.assert_close(winograd, direct, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [2, 4, None], ids=["F2", "F4", "direct"])
def test_a_block_takes_a_short_remainder(m):
    """25 tiles are one block of 25 (24 + a remainder under a micro-tile's rows), a 7x7
    map's 49 pixels one block of 49 for the direct conv: every output as the reference."""
    shape = (25, 8, m, m) if m else (1, 8, 7, 7)
    x, weight, bias = conv_case(shape, 40, 1, 1.0)
    out = conv_program(weight, bias, 1, m).forward(x)
    expected = reference(x, weight, bias, 1).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [2, 4])
def test_tasks_of_several_column_chunks(m, threads):
    """A task transforms its tiles once for several 64-column chunks (all 4 of 200
    columns on one thread; two tasks of 2 on two), the last chunk partial, one tile's
    input NaN: every chunk of every tile as the reference."""
    x, weight, bias = conv_case((2, 16, 30, 30), 200, 1, 1.0)
    x[1, 5, 13, 17] = float("nan")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = conv_program(weight, bias, 1, m).forward(x)
    finally:
        torch.set_num_threads(before)
    expected = reference(x, weight, bias, 1)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    finite = ~expected.isnan()
    err = (out.double() - expected).abs()[finite]
    assert (err <= error_bound(x.nan_to_num(), weight, bias, 1, m)[finite]).all()


@pytest.mark.parametrize("m", [2, 4])
def test_weights_shape(m):
    w = torch.randn(9 * 5, 7)
    assert load_extension().winograd_weights(w, m).shape == ((m + 2) ** 2 * 5, 7)


def test_bad_tile_and_mismatched_weights_rejected():
    ext = load_extension()
    w = torch.randn(9 * 5, 7)
    with pytest.raises(RuntimeError, match="m must be 2 or 4"):
        ext.winograd_weights(w, 3)
    weight, bias = torch.randn(7, 5, 3, 3), torch.randn(7)
    tensors = [pack_weight(weight, torch.float32), bias, torch.randn(25 * 5, 7)]
    ints = [
        2,
        5,
        1,
        0,
        7,
        0,
        -1,
        0,
        0,
        -1,
        1,
        1,
        0,
        1,
        0,
        3,
        3,
        1,
        1,
        1,
        0,
        0,
        1,
        0,
        7,
        2,
    ]
    with pytest.raises(RuntimeError, match="Winograd weights"):
        ext.Program(tensors, ints)

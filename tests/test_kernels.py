"""Kernel-level checks: each launch writes exactly its own slices."""

import torch
import triton
import triton.language as tl
from conftest import DEVICE, assert_close, make_reference

from inception_fused import FusedInceptionModule
from inception_fused.kernels.conv_tile import nhwc_strides
from inception_fused.kernels.pointwise import launch_pointwise
from inception_fused.kernels.spatial import launch_spatial

CHANNELS = (20, 6, 5, 10, 3, 7, 4)  # in, c1, r3, c3, r5, c5, pool -> out 27


def setup_case():
    ref = make_reference(*CHANNELS).to(DEVICE).eval()
    folded = FusedInceptionModule.from_module(ref).eval().folded(torch.float32)
    x = torch.randn(2, 20, 6, 5, device=DEVICE)
    out = torch.full((2, 27, 6, 5), float("nan"), device=DEVICE)
    out = out.contiguous(memory_format=torch.channels_last)
    return ref, folded, x, out


def test_pointwise_writes_only_branch1_pool_and_scratch():
    ref, f, x, out = setup_case()
    scratch = torch.full((2 * 6 * 5, 8), float("nan"), device=DEVICE)
    launch_pointwise(
        x,
        f.stem_w,
        f.stem_b,
        f.pool_w,
        f.pool_b,
        out,
        scratch,
        f.c1,
    )
    with torch.no_grad():
        assert_close(out[:, :6], ref.branch1(x))
        assert_close(out[:, 23:], ref.branch4(x))
        reduced = torch.cat([ref.branch2[0](x), ref.branch3[0](x)], 1)
    assert torch.isnan(out[:, 6:23]).all(), "launch A wrote into branch 2/3 slices"
    assert_close(scratch.view(2, 6, 5, 8).permute(0, 3, 1, 2), reduced)


def test_spatial_writes_only_branches_2_and_3():
    ref, f, x, out = setup_case()
    with torch.no_grad():
        reduced = torch.cat([ref.branch2[0](x), ref.branch3[0](x)], 1)
    scratch = reduced.permute(0, 2, 3, 1).reshape(60, 8).contiguous()
    launch_spatial(
        scratch,
        f.w3,
        f.b3,
        f.w5,
        f.b5,
        out,
        f.r3,
        f.k3,
        f.k5,
        f.c1,
    )
    with torch.no_grad():
        assert_close(out[:, 6:16], ref.branch2[1](reduced[:, :5]))
        assert_close(out[:, 16:23], ref.branch3[1](reduced[:, 5:]))
    assert torch.isnan(out[:, :6]).all() and torch.isnan(out[:, 23:]).all()


@triton.jit
def _strides_kernel(out_ptr, H, W, C):
    s_n, _, s_h, s_w = nhwc_strides(H, W, C)
    tl.store(out_ptr, s_n)
    tl.store(out_ptr + 1, s_h)
    tl.store(out_ptr + 2, s_w)


def test_image_strides_are_64_bit():
    # One image of 2048 x 2048 x 1024 elements: H*W*C = 2**32 overflows int32.
    out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    _strides_kernel[(1,)](out, 2048, 2048, 1024)
    assert out.tolist() == [2**32, 2048 * 1024, 1024]

"""Kernel-level checks of train_backward against autograd through the reference module."""

import copy

import pytest
import torch
from conftest import DEVICE, assert_close, make_reference

from inception_fused.folding import BNParams, conv_blocks, pack_raw_inception
from inception_fused.kernels.train_backward import train_backward
from inception_fused.kernels.train_forward import train_forward

CHANNELS = (20, 6, 5, 10, 3, 7, 4)


def check_against_reference(x, dtype=torch.float32, batch_stats=True, **kwargs):
    ref = make_reference(*CHANNELS, **kwargs).to(DEVICE, dtype).train(batch_stats)
    ours = copy.deepcopy(ref)
    x = x.to(DEVICE, dtype)
    x_ref = x.clone().requires_grad_()
    out = ref(x_ref)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    w = pack_raw_inception(ours, dtype)
    bn = BNParams.from_module(ours, dtype)
    saved = train_forward(x, w, bn, batch_stats)
    grads = train_backward(grad_out, x, w, bn, batch_stats, saved)
    assert_close(grads.grad_x, x_ref.grad)
    for i, block in enumerate(conv_blocks(ref)):
        assert_close(grads.conv_weight[i], block.conv.weight.grad)
        if block.bn is None:
            assert_close(grads.conv_bias[i], block.conv.bias.grad)
            assert grads.bn_weight[i] is None and grads.bn_bias[i] is None
        else:
            assert grads.conv_bias[i] is None
            assert_close(grads.bn_weight[i], block.bn.weight.grad)
            assert_close(grads.bn_bias[i], block.bn.bias.grad)
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
# Without BN, batch and frozen statistics are the same computation: one "bias" case.
@pytest.mark.parametrize(
    ("batch_norm", "batch_stats"),
    [(True, True), (True, False), (False, True)],
    ids=["bn-batch", "bn-frozen", "bias"],
)
def test_matches_autograd(dtype, batch_stats, batch_norm):
    x = torch.randn(2, 20, 6, 5)
    check_against_reference(x, dtype, batch_stats, batch_norm=batch_norm)


@pytest.mark.parametrize("branch3_kernel", [1, 3, 7])
def test_branch3_kernel_sizes(branch3_kernel):
    # The data-gradient conv reads each branch's packed kernel flipped in place, from its
    # last tap: kernel sizes other than the 3x3 branch's, and equal to it.
    x = torch.randn(2, 20, 6, 5)
    check_against_reference(x, torch.float64, branch3_kernel=branch3_kernel)


@pytest.mark.parametrize(
    "make_x",
    [
        lambda: torch.relu(torch.randn(2, 20, 6, 5)),  # zeros everywhere: ties
        lambda: torch.randint(0, 2, (2, 20, 6, 5)).float(),  # ties of ones and zeros
        lambda: torch.full((2, 20, 6, 5), 0.5),  # every window one big tie
    ],
    ids=["relu", "binary", "constant"],
)
def test_max_pool_ties_go_where_pytorch_sends_them(make_x):
    # The first maximum in raster order takes the gradient, as in max_pool2d's backward.
    check_against_reference(make_x(), torch.float64)


def test_grad_out_layouts_and_skipped_input_grad():
    ref = make_reference(*CHANNELS).to(DEVICE)
    w = pack_raw_inception(ref, torch.float32)
    bn = BNParams.from_module(ref, torch.float32)
    x = torch.randn(2, 7, 5, 20, device=DEVICE).permute(0, 3, 2, 1)  # N, W, H, C memory
    saved = train_forward(x, w, bn, True)
    grad_out = torch.randn(2, 27, 5, 7, device=DEVICE)
    expected = train_backward(grad_out, x, w, bn, True, saved)
    grad_out_cl = grad_out.contiguous(memory_format=torch.channels_last)
    other = train_backward(grad_out_cl, x, w, bn, True, saved, needs_input_grad=False)
    assert other.grad_x is None
    assert expected.grad_x.shape == x.shape
    for a, b in zip(expected.conv_weight, other.conv_weight, strict=True):
        assert_close(a, b)
    # out.sum().backward() hands in a stride-0 expanded grad_out.
    ones = torch.ones(2, 27, 5, 7, device=DEVICE)
    dense = train_backward(ones, x, w, bn, True, saved)
    expanded = train_backward(
        ones[:1, :1, :1, :1].expand_as(ones), x, w, bn, True, saved
    )
    assert_close(expanded.grad_x, dense.grad_x)

"""Eval-mode parity of the fused Triton forward with the plain PyTorch reference."""

import pytest
import torch
from conftest import (
    DEVICE,
    DTYPES,
    ON_GPU,
    TF32_TOLERANCE,
    TOLERANCES,
    assert_close,
    make_reference,
)

from inception_fused import FusedInceptionModule
from inception_fused.configs import GOOGLENET_CONFIGS
from inception_fused.kernels import pointwise

# Real feature-map sizes on the GPU; small ones through the interpreter.
BATCH = 4 if ON_GPU else 2


def fused_and_reference(channels, dtype=torch.float32, **kwargs):
    ref = make_reference(*channels, **kwargs).to(DEVICE, dtype).eval()
    return FusedInceptionModule.from_module(ref).eval(), ref


def run_both(fused, ref, x):
    with torch.no_grad():
        return fused(x), ref(x)


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "bias"])
@pytest.mark.parametrize("branch3_kernel", [3, 5])
@pytest.mark.parametrize("name", list(GOOGLENET_CONFIGS))
def test_googlenet_configs(name, branch3_kernel, batch_norm):
    cfg = GOOGLENET_CONFIGS[name]
    fused, ref = fused_and_reference(
        cfg.channels, branch3_kernel=branch3_kernel, batch_norm=batch_norm
    )
    side = cfg.spatial if ON_GPU else min(cfg.spatial, 7)
    x = torch.randn(BATCH, cfg.in_channels, side, side, device=DEVICE)
    out, expected = run_both(fused, ref, x)
    assert out.shape == (BATCH, cfg.out_channels, side, side)
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(dtype):
    fused, ref = fused_and_reference((64, 16, 24, 32, 8, 16, 16), dtype)
    x = torch.randn(2, 64, 9, 9, device=DEVICE, dtype=dtype)
    out, expected = run_both(fused, ref, x)
    assert out.dtype == dtype
    if dtype in (torch.float16, torch.bfloat16):  # compare against the fp32 computation
        expected = ref.float()(x.float()).to(dtype)
    assert_close(out, expected, dtype)


@pytest.mark.skipif(not ON_GPU, reason="TF32 is a GPU precision")
def test_tf32_when_torch_allows_it(monkeypatch):
    """The suite runs fp32 in IEEE (conftest.py); with cuDNN's convs on TF32 our dots
    follow, and agree with the IEEE fp32 reference at TF32's tolerance."""
    from inception_fused.kernels.launch import input_precision

    fused, ref = fused_and_reference((192, 64, 96, 128, 16, 32, 32), torch.float32)
    x = torch.randn(4, 192, 28, 28, device=DEVICE)
    with torch.no_grad():
        expected = ref(x)
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        monkeypatch.setattr(conv, "fp32_precision", "tf32")
    else:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert input_precision(torch.float32) == "tf32"
    with torch.no_grad():
        out = fused(x)
    atol, rtol = TF32_TOLERANCE
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (3, 5, 7), (2, 1, 9), (1, 13, 1), (2, 2, 3)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("branch3_kernel", [3, 5])
@pytest.mark.parametrize("launches", ["merged", "split"])
def test_odd_shapes(shape, branch3_kernel, launches, monkeypatch):
    """Channel counts deliberately not multiples of 16: every mask path is exercised,
    with the stem and pool tiles in one launch (small M) and in two."""
    if launches == "split":
        monkeypatch.setattr(pointwise, "MERGED_ROWS", 0)
    fused, ref = fused_and_reference(
        (37, 5, 7, 11, 3, 9, 6), branch3_kernel=branch3_kernel
    )
    n, h, w = shape
    x = torch.randn(n, 37, h, w, device=DEVICE)
    out, expected = run_both(fused, ref, x)
    assert_close(out, expected)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "permuted"])
def test_input_layouts(layout):
    fused, ref = fused_and_reference((24, 8, 12, 16, 4, 8, 8))
    x = torch.randn(2, 24, 12, 10, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # non-contiguous in W
        x = torch.randn(2, 24, 12, 20, device=DEVICE)[..., ::2]
    elif layout == "permuted":  # memory order N, W, H, C
        x = torch.randn(2, 10, 12, 24, device=DEVICE).permute(0, 3, 2, 1)
    out, expected = run_both(fused, ref, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, expected)


def test_empty_batch():
    fused, _ = fused_and_reference((16, 4, 4, 8, 4, 8, 4))
    with torch.no_grad():
        out = fused(torch.randn(0, 16, 5, 5, device=DEVICE))
    assert out.shape == (0, 24, 5, 5)


@pytest.mark.skipif(not ON_GPU, reason="needs > 2**31 elements on the GPU")
def test_64bit_offsets():
    # N*H*W*C_in passes 2**31 (and so does the output's): the last images are read and
    # written beyond 32-bit element offsets. ~4.3 GB in, ~5.7 GB out (fp16).
    fused, ref = fused_and_reference((192, 64, 96, 128, 16, 32, 32), torch.float16)
    n = 14_300
    x = torch.randn(n, 192, 28, 28, device=DEVICE, dtype=torch.float16)
    assert x.numel() > 2**31
    with torch.no_grad():
        out = fused(x)
        for images in (slice(0, 3), slice(n - 3, n)):
            expected = ref.float()(x[images].float()).half()
            assert_close(out[images], expected, torch.float16)


@pytest.mark.skipif(not ON_GPU, reason="needs > 2**31 elements on the GPU")
def test_64bit_offsets_train():
    """A train step over an input past 2**31 elements: the same 13 images repeated 1100
    times, so the batch statistics are the 13 images' and each copy's output and input
    gradient equal the reference's step on them; parameter gradients are 1100 times
    theirs. fp16 kernels under autocast (fp32 parameters: their gradients would
    overflow fp16), against the fp32 reference; about 60 GB."""
    copies, small_n = 1100, 13
    ref = make_reference(192, 64, 96, 128, 16, 32, 32).to(DEVICE).train()
    fused = FusedInceptionModule.from_module(ref).train()
    small = torch.randn(small_n, 192, 28, 28, device=DEVICE).half().float()
    grad_small = torch.randn(small_n, 256, 28, 28, device=DEVICE).half()
    x = small.repeat(copies, 1, 1, 1).requires_grad_()
    assert x.numel() > 2**31
    with torch.autocast("cuda", dtype=torch.float16):
        out = fused(x)
    assert out.dtype == torch.float16
    out.backward(grad_small.repeat(copies, 1, 1, 1))
    x_ref = small.clone().requires_grad_()
    expected = ref(x_ref)
    expected.backward(grad_small.float())
    atol, rtol = TOLERANCES[torch.float16]
    last = slice(len(x) - small_n, len(x))
    for got, want in ((out[last], expected), (x.grad[last], x_ref.grad)):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.float(), want, atol=atol * scale, rtol=rtol)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
        want = q.grad * copies
        scale = float(want.abs().max())
        torch.testing.assert_close(
            p.grad.float(), want, atol=atol * scale, rtol=rtol, msg=name
        )


def test_single_channel_branches():
    # Channel counts of 1 are specialised by Triton unless the kernel opts out.
    fused, ref = fused_and_reference((8, 1, 1, 1, 1, 1, 1))
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    out, expected = run_both(fused, ref, x)
    assert_close(out, expected)

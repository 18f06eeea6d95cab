"""Shared test setup: device choice, dtype-keyed tolerances, model helpers.

Without a GPU every Triton kernel runs through the interpreter (TRITON_INTERPRET=1, set here
before any kernel module is imported, with INCEPTION_FUSED_BACKEND=triton so that modules
built without an explicit backend pick the interpreter over the C++ CPU backend); with one,
the same tests compile the kernels. tests/test_cpu_backend.py asks for backend="cpu".
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["INCEPTION_FUSED_BACKEND"] = "triton"
# On a GPU the tile tuner would time every candidate at each new test shape's first
# launch (compiles included): the suite runs the table's tiles; test_tiles.py tunes.
os.environ.setdefault("INCEPTION_FUSED_AUTOTUNE", "0")

import copy
import functools

import pytest
import torchvision

from inception_fused import InceptionModule

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def _ieee_fp32_on_gpu() -> None:
    """fp32 convs and matmuls in IEEE fp32, for the reference and our kernels alike
    (kernels/launch.py input_precision follows cuDNN's conv flag): fp32 is compared at
    the CPU tolerances. One test (test_eval_forward.py) turns TF32 on."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # torch before the fp32_precision API
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


if ON_GPU:
    _ieee_fp32_on_gpu()

# (atol, rtol) for fused vs reference, keyed by dtype: the one place tolerances live.
# 16-bit entries compare a 16-bit run against the fp32 computation of the same model.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 5e-2),
}
# fp32 with TF32 dot products (10-bit mantissa), where a test turns TF32 on.
TF32_TOLERANCE = (2e-2, 1e-2)

# Float dtypes the fused path serves on this device.
DTYPES = (
    [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    if ON_GPU
    else [torch.float32, torch.float64]
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None) -> None:
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randomize_bn(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                shape = m.num_features
                m.weight.copy_(torch.rand(shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(shape, generator=g) + 0.5)
    return module


def make_reference(*channels: int, seed: int = 0, **kwargs) -> InceptionModule:
    torch.manual_seed(seed)
    return randomize_bn(InceptionModule(*channels, **kwargs), seed)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def make_input_sensitive(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Reinitialise a GoogLeNet-like ``model`` so that its logits depend on its input.

    He-initialised convs (torchvision's std 0.01 shrinks the input's signal ~10x per
    layer), random BN affine parameters, and running statistics that match the
    activations they normalise: the average over a few train-mode forwards. Returns
    ``model`` in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(
                    m.weight, nonlinearity="relu", generator=g
                )
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64, generator=g))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


@functools.cache
def _calibrated_googlenet(seed: int, kwargs: tuple) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.googlenet(
        weights=None, init_weights=False, **dict(kwargs)
    )
    return make_input_sensitive(model, seed)


def googlenet_that_sees_input(
    seed: int = 0, num_classes: int = 10, **kwargs
) -> torch.nn.Module:
    """A torchvision GoogLeNet in eval mode whose logits depend on its input.

    See ``make_input_sensitive``; whole-network tests build from it and check
    ``assert_sees_input``.
    """
    kwargs["num_classes"] = num_classes
    return copy.deepcopy(_calibrated_googlenet(seed, tuple(sorted(kwargs.items()))))


def assert_sees_input(
    model: torch.nn.Module, x: torch.Tensor, atol: float, rtol: float
) -> None:
    """Logits of ``x`` and of another input differ by 100x the tolerance a test compares
    them at: a fused model that ignored or garbled its input would fail the comparison."""
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        a, b = (model(t.to(x)) for t in (x, other))
    a, b = (t.logits if hasattr(t, "logits") else t for t in (a, b))
    gap = (a - b).abs().max().item()
    tolerance = atol + rtol * b.abs().max().item()
    assert gap > 100 * tolerance, f"logits {gap:.2e} apart, tolerance {tolerance:.2e}"

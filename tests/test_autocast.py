"""Under torch.autocast the fused module returns the reference's dtype, values close.

CPU: the C++ backend and the Triton interpreter compute in fp32 and cast (before: float32
out where the reference gives bfloat16, and train mode on the interpreter raised). CUDA:
the kernels run in the autocast dtype (train mode: tests/test_training.py::test_autocast).
"""

import pytest
import torch
from conftest import DEVICE, ON_GPU, TOLERANCES, make_reference

from inception_fused import FusedInceptionModule

CHANNELS = (16, 4, 6, 8, 2, 4, 4)
LOW = [torch.bfloat16, torch.float16]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def pair(backend: str, train: bool):
    ref = make_reference(*CHANNELS).to(DEVICE).train(train)
    return FusedInceptionModule.from_module(ref, backend=backend), ref


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_cpu_eval(backend, dtype):
    if ON_GPU and backend == "triton":
        pytest.skip("CPU tensors take the Triton path only through the interpreter")
    fused, ref = pair(backend, train=False)
    fused, ref = fused.cpu(), ref.cpu()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        close(fused(x), ref(x))


@pytest.mark.skipif(ON_GPU, reason="the interpreter runs on CPU tensors")
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_cpu_train_step_on_the_interpreter(dtype):
    fused, ref = pair("triton", train=True)
    x = torch.randn(3, 16, 5, 5)
    outs, grads = [], []
    for m in (fused, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            out = m(xi)
        out.float().square().sum().backward()
        outs.append(out)
        grads.append([xi.grad, *(p.grad for p in m.parameters())])
    close(*outs)
    for g, g_ref in zip(*grads, strict=True):
        assert g.dtype == g_ref.dtype == torch.float32
        # The reference's gradients carry bf16/fp16 rounding of values up to ~100.
        scale = float(g_ref.abs().max())
        torch.testing.assert_close(g, g_ref, atol=1e-2 * scale, rtol=5e-2)
    for b, b_ref in zip(fused.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref.to(b.dtype), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not ON_GPU, reason="CUDA autocast needs the compiled kernels")
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_cuda_eval(dtype):
    fused, ref = pair("triton", train=False)
    x = torch.randn(4, 16, 14, 14, device=DEVICE)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        close(fused(x), ref(x))

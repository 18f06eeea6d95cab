"""Every Triton launch runs under its tensors' device (Triton launches on the current CUDA
device, so a model on cuda:1 while cuda:0 is current used the wrong GPU); and fp32 dot
precision read from torch's flags without tripping its legacy/new API check."""

import contextlib

import pytest
import torch
from conftest import DEVICE, ON_GPU, assert_close, make_reference
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import KernelInterface

from inception_fused import FusedInceptionModule, eval_launch, training
from inception_fused.kernels import launch

CHANNELS = (16, 4, 6, 8, 2, 4, 4)


@pytest.fixture
def launches(monkeypatch):
    """Per kernel launch, the device whose context it ran in (None: outside any)."""
    entered: list[torch.device] = []
    seen: list[torch.device | None] = []

    @contextlib.contextmanager
    def recording_on_device(t):
        entered.append(t.device)
        try:
            yield
        finally:
            entered.pop()

    for mod in (eval_launch, training):
        monkeypatch.setattr(mod, "on_device", recording_on_device)

    def recording(getitem):
        def recording_getitem(self, grid):
            seen.append(entered[-1] if entered else None)
            return getitem(self, grid)

        return recording_getitem

    # `kernel[grid]`: compiled kernels and, since Triton 3.4, interpreted ones go through
    # KernelInterface; older interpreters define their own __getitem__.
    for cls in (KernelInterface, InterpretedFunction):
        if "__getitem__" in cls.__dict__:
            monkeypatch.setattr(cls, "__getitem__", recording(cls.__getitem__))
    return seen


@pytest.mark.parametrize("mode", ["eval", "train", "backward"])
def test_every_launch_inside_the_inputs_device_context(launches, mode):
    ref = make_reference(*CHANNELS).to(DEVICE).train(mode != "eval")
    fused = FusedInceptionModule.from_module(ref, backend="triton")
    x = torch.randn(2, 16, 5, 5, device=DEVICE, requires_grad=mode != "eval")
    with torch.set_grad_enabled(mode != "eval"):
        out = fused(x)
    if mode == "backward":
        launches.clear()
        out.sum().backward()
    assert launches and all(d == x.device for d in launches), launches


def test_on_device_switches_to_the_tensors_gpu(monkeypatch):
    # On CPU: a tensor that claims to be on cuda:1 gets torch.cuda.device(cuda:1).
    made = []
    monkeypatch.setattr(launch.torch.cuda, "device", lambda d: made.append(d) or 1)
    fake = type("T", (), {"is_cuda": True, "device": torch.device("cuda", 1)})()
    assert launch.on_device(fake) == 1 and made == [torch.device("cuda", 1)]
    assert isinstance(launch.on_device(torch.ones(1)), contextlib.nullcontext)


@pytest.mark.skipif(
    not ON_GPU or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_second_gpu_while_first_is_current(train):
    device = torch.device("cuda", 1)
    ref = make_reference(*CHANNELS).to(device).train(train)
    fused = FusedInceptionModule.from_module(ref, backend="triton")
    x = torch.randn(4, 16, 14, 14, device=device)
    torch.cuda.set_device(0)
    outs, grads = [], []
    for m in (fused, ref):
        xi = x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            out = m(xi)
        if train:
            out.square().sum().backward()
            grads.append(xi.grad)
        outs.append(out)
    torch.cuda.synchronize(device)
    assert_close(*outs)
    if train:
        assert_close(*grads)


# ------------------------------------------------------------------ fp32 dot precision

# torch's fp32_precision flags (torch >= 2.9); older torch has only allow_tf32.
NEW_PRECISION_API = hasattr(
    getattr(torch.backends.cudnn, "conv", None), "fp32_precision"
)
PRECISION_FLAGS = (
    (
        (torch.backends, "fp32_precision"),
        (torch.backends.cudnn, "fp32_precision"),
        (torch.backends.cudnn.conv, "fp32_precision"),
        (torch.backends.cudnn.rnn, "fp32_precision"),
        (torch.backends.cuda.matmul, "fp32_precision"),
    )
    if NEW_PRECISION_API
    else ()
)


@pytest.fixture
def gpu_branch(monkeypatch):
    """input_precision as on a GPU (not interpreting); torch's flags restored after."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    saved = [getattr(obj, name) for obj, name in PRECISION_FLAGS]
    legacy = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    for (obj, name), value in zip(PRECISION_FLAGS, saved, strict=True):
        setattr(obj, name, value)
    # Setting the legacy flags last makes them readable again for later tests.
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = legacy


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({}, "tf32"),  # torch's default lets cuDNN convs use TF32
        ({"legacy_allow_tf32": False}, "ieee"),
        ({"global": "ieee"}, "tf32"),  # conv's own flag (tf32 by default) wins
        ({"global": "ieee", "conv": "none"}, "ieee"),
        ({"cudnn": "ieee", "conv": "none"}, "ieee"),
        ({"conv": "ieee"}, "ieee"),
        ({"rnn": "ieee"}, "tf32"),  # made allow_tf32 raise; conv still TF32
        ({"global": "tf32", "cudnn": "none", "conv": "none"}, "tf32"),
    ],
    ids=str,
)
def test_input_precision_from_new_and_legacy_flags(gpu_branch, flags, expected):
    if not NEW_PRECISION_API and set(flags) - {"legacy_allow_tf32"}:
        pytest.skip("this torch has no fp32_precision flags")
    targets = {
        "global": torch.backends,
        "cudnn": torch.backends.cudnn,
        "conv": getattr(torch.backends.cudnn, "conv", None),
        "rnn": getattr(torch.backends.cudnn, "rnn", None),
    }
    for key, value in flags.items():
        if key == "legacy_allow_tf32":
            torch.backends.cudnn.allow_tf32 = value
        else:
            targets[key].fp32_precision = value
    assert launch.input_precision(torch.float32) == expected
    assert launch.input_precision(torch.bfloat16) == "ieee"

"""NaN and +-inf through the Triton kernels exactly as through the reference module.

One poisoned value (NaN, +inf or -inf) at an interior, border or corner pixel of x, or in
a weight, in eval (folded BN), the train forward (batch statistics, running stats) and the
backward. The NaN and +-inf masks of every result must equal the reference's and the finite
values must be close: ReLU(NaN) = NaN, a NaN in a max-pool window gives NaN, a NaN in a
batch poisons its statistics. (The C++ backend has its own tests.)
"""

import copy

import pytest
import torch
from conftest import DEVICE, assert_close, make_reference

from inception_fused import FusedInceptionModule
from inception_fused.folding import BNParams, conv_blocks, pack_raw_inception
from inception_fused.kernels.train_backward import train_backward
from inception_fused.kernels.train_forward import train_forward

CHANNELS = (6, 4, 3, 5, 2, 3, 3)  # in, c1, r3, c3, r5, c5, pool -> out 15
SHAPE = (2, 6, 5, 6)
VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
PIXELS = {"interior": (2, 3), "border": (0, 2), "corner": (4, 5)}


def assert_same_nonfinite(
    got: torch.Tensor, want: torch.Tensor, what: str, padding_nan: bool = False
) -> None:
    """``padding_nan``: at border pixels ``got`` may be NaN where ``want`` is finite.

    A non-finite weight meets the zero padding of its conv: an implicit-GEMM or im2col
    conv (ours, and cuDNN's) multiplies it, 0 * inf = NaN, where PyTorch's CPU conv skips
    padded taps. Interior pixels must agree exactly.
    """
    if padding_nan:
        border = torch.ones_like(want, dtype=torch.bool)
        border[..., 1:-1, 1:-1] = False
        extra = border & got.isnan() & want.isfinite()
        got = torch.where(extra, want, got)
    for mask in (torch.isnan, torch.isposinf, torch.isneginf):
        g, w = mask(got), mask(want)
        assert torch.equal(g, w), (
            f"{what}: {mask.__name__} differs at {(g != w).sum().item()} of "
            f"{g.numel()} elements ({g.sum().item()} vs {w.sum().item()})"
        )
    finite = torch.isfinite(want)
    assert_close(got[finite], want[finite])


def poisoned_input(value: str, pixel: str) -> torch.Tensor:
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    h, w = PIXELS[pixel]
    x[1, 2, h, w] = VALUES[value]
    return x.to(DEVICE)


def poison_weight(module: torch.nn.Module, value: str) -> None:
    with torch.no_grad():  # one weight of the pool projection and of the 3x3 conv
        module.branch4[1].conv.weight[1, 2, 0, 0] = VALUES[value]
        module.branch2[1].conv.weight[2, 1, 1, 0] = VALUES[value]


PIXEL_CASES = [(v, p) for v in VALUES for p in PIXELS]
CASES = PIXEL_CASES + [(v, "weight") for v in VALUES]


def make_case(value: str, where: str):
    ref = make_reference(*CHANNELS).to(DEVICE)
    if where == "weight":
        poison_weight(ref, value)
        x = poisoned_input(value, "interior").nan_to_num(0.0, 0.0, 0.0)
    else:
        x = poisoned_input(value, where)
    return ref, x


@pytest.mark.parametrize("value,where", CASES)
def test_eval(value, where):
    ref, x = make_case(value, where)
    ref.eval()
    fused = FusedInceptionModule.from_module(ref, backend="triton").eval()
    with torch.no_grad():
        want = ref(x)
        got = fused(x)
    assert want.isfinite().logical_not().any(), "the case poisons nothing"
    assert_same_nonfinite(got, want, "eval output", where == "weight")


def run_both(value: str, where: str, batch_stats: bool):
    """Reference forward + backward (train or eval mode BN) and ours on a copy."""
    ref, x = make_case(value, where)
    ref.train(batch_stats)
    ours = copy.deepcopy(ref)
    x_ref = x.clone().requires_grad_()
    want = ref(x_ref)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    want.backward(grad_out.to(DEVICE))
    w = pack_raw_inception(ours, x.dtype)
    bn = BNParams.from_module(ours, x.dtype)
    saved = train_forward(x, w, bn, batch_stats)
    grads = train_backward(grad_out.to(DEVICE), x, w, bn, batch_stats, saved)
    assert_same_nonfinite(saved.out, want.detach(), "output")
    assert_same_nonfinite(grads.grad_x, x_ref.grad, "grad_x")
    for i, block in enumerate(conv_blocks(ref)):
        assert_same_nonfinite(grads.conv_weight[i], block.conv.weight.grad, f"dW {i}")
    return ref, ours, grads


@pytest.mark.parametrize("value,where", CASES)
def test_train_forward_and_backward(value, where):
    ref, ours, grads = run_both(value, where, batch_stats=True)
    for i, (mine, theirs) in enumerate(
        zip(conv_blocks(ours), conv_blocks(ref), strict=True)
    ):
        for buf in ("running_mean", "running_var"):
            assert_same_nonfinite(
                getattr(mine.bn, buf), getattr(theirs.bn, buf), f"block {i} {buf}"
            )
        assert_same_nonfinite(grads.bn_weight[i], theirs.bn.weight.grad, f"dgamma {i}")
        assert_same_nonfinite(grads.bn_bias[i], theirs.bn.bias.grad, f"dbeta {i}")


@pytest.mark.parametrize("value,where", PIXEL_CASES)
def test_frozen_bn_backward(value, where):
    """BN with running statistics (batch_stats=False): the poison stays local, so the
    ReLU mask and the max-pool's argmax decide which gradients are non-finite. (A weight
    poisons border outputs through the padding, see assert_same_nonfinite, and the
    gradients behind them: test_eval covers that case.)"""
    run_both(value, where, batch_stats=False)


@pytest.mark.parametrize("poison", ["finite", "+inf", "nan"])
def test_grad_scaler_skips_the_step_like_the_reference(poison):
    """AMP's overflow check: a non-finite input makes the GradScaler skip the optimizer
    step and shrink its scale, exactly as with the reference; a finite one steps."""
    scale = 2.0**10
    results = []
    for fused in (False, True):
        ref = make_reference(*CHANNELS).to(DEVICE).train()
        module = FusedInceptionModule.from_module(ref) if fused else ref
        x = poisoned_input(poison, "interior") if poison != "finite" else None
        if x is None:
            x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=scale)
        before = [p.detach().clone() for p in module.parameters()]
        scaler.scale(module(x.to(DEVICE)).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        stepped = any(
            not torch.equal(p, q) for p, q in zip(module.parameters(), before)
        )
        results.append((stepped, scaler.get_scale()))
    want_step = poison == "finite"
    assert results[0] == results[1] == (want_step, scale if want_step else scale / 2)

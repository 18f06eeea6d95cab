"""C++ backend, eval: NaN and +-inf come out exactly where the reference puts them.

ReLU(NaN) is NaN, a NaN in a max-pool window gives NaN, and the Winograd 3x3 path (whose
transforms would smear one inf over a whole m x m block as NaN) takes the direct conv for
tiles that hold a non-finite value, and is not used for non-finite weights.
"""

import pytest
import torch
from conftest import TOLERANCES, make_reference

from inception_fused import FusedInceptionModule

CHANNELS = (19, 8, 12, 16, 6, 9, 7)  # odd counts: vector body and scalar tail
H, W = 9, 8  # 9: Winograd's m x m tiles read padded extra rows


def pair(branch3_kernel):
    ref = make_reference(*CHANNELS, branch3_kernel=branch3_kernel).eval()
    fused = FusedInceptionModule.from_module(ref, share_parameters=True, backend="cpu")
    return fused.eval(), ref


def assert_same_nonfinite(out, expected):
    """Identical NaN / +inf / -inf masks, finite values within fp32 tolerance."""
    for name, mask in [
        ("NaN", torch.isnan),
        ("+inf", lambda t: t == float("inf")),
        ("-inf", lambda t: t == float("-inf")),
    ]:
        got, want = mask(out), mask(expected)
        assert torch.equal(got, want), (
            f"{name}: {int(got.sum())} in the fused output, {int(want.sum())} in the "
            f"reference, {int((got ^ want).sum())} positions differ"
        )
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol, equal_nan=True)


POSITIONS = {"interior": (4, 3), "border": (0, 5), "corner": (H - 1, W - 1)}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("where", list(POSITIONS))
@pytest.mark.parametrize("branch3_kernel", [3, 5])
def test_nonfinite_input_pixel(value, where, branch3_kernel):
    fused, ref = pair(branch3_kernel)
    x = torch.randn(2, CHANNELS[0], H, W)
    h, w = POSITIONS[where]
    x[1, 3, h, w] = value
    with torch.no_grad():
        out, expected = fused(x), ref(x)
    assert not torch.isfinite(expected).all()  # the case is not vacuous
    assert_same_nonfinite(out, expected)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_nonfinite_whole_channel(value):
    """Many non-finite reduce outputs: every Winograd tile falls back."""
    fused, ref = pair(3)
    x = torch.randn(1, CHANNELS[0], H, W)
    x[0, 2] = value
    with torch.no_grad():
        assert_same_nonfinite(fused(x), ref(x))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("layer", ["branch1", "branch2.0", "branch2.1", "branch4.1"])
def test_nonfinite_weight(value, layer):
    """branch2.1 is the (Winograd) 3x3 conv; branch4.1 the pool projection."""
    fused, ref = pair(3)
    with torch.no_grad():
        weight = ref.get_submodule(layer).conv.weight
        weight[1, 2, weight.shape[2] // 2, 0] = value
        x = torch.randn(2, CHANNELS[0], H, W) - 1  # negative inputs too after pooling
        out, expected = fused(x), ref(x)
    assert not torch.isfinite(expected).all()
    assert_same_nonfinite(out, expected)


def test_pool_branch_propagates_nan_to_its_window():
    """One NaN reaches all pool-projection outputs of its 3x3 window, as max_pool2d."""
    fused, _ref = pair(3)
    x = torch.randn(1, CHANNELS[0], H, W)
    x[0, 0, 4, 4] = float("nan")
    with torch.no_grad():
        out = fused(x)
    pool = out[0, -CHANNELS[-1] :]
    nan_pixels = torch.isnan(pool).any(0)
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[3:6, 3:6] = True
    assert torch.equal(nan_pixels, expected)

"""Module behaviour: construction, state dicts, folding cache, errors, train fallback."""

import pickle

import pytest
import torch
from conftest import DEVICE, assert_close, make_reference, randomize_bn
from torchvision.models.googlenet import Inception as GoogLeNetInception

from inception_fused import FusedInceptionModule, InceptionModule, eval_launch

CHANNELS = (16, 4, 6, 8, 2, 4, 4)


def pair(**kwargs):
    ref = make_reference(*CHANNELS, **kwargs).to(DEVICE).eval()
    return FusedInceptionModule.from_module(ref).eval(), ref


def fused_out(fused, x):
    with torch.no_grad():
        return fused(x)


def test_state_dict_keys_match_reference_and_torchvision():
    tv = GoogLeNetInception(*CHANNELS)
    ours = FusedInceptionModule(*CHANNELS, branch3_kernel=3)
    assert ours.state_dict().keys() == tv.state_dict().keys()
    assert ours.state_dict().keys() == InceptionModule(*CHANNELS).state_dict().keys()
    ours.load_state_dict(tv.state_dict())


def test_from_torchvision_inception():
    tv = randomize_bn(GoogLeNetInception(*CHANNELS)).to(DEVICE).eval()
    fused = FusedInceptionModule.from_module(tv)
    assert fused.branch3_kernel == 3 and not fused.training
    x = torch.randn(2, 16, 7, 7, device=DEVICE)
    with torch.no_grad():
        assert_close(fused(x), tv(x))


def test_constructor_and_load_state_dict():
    ref = make_reference(*CHANNELS).to(DEVICE).eval()
    fused = FusedInceptionModule(*CHANNELS).to(DEVICE).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(1, 16, 5, 5, device=DEVICE)
    with torch.no_grad():
        assert_close(fused(x), ref(x))


def test_from_module_copies_unless_asked_to_share():
    fused, ref = pair()
    assert fused.branch1.conv.weight is not ref.branch1.conv.weight
    shared = FusedInceptionModule.from_module(ref, share_parameters=True)
    assert shared.branch1.conv.weight is ref.branch1.conv.weight


@pytest.mark.parametrize(
    "edit",
    [
        "inplace_weight",
        "running_var",
        "load_state_dict",
        "replaced_parameter",
        "bn_eps",
        "to_double",
    ],
)
def test_fold_cache_invalidation(edit):
    fused, ref = pair()
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    fused_out(fused, x)  # fill the cache
    with torch.no_grad():
        if edit == "inplace_weight":
            for m in (fused, ref):
                m.branch2[1].conv.weight.mul_(-1.5)
        elif edit == "running_var":
            for m in (fused, ref):
                m.branch3[0].bn.running_var.fill_(3.0)
        elif edit == "load_state_dict":
            other = make_reference(*CHANNELS, seed=7).to(DEVICE)
            fused.load_state_dict(other.state_dict())
            ref.load_state_dict(other.state_dict())
        elif edit == "replaced_parameter":
            new = torch.randn_like(ref.branch4[1].bn.weight)
            ref.branch4[1].bn.weight.copy_(new)
            fused.branch4[1].bn.weight = torch.nn.Parameter(new.clone())
        elif edit == "bn_eps":  # folded in, and no version counts it
            for m in (fused, ref):
                m.branch2[0].bn.eps = 3.0
        elif edit == "to_double":
            fused.double()
            ref.double()
            x = x.double()
    assert_close(fused_out(fused, x), ref(x))


def test_fold_cache_reused_when_nothing_changes():
    fused, _ = pair()
    assert fused.folded(torch.float32) is fused.folded(torch.float32)


def test_pickle_drops_fold_cache():
    fused, _ = pair()
    fused.folded(torch.float32)
    clone = pickle.loads(pickle.dumps(fused))
    assert clone._fold_cache.value is None


@pytest.fixture
def no_kernels(monkeypatch):
    """Fail the test if any kernel is launched."""

    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(eval_launch, "launch_pointwise", boom)
    monkeypatch.setattr(eval_launch, "launch_spatial", boom)


@pytest.mark.parametrize(
    "x, error, message",
    [
        (torch.randn(2, 15, 5, 5), ValueError, "expected 16 input channels"),
        (torch.randn(16, 5, 5), ValueError, "4-D"),
        (torch.randn(1, 2, 16, 5, 5), ValueError, "4-D"),
        (torch.ones(2, 16, 5, 5, dtype=torch.int32), TypeError, "floating-point"),
        (torch.ones(2, 16, 5, 5, dtype=torch.complex64), TypeError, "floating-point"),
        (torch.randn(2, 16, 5, 5, dtype=torch.float64), TypeError, "dtype"),
        (torch.randn(2, 16, 5, 5, device="meta"), ValueError, "is on meta"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
    ids=[
        "channels",
        "rank3",
        "rank5",
        "int",
        "complex",
        "dtype_mix",
        "device_mix",
        "list",
    ],
)
def test_bad_input_raises_before_any_kernel(no_kernels, x, error, message):
    fused, _ = pair()
    if isinstance(x, torch.Tensor) and x.device.type != "meta":
        x = x.to(DEVICE)
    with pytest.raises(error, match=message):
        fused_out(fused, x)


@pytest.mark.parametrize(
    "args, kwargs", [((0, 1, 1, 1, 1, 1, 1), {}), (CHANNELS, {"branch3_kernel": 4})]
)
def test_bad_constructor_arguments(args, kwargs):
    with pytest.raises(ValueError):
        FusedInceptionModule(*args, **kwargs)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        FusedInceptionModule(*CHANNELS, backend="cuda-magic")


def test_train_mode_matches_reference_including_running_stats():
    fused, ref = pair()
    fused.train()
    ref.train()
    x = torch.randn(4, 16, 6, 6, device=DEVICE)
    assert_close(fused(x), ref(x))
    for (name, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers()):
        # Batch statistics are reduced in another order than the reference's.
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)

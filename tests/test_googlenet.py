"""Whole networks: torchvision's GoogLeNet swapped onto fused blocks, the paper builder.

Eval runs the C++ backend (backend="cpu") except in the one Triton-interpreter test; train
mode is compared through public behaviour only (outputs, gradients, BN buffers).
"""

import pytest
import torch
from conftest import (
    TOLERANCES,
    assert_close,
    assert_sees_input,
    googlenet_that_sees_input,
    make_input_sensitive,
)
from torchvision.models.googlenet import (
    BasicConv2d,
    GoogLeNet,
    GoogLeNetOutputs,
    Inception,
    InceptionAux,
)

from inception_fused import (
    AUX_LOSS_WEIGHT,
    FusedInceptionModule,
    InceptionModule,
    TorchvisionFusedInception,
    fuse_googlenet,
    googlenet,
    googlenet_loss,
    to_reference,
    unfuse_googlenet,
)
from inception_fused.configs import GOOGLENET_CONFIGS
from inception_fused.folding import conv_blocks

NUM_CLASSES = 10
INPUT = (1, 3, 64, 64)
BLOCK_NAMES = ["inception" + name for name in GOOGLENET_CONFIGS]

# Logits (|x| ~ 1 here) after ~60 layers of rounding: fp32 torchvision itself is ~2e-5
# from its fp64 twin.
NETWORK_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-8)}


def torchvision_googlenet(seed=0, **kwargs):
    """A torchvision GoogLeNet whose logits depend on its input (stand-in for weights=)."""
    return googlenet_that_sees_input(seed, NUM_CLASSES, **kwargs)


def close(actual, expected):
    atol, rtol = NETWORK_TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def sees_input(model, x):
    assert_sees_input(model, x, *NETWORK_TOLERANCE[x.dtype])


def fused_blocks(model):
    return [m for m in model.modules() if isinstance(m, FusedInceptionModule)]


def test_fuse_swaps_all_nine_blocks_in_place_sharing_tensors():
    model = torchvision_googlenet(aux_logits=True).eval()
    before = dict(model.state_dict(keep_vars=True))
    assert fuse_googlenet(model, backend="cpu") is model
    assert all(isinstance(getattr(model, n), FusedInceptionModule) for n in BLOCK_NAMES)
    assert not any(isinstance(m, Inception) for m in model.modules())
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # same tensors, not copies
    assert all(not b.training and b.branch3_kernel == 3 for b in fused_blocks(model))


def test_fuse_not_inplace_leaves_the_original_alone():
    model = torchvision_googlenet()
    fused = fuse_googlenet(model, inplace=False)
    assert fused is not model and isinstance(model.inception3a, Inception)
    assert (
        fused.inception3a.branch1.conv.weight
        is not model.inception3a.branch1.conv.weight
    )


def test_fuse_keeps_mode_dtype_and_is_idempotent():
    model = torchvision_googlenet().double().train()
    fuse_googlenet(model)
    blocks = fused_blocks(model)
    assert all(b.training for b in blocks)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert fuse_googlenet(model) is model and fused_blocks(model) == blocks


def test_fuse_without_inception_blocks_raises():
    with pytest.raises(ValueError, match="no Inception block"):
        fuse_googlenet(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))
    with pytest.raises(TypeError, match="nn.Module"):
        fuse_googlenet("googlenet")


@pytest.mark.parametrize(
    "aux_logits, transform_input, dtype",
    [
        (False, False, torch.float32),
        (False, True, torch.float32),
        (True, False, torch.float32),
        (True, True, torch.float32),
        (True, True, torch.float64),
    ],
)
def test_eval_parity_with_torchvision(aux_logits, transform_input, dtype):
    ref = torchvision_googlenet(aux_logits=aux_logits, transform_input=transform_input)
    ref = ref.to(dtype).eval()
    fused = fuse_googlenet(ref, inplace=False, backend="cpu")
    x = torch.randn(*INPUT, dtype=dtype)
    sees_input(ref, x)
    with torch.no_grad():
        expected = ref(x)
        out = fused(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, NUM_CLASSES)
    close(out, expected)


def test_pretrained_state_dict_round_trip():
    """Weights saved from torchvision load into the fused model and back, unchanged."""
    ref = torchvision_googlenet(seed=3).eval()
    fused = fuse_googlenet(torchvision_googlenet(seed=4), backend="cpu").eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(*INPUT)
    sees_input(ref, x)
    with torch.no_grad():
        close(fused(x), ref(x))
    back = torchvision_googlenet(seed=5).eval()
    back.load_state_dict(fused.state_dict())
    with torch.no_grad():
        close(back(x), ref(x))


def test_train_parity_with_torchvision():
    """Train forward and backward of every block through the Triton kernels (the C++
    backend trains with the reference math, so it would compare torchvision with itself).

    Batch 2 at 64x64 leaves 8 rows to the last BNs' batch statistics: fp32 torchvision
    itself is ~3e-3 of each gradient's largest value from its fp64 twin.
    """
    ref = torchvision_googlenet(aux_logits=True, transform_input=True)
    fused = fuse_googlenet(ref, inplace=False, backend="triton")
    x = torch.randn(2, *INPUT[1:])
    sees_input(ref, x)
    target = torch.tensor([1, 7])
    outputs = []
    for model in (ref, fused):
        torch.manual_seed(11)  # the same dropout masks for both
        out = model.train()(x)
        googlenet_loss(out, target).backward()
        outputs.append(out)
    assert isinstance(outputs[1], GoogLeNetOutputs)
    for a, e in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(a, e, atol=5e-4, rtol=1e-3)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
        atol = 1e-2 * q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=0, msg=name)
    for (name, a), b in zip(fused.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_blocks_argument_class():
    ref = torchvision_googlenet(aux_logits=True).eval()
    torch.manual_seed(0)
    model = GoogLeNet(
        num_classes=NUM_CLASSES,
        init_weights=True,
        blocks=[BasicConv2d, TorchvisionFusedInception, InceptionAux],
    ).eval()
    assert all(
        isinstance(getattr(model, n), TorchvisionFusedInception) for n in BLOCK_NAMES
    )
    model.load_state_dict(ref.state_dict())  # same keys and shapes as torchvision's
    for block in fused_blocks(model):
        block.backend = "cpu"
    x = torch.randn(*INPUT)
    sees_input(ref, x)
    with torch.no_grad():
        close(model(x), ref(x))


def test_blocks_class_signature_matches_torchvision():
    ours = TorchvisionFusedInception(
        192, 64, 96, 128, 16, 32, 32, conv_block=BasicConv2d
    )
    theirs = Inception(192, 64, 96, 128, 16, 32, 32)
    assert ours.branch3_kernel == 3
    shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes


def test_unfuse_restores_torchvision_blocks():
    ref = torchvision_googlenet(aux_logits=True).eval()
    fused = fuse_googlenet(ref, inplace=False, backend="cpu")
    plain = unfuse_googlenet(fused, inplace=False)
    assert all(type(getattr(plain, n)) is Inception for n in BLOCK_NAMES)
    assert isinstance(fused.inception3a, FusedInceptionModule)  # inplace=False
    assert unfuse_googlenet(fused) is fused and not fused_blocks(fused)
    x = torch.randn(*INPUT)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref(x), atol=0, rtol=0)
    # The unfused model is plain torchvision again: it scripts.
    scripted = torch.jit.script(plain)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x).logits, ref(x), atol=0, rtol=0)


def test_to_reference_shares_tensors_and_keeps_kernel_size():
    fused = FusedInceptionModule(16, 4, 6, 8, 2, 4, 4, branch3_kernel=5).train()
    plain = to_reference(fused)
    assert (
        type(plain) is InceptionModule and plain.branch3_kernel == 5 and plain.training
    )
    for ours, theirs in zip(conv_blocks(plain), conv_blocks(fused), strict=True):
        assert ours.conv is theirs.conv and ours.bn is theirs.bn
    nobn = to_reference(FusedInceptionModule(16, 4, 6, 8, 2, 4, 4, batch_norm=False))
    assert type(nobn) is InceptionModule and nobn.branch1.bn is None


def test_paper_googlenet_structure():
    model = googlenet(NUM_CLASSES, backend="cpu")
    blocks = [getattr(model, n) for n in BLOCK_NAMES]
    assert all(isinstance(b, FusedInceptionModule) for b in blocks)
    assert all(b.branch3[1].conv.kernel_size == (5, 5) for b in blocks)
    assert [b.out_channels for b in blocks] == [
        256,
        480,
        512,
        512,
        512,
        528,
        832,
        832,
        1024,
    ]
    assert model.aux1.conv.conv.in_channels == 512  # on 4a
    assert model.aux2.conv.conv.in_channels == 528  # on 4d
    assert model.dropout.p == 0.4 and model.aux1.dropout.p == 0.7
    assert AUX_LOSS_WEIGHT == 0.3
    assert googlenet(aux_logits=False).aux1 is None


def test_paper_googlenet_matches_its_reference_and_trains():
    """Dispatch of the paper builder's blocks (the C++ backend trains with the reference
    math): eval logits, the aux-weighted loss and every gradient match the unfused twin."""
    torch.manual_seed(0)
    model = make_input_sensitive(googlenet(NUM_CLASSES, backend="cpu"))
    plain = unfuse_googlenet(model, inplace=False)
    x = torch.randn(2, *INPUT[1:])
    sees_input(plain, x)
    with torch.no_grad():
        close(model(x), plain(x))
    target = torch.tensor([0, 3])
    for m in (model, plain):
        torch.manual_seed(1)  # the same dropout masks
        out = m.train()(x)
        assert isinstance(out, GoogLeNetOutputs)
        loss = googlenet_loss(out, target)
        main = torch.nn.functional.cross_entropy(out.logits, target)
        aux = sum(torch.nn.functional.cross_entropy(a, target) for a in out[1:])
        torch.testing.assert_close(loss, main + 0.3 * aux)
        loss.backward()
    named = list(model.named_parameters())
    for (name, p), q in zip(named, plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_whole_network_through_triton_interpreter_or_gpu(device):
    """The one whole-network run of the Triton kernels (interpreted without a GPU)."""
    ref = torchvision_googlenet().to(device).eval()
    fused = fuse_googlenet(ref, inplace=False, backend="triton")
    x = torch.randn(*INPUT, device=device)
    assert_sees_input(ref, x, *TOLERANCES[torch.float32])
    with torch.no_grad():
        assert_close(fused(x), ref(x))

"""Inception-v3 and the FID networks on the C++ backend (inception_v3.py, program.py):
every Mixed block class of every package against its own forward, whole models, an FID
value through torchmetrics, edits and train-mode updates seen by the next eval, the state
dict, pickling, and bad input."""

import copy
import functools
import io
import pickle
from unittest import mock

import pytest
import pytorch_fid.inception as pytorch_fid
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity
import torchmetrics.image.fid as torchmetrics_fid
import torchvision
from conftest import TOLERANCES
from torch import nn

from inception_fused.inception_v3 import (
    FusedLayer,
    fuse_inception_v3,
    unfuse_inception_v3,
)

TV = torchvision.models.inception
# Every Mixed block class of every package: (class, constructor args).
BLOCKS = [
    (TV.InceptionA, (192, 32)), (pytorch_fid.FIDInceptionA, (192, 32)),
    (fidelity.InceptionA, (192, 32)), (TV.InceptionB, (288,)),
    (fidelity.InceptionB, (288,)), (TV.InceptionC, (768, 128)),
    (pytorch_fid.FIDInceptionC, (768, 128)), (fidelity.InceptionC, (768, 128)),
    (TV.InceptionD, (768,)), (fidelity.InceptionD, (768,)), (TV.InceptionE, (1280,)),
    (pytorch_fid.FIDInceptionE_1, (1280,)), (pytorch_fid.FIDInceptionE_2, (2048,)),
    (fidelity.InceptionE_1, (1280,)), (fidelity.InceptionE_2, (2048,)),
]  # fmt: skip


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-initialised convs and random BN affines and statistics (torchvision's init
    makes v3's activations explode; default statistics make BN an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02, generator=g)
    return model.eval()


@functools.cache
def _state_dict(seed: int = 0) -> dict:
    """Weights for every package's network: a torchvision Inception3 with 1008 classes
    and no aux head (the FID networks' layout), its BN statistics calibrated by
    train-mode forwards so the features depend on the image."""
    torch.manual_seed(seed)
    model = randomise(TV.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                      num_classes=1008), seed)  # fmt: skip
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(seed)))
    for m in bns:
        m.momentum = 0.1
    return copy.deepcopy(model.state_dict())


def torchvision_model(**kwargs) -> nn.Module:
    model = TV.inception_v3(weights=None, aux_logits=False, init_weights=False,
                            num_classes=1008, **kwargs)  # fmt: skip
    model.load_state_dict(_state_dict())
    return model.eval()


def fid_model(**kwargs) -> nn.Module:
    with mock.patch.object(pytorch_fid, "load_state_dict_from_url", lambda *a, **k: _state_dict()):
        return pytorch_fid.InceptionV3(**kwargs).eval()


def weights_file(tmp_path) -> str:
    path = tmp_path / "inception.pt"
    torch.save(_state_dict(), path)
    return str(path)


def assert_close(actual, expected, dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    scale = expected.abs().max().item() if expected.numel() else 1.0  # grows with depth
    torch.testing.assert_close(actual, expected, atol=atol * max(scale, 1), rtol=rtol)


def no_eager_convs():
    """Fails the test if any nn.Conv2d runs eagerly (the fused path must take it all)."""

    def boom(*args, **kwargs):
        raise AssertionError("an eager Conv2d ran")

    return mock.patch.object(nn.Conv2d, "forward", boom)


def fused_and_reference(model, x, **fuse_kwargs):
    """(fused copy of model, its output, model's output) for x, no eager conv allowed in
    the fused forward."""
    fused = fuse_inception_v3(copy.deepcopy(model), **fuse_kwargs)
    with torch.no_grad():
        expected = model(x)
        with no_eager_convs():
            actual = fused(x)
    return fused, actual, expected


def make_block(cls, args, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return randomise(cls(*args), seed).to(dtype)


def _block_id(value) -> str:
    return f"{value.__module__.split('.')[0]}.{value.__name__}" if isinstance(value, type) else ""


@pytest.mark.parametrize("cls,args", BLOCKS, ids=_block_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_matches_its_package(cls, args, dtype):
    block = make_block(cls, args, dtype)
    ref = copy.deepcopy(block)
    fuse_inception_v3(block)
    assert isinstance(block, FusedLayer) and isinstance(block, cls)
    g = torch.Generator().manual_seed(1)
    for shape, channels_last in (((2, 9, 11), False), ((1, 7, 7), True), ((0, 5, 5), False)):
        n, h, w = shape
        x = torch.randn(n, args[0], h, w, generator=g, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = ref(x)
            with no_eager_convs():
                actual = block(x)
        assert actual.shape == expected.shape
        assert_close(actual, expected, dtype)


def test_fid_pooling_is_told_apart():
    """pytorch-fid's FIDInceptionE_2 is an InceptionE that max-pools: recognised by its
    exact class, and its output differs from what an average pool would give."""
    block = make_block(pytorch_fid.FIDInceptionE_2, (2048,))
    as_torchvision = copy.deepcopy(block)
    as_torchvision.__class__ = TV.InceptionE
    x = torch.randn(1, 2048, 5, 5)
    with torch.no_grad():
        tv = as_torchvision(x)
        fused = fuse_inception_v3(block)(x)
        assert not torch.allclose(fused, tv, atol=1e-3)
        assert_close(fused, pytorch_fid.FIDInceptionE_2.forward(block, x), torch.float32)


@pytest.mark.parametrize("transform_input", [False, True])
def test_torchvision_whole_network(transform_input):
    model = torchvision_model(transform_input=transform_input)
    x = torch.randn(2, 3, 75, 91, generator=torch.Generator().manual_seed(2))
    fused, actual, expected = fused_and_reference(model, x)
    with torch.no_grad():
        other = fused(torch.randn_like(x))
    assert_close(actual, expected, torch.float32)
    assert (actual - other).abs().max() > 100 * 1e-4 * expected.abs().max()  # sees x
    # One program call runs it all: no Mixed block or stem conv runs its own.
    real = FusedLayer._program
    with torch.no_grad(), mock.patch.object(FusedLayer, "_program", autospec=True, side_effect=real) as program:
        fused(x)
    assert [call.args[0] for call in program.call_args_list] == [fused]


def test_torchvision_channels_last_fp64_and_batch_edges():
    model = torchvision_model().double()
    fused = fuse_inception_v3(copy.deepcopy(model))
    for n in (0, 1):
        x = torch.randn(n, 3, 80, 75, dtype=torch.float64).to(memory_format=torch.channels_last)
        with torch.no_grad():
            assert_close(fused(x), model(x), torch.float64)


def test_pytorch_fid_every_output_block():
    model = fid_model(output_blocks=[0, 1, 2, 3], resize_input=False)
    x = torch.rand(2, 3, 83, 79, generator=torch.Generator().manual_seed(3))
    _, actual, expected = fused_and_reference(model, x)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        assert_close(a, e, torch.float32)


def test_torch_fidelity_features(tmp_path):
    features = ["64", "192", "768", "2048", "logits_unbiased"]
    model = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", features,
                                                 feature_extractor_weights_path=weights_file(tmp_path))  # fmt: skip
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    _, actual, expected = fused_and_reference(model, x)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, torch.float32)


def test_torchmetrics_fid_value(tmp_path):
    """FID through torchmetrics with the fused extractor equals the stock one (1e-4)."""
    path = weights_file(tmp_path)
    g = torch.Generator().manual_seed(5)
    real = torch.randint(0, 256, (16, 3, 48, 48), dtype=torch.uint8, generator=g)
    fake = (real.float() * 0.7 + 40).clamp(0, 255).to(torch.uint8)
    values = []
    for fuse in (False, True):
        metric = torchmetrics_fid.FrechetInceptionDistance(
            feature=2048, feature_extractor_weights_path=path
        )
        if fuse:
            fuse_inception_v3(metric)
            assert isinstance(metric.inception.Mixed_5b, FusedLayer)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        values.append(metric.compute().item())
    assert values[0] > 0
    assert abs(values[1] - values[0]) <= 1e-4 * values[0], values


def test_edits_and_train_mode_updates_are_seen():
    model = torchvision_model()
    fused = fuse_inception_v3(copy.deepcopy(model))
    x = torch.randn(1, 3, 75, 75)
    edits = [  # each alone: a conv weight and a BN statistic inside blocks, the FC
        lambda m: m.Mixed_6b.branch7x7dbl_3.conv.weight.mul_(1.5),
        lambda m: m.Conv2d_1a_3x3.bn.running_var.mul_(2.0),
        lambda m: m.fc.bias.add_(1.0),
    ]
    with torch.no_grad():
        fused(x)  # builds the program
        for edit in edits:
            for m in (model, fused):
                edit(m)
            assert_close(fused(x), model(x), torch.float32)
        # What torch.func.functional_call does: a tensor swapped into a module's dict.
        new = torch.rand_like(model.Mixed_5b.branch1x1.bn.running_var) + 0.5
        for m in (model, fused):
            m.Mixed_5b.branch1x1.bn._buffers["running_var"] = new.clone()
        assert_close(fused(x), model(x), torch.float32)
    for m in (model, fused):  # train-mode forwards move the running statistics
        m.train()
        with torch.no_grad():
            m(torch.randn(2, 3, 75, 75, generator=torch.Generator().manual_seed(6)))
        m.eval()
    with torch.no_grad():
        assert_close(fused(x), model(x), torch.float32)


def test_attribute_edits_are_seen():
    """No version counts an attribute: a BN's eps (inside a block, in the stem) and a
    conv's geometry (the stem's stride: every later map changes size) each rebuild the
    program, and the model is freed once dropped (the watch's cycle is collectable)."""
    import gc
    import weakref

    model = torchvision_model()
    fused = fuse_inception_v3(copy.deepcopy(model))
    x = torch.randn(1, 3, 75, 75)
    edits = [
        ("Mixed_6c.branch7x7_2.bn", "eps", 2.0),
        ("Conv2d_2a_3x3.bn", "eps", 2.0),
        ("Conv2d_1a_3x3.conv", "stride", (1, 1)),
    ]
    with torch.no_grad():
        fused(x)
        for path, name, value in edits:
            before = model(x)
            for m in (model, fused):
                setattr(m.get_submodule(path), name, value)
            after = model(x)
            assert not torch.allclose(before, after, atol=1e-2), f"{name} changed nothing"
            with no_eager_convs():
                assert_close(fused(x), after, torch.float32)
    gone = weakref.ref(fused)
    del fused, m
    gc.collect()
    assert gone() is None


def test_state_dict_unfuse_and_pickle():
    model = torchvision_model()
    keys = list(model.state_dict())
    fused = fuse_inception_v3(model, inplace=False)
    assert fused is not model and type(model) is TV.Inception3
    assert list(fused.state_dict()) == keys
    x = torch.randn(1, 3, 75, 75)
    with torch.no_grad():
        expected = fused(x)
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert type(loaded) is type(fused)
        assert_close(loaded(x), expected, torch.float32)
        assert_close(pickle.loads(pickle.dumps(fused))(x), expected, torch.float32)
    unfuse_inception_v3(fused)
    assert type(fused) is TV.Inception3
    assert not any(isinstance(m, FusedLayer) for m in fused.modules())


def test_reference_paths_stay():
    """Training, gradients, hooks and autocast run the package's own forward."""
    block = make_block(TV.InceptionA, (192, 32))
    fuse_inception_v3(block)
    x = torch.randn(1, 192, 7, 7, requires_grad=True)
    with no_eager_convs(), pytest.raises(AssertionError, match="eager Conv2d"):
        block(x)  # autograd needs the per-layer graph
    seen = []
    block.branch_pool.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        block(x)
    assert seen == [1]


def test_confirmed_program_skips_the_full_test(monkeypatch):
    """After a call confirmed the C++ program, the next ones skip the Python test (the
    layers' walk and the fold cache); an edit brings it back for one call."""
    model = fuse_inception_v3(torchvision_model())
    x = torch.randn(1, 3, 75, 75)
    walks = []
    layers = type(model)._layers
    monkeypatch.setattr(type(model), "_layers", lambda self: walks.append(1) or layers(self))
    with torch.no_grad():
        model(x)
        model(x)
        assert walks == [1]
        model.Mixed_7c.branch_pool.bn.running_mean.add_(0.1)
        model(x)
        model(x)
    assert walks == [1, 1]


@pytest.mark.parametrize("make", [torchvision_model, fid_model], ids=["torchvision", "pytorch-fid"])
def test_repeated_calls_build_once(make, monkeypatch):
    """Nothing a wrapper's forward does between calls looks like a change to the watch
    (an attribute written per call would refold every call)."""
    from inception_fused import inception_v3

    builds = []
    build = inception_v3._layers_program
    monkeypatch.setattr(inception_v3, "_layers_program", lambda *a: builds.append(1) or build(*a))
    model = fuse_inception_v3(make())
    x = torch.rand(1, 3, 75, 75)
    with torch.no_grad():
        model(x)
        first = len(builds)
        for _ in range(3):
            model(x)
    assert first > 0 and len(builds) == first


def test_hooks_added_after_the_program_ran_are_called():
    model = fuse_inception_v3(torchvision_model())
    x = torch.randn(1, 3, 75, 75)
    seen = []
    with torch.no_grad():
        model(x)
        model(x)  # the confirmed program's shortcut
        handle = model.Mixed_6c.branch1x1.register_forward_pre_hook(lambda *a: seen.append(1))
        model(x)
        assert seen == [1]
        handle.remove()
        model(x)
    assert seen == [1]


def test_bad_input():
    model = fuse_inception_v3(torchvision_model())
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="too small"):
            model(torch.randn(1, 3, 40, 40))
        with pytest.raises(RuntimeError):  # the reference's own error: 4 channels
            model(torch.randn(1, 4, 75, 75))
    with pytest.raises(ValueError, match="backend"):
        fuse_inception_v3(torchvision_model(), backend="cuda")


def test_nonfinite_flows_as_in_the_reference():
    block = make_block(TV.InceptionC, (768, 128), torch.float64)
    ref = copy.deepcopy(block)
    fuse_inception_v3(block)
    x = torch.randn(1, 768, 6, 6, dtype=torch.float64)
    x[0, 3, 2, 4] = float("nan")
    x[0, 9, 0, 0] = float("inf")
    with torch.no_grad():
        expected, actual = ref(x), block(x)
    torch.testing.assert_close(actual, expected, equal_nan=True, atol=1e-10, rtol=1e-8)


# --- the Triton backend (the interpreter here; CUDA where there is a GPU) -----------


@pytest.mark.parametrize("cls,args", BLOCKS, ids=_block_id)
def test_block_on_triton(cls, args):
    block = make_block(cls, args)
    ref = copy.deepcopy(block)
    fuse_inception_v3(block, backend="triton")
    x = torch.randn(2, args[0], 5, 7, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with no_eager_convs():
            actual = block(x)
        assert_close(actual, ref(x), torch.float32)


def test_torchvision_whole_network_on_triton():
    model = torchvision_model(transform_input=True)
    x = torch.randn(1, 3, 75, 77, generator=torch.Generator().manual_seed(8))
    _, actual, expected = fused_and_reference(model, x, backend="triton")
    assert_close(actual, expected, torch.float32)


def test_compile_fullgraph_runs_the_package_forward():
    block = fuse_inception_v3(make_block(TV.InceptionE, (1280,)))
    ref = copy.deepcopy(block)
    unfuse_inception_v3(ref)
    x = torch.randn(1, 1280, 5, 5)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), ref(x), torch.float32)


def test_pytorch_fid_pool_block_on_triton():
    """pytorch-fid's last block (7a, 7b, 7c, average pool: features, no FC) as Triton
    launches; the head multiplies by an identity."""
    model = fid_model(output_blocks=[3], resize_input=False)
    block = model.blocks[3]
    fuse_inception_v3(model, backend="triton")
    ref = unfuse_inception_v3(copy.deepcopy(model))
    x = torch.randn(1, 768, 5, 5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        with no_eager_convs():
            actual = block(x)
        assert actual.shape == (1, 2048, 1, 1)
        assert_close(actual, ref.blocks[3](x), torch.float32)

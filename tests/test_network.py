"""The whole-network plan (inception_fused/network.py, a csrc Program): torchvision's
GoogLeNet after fuse_googlenet runs its eval forward as one C++ call.

Parity with torchvision in every mode the plan serves, each layer of the plan on its own
(through programs with fewer stages), the plan cache's invalidation, and the
cases that must take torchvision's own forward instead.
"""

import copy
import io
import pickle
from unittest import mock

import pytest
import torch
import torchvision
from conftest import assert_sees_input, googlenet_that_sees_input

from inception_fused import fuse_googlenet, unfuse_googlenet
from inception_fused.cpu import load_extension
from inception_fused.network import BLOCK_GRAPH, FusedGoogLeNet, build_plan
from inception_fused.program import Pool, ProgramBuilder

NUM_CLASSES = 10
# Logits |x| ~ 1: fp32 torchvision itself is ~2e-5 from its fp64 twin.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-8)}


def torchvision_googlenet(seed=0, dtype=torch.float32, **kwargs):
    return googlenet_that_sees_input(seed, NUM_CLASSES, **kwargs).to(dtype)


def fused_pair(**kwargs):
    """(fused, reference), the reference checked to see its input at TOLERANCE."""
    ref = torchvision_googlenet(**kwargs)
    dtype = next(ref.parameters()).dtype
    assert_sees_input(ref, torch.randn(1, 3, 64, 64, dtype=dtype), *TOLERANCE[dtype])
    return fuse_googlenet(copy.deepcopy(ref), backend="auto"), ref


def close(actual, expected):
    atol, rtol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def eager_conv_ran(*args, **kwargs):
    raise AssertionError("an eager Conv2d ran: torchvision's forward, not the plan")


def run_plan(fused, x):
    """fused(x) under no_grad, asserting it ran the one-call plan."""
    fused._network_plan = None
    with torch.no_grad():
        out = fused(x)
    assert fused._network_plan is not None, "the plan did not run"
    return out


@pytest.mark.parametrize("transform_input", [False, True], ids=["raw", "transform"])
@pytest.mark.parametrize("aux_logits", [False, True], ids=["noaux", "aux"])
def test_parity_aux_and_transform_input(aux_logits, transform_input):
    fused, ref = fused_pair(aux_logits=aux_logits, transform_input=transform_input)
    assert type(fused) is FusedGoogLeNet
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = ref(x)
    close(run_plan(fused, x), expected)


@pytest.mark.parametrize(
    ("batch", "height", "width"),
    [(1, 224, 224), (3, 67, 75), (1, 17, 21), (0, 64, 64)],
    ids=["224", "odd", "smallest-odd", "empty"],
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_parity_sizes_and_layouts(batch, height, width, layout):
    fused, ref = fused_pair()
    x = torch.randn(batch, 3, height, 2 * width)[..., ::2]  # sliced: stride 2 in W
    if layout == "nchw":
        x = x.contiguous()
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = ref(x)
    close(run_plan(fused, x), expected)


def test_parity_float64_and_inference_mode():
    fused, ref = fused_pair(dtype=torch.float64, transform_input=True)
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    with torch.inference_mode():
        out = fused(x)
    assert (
        fused._network_plan is not None and fused._network_plan.dtype == torch.float64
    )
    with torch.no_grad():
        close(out, ref(x))


def test_nonfinite_input_as_torchvision():
    fused, ref = fused_pair()
    x = torch.randn(2, 3, 64, 64)
    x[1, 0, 10, 10] = float("nan")
    x[0, 2, 0, 63] = float("inf")
    with torch.no_grad():
        expected = ref(x)
    out = run_plan(fused, x)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4, equal_nan=True)


def test_too_small_input_raises_as_torchvision():
    fused, ref = fused_pair()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), pytest.raises(RuntimeError) as theirs:
        ref(x)
    with torch.no_grad(), pytest.raises(RuntimeError) as ours:
        fused(x)
    assert str(ours.value) == str(theirs.value)


# --- the plan cache --------------------------------------------------------------


def test_plan_is_reused_and_rebuilt_on_changes():
    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused(x)
        plan = fused._network_plan
        fused(x)
        assert fused._network_plan is plan  # nothing changed: same plan
        for model in (fused, ref):  # an in-place edit of a stem BN statistic
            model.conv2.bn.running_var.mul_(1.5)
        close(fused(x), ref(x))
        assert fused._network_plan is not plan
        plan = fused._network_plan
        for model in (fused, ref):  # a block's weight
            model.inception4c.branch2[1].conv.weight.add_(0.01)
        close(fused(x), ref(x))
        assert fused._network_plan is not plan
        for model in (fused, ref):  # the FC
            model.fc.bias.fill_(0.5)
        close(fused(x), ref(x))


def test_confirmed_plan_skips_the_fold_caches(monkeypatch):
    """A plan confirmed current runs without the blocks' fold caches being asked; a
    change makes the next call ask them again."""
    from inception_fused import network

    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    run_plan(fused, x)
    asked = []
    folded = network.blocks_folded
    monkeypatch.setattr(
        network, "blocks_folded", lambda *a: asked.append(1) or folded(*a)
    )
    with torch.no_grad():
        fused(x)
        assert asked == []
        for model in (fused, ref):
            model.inception5b.branch4[1].bn.bias.add_(0.1)
        close(fused(x), ref(x))
        assert asked == [1]
        fused(x)
        assert asked == [1]


def test_plan_sees_attribute_edits():
    """A BN's eps is folded into the plan and no version counts its edits: the watch
    sees the attribute, the folds are dropped (a stem BN's and a block's alike)."""
    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    run_plan(fused, x)
    with torch.no_grad():
        for path in ("conv2.bn", "inception4b.branch3.1.bn"):
            before = ref(x)
            for model in (fused, ref):
                model.get_submodule(path).eps = 4.0
            after = ref(x)
            assert not torch.allclose(before, after, atol=1e-2), "eps changed nothing"
            close(fused(x), after)


def test_plan_verdicts_follow_hooks_and_requires_grad():
    """The confirmed verdict is "torchvision's forward" while a hook is set (no refold
    per call), the plan again once it is removed; with gradients enabled the plan runs
    only while no parameter requires one, and a flipped flag is seen."""
    from inception_fused import network

    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    run_plan(fused, x)
    builds = []
    build = network.build_plan
    seen = []
    handle = fused.conv1.register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(network, "build_plan", lambda *a: builds.append(1) or build(*a))
        for _ in range(3):
            close(fused(x), ref(x))
        assert seen == [1, 1, 1] and builds == []
        handle.remove()
        close(fused(x), ref(x))
        assert seen == [1, 1, 1] and builds == []
    for model in (fused, ref):
        model.requires_grad_(False)
    expected = ref(x)
    with mock.patch.object(torch.nn.Conv2d, "forward", eager_conv_ran):
        close(fused(x), expected)  # gradients enabled, none required: the plan
    fused.inception5a.branch1.conv.weight.requires_grad_(True)
    out = fused(x)  # torchvision's forward: autograd needs the per-layer graph
    assert out.requires_grad
    close(out.detach(), ref(x))


def test_fused_model_is_freed():
    """The watch's owner sits in the model's __dict__ and the objects it compares refer
    back to the model: the garbage collector must see that cycle."""
    import gc
    import weakref

    fused, _ = fused_pair()
    run_plan(fused, torch.randn(1, 3, 64, 64))
    gone = weakref.ref(fused)
    del fused
    gc.collect()
    assert gone() is None


def test_plan_sees_tensors_replaced_in_the_dicts():
    """What torch.func.functional_call does: a tensor swapped straight into a module's
    _parameters / _buffers dict, no registration hook, the old one's version unmoved."""
    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    run_plan(fused, x)
    with torch.no_grad():
        for name in ("running_mean", "running_var"):
            new = torch.rand_like(ref.inception4a.branch3[0].bn._buffers[name]) + 0.5
            for model in (fused, ref):
                model.inception4a.branch3[0].bn._buffers[name] = new.clone()
        close(fused(x), ref(x))
        new = torch.randn_like(ref.conv3.conv.weight) * 0.1
        for model in (fused, ref):
            model.conv3.conv._parameters["weight"] = torch.nn.Parameter(new.clone())
        close(fused(x), ref(x))


def test_plan_refolds_a_block_switched_train_and_back():
    """A block's train()/eval() clears its fold (what changed during training may have
    bypassed every version counter, e.g. edits through .data): the network plan too."""
    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    run_plan(fused, x)
    for model in (fused, ref):
        model.inception3b.branch2[1].conv.weight.data.mul_(1.5)  # no version bump
        model.inception3b.train()
        model.inception3b.eval()
    with torch.no_grad():
        close(fused(x), ref(x))


def test_plan_rebuilt_after_load_state_dict_and_to():
    fused, _ = fused_pair(seed=1)
    other = torchvision_googlenet(seed=2)
    x = torch.randn(1, 3, 64, 64)
    run_plan(fused, x)
    fused.load_state_dict(other.state_dict())
    with torch.no_grad():
        close(fused(x), other(x))
        fused.to(torch.float64)
        other.to(torch.float64)
        close(fused(x.double()), other(x.double()))


def test_validation_after_training_uses_new_statistics():
    """Train-mode forwards update every BN's running stats: the next eval refolds."""
    fused, ref = fused_pair(aux_logits=True)
    x = torch.randn(2, 3, 64, 64)
    run_plan(fused, x)
    for model in (fused, ref):
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(
                    torch.randn(
                        4, 3, 64, 64, generator=torch.Generator().manual_seed(0)
                    )
                )
        model.eval()
    with torch.no_grad():
        close(fused(x), ref(x))


def test_optimizer_step_seen():
    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    run_plan(fused, x)
    for model in (fused, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(x).square().sum()  # grad enabled: torchvision's forward
        loss.backward()
        opt.step()
    with torch.no_grad():
        close(fused(x), ref(x))


def test_pickle_and_deepcopy_drop_the_plan():
    fused, _ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    run_plan(fused, x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for clone in (
        torch.load(buffer, weights_only=False),
        copy.deepcopy(fused),
        pickle.loads(pickle.dumps(fused)),
    ):
        assert clone._network_plan is None
        close(run_plan(clone, x), run_plan(fused, x))


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_plan_sees_optimizer_steps_on_the_stem(kind):
    """A fused optimizer writes without bumping versions: the plan must still refold."""
    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    before = run_plan(fused, x)
    # Fine-tune the stem and head only, BN kept in eval. Adam's step is ~lr times the
    # gradient's sign, which rounding flips where a gradient is ~0: the reference takes
    # the fused model's new weights rather than its own step.
    params = [fused.conv1.conv.weight, fused.fc.weight]
    opt = torch.optim.Adam(params, lr=0.1, **{kind: True})
    fused(torch.randn(2, 3, 64, 64)).square().mean().backward()
    opt.step()
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():
        expected = ref(x)
        assert not torch.allclose(expected, before)
        close(fused(x), expected)


def test_validation_after_training_epochs():
    """train -> eval -> train -> eval: BN statistics updated by training are used."""
    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    for epoch in range(2):
        for model in (fused, ref):
            model.train()
            torch.manual_seed(epoch)  # the same dropout masks
            with torch.no_grad():
                model(torch.randn(2, 3, 64, 64) + epoch)
            model.eval()
        close(run_plan(fused, x), ref(x).detach())


# --- when torchvision's forward runs instead -------------------------------------


def test_grad_enabled_takes_torchvision_forward():
    fused, _ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    out = fused(x)  # parameters require grad, grad mode on
    assert out.requires_grad and fused._network_plan is None
    out.sum().backward()
    assert fused.conv1.conv.weight.grad is not None


def test_hooks_take_torchvision_forward():
    fused, ref = fused_pair()
    seen = []
    fused.conv3.register_forward_hook(lambda *_: seen.append(1))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        close(fused(x), ref(x))
    assert seen == [1]


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_hooks_added_after_the_plan_ran_are_called(kind):
    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    run_plan(fused, x)
    seen = []
    module = fused.conv2.bn  # (a block runs fused either way: its children's hooks don't)
    handle = getattr(module, f"register_{kind}_hook")(lambda *_: seen.append(1))
    with torch.no_grad():
        close(fused(x), ref(x))
        assert seen == [1]
        handle.remove()
        fused(x)
    assert seen == [1]


def test_train_mode_returns_aux_outputs():
    fused, _ = fused_pair(aux_logits=True)
    fused.train()
    out = fused(torch.randn(2, 3, 64, 64))
    assert out.aux_logits1.shape == out.aux_logits2.shape == (2, NUM_CLASSES)


def test_triton_or_reference_blocks_keep_their_backend():
    ref = torchvision_googlenet()
    fused = fuse_googlenet(copy.deepcopy(ref), backend="reference")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        close(fused(x), ref(x))
    assert fused._network_plan is None


def test_unfuse_restores_the_torchvision_class():
    fused, _ = fused_pair()
    run_plan(fused, torch.randn(1, 3, 64, 64))
    unfuse_googlenet(fused)
    assert type(fused) is torchvision.models.GoogLeNet
    assert "_network_plan" not in fused.__dict__


def test_compiled_model_takes_the_per_block_path():
    fused, ref = fused_pair()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    with torch.no_grad():
        close(compiled(x), ref(x))
    assert fused._network_plan is None


# --- each layer of the plan, through programs with fewer stages ------------------


def stem_program(model, fc, block=False, winograd=True):
    """conv1 + maxpool1, conv2, conv3 + maxpool2, (3a + maxpool4), average pool + fc."""
    builder = ProgramBuilder(3)
    builder.conv(model.conv1)
    builder.max_pool(model.maxpool1)
    builder.conv(model.conv2)
    builder.conv(model.conv3)
    builder.max_pool(model.maxpool2)
    if block:
        builder.block(model.inception3a, BLOCK_GRAPH, Pool.MAX)
        builder.max_pool(model.maxpool4)
    builder.head(fc)
    return load_extension().Program(*builder.finish().encode(torch.float32, winograd))


@pytest.mark.parametrize("winograd", [True, False], ids=["winograd", "direct"])
@pytest.mark.parametrize("size", [(56, 56), (41, 37)], ids=["even", "odd"])
def test_stem_and_head_layers_alone(winograd, size):
    """conv1 + pool, conv2, conv3 + pool, average pool and FC without any block."""
    model = torchvision_googlenet()
    fc = torch.nn.Linear(192, 7)
    plan = stem_program(model, fc, winograd=winograd)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y = model.maxpool1(model.conv1(x))
        y = model.maxpool2(model.conv3(model.conv2(y)))
        expected = fc(y.mean((2, 3)))
        close(plan.forward(x), expected)


def test_profile_times_each_op_of_a_forward():
    """profile() runs the ops as forward() does and times each: input, conv1, pool,
    conv2, conv3, pool, the head."""
    model = torchvision_googlenet()
    plan = stem_program(model, torch.nn.Linear(192, 7))
    x = torch.randn(1, 3, 40, 40)
    op_ms = plan.profile(x)
    assert len(op_ms) == 7 and all(t >= 0 for t in op_ms)
    close(plan.forward(x), plan.forward(x.clone()))


def test_program_copies_its_weights():
    """A program keeps its own copy of what it was built from: later in-place changes
    to those tensors do not reach it (the module plans rebuild on a weight's version)."""
    model = torchvision_googlenet()
    builder = ProgramBuilder(3)
    builder.conv(model.conv1)
    tensors, ints = builder.finish().encode(torch.float32)
    plan = load_extension().Program(tensors, ints)
    x = torch.randn(1, 3, 20, 20)
    before = plan.forward(x)
    for t in tensors:
        t.fill_(float("nan"))
    torch.testing.assert_close(plan.forward(x), before, rtol=0, atol=0)


def test_one_block_with_pool_after_it():
    """A block's output, then a 2x2/2 ceil-mode pool (maxpool4) on an odd map."""
    model = fuse_googlenet(torchvision_googlenet())
    fc = torch.nn.Linear(256, 5)
    plan = stem_program(model, fc, block=True)
    x = torch.randn(2, 3, 100, 84)
    with torch.no_grad():
        y = model.maxpool2(model.conv3(model.conv2(model.maxpool1(model.conv1(x)))))
        y = model.maxpool4(unfuse_googlenet(copy.deepcopy(model)).inception3a(y))
        close(plan.forward(x), fc(y.mean((2, 3))))


def test_plan_rejects_mismatched_tensors():
    model = fuse_googlenet(torchvision_googlenet())
    plan = build_plan(model, torch.float32)
    with pytest.raises(
        RuntimeError, match="(?i)expected a 4-D float CPU tensor with 3"
    ):
        plan(torch.randn(1, 4, 64, 64))
    with pytest.raises(RuntimeError, match="the FC does not take 192"):
        stem_program(model, torch.nn.Linear(100, 3))

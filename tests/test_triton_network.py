"""The whole GoogLeNet on the Triton backend: the network plan as 25 launches, against
torchvision, under the interpreter (small images: every stage still has pixels, and
every edge mask is taken); capture and replay on a GPU.
"""

import contextlib
import copy

import pytest
import torch
from conftest import (
    DEVICE,
    ON_GPU,
    TOLERANCES,
    assert_close,
    assert_sees_input,
    googlenet_that_sees_input,
)
from torch import nn

from inception_fused import fuse_googlenet
from inception_fused.kernels.aot import captured_launches
from inception_fused.kernels.conv import pooled_size
from inception_fused.kernels.workspace import Workspace, empty, release
from inception_fused.network import (
    BLOCKS,
    TritonPlan,
    blocks_folded,
    build_triton_plan,
)

SHAPE = (2, 3, 32, 35)
EAGER_LAYERS = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.Linear,
    nn.AdaptiveAvgPool2d,
)


def pair(dtype=torch.float32, **kwargs):
    ref = googlenet_that_sees_input(**kwargs).to(DEVICE, dtype)
    fused = fuse_googlenet(copy.deepcopy(ref), backend="triton")
    return fused, ref


def refuse(self, *args, **kwargs):
    raise AssertionError(f"eager {type(self).__name__} forward")


@contextlib.contextmanager
def eager_layers_refused():
    """Any eager conv, BN, pool or linear forward raises: the plan runs them all."""
    with pytest.MonkeyPatch.context() as mp:
        for layer in EAGER_LAYERS:
            mp.setattr(layer, "forward", refuse)
        yield


# (layout, dtype, transform_input, shape): each layout once; fp64 (slow in the
# interpreter) without the transform on one of the smallest images every stage keeps.
CASES = {
    "nchw": (lambda t: t, torch.float32, True, SHAPE),
    "channels_last": (
        lambda t: t.contiguous(memory_format=torch.channels_last),
        torch.float32,
        True,
        SHAPE,
    ),
    "sliced": (
        lambda t: torch.cat([t, t], 1)[:, 1:4],
        torch.float64,
        False,
        (1, 3, 17, 19),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eval_matches_torchvision_through_the_plan(case):
    layout, dtype, transform, shape = CASES[case]
    fused, ref = pair(dtype, transform_input=transform)
    g = torch.Generator().manual_seed(1)
    x = layout(torch.randn(shape, generator=g, dtype=dtype).to(DEVICE))
    with torch.no_grad():
        expected = ref(x)
        assert_sees_input(ref, x, *TOLERANCES[dtype])
        with eager_layers_refused():
            got = fused(x)
        if case == "nchw":  # a second forward reuses the first's maps (the workspace)
            flipped = x.flip(3)
            expected_flipped = ref(flipped)
            with eager_layers_refused():
                assert_close(fused(flipped), expected_flipped)
    assert isinstance(fused._network_plan, TritonPlan)
    assert_close(got, expected)


def test_edits_are_seen_by_the_next_eval():
    """A conv weight written in place, a BN's statistics moved by a train-mode forward
    and the FC weight replaced: the next eval folds them all."""
    fused, ref = pair(transform_input=True)
    x = torch.randn(SHAPE, device=DEVICE)
    image = torch.randn(2, 64, 9, 9, device=DEVICE)
    fc = ref.fc.weight * 1.25
    with torch.no_grad():
        before = fused(x)  # builds and caches the plan
        for model in (fused, ref):
            model.conv1.conv.weight.mul_(1.1)
            model.conv3.train()(image)
            model.conv3.eval()
            model.fc.weight = nn.Parameter(fc.clone())
        with eager_layers_refused():
            got = fused(x)
        expected = ref(x)
    assert not torch.allclose(expected, before, atol=0.05)  # the edits moved the logits
    # fp32 rounding of a whole network scales with its logits.
    assert_close(got / expected.abs().max(), expected / expected.abs().max())


def meta_plan() -> TritonPlan:
    model = googlenet_that_sees_input(transform_input=True)
    fused = fuse_googlenet(model, backend="triton").to("meta")
    return build_triton_plan(fused, torch.float32, blocks_folded(fused, torch.float32))


@pytest.mark.parametrize("batch", [1, 32])
def test_launches_of_a_whole_forward(batch):
    """Recorded as a GPU would run it (meta tensors): conv1, conv2 (maxpool1 taken while
    it loads), conv3, maxpool2-4, per block the stem and pool tiles (one launch at batch
    1; two at batch 32, where 5b's M = 32 * 7 * 7 > MERGED_ROWS) and the 3x3/5x5 tiles,
    and the head: 25 launches at batch 1."""
    x = torch.empty(batch, 3, 224, 224, device="meta")
    with captured_launches() as launches:
        logits = meta_plan()(x)
    names = [launch.name for launch in launches]
    assert names[:4] == ["conv_relu_kernel"] * 3 + ["max_pool_kernel"]
    tiles = ["both"] if batch == 1 else ["stem", "pool"]
    block = [
        *(("inception_pointwise_kernel", t) for t in tiles),
        ("inception_spatial_kernel", None),
    ]
    pools = [[("max_pool_kernel", None)] if pool else [] for _, pool in BLOCKS]
    got = [(launch.name, launch.kwargs.get("TILES")) for launch in launches[4:-1]]
    assert got == [launch for after in pools for launch in (*block, *after)]
    assert names[-1] == "avg_pool_fc_kernel"
    assert len(names) == (25 if batch == 1 else 34)
    assert logits.shape == (batch, 10)


def test_a_second_forward_allocates_only_the_logits():
    """The maps live in the plan's workspace: the first forward allocates them (a map
    whose last reader has launched lends its memory to a later one), the next allocates
    nothing but the logits it returns; a new input shape gets its own workspace."""
    plan = meta_plan()
    x = torch.empty(8, 3, 224, 224, device="meta")
    allocations, maps = [], []
    empty, take = torch.empty, Workspace.take

    def counting_empty(*args, **kwargs):
        allocations.append(args)
        return empty(*args, **kwargs)

    def counting_take(self, nbytes, device):
        maps.append(nbytes)
        return take(self, nbytes, device)

    with captured_launches(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", counting_empty)
        mp.setattr(Workspace, "take", counting_take)
        plan(x)
        first = len(allocations)
        (workspace,) = plan.workspaces.values()
        assert workspace.nbytes() < sum(maps) / 2
        plan(x)
        assert len(allocations) - first == 1  # the logits
        plan(x[:1])
    assert len(plan.workspaces) == 2


def test_a_workspace_replays_its_first_run():
    """A released map lends its buffer to the next that fits; later runs get the same
    memory back in the same order, and a changed sequence is refused."""
    workspace = Workspace()

    def run(shapes):
        with workspace:
            maps = [empty(s, torch.float32, "cpu", len(s) == 4) for s in shapes]
        return [m.untyped_storage().data_ptr() for m in maps], maps

    shapes = [(2, 3, 4, 5), (2, 8, 4, 5), (1, 7)]
    with workspace:
        a = empty(shapes[0], torch.float32, "cpu", True)
        b = empty(shapes[1], torch.float32, "cpu", True)
        release(a)
        c = empty(shapes[2], torch.float32, "cpu", False)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert c.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert workspace.nbytes() == 4 * (120 + 320)
    ptrs, maps = run(shapes)
    assert ptrs == [t.untyped_storage().data_ptr() for t in (a, b, c)]
    assert [tuple(m.shape) for m in maps] == shapes
    with pytest.raises(RuntimeError, match="differs"):
        run([(2, 3, 4, 5), (2, 9, 4, 5)])
    assert workspace.nbytes() == 0  # a run that raised: the next records afresh
    run(shapes)
    with pytest.raises(RuntimeError, match="more maps"):
        run([*shapes, (1,)])


def test_pooled_size_is_max_pool2ds():
    for size in range(1, 40):
        for kernel in (2, 3):
            if size < kernel:
                continue
            pool = nn.MaxPool2d(kernel, 2, ceil_mode=True)
            assert pooled_size(size, kernel) == pool(torch.ones(1, size, size)).shape[1]


def test_fullgraph_compile_without_a_graph_break():
    """Under torch.compile the blocks run through their custom op (the plan is eager);
    the interpreter once broke the graph reading Triton's knobs."""
    fused, ref = pair(transform_input=True)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    compiled = torch.compile(fused, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_close(compiled(x), ref(x))


def test_bad_input_raises_before_any_launch():
    fused, ref = pair()
    x = torch.randn(1, 4, 32, 32, device=DEVICE)
    with captured_launches() as launches, torch.no_grad():
        with pytest.raises(RuntimeError) as got:
            fused(x)
        with pytest.raises(RuntimeError) as expected:
            ref(x)
    assert str(got.value) == str(expected.value)
    assert launches == []


@pytest.mark.skipif(not ON_GPU, reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_capture_and_replay_equal_eager(dtype):
    """No host sync and nothing cached during the capture: the replay equals the eager
    plan, and follows an input written in place."""
    fused, ref = pair(dtype, transform_input=True)
    fused = fused.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 224, 224, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager = fused(x)  # builds the plan and the folds before the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fused(x)
        graph.replay()
        torch.testing.assert_close(captured, eager, atol=0, rtol=0)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(captured, fused(x), atol=0, rtol=0)
        assert_close(captured.float(), ref.float()(x.float()), dtype)

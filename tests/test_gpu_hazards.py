"""What only a GPU would show, simulated where a CPU can: fake kernels' strides against the
real ops' in every layout, a compiled train step with channels_last weights, the kernels'
input layout on a GPU, caches and constants during a CUDA graph capture, nn.DataParallel
replicas. The capture and pool tests that need a device run on CUDA only.
"""

import dataclasses

import pytest
import torch
from conftest import DEVICE, ON_GPU, assert_close, make_reference
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map_only

from inception_fused import FusedInceptionModule, folding
from inception_fused.eval_launch import inception_eval_forward
from inception_fused.folding import conv_blocks, fold_inception, pack_raw_inception
from inception_fused.kernels.input_grad import launch_input_grad
from inception_fused.kernels.launch import (
    aligned_rows,
    kernel_layout,
    outside_graph_pools,
)
from inception_fused.training import _train_backward_op, _train_forward_op

SMALL = (12, 5, 6, 7, 3, 4, 3)  # in, c1, r3, c3, r5, c5, pool


def _layers(module):
    return conv_blocks(module)


def _op_args(module, x, batch_stats=True):
    blocks = _layers(module)
    bns = [b.bn for b in blocks]
    weights = [b.conv.weight.detach() for b in blocks]
    forward = (
        x, weights, [None] * 6, [bn.weight.detach() for bn in bns],
        [bn.bias.detach() for bn in bns], [bn.running_mean for bn in bns],
        [bn.running_var for bn in bns], [bn.num_batches_tracked for bn in bns],
        [bn.eps for bn in bns], [0.1] * 6, [False] * 6, batch_stats,
    )  # fmt: skip
    return weights, forward


def _strides(tensors):
    return [(tuple(t.shape), t.stride()) for t in tensors]


def _fake_run(op, args):
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = tree_map_only(torch.Tensor, mode.from_tensor, args)
        return op(*fake)


LAYOUTS = {
    "nchw": lambda t: t.contiguous(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "sliced": lambda t: torch.cat([t, t], 3)[..., ::2],
}


@pytest.mark.parametrize("weights_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("x_layout", list(LAYOUTS))
@pytest.mark.parametrize("k5", [3, 5])
def test_fake_kernels_strides_equal_the_real_ops(weights_layout, x_layout, k5):
    """Inductor asserts every op output's size and stride as the fake kernel gave them."""
    torch.manual_seed(0)
    module = make_reference(*SMALL, branch3_kernel=k5).to(DEVICE).train()
    module = module.to(memory_format=getattr(torch, weights_layout, None)
                       or torch.contiguous_format)  # fmt: skip
    x = LAYOUTS[x_layout](torch.randn(2, SMALL[0], 5, 4, device=DEVICE))
    weights, args = _op_args(module, x)
    real = _train_forward_op(*args)
    fake = _fake_run(_train_forward_op, args)
    assert _strides(fake) == _strides(real)
    out, z_out, z_red, stats = real
    blocks = _layers(module)
    backward_args = (
        torch.randn_like(out), x, weights, args[3], args[4], args[8], z_out, z_red,
        stats, True, True,
    )  # fmt: skip
    real_grads = _train_backward_op(*backward_args)
    fake_grads = _fake_run(_train_backward_op, backward_args)
    assert _strides(fake_grads) == _strides(real_grads)
    assert blocks[3].conv.weight.is_contiguous() == (weights_layout == "nchw")


@pytest.mark.parametrize("k5", [3, 5])
def test_compiled_train_step_with_channels_last_weights(k5):
    """model.to(memory_format=torch.channels_last), the usual AMP setup, under Inductor:
    the fake weight grads once kept the weights' strides and failed its stride assert."""
    torch.manual_seed(0)
    ref = make_reference(*SMALL, branch3_kernel=k5).to(DEVICE).train()
    ref = ref.to(memory_format=torch.channels_last)
    fused = FusedInceptionModule.from_module(ref, backend="triton")
    step = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, SMALL[0], 5, 5, device=DEVICE)
    grad_out = torch.randn(2, ref.out_channels, 5, 5, device=DEVICE)
    grads = {}
    for name, module in (("fused", step), ("ref", ref)):
        xg = x.clone().requires_grad_()
        out = module(xg)
        out.backward(grad_out)
        grads[name] = (out, xg.grad)
    for got, want in zip(grads["fused"], grads["ref"], strict=True):
        assert_close(got, want)
    for p, p_ref in zip(fused.parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, p_ref.grad)


def test_the_gpu_kernels_read_channels_last():
    """Meta tensors stand for CUDA ones (the sm90 report compiles their launches): an NCHW
    input is copied to channels_last once, a channels_last or one-pixel one is not."""
    nchw = torch.empty(2, 16, 5, 5, device="meta")
    assert kernel_layout(nchw).stride() == (400, 1, 80, 16)
    cl = nchw.contiguous(memory_format=torch.channels_last)
    assert kernel_layout(cl) is cl
    pixel = torch.empty(2, 16, 1, 1, device="meta")
    assert kernel_layout(pixel) is pixel
    cpu = torch.empty(2, 16, 5, 5)  # the interpreter reads any strides
    assert kernel_layout(cpu) is cpu


@pytest.fixture
def simulated_capture(monkeypatch):
    """torch.cuda says a capture is under way on the current stream."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_no_fold_is_cached_during_a_capture(simulated_capture):
    torch.manual_seed(0)
    ref = make_reference(*SMALL).to(DEVICE).eval()
    fused = FusedInceptionModule.from_module(ref, backend="triton").eval()
    x = torch.randn(2, SMALL[0], 4, 4, device=DEVICE)
    with torch.no_grad():
        assert_close(fused(x), ref(x))
        assert fused._fold_cache.value is None  # the graph folds on every replay
        assert_close(fused(x), ref(x))
        assert fused._fold_cache.value is None


def test_a_fold_cached_before_a_capture_is_used_in_it(monkeypatch):
    torch.manual_seed(0)
    fused = FusedInceptionModule.from_module(make_reference(*SMALL)).eval()
    folded = fused.folded(torch.float32)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert fused.folded(torch.float32) is folded


def test_no_constant_is_cached_during_a_capture(simulated_capture, monkeypatch):
    cpu = ((0.25,), (7,), torch.float32, torch.device("cpu"))
    # Only CUDA constants belong to a graph: a CPU one is cached all the same.
    assert folding.constant_vector(*cpu) is folding.constant_vector(*cpu)
    real_full = torch.full
    monkeypatch.setattr(  # a CUDA constant, built on the CPU
        torch,
        "full",
        lambda size, value, dtype, device: real_full(size, value, dtype=dtype),
    )
    cuda = ((0.5,), (3,), torch.float32, torch.device("cuda"))
    assert folding.constant_vector(*cuda) is not folding.constant_vector(*cuda)
    assert cuda not in folding._constants


def _replicate(module: torch.nn.Module, conv_scale: float) -> torch.nn.Module:
    """What nn.DataParallel's replicate makes for one device, without a GPU: every
    submodule copied by _replicate_for_data_parallel (which copies its __dict__), with
    new parameter tensors (here the conv weights scaled)."""
    copies = {m: m._replicate_for_data_parallel() for m in module.modules()}
    for m, replica in copies.items():
        for name, child in m._modules.items():
            replica._modules[name] = copies.get(child)
        for name, p in m._parameters.items():
            scaled = isinstance(m, torch.nn.Conv2d) and p is not None
            replica._parameters[name] = p * conv_scale if scaled else p
    return copies[module]


def test_data_parallel_replicas_fold_their_own_tensors():
    """A replica must neither share the original's fold cache nor read the original's
    submodules through its cached layout (they hold another device's tensors)."""
    torch.manual_seed(0)
    ref = make_reference(*SMALL).to(DEVICE).eval()
    fused = FusedInceptionModule.from_module(ref, backend="triton").eval()
    x = torch.randn(2, SMALL[0], 4, 4, device=DEVICE)
    doubled = _replicate(ref, 2.0)
    with torch.no_grad():
        assert_close(fused(x), ref(x))  # fills the original's cache and layout
        folded = fused._fold_cache.value
        replica = _replicate(fused, 2.0)
        assert_close(replica(x), doubled(x))
        assert fused._fold_cache.value is folded  # the replica folded into its own
        # The replica watches its own tensors: an in-place edit of one is seen.
        replica.branch1.conv.weight.mul_(3)
        doubled.branch1.conv.weight.mul_(3)
        assert_close(replica(x), doubled(x))
        assert_close(fused(x), ref(x))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graph capture needs a GPU")
def test_manual_capture_replays_as_eager():
    """Tuned, then captured: the replay equals an eager call, before and after the
    input changes in place."""
    from inception_fused.kernels import tiles

    torch.manual_seed(0)
    ref = make_reference(192, 64, 96, 128, 16, 32, 32).to(DEVICE).eval()
    fused = FusedInceptionModule.from_module(ref).eval().to(torch.bfloat16)
    x = torch.randn(8, 192, 28, 28, device=DEVICE, dtype=torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INCEPTION_FUSED_AUTOTUNE", "1")
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                eager = fused(x)  # tunes and folds before the capture
            torch.cuda.current_stream().wait_stream(side)
            assert tiles.tuned()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = fused(x)
            graph.replay()
            torch.testing.assert_close(captured, eager, atol=0, rtol=0)
            x.mul_(-1)
            graph.replay()
            torch.testing.assert_close(captured, fused(x), atol=0, rtol=0)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graph pools need a GPU")
def test_cached_constants_and_tuning_buffers_stay_out_of_a_graph_pool():
    """While the thread's allocations go to a graph's private pool (as in cudagraph
    trees' warmup), a cached constant and what the tuner allocates (its flush buffer,
    here a stand-in) come from the ordinary pool."""
    device = torch.cuda.current_device()
    pool = torch.cuda.graph_pool_handle()
    torch._C._cuda_beginAllocateCurrentThreadToPool(device, pool)
    try:
        vector = folding.constant_vector((0.75,), (123,), torch.float32, DEVICE)
        buffer = outside_graph_pools(
            DEVICE, lambda: torch.empty(1 << 20, device=DEVICE)
        )
        in_pool = torch.empty(1 << 20, device=DEVICE)
    finally:
        torch._C._cuda_endAllocateToPool(device, pool)
        torch._C._cuda_releasePool(device, pool)

    def pool_of(t):
        segment = next(
            s for s in torch.cuda.memory_snapshot()
            if s["address"] <= t.data_ptr() < s["address"] + s["total_size"]
        )  # fmt: skip
        return tuple(segment["segment_pool_id"])

    assert pool_of(in_pool) == tuple(pool)  # the routing works as simulated
    assert pool_of(vector) != tuple(pool)
    assert pool_of(buffer) != tuple(pool)


def test_kernels_read_stem_weights_by_their_padded_row_stride():
    """On a GPU the folded stem weights' rows are padded to 16 elements (aligned vector
    loads); the interpreter, handed such a fold, must give the same output, eval and
    train's input gradient."""
    torch.manual_seed(0)
    ref = make_reference(*SMALL).to(DEVICE).eval()
    x = torch.randn(2, SMALL[0], 4, 5, device=DEVICE)
    f = fold_inception(ref, torch.float32)
    padded = aligned_rows(*f.stem_w.shape, f.stem_w.dtype, f.stem_w.device)
    assert padded.stride(0) == 16 != f.stem_w.shape[1]
    f_padded = dataclasses.replace(f, stem_w=padded.copy_(f.stem_w))
    with torch.no_grad():
        assert_close(inception_eval_forward(x, f_padded), ref(x))
    w = pack_raw_inception(ref, torch.float32)
    w_padded = dataclasses.replace(
        w, stem_w=aligned_rows(*w.stem_w.shape, w.stem_w.dtype, DEVICE).copy_(w.stem_w)
    )
    g = aligned_rows(x.shape[0] * 20, 50, torch.float32, DEVICE).normal_()
    assert_close(launch_input_grad(g, w_padded, x), launch_input_grad(g, w, x))

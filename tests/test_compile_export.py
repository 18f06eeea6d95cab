"""torch.compile, torch.export and torch.library.opcheck on the custom op; TorchScript error.

Without a GPU the models run the C++ backend (the Triton interpreter cannot run inside an
Inductor graph); with one, the compiled Triton kernels. opcheck covers both backends.
"""

import pytest
import torch
from conftest import (
    DEVICE,
    ON_GPU,
    TOLERANCES,
    assert_close,
    assert_sees_input,
    googlenet_that_sees_input,
    make_reference,
)

from inception_fused import (
    FusedInceptionModule,
    fuse_googlenet,
    to_reference,
    unfuse_googlenet,
)
from inception_fused.eval_op import eval_forward

BACKEND = "triton" if ON_GPU else "cpu"
CHANNELS = (16, 4, 6, 8, 2, 4, 4)
EVAL_OP = torch.ops.inception_fused.eval_forward.default


def fused_googlenet(aux_logits=False):
    model = googlenet_that_sees_input(aux_logits=aux_logits)
    return fuse_googlenet(model, backend=BACKEND).to(DEVICE)


def small_net(seed=0):
    """Two fused blocks with a pool between them: quick to compile with Inductor."""
    first = FusedInceptionModule.from_module(make_reference(*CHANNELS, seed=seed))
    second = FusedInceptionModule.from_module(
        make_reference(20, 8, 4, 8, 4, 4, 4, branch3_kernel=3, seed=seed + 1)
    )
    for block in (first, second):
        block.backend = BACKEND
    return torch.nn.Sequential(first, torch.nn.MaxPool2d(2), second).to(DEVICE)


def op_count(graph):
    return sum(node.target == EVAL_OP for node in graph.nodes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["triton"] if ON_GPU else ["triton", "cpu"])
def test_opcheck(backend, dtype):
    block = FusedInceptionModule.from_module(make_reference(*CHANNELS)).to(
        DEVICE, dtype
    )
    f = block.eval().folded(dtype)
    x = torch.randn(2, CHANNELS[0], 5, 3, device=DEVICE, dtype=dtype)
    args = (x, f.stem_w, f.stem_b, f.pool_w, f.pool_b, f.w3, f.b3, f.w5, f.b5)
    torch.library.opcheck(EVAL_OP, (*args, f.c1, f.r3, f.k3, f.k5, backend))


def test_op_rejects_unknown_backend():
    block = FusedInceptionModule(*CHANNELS).eval()
    with pytest.raises(ValueError, match="backend must be one of"):
        eval_forward(torch.randn(1, 16, 3, 3), block.folded(torch.float32), "cuda")


def test_googlenet_eval_has_no_graph_break():
    model = fused_googlenet().eval()
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert sum(op_count(g.graph) for g in explained.graphs) == 9


def test_compile_inductor_eval_fullgraph():
    net = small_net().eval()
    # The plain-PyTorch twin, sharing net's tensors: edits below reach both.
    ref = torch.nn.Sequential(to_reference(net[0]), net[1], to_reference(net[2]))
    x = torch.randn(2, CHANNELS[0], 6, 6, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), ref(x))
        # The fold is traced into the graph, so parameter edits show up without a
        # recompile or a stale cache.
        net[2].branch2[1].bn.running_var.mul_(4.0)
        net[0].branch1.conv.weight.neg_()
        assert_close(compiled(x), ref(x))


def test_compile_googlenet_train_mode_fullgraph():
    """Train mode through Dynamo and AOT autograd (Inductor's codegen is the eval test's),
    against unfused torchvision. Without a GPU the C++ backend trains with the reference
    math, so there this checks tracing and dispatch; with one, the Triton kernels."""
    model = fused_googlenet(aux_logits=True).train()
    ref = unfuse_googlenet(model, inplace=False)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outputs = []
    for m in (compiled, ref):
        torch.manual_seed(1)  # the same dropout masks
        out = m(x)
        sum(o.square().mean() for o in out).backward()
        outputs.append(out)
    for a, e in zip(*outputs, strict=True):
        assert_close(a, e)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        atol = 1e-3 * q.grad.abs().max().item()  # batch statistics over few rows
        torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=0, msg=name)
    for a, b in zip(model.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_export_contains_the_op():
    model = fused_googlenet().eval()
    ref = unfuse_googlenet(model, inplace=False)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    assert_sees_input(ref, x, *TOLERANCES[torch.float32])
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    assert op_count(exported.graph) == 9
    assert op_count(exported.run_decompositions().graph) == 9  # never decomposed
    x3 = torch.randn(3, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        assert_close(exported.module()(x3), ref(x3))


def test_jit_script_raises_clearly():
    with pytest.raises(RuntimeError, match="does not support torch.jit.script"):
        torch.jit.script(fused_googlenet())

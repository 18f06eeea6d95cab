"""ONNX export: fused blocks and a fused GoogLeNet run in ONNX Runtime as the reference.

Exports go through ``torch.onnx.export(..., dynamo=True)`` exactly as users call it; the
graphs must hold standard ONNX operators only (no ``inception_fused`` domain) and ONNX
Runtime's outputs must match the plain PyTorch reference. Exports take seconds each (a
whole GoogLeNet about a minute on 2 busy cores), so the cases are few and chosen.
"""

import collections
import copy

import pytest
import torch
from conftest import (
    TOLERANCES,
    assert_close,
    assert_sees_input,
    googlenet_that_sees_input,
    make_reference,
)

from inception_fused import FusedInceptionModule, fuse_googlenet

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from inception_fused.onnx_export import ONNX_TRANSLATIONS

CHANNELS = (16, 4, 6, 8, 2, 4, 4)
# What a fused block exports to: BN folded into the Conv weights.
BLOCK_OPS = {"Conv", "Relu", "MaxPool", "Concat"}


def op_counts(program) -> collections.Counter:
    return collections.Counter(n.op_type for n in program.model_proto.graph.node)


def run_onnx(program, x: torch.Tensor) -> torch.Tensor:
    """Run the exported model in ONNX Runtime (CPU) on x."""
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (name,) = (i.name for i in session.get_inputs())
    return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])


def assert_standard_block_graph(program) -> None:
    ops = op_counts(program)
    domains = {n.domain for n in program.model_proto.graph.node}
    assert domains <= {""}, f"non-standard ONNX domains {domains}"
    assert set(ops) <= BLOCK_OPS, ops
    assert ops["Conv"] == 6 and ops["Relu"] == 6, ops


def block_pair(kernel: int, batch_norm: bool):
    ref = make_reference(*CHANNELS, branch3_kernel=kernel, batch_norm=batch_norm)
    return ref.eval(), FusedInceptionModule.from_module(ref).eval()


@pytest.mark.parametrize(
    "kernel, batch_norm", [(5, True), (3, False)], ids=["k5-bn", "k3-nobn"]
)
def test_block_exports_standard_ops(kernel, batch_norm):
    """The plain call, no extra argument; parameters requiring grad (the default)."""
    ref, fused = block_pair(kernel, batch_norm)
    x = torch.randn(2, CHANNELS[0], 5, 7)
    program = torch.onnx.export(fused, (x,), dynamo=True, verbose=False)
    assert_standard_block_graph(program)
    with torch.no_grad():
        expected = ref(x)
    assert_close(run_onnx(program, x), expected)


def test_exported_program_with_translation_table():
    """A graph that holds the custom op converts with ONNX_TRANSLATIONS."""
    ref, fused = block_pair(5, True)
    x = torch.randn(2, CHANNELS[0], 6, 4)
    with torch.no_grad():
        program = torch.export.export(fused, (x,))
    assert any("inception_fused" in str(n.target) for n in program.graph.nodes)
    onnx_program = torch.onnx.export(
        program, custom_translation_table=ONNX_TRANSLATIONS, dynamo=True, verbose=False
    )
    assert_standard_block_graph(onnx_program)
    with torch.no_grad():
        assert_close(run_onnx(onnx_program, x), ref(x))


@pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning"
)
def test_torchscript_exporter(tmp_path):
    """The deprecated dynamo=False exporter (jit tracing) records standard ops too."""
    ref, fused = block_pair(5, True)
    x = torch.randn(1, CHANNELS[0], 3, 6)
    path = tmp_path / "block.onnx"
    torch.onnx.export(fused, (x,), path, dynamo=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ops <= BLOCK_OPS | {"Constant"}, ops
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert_close(torch.from_numpy(out), ref(x))


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
def test_train_mode_exports_as_the_reference():
    """Train mode records the reference forward: the same ONNX model as unfused."""
    ref, fused = block_pair(3, True)
    x = torch.randn(3, CHANNELS[0], 4, 4)
    programs = [
        torch.onnx.export(m.train(), (x,), dynamo=True, verbose=False)
        for m in (ref, fused)
    ]
    assert op_counts(programs[0]) == op_counts(programs[1])
    torch.testing.assert_close(*(run_onnx(p, x) for p in programs), atol=0, rtol=0)


def test_fused_googlenet_dynamic_batch():
    ref = googlenet_that_sees_input()
    assert_sees_input(ref, torch.randn(1, 3, 64, 64), *TOLERANCES[torch.float32])
    model = fuse_googlenet(copy.deepcopy(ref))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(
        model,
        (torch.randn(2, 3, 64, 64),),
        dynamic_shapes={"x": {0: batch}},
        dynamo=True,
        verbose=False,
    )
    ops = op_counts(program)
    # torchvision's stem: 3 convs; each block: 6, BN folded in.
    assert ops["Conv"] == 3 + 6 * 9, ops
    assert "BatchNormalization" not in ops and "inception_fused" not in str(ops)
    for n in (1, 3):
        x = torch.randn(n, 3, 64, 64)
        with torch.no_grad():
            assert_close(run_onnx(program, x), ref(x))

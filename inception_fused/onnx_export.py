"""ONNX export: a fused Inception block as standard ONNX operators.

ONNX runtimes know nothing of our kernels, so an exported block is written as the ops it
computes: ``Conv`` (BN folded into its weights), ``Relu``, ``MaxPool``, ``Concat``.

Two routes produce it:

* ``torch.onnx.export(model, (x,), dynamo=True)`` needs no argument: under ONNX export
  :meth:`FusedInceptionModule.forward` records the reference forward instead of the custom
  op, and the exporter folds each BatchNorm into its conv's weights as it does for
  torchvision's own GoogLeNet (the exporter builds its translation registry afresh on
  every call and offers no public way to add to it, so the module, not a registry entry,
  makes the plain call work). The graph is then the unfused model's. Not the kernels'
  one stacked 1x1 conv + ``Split``: measured slower in ONNX Runtime, whose blocked
  (NCHWc) conv layout a ``Split`` interrupts with layout reorders.
* A graph that already holds ``inception_fused::eval_forward`` (a
  ``torch.export.ExportedProgram``) converts with
  ``torch.onnx.export(program, custom_translation_table=ONNX_TRANSLATIONS)``:
  :func:`onnx_eval_forward` unpacks the folded weights into the same per-branch convs.
  Their unpacking (and, in such a graph, the fold) is a constant subgraph that
  onnxscript's optimizer folds for small tensors and ONNX Runtime folds when it loads
  the model.
"""

from __future__ import annotations

import torch

from . import eval_op  # noqa: F401  registers torch.ops.inception_fused


def exporting_onnx() -> bool:
    """True while torch.onnx.export traces the model (dynamo or TorchScript exporter)."""
    # is_in_onnx_export costs ~4 us; the tracing checks ~0.3 us and rule out eager calls.
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    return tracing and torch.onnx.is_in_onnx_export()


def _conv_relu(inp, packed, bias, kernel: int):
    from onnxscript import opset18 as op  # onnxscript: only needed to export

    # Packed [k*k*C_in, C_out], rows (tap, input channel) -> [C_out, k, k, C_in] -> OIHW.
    rows = op.Reshape(
        op.Transpose(packed, perm=[1, 0]),
        op.Constant(value_ints=[0, kernel, kernel, -1]),
    )
    weight = op.Transpose(rows, perm=[0, 3, 1, 2])
    pad = kernel // 2
    conv = op.Conv(
        inp,
        weight,
        op.CastLike(bias, inp),
        kernel_shape=[kernel, kernel],
        pads=[pad, pad, pad, pad],
    )
    return op.Relu(conv)


# Unannotated parameters are ONNX tensor inputs, ``int``/``str`` ones attributes: the
# exporter reads the signature to bind the op's arguments.
def onnx_eval_forward(
    x,
    stem_w,
    stem_b,
    pool_w,
    pool_b,
    w3,
    b3,
    w5,
    b5,
    c1: int,
    r3: int,
    k3: int,
    k5: int,
    backend: str = "cpu",
    winograd_w3=None,
    winograd_w5=None,
):
    """ONNX translation of ``inception_fused::eval_forward`` (the backend is ignored)."""
    from onnxscript import opset18 as op

    def stem_conv(start: int, end: int):  # stem_w's columns: the three 1x1 convs
        def part(t, axis):
            def ints(*v):
                return op.Constant(value_ints=list(v))

            return op.Slice(t, ints(start), ints(end), ints(axis))

        return _conv_relu(x, part(stem_w, 1), part(stem_b, 0), 1)

    pooled, _ = op.MaxPool(x, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    return op.Concat(
        stem_conv(0, c1),
        _conv_relu(stem_conv(c1, c1 + r3), w3, b3, k3),
        _conv_relu(stem_conv(c1 + r3, _TO_END), w5, b5, k5),
        _conv_relu(pooled, pool_w, pool_b, 1),
        axis=1,
    )


_TO_END = 2**62  # a Slice end past any channel count

# torch.onnx.export(program, custom_translation_table=ONNX_TRANSLATIONS)
ONNX_TRANSLATIONS = {torch.ops.inception_fused.eval_forward.default: onnx_eval_forward}

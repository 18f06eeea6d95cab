"""ONNX export: a fused Inception block as standard ONNX operators.

ONNX runtimes know nothing of our kernels, so an exported block is written as the ops it
computes, over the BN-folded weights: one 1x1 ``Conv`` for the three 1x1 convs that read
x (their weights stacked, as in the kernels' stem GEMM), ``Relu``, ``Split``, the 3x3 and
5x5 ``Conv`` + ``Relu``, ``MaxPool`` 3x3/s1/p1 → 1x1 ``Conv`` + ``Relu``, ``Concat``. No
``BatchNormalization`` is left to run.

Two routes produce it:

* ``torch.onnx.export(model, (x,), dynamo=True)`` needs no argument:
  :meth:`FusedInceptionModule.forward` sees ``torch.onnx.is_in_onnx_export()`` and
  records :func:`standard_eval_forward` instead of the custom op. (The exporter builds
  its translation registry afresh on every call and offers no public way to add to it,
  so the module, not a registry entry, is what makes the plain call work.)
* A graph that already holds ``inception_fused::eval_forward`` (a
  ``torch.export.ExportedProgram``) converts with
  ``torch.onnx.export(program, custom_translation_table=ONNX_TRANSLATIONS)``.

The fold itself (BN scale into the conv weight) is part of the traced graph, over the
model's parameters: onnxscript's optimizer folds it into constants for small tensors and
ONNX Runtime does so for the rest when it loads the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import eval_op  # noqa: F401  registers torch.ops.inception_fused
from .folding import FoldedInception, conv_blocks, fold_inception
from .reference import InceptionModule

if TYPE_CHECKING:
    from .module import FusedInceptionModule


def exporting_onnx() -> bool:
    """True while torch.onnx.export traces the model (dynamo or TorchScript exporter)."""
    # is_in_onnx_export costs ~4 us; the tracing checks ~0.3 us and rule out eager calls.
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    return tracing and torch.onnx.is_in_onnx_export()


def onnx_forward(module: FusedInceptionModule, x: torch.Tensor) -> torch.Tensor:
    """What a fused block records under ONNX export: standard ops only.

    Eval mode with running statistics (the deployment case) records
    :func:`standard_eval_forward` over the fold; train mode, or BN without running
    statistics, records the reference forward (batch statistics), as the unfused model
    would.
    """
    no_running_stats = any(
        b.bn is not None and b.bn.running_mean is None for b in conv_blocks(module)
    )
    if module.training or no_running_stats:
        return InceptionModule.forward(module, x)
    return standard_eval_forward(x, fold_inception(module, x.dtype))


def conv_weight(packed: torch.Tensor, kernel: int) -> torch.Tensor:
    """Implicit-GEMM matrix [k*k*C_in, C_out] -> conv weight [C_out, C_in, k, k]."""
    return packed.reshape(kernel, kernel, -1, packed.shape[1]).permute(3, 2, 0, 1)


def standard_eval_forward(x: torch.Tensor, f: FoldedInception) -> torch.Tensor:
    """The eval forward in standard PyTorch ops over folded weights (what ONNX records)."""
    r5 = f.stem_w.shape[1] - f.c1 - f.r3

    def conv_relu(inp, packed, bias, kernel):  # fold_inception's bias may be wider
        weight = conv_weight(packed, kernel)
        return F.relu(F.conv2d(inp, weight, bias.to(inp.dtype), padding=kernel // 2))

    stem = conv_relu(x, f.stem_w, f.stem_b, 1)
    branch1, red3, red5 = stem.split([f.c1, f.r3, r5], 1)
    pooled = F.max_pool2d(x, 3, stride=1, padding=1)
    return torch.cat(
        [
            branch1,
            conv_relu(red3, f.w3, f.b3, f.k3),
            conv_relu(red5, f.w5, f.b5, f.k5),
            conv_relu(pooled, f.pool_w, f.pool_b, 1),
        ],
        1,
    )


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

    stem = _conv_relu(x, stem_w, stem_b, 1)

    def channels(start: int, end: int):
        return op.Slice(
            stem,
            op.Constant(value_ints=[start]),
            op.Constant(value_ints=[end]),
            op.Constant(value_ints=[1]),
        )

    pooled, _ = op.MaxPool(x, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    return op.Concat(
        channels(0, c1),
        _conv_relu(channels(c1, c1 + r3), w3, b3, k3),
        _conv_relu(channels(c1 + r3, _TO_END), w5, b5, k5),
        _conv_relu(pooled, pool_w, pool_b, 1),
        axis=1,
    )


_TO_END = 2**62  # a Slice end past any channel count

# torch.onnx.export(program, custom_translation_table=ONNX_TRANSLATIONS)
ONNX_TRANSLATIONS = {torch.ops.inception_fused.eval_forward.default: onnx_eval_forward}

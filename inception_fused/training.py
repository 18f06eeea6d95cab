"""Autograd entry point for train mode and eval-with-gradients: torch.library custom ops.

``inception_fused::train_forward`` runs the train forward kernels (batch statistics and
running-stat update, or frozen running statistics) and returns the output together with
what the backward needs; ``inception_fused::train_backward`` runs the backward kernels.
Both take flat tensors (so torch.compile sees them without a graph break) and rebuild the
packed weights and BN vectors inside. Eager calls (eval_op.unobserved) run the ops' bodies
without the dispatcher, and the backward reuses the forward's packed weights. The module
calls :func:`fused_train_forward`.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, NamedTuple

import torch
from torch import nn

from .eval_op import unobserved
from .fold_cache import structure_version
from .folding import (
    BNParams,
    FoldedInception,
    accumulator_dtype,
    constant_vector,
    conv_blocks,
    pack_stem,
    pack_weight,
)
from .kernels.launch import empty_channels_last, kernel_layout, on_device
from .kernels.train_backward import FlatGrads, split_grads, train_backward_flat
from .kernels.train_forward import TrainForward, train_forward
from .reference import InceptionModule

Tensor = torch.Tensor
CPU_INTERPRETER_DTYPES = (torch.float32, torch.float64)


def _pack(
    conv_weights: list[Tensor], conv_biases: list[Tensor | None], dtype: torch.dtype
) -> FoldedInception:
    """FoldedInception with raw weights (as pack_raw_inception) from flat tensors: four
    copies (the three stem convs in one), and shared zero vectors for absent biases."""
    acc = accumulator_dtype(dtype)
    device = conv_weights[0].device
    biases = [
        constant_vector((0.0,), (w.shape[0],), acc, device)
        if b is None
        else (b if b.dtype == acc else b.to(acc))
        for w, b in zip(conv_weights, conv_biases, strict=True)
    ]
    if conv_biases[0] is None and conv_biases[1] is None and conv_biases[2] is None:
        c_stem = sum(w.shape[0] for w in conv_weights[:3])
        stem_b = constant_vector((0.0,), (c_stem,), acc, device)
    else:
        stem_b = torch.cat(biases[:3])
    return FoldedInception(
        stem_w=pack_stem(conv_weights[:3], dtype),
        stem_b=stem_b,
        pool_w=pack_weight(conv_weights[5], dtype),
        pool_b=biases[5],
        w3=pack_weight(conv_weights[3], dtype),
        b3=biases[3],
        w5=pack_weight(conv_weights[4], dtype),
        b5=biases[4],
        c1=conv_weights[0].shape[0],
        r3=conv_weights[1].shape[0],
        k3=conv_weights[3].shape[-1],
        k5=conv_weights[4].shape[-1],
    )


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside the ops' bodies (the kernels pick their own dtypes); entered
    only where it is on, as a context costs microseconds."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _bn_params(
    conv_weights: list[Tensor],
    bn_weights: list[Tensor | None],
    bn_biases: list[Tensor | None],
    eps: list[float],
    running: tuple[list[Tensor], list[Tensor], list[Tensor]] | None,
    momentum: list[float | None],
    dtype: torch.dtype,
) -> BNParams | None:
    if not eps:
        return None
    none6: list[Tensor | None] = [None] * 6
    running_mean, running_var, count = running if running else (none6,) * 3
    return BNParams.build(
        gammas=bn_weights,
        betas=bn_biases,
        eps=eps,
        running_mean=list(running_mean),
        running_var=list(running_var),
        num_batches_tracked=list(count),
        momentum=momentum,
        channels=[w.shape[0] for w in conv_weights],
        device=conv_weights[0].device,
        dtype=dtype,
    )


def _packed_forward(
    x: Tensor,
    conv_weights: list[Tensor],
    conv_biases: list[Tensor | None],
    bn_weights: list[Tensor | None],
    bn_biases: list[Tensor | None],
    running_mean: list[Tensor],
    running_var: list[Tensor],
    num_batches_tracked: list[Tensor],
    eps: list[float],
    momentum: list[float],
    cumulative: list[bool],
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, FoldedInception, BNParams | None]:
    """The forward op's outputs, then the packed weights and BN vectors it built (what
    the backward needs of them: an eager backward takes them instead of repacking)."""
    momenta = [None if c else m for m, c in zip(momentum, cumulative, strict=True)]
    running = (running_mean, running_var, num_batches_tracked) if running_mean else None
    with _autocast_off(x.device.type), on_device(x):
        w = _pack(conv_weights, conv_biases, x.dtype)
        bn = _bn_params(
            conv_weights, bn_weights, bn_biases, eps, running, momenta, x.dtype
        )
        f = train_forward(x, w, bn, batch_stats)
    stats = f.stats
    if stats is None:
        stats = torch.empty(0, dtype=accumulator_dtype(x.dtype), device=x.device)
    return f.out, f.z_out, f.z_red, stats, w, bn


@torch.library.custom_op(
    "inception_fused::train_forward",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)
def _train_forward_op(
    x: Tensor,
    conv_weights: list[Tensor],
    conv_biases: list[Tensor | None],
    bn_weights: list[Tensor | None],
    bn_biases: list[Tensor | None],
    running_mean: list[Tensor],
    running_var: list[Tensor],
    num_batches_tracked: list[Tensor],
    eps: list[float],
    momentum: list[float],
    cumulative: list[bool],
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, z_out, z_red, stats): stats = [mean | invstd], each over [C_out | r3 + r5]
    (TrainForward.stats), empty without BN.

    Per-layer lists in BLOCK_ORDER. ``eps`` empty: no BatchNorm (batch_norm=False).
    Running-stat lists: six tensors, or empty when the BNs do not track running stats.
    ``cumulative[i]``: momentum=None.
    """
    out, z_out, z_red, stats, _, _ = _packed_forward(
        x, conv_weights, conv_biases, bn_weights, bn_biases, running_mean,
        running_var, num_batches_tracked, eps, momentum, cumulative, batch_stats,
    )  # fmt: skip
    return out, z_out, z_red, stats


@_train_forward_op.register_fake
def _(
    x, conv_weights, conv_biases, bn_weights, bn_biases, running_mean, running_var,
    num_batches_tracked, eps, momentum, cumulative, batch_stats,
):  # fmt: skip
    n, _, h, w = x.shape
    c_out = sum(conv_weights[i].shape[0] for i in (0, 3, 4, 5))
    c_red = conv_weights[1].shape[0] + conv_weights[2].shape[0]
    out = empty_channels_last((n, c_out, h, w), x)
    stats = x.new_empty((2 * (c_out + c_red) if eps else 0,))
    return (
        out,
        x.new_empty((n * h * w, c_out)),
        x.new_empty((n * h * w, c_red)),
        stats.to(accumulator_dtype(x.dtype)),
    )


def _packed_backward(
    grad_out: Tensor,
    x: Tensor,
    w: FoldedInception,
    bn: BNParams | None,
    z_out: Tensor,
    z_red: Tensor,
    stats: Tensor,
    batch_stats: bool,
    needs_input_grad: bool,
) -> FlatGrads:
    """The gradients from packed weights and BN vectors (biases and running statistics
    unused); grad_x None when not needed."""
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    with _autocast_off(x.device.type), on_device(x):
        saved = TrainForward.viewing(None, z_out, z_red, None if bn is None else stats)
        return train_backward_flat(
            grad_out, x, w, bn, batch_stats, saved, needs_input_grad
        )


@torch.library.custom_op("inception_fused::train_backward", mutates_args=())
def _train_backward_op(
    grad_out: Tensor,
    x: Tensor,
    conv_weights: list[Tensor],
    bn_weights: list[Tensor | None],
    bn_biases: list[Tensor | None],
    eps: list[float],
    z_out: Tensor,
    z_red: Tensor,
    stats: Tensor,
    batch_stats: bool,
    needs_input_grad: bool,
) -> list[Tensor]:
    """The FlatGrads fields as a list; grad_x is empty when not needed."""
    with _autocast_off(x.device.type):
        w = _pack(conv_weights, [None] * 6, x.dtype)
        bn = _bn_params(
            conv_weights, bn_weights, bn_biases, eps, None, [None] * 6, x.dtype
        )
    flat = _packed_backward(
        grad_out, x, w, bn, z_out, z_red, stats, batch_stats, needs_input_grad
    )
    grad_x = flat.grad_x if needs_input_grad else x.new_empty(0)
    # aten picks the conv weight grads' memory format; the op promises contiguous ones.
    w3, w5 = flat.w3.contiguous(), flat.w5.contiguous()
    return [grad_x, flat.stem_w, w3, w5, *flat[4:]]


@_train_backward_op.register_fake
def _(
    grad_out, x, conv_weights, bn_weights, bn_biases, eps, z_out, z_red, stats,
    batch_stats, needs_input_grad,
):  # fmt: skip
    # Strides as the real op's: grad_x in the layout the kernels read x in, contiguous
    # weight grads whatever the weights' memory format (channels_last under AMP).
    c_in = x.shape[1]
    c_stem = sum(conv_weights[i].shape[0] for i in range(3))
    acc = accumulator_dtype(x.dtype)
    return [
        torch.empty_like(kernel_layout(x)) if needs_input_grad else x.new_empty(0),
        x.new_empty((c_stem, c_in)),
        conv_weights[3].new_empty(conv_weights[3].shape),
        conv_weights[4].new_empty(conv_weights[4].shape),
        x.new_empty((conv_weights[5].shape[0], c_in)),
        *(x.new_empty((z.shape[1],), dtype=acc) for z in (z_out, z_out, z_red, z_red)),
    ]


def _cast(grads: list[Tensor | None], like: list[Tensor | None]) -> list:
    """Each grad in its parameter's dtype; None where the parameter does not exist."""
    return [
        None if p is None or g is None else g if g.dtype == p.dtype else g.to(p.dtype)
        for g, p in zip(grads, like, strict=True)
    ]


class _InceptionTrain(torch.autograd.Function):
    """Autograd for the forward op. The forward op mutates the running statistics, and
    torch.library only takes autograd formulas for functional ops, so the formula lives
    here; both halves are custom ops with fake kernels, so torch.compile traces it whole.

    Differentiable inputs are passed flat (x, then 6 conv weights, 6 conv biases, 6 BN
    weights, 6 BN biases, None where absent); ``bn`` holds the non-differentiable rest.
    """

    @staticmethod
    def forward(ctx: Any, bn: dict, x: Tensor, *params: Tensor | None) -> Tensor:
        conv_weights, conv_biases = list(params[0:6]), list(params[6:12])
        bn_weights, bn_biases = list(params[12:18]), list(params[18:24])
        has_bn = bool(bn["eps"])
        args = (
            x, conv_weights, conv_biases,
            bn_weights if has_bn else [], bn_biases if has_bn else [],
            bn["running_mean"], bn["running_var"], bn["num_batches_tracked"],
            bn["eps"], bn["momentum"], bn["cumulative"], bn["batch_stats"],
        )  # fmt: skip
        # Eager calls skip the dispatcher and keep the packed weights for backward.
        ctx.packed = None
        if unobserved(x):
            out, z_out, z_red, stats, *ctx.packed = _packed_forward(*args)
        else:
            out, z_out, z_red, stats = _train_forward_op(*args)
        ctx.save_for_backward(x, *params, z_out, z_red, stats)
        ctx.eps = bn["eps"]
        ctx.batch_stats = bn["batch_stats"]
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        x, *params = ctx.saved_tensors
        params, (z_out, z_red, stats) = params[:24], params[24:]
        conv_weights = params[0:6]
        has_bn = bool(ctx.eps)
        needs_x = ctx.needs_input_grad[1]
        # Through the op while tracing, or to raise on double backward (create_graph).
        if ctx.packed and unobserved(grad_out) and not torch.is_grad_enabled():
            flat = _packed_backward(
                grad_out, x, *ctx.packed, z_out, z_red, stats, ctx.batch_stats,
                needs_x,
            )  # fmt: skip
        else:
            grads = _train_backward_op(
                grad_out, x, conv_weights, params[12:18] if has_bn else [],
                params[18:24] if has_bn else [], ctx.eps, z_out, z_red, stats,
                ctx.batch_stats, needs_x,
            )  # fmt: skip
            # Not NamedTuple._replace: torch 2.7's dynamo refuses it (fullgraph).
            flat = FlatGrads(grads[0] if needs_x else None, *grads[1:])
        ctx.packed = None
        grads = split_grads(
            flat,
            conv_weights[0].shape[0],
            conv_weights[1].shape[0],
            has_bn,
        )
        return (
            None,
            grads.grad_x,
            *grads.conv_weight,
            *_cast(grads.conv_bias, params[6:12]),
            *_cast(grads.bn_weight, params[12:18]),
            *_cast(grads.bn_bias, params[18:24]),
        )


def _no_double_backward(ctx: Any, *grads: Tensor) -> tuple:
    raise RuntimeError(
        "inception_fused: double backward (differentiating the gradients of a "
        "FusedInceptionModule) is not supported; use backend='reference' for it"
    )


_train_backward_op.register_autograd(
    _no_double_backward, setup_context=lambda ctx, inputs, output: None
)


_Dicts = tuple[tuple[nn.Module, dict], ...]


class _TrainLayout(NamedTuple):
    """Which submodules and tensor dicts the train path reads (structure only: the
    tensors and BN settings themselves are read afresh on every call)."""

    structure: int
    convs: _Dicts  # (conv, its parameter dict), BLOCK_ORDER
    bns: tuple[nn.Module, ...]  # the six BatchNorms; () with batch_norm=False
    bn_params: _Dicts
    bn_buffers: _Dicts


_layouts: weakref.WeakKeyDictionary[nn.Module, _TrainLayout] = (
    weakref.WeakKeyDictionary()
)


def _read_layout(module: InceptionModule) -> _TrainLayout:
    blocks = conv_blocks(module)
    bns = () if blocks[0].bn is None else tuple(b.bn for b in blocks)
    return _TrainLayout(
        structure_version(),
        tuple((b.conv, b.conv._parameters) for b in blocks),
        bns,
        tuple((bn, bn._parameters) for bn in bns),
        tuple((bn, bn._buffers) for bn in bns),
    )


def _read(dicts: _Dicts, name: str) -> list[Tensor | None]:
    """Each module's tensor ``name``, from its dict where it is there (a dict lookup),
    else through the module (a parametrized weight, computed on access)."""
    return [d[name] if name in d else getattr(m, name) for m, d in dicts]


def _train_layout(module: InceptionModule) -> _TrainLayout:
    """The module's layout, looked up again when any module anywhere registered a
    parameter, buffer or submodule (fold_cache.structure_version); read afresh while
    tracing (a graph cannot check a cache)."""
    if torch.compiler.is_compiling():
        return _read_layout(module)
    layout = _layouts.get(module)
    if layout is None or layout.structure != structure_version():
        layout = _layouts[module] = _read_layout(module)
    return layout


def bn_batch_stats(module: InceptionModule) -> bool | None:
    """Whether the BNs normalise with batch statistics (train mode, or no running stats);
    None when the six layers disagree (the fused op serves one mode for all of them)."""
    layout = _train_layout(module)
    if not layout.bns:
        return module.training
    running = _read(layout.bn_buffers, "running_mean")
    modes = {
        bn.training or r is None for bn, r in zip(layout.bns, running, strict=True)
    }
    tracking = {r is not None for r in running}
    return modes.pop() if len(modes) == 1 and len(tracking) == 1 else None


def fused_train_forward(
    module: InceptionModule, x: Tensor, batch_stats: bool
) -> Tensor:
    """The module's forward through the autograd custom op (Triton kernels).

    ``batch_stats`` as :func:`bn_batch_stats` decides (not None).
    Under autocast the output has the reference's dtype (the autocast dtype). On CUDA
    the convs run in it (like cuDNN's), BN statistics and parameters stay fp32; the CPU
    interpreter computes in the input's dtype and casts the output.
    """
    device_type = x.device.type
    dtype = out_dtype = x.dtype
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        out_dtype = torch.get_autocast_dtype(device_type)
        dtype = x.dtype if device_type == "cpu" else out_dtype
    if device_type == "cpu" and dtype not in CPU_INTERPRETER_DTYPES:
        raise TypeError(
            f"the Triton interpreter on CPU runs float32 and float64, got {dtype}"
        )
    n, _, h, w = x.shape
    layout = _train_layout(module)
    bns = layout.bns
    if bns and batch_stats and n * h * w <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{tuple(x.shape)}"
        )
    buffers = layout.bn_buffers
    running_mean = _read(buffers, "running_mean")
    # len(), not bool(): torch 2.7's Dynamo cannot trace bool() of a tuple (fullgraph).
    tracked = len(bns) > 0 and running_mean[0] is not None
    bn_args = {
        "eps": [bn.eps for bn in bns],
        "momentum": [bn.momentum or 0.0 for bn in bns],
        "cumulative": [bn.momentum is None for bn in bns],
        "running_mean": running_mean if tracked else [],
        "running_var": _read(buffers, "running_var") if tracked else [],
        "num_batches_tracked": _read(buffers, "num_batches_tracked") if tracked else [],
        "batch_stats": batch_stats,
    }
    # Conv parameters in the compute dtype (autograd casts their grads back).
    convs = [
        t if t is None or t.dtype == dtype else t.to(dtype)
        for name in ("weight", "bias")
        for t in _read(layout.convs, name)
    ]
    affine = [t for name in ("weight", "bias") for t in _read(layout.bn_params, name)]
    # Converted before the op, so that the backward reads the saved x as the forward did.
    x = kernel_layout(x if x.dtype == dtype else x.to(dtype))
    out = _InceptionTrain.apply(
        bn_args,
        x,
        *convs,
        *(affine or [None] * 12),
    )
    return out if out.dtype == out_dtype else out.to(out_dtype)

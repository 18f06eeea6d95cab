"""The eval forward: a torch.library custom op for tracing, a direct call otherwise.

Registering ``inception_fused::eval_forward`` lets ``torch.compile`` (``fullgraph=True``),
``torch.export`` and FakeTensor tracing treat a fused Inception block as one opaque
operator with a known output, instead of breaking the graph at the kernel launches. The
op takes the BN-folded weights (:class:`~inception_fused.folding.FoldedInception`) and the
backend, and runs the two Triton launches (CUDA tensors, or CPU tensors through the
interpreter) or the C++ CPU backend.

It is a ``custom_op`` rather than a ``triton_op``: our kernels already write the whole
module output, so Inductor has nothing to fuse into them, and an opaque op keeps one
implementation for the Triton and C++ backends. The dispatcher costs more host time than
the rest of a call, so :func:`eval_forward` goes through the op only when something may
be watching operators (tracing, dispatch or function modes, functorch, the profiler).
"""

import torch

from .cpu import cpu_eval_forward
from .eval_launch import inception_eval_forward
from .folding import FoldedInception
from .kernels.launch import empty_channels_last

OP_BACKENDS = ("triton", "cpu")


@torch.library.custom_op("inception_fused::eval_forward", mutates_args=())
def _eval_forward_op(
    x: torch.Tensor,
    stem_w: torch.Tensor,
    stem_b: torch.Tensor,
    pool_w: torch.Tensor,
    pool_b: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    w5: torch.Tensor,
    b5: torch.Tensor,
    c1: int,
    r3: int,
    k3: int,
    k5: int,
    backend: str,
) -> torch.Tensor:
    """Eval-mode Inception over BN-folded, packed weights; channels_last output.

    ``backend``: ``"triton"`` (the two Triton launches) or ``"cpu"`` (the C++ backend).
    """
    if backend not in OP_BACKENDS:
        raise ValueError(f"backend must be one of {OP_BACKENDS}, got {backend!r}")
    # The kernels index the packed weights as dense matrices (the Triton kernels take
    # stem_w's row stride: padded on a GPU); a compiled graph may hand them over in
    # another layout.
    if backend != "triton" or stem_w.stride(1) != 1:
        stem_w = stem_w.contiguous()
    weights = (t.contiguous() for t in (stem_b, pool_w, pool_b, w3, b3, w5, b5))
    f = FoldedInception(stem_w, *weights, c1, r3, k3, k5)
    if backend == "triton":
        return inception_eval_forward(x, f)
    # A compiled graph folds per call: its Program is found by the weights' values.
    return cpu_eval_forward(x, f, by_content=True)


@_eval_forward_op.register_fake
def _(x, stem_w, stem_b, pool_w, pool_b, w3, b3, w5, b5, c1, r3, k3, k5, backend):
    n, _, h, w = x.shape
    c_out = c1 + w3.shape[1] + w5.shape[1] + pool_w.shape[1]
    return empty_channels_last((n, c_out, h, w), x)


def unobserved(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may skip the dispatcher: a plain tensor, and nothing that
    records or transforms operators is active (compile/export tracing, JIT tracing,
    dispatch and function modes such as FakeTensorMode or ``with torch.device``,
    functorch transforms, the autograd profiler)."""
    return (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._len_torch_function_stack()
        and torch._C._get_tracing_state() is None
        and not torch._C._autograd._profiler_enabled()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def eval_forward(x: torch.Tensor, f: FoldedInception, backend: str) -> torch.Tensor:
    """Eval-mode Inception of ``x`` over ``f``; channels_last output.

    ``backend`` is ``"triton"`` or ``"cpu"`` (the C++ backend: the Program cached with
    ``f``). Through the custom op when :func:`unobserved` says something may watch, else
    straight to the kernels.
    """
    if backend not in OP_BACKENDS:
        raise ValueError(f"backend must be one of {OP_BACKENDS}, got {backend!r}")
    if unobserved(x):
        if backend == "triton":
            return inception_eval_forward(x, f)
        return cpu_eval_forward(x, f)
    return _eval_forward_op(x, *f.args, backend)

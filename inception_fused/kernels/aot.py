"""Compile the launchers' real launches for a GPU that is not there (sm_90a by default).

Inside ``captured_launches()`` a Triton launch is recorded instead of run. Called with meta
tensors (which the launchers treat as CUDA tensors, see launch.compiled_for_gpu), the
launchers go through their GPU paths - tile choice, grid, arguments - without memory or
a device. ``compile_launch`` then specialises each recorded launch exactly as Triton's
runtime would (ints equal to 1 become constexprs, pointers and ints divisible by 16 carry
that fact; a meta tensor's data_ptr is its byte offset, so views keep their alignment)
and compiles it with the ptxas bundled in the Triton wheel. Needs the compiler, not the
interpreter: run it in a process without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from .tiles import launching_every_candidate

SM90 = GPUTarget("cuda", 90, 32)


@dataclass
class Launch:
    """One recorded kernel launch."""

    kernel: JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grid: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@contextmanager
def captured_launches() -> Iterator[list[Launch]]:
    """Record every JIT kernel launch made inside the block (nothing runs)."""
    launches: list[Launch] = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append(Launch(kernel, args, kwargs, tuple(grid)))

    # Under TRITON_INTERPRET=1 the kernels are InterpretedFunctions: recorded the same
    # (their names count; only compiled JITFunctions can be specialised).
    from triton.runtime.interpreter import InterpretedFunction

    with (
        mock.patch.object(JITFunction, "run", record),
        mock.patch.object(InterpretedFunction, "run", record),
    ):
        yield launches


def specialise(launch: Launch, target: GPUTarget = SM90) -> tuple[ASTSource, dict]:
    """The compile source and options Triton's runtime would build for this launch."""
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def compile_launch(launch: Launch, target: GPUTarget = SM90) -> Any:
    """A CompiledKernel (``.asm`` holds ttir, ptx and cubin; ``.metadata`` its resources)."""
    source, options = specialise(launch, target)
    return triton.compile(source, target=target, options=options)


MODES = ("eval", "train", "backward")


def module_launches(
    channels: tuple[int, ...],
    batch: int,
    side: int,
    dtype: torch.dtype,
    branch3_kernel: int = 3,
    modes: tuple[str, ...] = MODES,
    keys: list | None = None,
    channels_last: bool = True,
) -> dict[str, list[Launch]]:
    """The launches of one Inception module's eval forward, train forward (batch
    statistics) and backward at this shape, by mode, recorded on meta tensors, for a
    channels_last input or (``channels_last=False``) an NCHW one. Given a list ``keys``,
    each conv launch is also recorded with every tile config the GPU tuner may try, and
    its tiles.TileKey appended to ``keys``."""
    from ..eval_launch import inception_eval_forward
    from ..folding import BNParams, fold_inception, pack_raw_inception
    from ..reference import InceptionModule
    from .train_backward import train_backward
    from .train_forward import train_forward

    module = InceptionModule(*channels, branch3_kernel=branch3_kernel)
    module = module.to("meta", dtype)
    x = torch.empty(batch, channels[0], side, side, device="meta", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    found: dict[str, list[Launch]] = {}
    every = (
        launching_every_candidate() if keys is not None else contextlib.nullcontext()
    )
    with every as seen:
        if "eval" in modes:
            with captured_launches() as found["eval"]:
                inception_eval_forward(x, fold_inception(module, dtype))
        if "train" in modes or "backward" in modes:
            w = pack_raw_inception(module, dtype)
            bn = BNParams.from_module(module, dtype)
            with captured_launches() as train:
                saved = train_forward(x, w, bn, True)
            if "train" in modes:
                found["train"] = train
            if "backward" in modes:
                with captured_launches() as found["backward"]:
                    train_backward(torch.empty_like(saved.out), x, w, bn, True, saved)
    if keys is not None:
        keys.extend(seen)
    return found


def network_launches(
    batch: int,
    side: int,
    dtype: torch.dtype,
    keys: list | None = None,
    channels_last: bool = True,
) -> dict[str, list[Launch]]:
    """The launches of a whole GoogLeNet eval forward (network.TritonPlan) on a
    ``side`` x ``side`` image, recorded on meta tensors, as module_launches records a
    block's."""
    from torchvision.models import googlenet

    from ..googlenet import fuse_googlenet
    from ..network import blocks_folded, build_triton_plan

    with torch.device("meta"):
        model = googlenet(weights=None, init_weights=False, transform_input=True)
    model = fuse_googlenet(model.eval().to(dtype), backend="triton")
    x = torch.empty(batch, 3, side, side, device="meta", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    every = (
        launching_every_candidate() if keys is not None else contextlib.nullcontext()
    )
    with every as seen, captured_launches() as launches:
        build_triton_plan(model, dtype, blocks_folded(model, dtype))(x)
    if keys is not None:
        keys.extend(seen)
    return {"eval": launches}


def launch_key(launch: Launch, target: GPUTarget = SM90) -> str:
    """Equal for launches that compile to the same binary."""
    source, options = specialise(launch, target)
    return repr(
        (
            launch.name,
            sorted(source.signature.items()),
            sorted(map(repr, source.constants.items())),
            sorted(map(repr, source.attrs.items())),
            sorted((k, repr(v)) for k, v in options.items()),
        )
    )


# Inception-v3's single-layer launches (299x299 image: maps of 147, 35, 17 and 8), one of
# each kind the conv and max-pool kernels serve there: (name, C_in, C_out, side, (kh,
# kw), stride, padding, pool, transform, destination channels C_total, first channel).
# A None destination is a new tensor.
INCEPTION_V3_CONVS = (
    ("Conv2d_1a_3x3", 3, 32, 299, (3, 3), 2, 0, None, True, None),
    ("Mixed_5b.branch_pool", 192, 32, 35, (1, 1), 1, 0, "avg", False, (256, 224)),
    ("Mixed_5b.pool/fid", 192, 32, 35, (1, 1), 1, 0, "avg_exclude", False, (256, 224)),
    ("Mixed_6a.branch3x3", 288, 384, 35, (3, 3), 2, 0, None, False, (768, 0)),
    ("Mixed_6b.branch7x7_2", 128, 128, 17, (1, 7), 1, (0, 3), None, False, None),
    ("Mixed_6b.branch7x7_3", 128, 192, 17, (7, 1), 1, (3, 0), None, False, (768, 192)),
    ("Mixed_7b.branch3x3_2a", 384, 384, 8, (1, 3), 1, (0, 1), None, False, (2048, 320)),
    ("Mixed_7b.branch3x3_2b", 384, 384, 8, (3, 1), 1, (1, 0), None, False, (2048, 704)),
    ("Mixed_7c.pool/fid", 2048, 192, 8, (1, 1), 1, 0, "max", False, (2048, 1856)),
)
# Max pools, 3x3/2 floor mode: (name, C, side, destination as above).
INCEPTION_V3_POOLS = (
    ("maxpool1", 64, 147, None),
    ("Mixed_6a.branch_pool", 288, 35, (768, 480)),
)


def inception_v3_layer_launches(
    batch: int,
    dtype: torch.dtype,
    keys: list | None = None,
    channels_last: bool = True,
) -> dict[str, list[Launch]]:
    """Eval launches of Inception-v3's layer kinds (INCEPTION_V3_CONVS and _POOLS) at
    ``batch``, recorded on meta tensors as network_launches records GoogLeNet's."""
    from ..folding import accumulator_dtype
    from .conv import launch_conv_relu, pooled_size
    from .max_pool import launch_max_pool

    acc = accumulator_dtype(dtype)
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def meta(*shape, dt=dtype, fmt=torch.contiguous_format):
        return torch.empty(shape, device="meta", dtype=dt).contiguous(memory_format=fmt)

    every = (
        launching_every_candidate() if keys is not None else contextlib.nullcontext()
    )
    with every as seen, captured_launches() as launches:
        for _, c_in, c_out, side, (
            kh,
            kw,
        ), stride, pad, pool, transform, dest in INCEPTION_V3_CONVS:
            ph, pw = (pad, pad) if isinstance(pad, int) else pad
            h_out = (side + 2 * ph - kh) // stride + 1
            w_out = (side + 2 * pw - kw) // stride + 1
            out = None
            if dest is not None:
                out = meta(batch, dest[0], h_out, w_out, fmt=torch.channels_last)
            launch_conv_relu(
                meta(batch, c_in, side, side, fmt=layout),
                meta(kh * kw * c_in, c_out),
                meta(c_out, dt=acc),
                (kh, kw),
                stride,
                pool,
                meta(4, c_in, dt=acc) if transform else None,
                padding=(ph, pw),
                out=out,
                out_channel=0 if dest is None else dest[1],
            )
        for _, c, side, dest in INCEPTION_V3_POOLS:
            out = None
            if dest is not None:
                s = pooled_size(side, 3, ceil_mode=False)
                out = meta(batch, dest[0], s, s, fmt=torch.channels_last)
            launch_max_pool(
                meta(batch, c, side, side, fmt=layout),
                3,
                ceil_mode=False,
                out=out,
                out_channel=0 if dest is None else dest[1],
            )
    if keys is not None:
        keys.extend(seen)
    return {"eval": launches}

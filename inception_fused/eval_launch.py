"""Fused Inception eval forward: the two Triton launches, wired to one preallocated output."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .folding import FoldedInception
from .kernels.launch import aligned_rows, empty_channels_last, kernel_layout, on_device
from .kernels.pointwise import launch_pointwise
from .kernels.spatial import launch_spatial
from .kernels.workspace import release


class LaunchPlan(NamedTuple):
    """What a call needs besides the tensors, fixed by the shapes: computed once."""

    out_shape: tuple[int, int, int, int]
    m: int  # pixels, N*H*W
    c_red: int


@functools.lru_cache(maxsize=256)
def launch_plan(
    x_shape: tuple[int, int, int, int],
    widths: tuple[int, int, int, int, int, int],
) -> LaunchPlan:
    """The plan for an input of ``x_shape`` and a fold of ``widths``
    (:attr:`FoldedInception.widths`)."""
    n, _, h, w = x_shape
    c_stem, c1, _, c3, c5, c_pool = widths
    m = n * h * w
    c_red = c_stem - c1
    return LaunchPlan(
        out_shape=(n, c1 + c3 + c5 + c_pool, h, w),
        m=m,
        c_red=c_red,
    )


def inception_eval_forward(x: torch.Tensor, f: FoldedInception) -> torch.Tensor:
    """Eval-mode Inception (BN folded) in two Triton launches; returns channels_last output.

    x may have any strides: the interpreter reads NCHW and channels_last without a copy, a
    GPU reads channels_last (launch.kernel_layout).
    """
    x = kernel_layout(x)
    plan = launch_plan(x.shape, f.widths)
    out = empty_channels_last(plan.out_shape, x)
    if plan.m == 0:
        return out
    scratch = aligned_rows(plan.m, plan.c_red, x.dtype, x.device)
    with on_device(x):
        launch_pointwise(
            x,
            f.stem_w,
            f.stem_b,
            f.pool_w,
            f.pool_b,
            out,
            scratch,
            f.c1,
        )
        launch_spatial(
            scratch,
            f.w3,
            f.b3,
            f.w5,
            f.b5,
            out,
            f.r3,
            f.k3,
            f.k5,
            f.c1,
        )
    release(scratch)
    return out

"""Fused Inception forward: the two launches, wired to one preallocated output."""

from __future__ import annotations

import torch

from .folding import FoldedInception
from .kernels.launch import compiled_for_gpu, tile_config
from .kernels.pointwise import launch_pointwise
from .kernels.spatial import launch_spatial


def inception_eval_forward(x: torch.Tensor, f: FoldedInception) -> torch.Tensor:
    """Eval-mode Inception (BN folded) in two Triton launches; returns channels_last output.

    x may have any strides (NCHW-contiguous and channels_last both read without a copy).
    """
    n, _, h, w = x.shape
    c3, c5, c_pool = f.w3.shape[1], f.w5.shape[1], f.pool_w.shape[1]
    c_red = f.stem_w.shape[1] - f.c1
    c_out = f.c1 + c3 + c5 + c_pool
    out = torch.empty(
        (n, c_out, h, w),
        device=x.device,
        dtype=x.dtype,
        memory_format=torch.channels_last,
    )
    if n == 0:
        return out
    m = n * h * w
    scratch = torch.empty((m, c_red), device=x.device, dtype=x.dtype)
    on_gpu = compiled_for_gpu(x)
    cfg_a = tile_config(x.dtype, m, max(f.stem_w.shape[1], c_pool), x.shape[1], on_gpu)
    launch_pointwise(
        x, f.stem_w, f.stem_b, f.pool_w, f.pool_b, out, scratch, f.c1, cfg_a
    )
    cfg_b = tile_config(x.dtype, m, max(c3, c5), max(f.r3, c_red - f.r3), on_gpu)
    launch_spatial(scratch, f.w3, f.b3, f.w5, f.b5, out, f.r3, f.k3, f.k5, f.c1, cfg_b)
    return out

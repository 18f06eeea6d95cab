"""Launch settings shared by the kernel families: tile sizes, dot precision, accumulator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def compiled_for_gpu(t: torch.Tensor) -> bool:
    """Whether kernels on ``t`` are compiled for a GPU (else the interpreter runs them).

    Meta tensors stand for CUDA tensors in ahead-of-time compiles (kernels/aot.py), so the
    launchers pick the tiles they would pick on a GPU.
    """
    return t.is_cuda or t.is_meta


def nchw_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Element strides of a 4-D tensor in NCHW index order, whatever its memory layout."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def tile_config(
    dtype: torch.dtype, m: int, n_cols: int, k: int, on_gpu: bool
) -> TileConfig:
    """Tile sizes for an [m, k] @ [k, n_cols] conv GEMM.

    The interpreter pays ~ms per program and loop step, so it gets the biggest tiles the
    problem can fill. On the GPU tl.dot needs every tile dimension >= 16.
    """
    use_dot = dtype != torch.float64
    if not on_gpu:
        # Without tl.dot the [M, K, N] product is materialised: keep it under Triton's
        # 2**20-element cap by thinning K.
        block_k = _pow2(k, 16, 128) if use_dot else 16
        return TileConfig(
            _pow2(m, 16, 256), _pow2(n_cols, 16, 128), block_k, use_dot=use_dot
        )
    if not use_dot:  # fp64: broadcast multiply-and-sum keeps [M, K, N] in registers
        return TileConfig(32, 32, 8, num_stages=1, use_dot=False)
    block_m = 64 if m <= 8192 else 128
    block_k = 32 if dtype == torch.float32 else 64
    return TileConfig(block_m, 64, block_k)


def pool_tile_config(cfg: TileConfig, on_gpu: bool) -> TileConfig:
    """Tiles of the pool projection, whose input is the max of nine loads per step.

    Same rows per tile as ``cfg`` (train statistics share one partials matrix); on the
    GPU a K step of 16 and two stages keep nine pipelined [BLOCK_M, BLOCK_K] buffers
    within shared memory and registers (the stem's K step would need ~340 KiB).
    """
    if not on_gpu or not cfg.use_dot:
        return cfg
    return TileConfig(cfg.block_m, cfg.block_n, 16, cfg.num_warps, 2, cfg.use_dot)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 tl.dot uses TF32 only where torch would let cuDNN's convs use it."""
    if (
        dtype == torch.float32
        and not interpreting()
        and torch.backends.cudnn.allow_tf32
    ):
        return "tf32"
    return "ieee"


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32

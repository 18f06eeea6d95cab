"""Launch settings shared by the kernel families: tile sizes, dot precision, accumulator."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
import triton
import triton.language as tl

from . import workspace


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True


def _interpret_flag() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # Triton < 3.4 reads the variable itself, and only "1" counts
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


# Read once, as Triton decides at @triton.jit time (our kernel modules' import) whether a
# kernel is interpreted; and a constant is what Dynamo can trace (knobs call into C).
_INTERPRETING = _interpret_flag()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 set
    before inception_fused was imported)."""
    return _INTERPRETING


def compiled_for_gpu(t: torch.Tensor) -> bool:
    """Whether kernels on ``t`` are compiled for a GPU (else the interpreter runs them).

    Meta tensors stand for CUDA tensors in ahead-of-time compiles (kernels/aot.py), so the
    launchers pick the tiles they would pick on a GPU.
    """
    return t.is_cuda or t.is_meta


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the GPU kernels read it: an input whose channel axis is strided (NCHW) is
    copied once to channels_last. Read through its strides, a tile's channels are scalar
    loads (2 bytes each in 16-bit), never pipelined, and the pool tiles spill (sm90
    report); the copy costs one read and one write of x. The interpreter reads any
    strides as they are."""
    if compiled_for_gpu(x) and x.stride(1) != 1 and x.shape[1] > 1:
        return empty_channels_last(x.shape, x).copy_(x)
    return x


def empty_channels_last(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised [N, C, H, W] channels_last tensor of ``like``'s dtype and device
    (from the active workspace, if any): every launcher's output, an [N*H*W, C] row-major
    matrix the kernels store into."""
    return workspace.empty(shape, like.dtype, like.device, channels_last=True)


def channels_last_destination(
    out: torch.Tensor | None,
    channel: int,
    shape: tuple[int, int, int, int],
    like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where a launcher stores its [N, C, H, W] result: (the tensor it returns, the view
    its kernel stores into from channel 0, that view's row stride).

    Without ``out``, a new channels_last tensor. Else channels [channel, channel + C) of
    ``out``: a channels_last [N, C_total, H, W] tensor of ``like``'s dtype and device (a
    block's concatenated output), whose other channels are left as they are. Raises
    ValueError naming what does not fit, before anything is launched."""
    n, c, h, w = shape
    if out is None:
        if channel != 0:
            raise ValueError(f"out_channel={channel} without an out tensor")
        out = empty_channels_last(shape, like)
        return out, out, c
    if out.dim() != 4 or (out.shape[0], *out.shape[2:]) != (n, h, w):
        raise ValueError(
            f"out has shape {list(out.shape)}; expected [{n}, C_total, {h}, {w}]"
        )
    if not 0 <= channel <= out.shape[1] - c:
        raise ValueError(
            f"channels [{channel}, {channel + c}) do not fit in out's {out.shape[1]}"
        )
    if out.dtype != like.dtype:
        raise ValueError(f"out has dtype {out.dtype}; expected {like.dtype}")
    if out.device != like.device:
        raise ValueError(f"out is on {out.device}; expected {like.device}")
    if not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(
            f"out (strides {out.stride()}) is not a dense channels_last tensor"
        )
    return out, out[:, channel:], out.shape[1]


def aligned_rows(
    rows: int, cols: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An uninitialised [rows, cols] matrix whose row stride is a multiple of 16 elements
    (from the active workspace, if any): Triton then knows every row's start is 16-byte
    aligned and loads rows with vector, asynchronous copies (a row stride like 4b's 296
    or 136 gives scalar loads)."""
    padded = workspace.empty((rows, ceil_div(cols, 16) * 16), dtype, device, False)
    return padded[:, :cols]


def nchw_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Element strides of a 4-D tensor in NCHW index order, whatever its memory layout."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def pair(v: int | Sequence[int]) -> tuple[int, ...]:
    """A conv or pool size as torch's modules hold it (an int for both sides, or a
    sequence per side) as a tuple per side."""
    return tuple(v) if isinstance(v, Sequence) else (v, v)


# Host-side grid math in plain Python: triton.cdiv and triton.next_power_of_2 are
# ConstexprFunctions (~3 us a call), and a train step makes dozens of such calls.
def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pow2_clamp(x: int, lo: int, hi: int) -> int:
    """The power of two >= x, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << (max(1, x) - 1).bit_length()))


def tile_config(
    dtype: torch.dtype, m: int, n_cols: int, k: int, on_gpu: bool
) -> TileConfig:
    """The rule's tile sizes for an [m, k] @ [k, n_cols] conv GEMM (kernels/tiles.py
    picks per shape, from a table where it has one).

    The interpreter pays ~ms per program and loop step, so it gets the biggest tiles the
    problem can fill. On the GPU tl.dot needs every tile dimension >= 16.
    """
    use_dot = dtype != torch.float64
    if not on_gpu:
        # Without tl.dot the [M, K, N] product is materialised: keep it under Triton's
        # 2**20-element cap by thinning K.
        block_k = pow2_clamp(k, 16, 128) if use_dot else 16
        return TileConfig(
            pow2_clamp(m, 16, 256),
            pow2_clamp(n_cols, 16, 128),
            block_k,
            use_dot=use_dot,
        )
    if not use_dot:  # fp64: broadcast multiply-and-sum keeps [M, K, N] in registers
        # (16x32: at 32x32 or 16x16 some fp64 kernels spill 8 B for sm_90a)
        return TileConfig(16, 32, 8, num_stages=1, use_dot=False)
    block_m = 64 if m <= 8192 else 128
    if dtype == torch.float32:
        # A TF32 tile holds twice the bytes per K step: half the K step, and eight warps
        # (two warpgroups) so the accumulator and address registers fit without spills.
        return TileConfig(block_m, 64, 32, num_warps=8)
    return TileConfig(block_m, 64, 64)


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
    if dtype != torch.float32 or interpreting():
        return "ieee"
    return "tf32" if _cudnn_conv_allows_tf32() else "ieee"


def _cudnn_conv_allows_tf32() -> bool:
    """torch's fp32 precision for cuDNN convs, from the API the user may have set.

    Once any ``fp32_precision`` flag is set, reading the legacy ``allow_tf32`` raises
    ("a mix of the legacy and new APIs"), so read the new flags where torch has them:
    ``cudnn.conv``, else (``"none"``: inherit) ``cudnn``, else the global one. Anything
    but ``"tf32"`` (``"ieee"``, ``"none"`` at the root, ``"bf16"``) gets IEEE fp32.
    """
    backends = torch.backends
    conv = getattr(backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):  # torch before the new API
        return bool(backends.cudnn.allow_tf32)
    for precision in (
        conv.fp32_precision,
        backends.cudnn.fp32_precision,
        backends.fp32_precision,
    ):
        if precision != "none":
            return precision == "tf32"
    return False


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current one while kernels are launched for it: Triton launches
    on the current CUDA device, which need not be the tensors' (a model on cuda:1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


T = TypeVar("T")
_helper_thread: ThreadPoolExecutor | None = None


def outside_graph_pools(device: torch.device, fn: Callable[[], T]) -> T:
    """``fn()`` with its CUDA allocations outside any CUDA graph's memory pool.

    While cudagraph trees (``torch.compile(mode="reduce-overhead")``) warm up or record,
    every allocation of the calling thread comes out of the graph's private pool
    (torch._C._cuda_beginAllocateCurrentThreadToPool), which PyTorch hands out again: a
    tensor kept across calls (a shared constant) could be overwritten, and a timing's
    flush buffer would stay in the pool. So ``fn`` runs on a helper thread, whose stream
    first waits for the caller's work; the caller waits until ``fn``'s kernels are done.
    Off CUDA, ``fn`` simply runs.
    """
    global _helper_thread
    if device.type != "cuda":
        return fn()
    if _helper_thread is None:
        _helper_thread = ThreadPoolExecutor(1, thread_name_prefix="inception_fused")
    ready = torch.cuda.current_stream(device).record_event()

    def run() -> T:
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream()
            stream.wait_event(ready)
            result = fn()
            stream.synchronize()
            return result

    return _helper_thread.submit(run).result()


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32

"""Which tiles each conv GEMM launch gets: a committed per-shape table, a rule for shapes
the table lacks, and on CUDA a tuner that times a few candidates at a shape's first use.

A launch is named by a :class:`TileKey`: the kernel (``pointwise`` stem tiles, ``pool``
tiles, both in one launch ``pointwise_pool``, ``spatial``, ``reduce_grad``,
``input_grad``; the network's ``conv`` stem layers and ``head``), the mode, dtype and the
GEMM's (M, N, K) with the kernel size (height and width where they differ: Inception-v3's
1x7, 7x1, 1x3 and 3x1 convs). On the GPU, its tiles are the table's entry
(``tile_table.json``: the rule's choice checked by ``benchmarks/sm90_report.py``, or the
winner measured on a GPU by ``benchmarks/tune_tiles.py``), else the rule. The interpreter
keeps the rule's one config (big tiles: it pays per program).

On CUDA, the first launch of a key times every candidate (``candidates``: the choice
first) and keeps the fastest for the process, per GPU model. A key says whether fp32
runs with TF32 off (``ieee``: FMA dots, which need smaller K steps). A key holds M's power-of-two bucket, not M: the rule's tiles are the same across
a bucket, so a new batch size re-tunes only when it crosses one. Launches too small to
fill a GPU (``TINY_GEMM``) and keys with one candidate are not timed. A candidate that fails to compile or launch
(shared memory over another GPU's limit, a ptxas error) is skipped. Every candidate list
is compiled and checked for sm_90a by the report (no spills, HGMMA, pipelined loads,
shared memory that fits). Tuning is off under deterministic algorithms (the pick must not
vary by run), during CUDA graph capture (a capture replays the picks tuned before it),
and with ``INCEPTION_FUSED_AUTOTUNE=0``. Timing runs on a helper thread, outside any CUDA
graph pool (launch.outside_graph_pools).

Train-forward tiles (``mode="train"``) keep the rule's rows per tile: the three launches
write rows of one statistics partials matrix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import triton

from .launch import (
    TileConfig,
    ceil_div,
    input_precision,
    outside_graph_pools,
    pool_tile_config,
    pow2_clamp,
    tile_config,
)

TABLE_PATH = Path(__file__).with_name("tile_table.json")
KERNELS = (
    "pointwise", "pool", "pointwise_pool", "spatial", "reduce_grad", "input_grad", "conv",
    "head",
)  # fmt: skip
# 128-wide N tiles (16-bit types) are offered to the eval stem tiles only: at 128x128 the
# spatial kernel spills (its branch selects and tap loop hold more addresses), and so do
# the train stem tiles and reduce_grad under Triton 3.6 (statistics / BN epilogues).
DTYPE_NAMES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class TileKey(NamedTuple):
    """One conv GEMM launch: [m, k] @ [k, n] per tap, ``ks`` x ``ks`` taps (``ks`` x
    ``kw`` where ``kw`` is set: a rectangular kernel), with ``m`` rounded up to its
    bucket (:meth:`of` builds one from a launch's exact M)."""

    kernel: str
    mode: str  # "eval", "train" or "backward"
    dtype: torch.dtype
    m: int  # a power of two: the bucket of every M in (m / 2, m]
    n: int
    k: int
    ks: int = 1
    ieee: bool = False  # fp32 with TF32 off: FMA dots, other tiles and timings
    kw: int = 0  # a rectangular kernel's width (``ks`` its height); 0: square

    @classmethod
    def of(
        cls,
        kernel: str,
        mode: str,
        dtype: torch.dtype,
        m: int,
        n: int,
        k: int,
        ks: int = 1,
        kw: int | None = None,
    ) -> TileKey:
        """The key of a launch with ``m`` rows, under torch's current fp32 precision;
        ``kw``: the kernel's width where it is not ``ks``."""
        ieee = dtype == torch.float32 and input_precision(dtype) == "ieee"
        kw = 0 if kw is None or kw == ks else kw
        return cls(kernel, mode, dtype, m_bucket(m), n, k, ks, ieee, kw)

    def as_json(self) -> dict:
        """The table's key: ``ieee`` and ``kw`` only where they are set."""
        fields = self._asdict() | {"dtype": DTYPE_NAMES[self.dtype]}
        if not self.ieee:
            del fields["ieee"]
        if not self.kw:
            del fields["kw"]
        return fields

    @classmethod
    def from_json(cls, fields: dict) -> TileKey:
        return cls(**(fields | {"dtype": _DTYPES_BY_NAME[fields["dtype"]]}))


def m_bucket(m: int) -> int:
    """The power of two >= ``m``: the rule's row thresholds are powers of two, so every M
    of a bucket gets the same tiles (tests/test_tiles.py checks it)."""
    return 1 << (max(1, m) - 1).bit_length()


def rule(key: TileKey, on_gpu: bool) -> TileConfig:
    """The tiles a shape gets without a table entry."""
    cfg = _kernel_rule(key, tile_config(key.dtype, key.m, key.n, key.k, on_gpu), on_gpu)
    if key.ieee and on_gpu and cfg.use_dot:
        return _fma_dot_tiles(key, cfg)
    return cfg


def _kernel_rule(key: TileKey, cfg: TileConfig, on_gpu: bool) -> TileConfig:
    if key.kernel == "conv" and cfg.use_dot:  # conv1 reads 3 channels per tap
        return dataclasses.replace(cfg, block_k=pow2_clamp(key.k, 16, cfg.block_k))
    if key.kernel in ("pool", "pointwise_pool"):  # the merged launch: the pool's tiles
        return pool_tile_config(cfg, on_gpu)
    if key.kernel == "spatial" and key.mode == "train" and on_gpu and cfg.use_dot:
        # The BN+ReLU prologue holds the reduce layers' vectors too: at four warps the
        # 128x64 tiles of 4b/4c spill 32 B under Triton 3.6.
        return dataclasses.replace(cfg, num_warps=8)
    if key.kernel == "input_grad":
        if on_gpu:  # four [BLOCK_M, BLOCK_N] tiles live at once (fp64: 16 columns,
            # or Triton 3.6 spills 8 B)
            block_n = cfg.block_n if cfg.use_dot else 16
            return dataclasses.replace(
                cfg, block_m=min(cfg.block_m, 64), block_n=block_n
            )
        # interpreter: fewer, wider programs (fp64's [256, 16, 256] product is still
        # within Triton's 2**20-element cap)
        return dataclasses.replace(cfg, block_n=pow2_clamp(key.n, 1, 256))
    return cfg


def _fma_dot_tiles(key: TileKey, cfg: TileConfig) -> TileConfig:
    """fp32 with TF32 off: tl.dot runs on FMAs and holds its A and B fragments in
    registers, so the tensor-core tiles spill (sm90 report, grid ``fp32-ieee``)."""
    if key.kernel == "conv":  # conv1's transform prologue: 64 columns spill 8-24 B;
        # under Triton 3.6 Inception-v3's 3x3/2 convs spill 24 B at eight warps (the
        # stem's, with its transform) and 8 B at four with a K step of 32 (Mixed_6a's)
        return dataclasses.replace(
            cfg, block_m=64, block_n=32, block_k=min(cfg.block_k, 16), num_warps=4
        )
    if key.mode != "train":  # 128-row spatial and reduce_grad tiles spill 16-32 B
        return dataclasses.replace(cfg, block_m=64)
    # Train tiles keep their rows (one statistics partials matrix).
    if cfg.block_m == 128:  # a K step of 32 spills 16-24 B
        return dataclasses.replace(cfg, block_k=min(cfg.block_k, 16))
    # 64 rows on eight warps spill 8-24 B; on four, 64 columns or a K step of 32 still
    # spill 8-16 B in the stem and spatial tiles at 4a-4d under Triton 3.6.
    return dataclasses.replace(cfg, num_warps=4, block_n=32, block_k=16)


def candidates(key: TileKey) -> list[TileConfig]:
    """The GPU configs the tuner tries for ``key``, the table's (or rule's) choice first:
    one more pipeline stage, eight warps, a wider N tile (16-bit eval stem tiles)
    and, where the rows per tile are free, half the rows. Each is in the report's --check."""
    first = choice(key, True)
    if not first.use_dot or key.ieee:  # fp64, and fp32 on FMAs (not worth a timing,
        return [first]  # and its registers are tight): one config
    base = rule(key, True)
    found = [first, base]
    # A fourth stage of the TF32 train spatial tiles spills 8 B at 4b under Triton 3.6.
    if (key.kernel, key.mode, key.dtype) != ("spatial", "train", torch.float32):
        found.append(dataclasses.replace(base, num_stages=base.num_stages + 1))
    found.append(dataclasses.replace(base, num_warps=8))
    wide_n = key.kernel == "pointwise" and key.mode == "eval"
    if key.dtype != torch.float32 and key.n >= 128 and wide_n:
        found.append(dataclasses.replace(base, block_n=128, num_warps=8))
    if key.mode != "train" and base.block_m == 128:
        found.append(dataclasses.replace(base, block_m=64))
    return list(dict.fromkeys(found))


def rows_per_tile(dtype: torch.dtype, m: int, on_gpu: bool) -> int:
    """BLOCK_M of every train-forward launch at M = ``m``: their statistics partials have
    cdiv(m, rows_per_tile) rows."""
    return rule(TileKey.of("pointwise", "train", dtype, m, 1, 1), on_gpu).block_m


def check_partial_rows(
    partials: tuple[torch.Tensor, torch.Tensor] | None, m: int, cfg: TileConfig
) -> None:
    if partials is not None and partials[0].shape[0] != ceil_div(m, cfg.block_m):
        raise ValueError(
            f"statistics partials have {partials[0].shape[0]} rows; tiles of "
            f"{cfg.block_m} rows over M={m} need {ceil_div(m, cfg.block_m)}"
        )


def table_entries() -> list[dict]:
    """The table file's entries: {"key", "config", "source"} each."""
    return json.loads(TABLE_PATH.read_text())["entries"] if TABLE_PATH.exists() else []


def save_table(entries: list[dict]) -> None:
    """One entry per line, sorted by key, so that a diff shows which shapes changed."""
    entries = sorted(entries, key=lambda e: json.dumps(e["key"], sort_keys=True))
    lines = ",\n".join(json.dumps(e, sort_keys=True) for e in entries)
    TABLE_PATH.write_text('{"entries": [\n' + lines + "\n]}\n")
    table.cache_clear()
    choice.cache_clear()


@functools.cache
def table() -> dict[TileKey, TileConfig]:
    """The committed per-shape tiles (GPU only)."""
    found = {}
    for entry in table_entries():
        key = TileKey.from_json(entry["key"])
        cfg = TileConfig(**entry["config"])
        if key.mode == "train" and cfg.block_m != rule(key, True).block_m:
            raise ValueError(
                f"{TABLE_PATH.name}: train tiles must keep BLOCK_M: {entry}"
            )
        found[key] = cfg
    return found


@functools.lru_cache(maxsize=4096)
def choice(key: TileKey, on_gpu: bool) -> TileConfig:
    """The table's tiles for ``key`` on the GPU, else the rule's."""
    return table().get(key, rule(key, True)) if on_gpu else rule(key, False)


# Picks and timings per (GPU model, key).
TuneKey = tuple[str, TileKey]
_tuned: dict[TuneKey, TileConfig] = {}
_timings: dict[TuneKey, dict[TileConfig, float]] = {}
_recording: list[TileKey] | None = None
# Below this many output elements (M x N, e.g. 512 x 512) a launch is a few tiles: its
# time is launch latency, the same for every candidate, and not worth a timing.
TINY_GEMM = 1 << 18
# What a failing candidate raises (Triton's own autotuner skips the same): shared memory
# or registers over this GPU's limits, ptxas or compile-time assertion errors.
_CANDIDATE_ERRORS = tuple(
    getattr(module, name)
    for module, name in (
        (triton.runtime.errors, "OutOfResources"),
        (triton.runtime.errors, "PTXASError"),
        (triton.compiler.errors, "CompileTimeAssertionFailure"),
    )
    if hasattr(module, name)
)


def autotuning() -> bool:
    return (
        os.environ.get("INCEPTION_FUSED_AUTOTUNE", "1") != "0"
        and not torch.are_deterministic_algorithms_enabled()
        and not (
            torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
        )
    )


@functools.cache
def _gpu_model(index: int) -> str:
    return torch.cuda.get_device_name(index)


def tuning_device(t: torch.Tensor) -> str | None:
    """The GPU model whose timings picks on ``t`` use; None off CUDA (nothing is timed)."""
    if not t.is_cuda:
        return None
    index = t.device.index
    return _gpu_model(torch.cuda.current_device() if index is None else index)


def pick(
    key: TileKey, t: torch.Tensor, launch: Callable[[TileConfig], object]
) -> TileConfig:
    """The tiles to launch ``key`` with, on ``t``'s device; ``launch(cfg)`` runs the
    launch (idempotent: it only stores) and is called here only while tuning."""
    if _recording is not None:  # sm90 report: every candidate's launch is recorded
        _recording.append(key)
        for cfg in candidates(key):
            launch(cfg)
        return choice(key, True)
    device = tuning_device(t)
    if device is None:
        return choice(key, t.is_meta)
    tune_key = (device, key)
    best = _tuned.get(tune_key)
    if best is not None:  # also during a capture: the graph holds the tuned tiles
        return best
    if key.m * key.n < TINY_GEMM or len(candidates(key)) == 1 or not autotuning():
        return choice(key, True)
    return outside_graph_pools(t.device, lambda: _tune(tune_key, launch))


def _time(launch: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(launch, warmup=5, rep=25)


def _tune(tune_key: TuneKey, launch: Callable[[TileConfig], object]) -> TileConfig:
    """Time every candidate of ``tune_key``, keep the fastest; a failing one is skipped
    (raised only when every candidate fails)."""
    times, errors = {}, []
    for cfg in candidates(tune_key[1]):
        try:
            times[cfg] = _time(lambda c=cfg: launch(c))
        except _CANDIDATE_ERRORS as err:
            errors.append(err)
    if not times:
        raise errors[0]
    _timings[tune_key] = times
    best = _tuned[tune_key] = min(times, key=times.get)
    return best


def tuned() -> dict[TileKey, dict[TileConfig, float]]:
    """Every key tuned in this process: each candidate's time in ms (for one GPU model
    and precision: the last tuned wins where a process tuned several)."""
    return {key: times for (_, key), times in _timings.items()}


@contextlib.contextmanager
def launching_every_candidate() -> Iterator[list[TileKey]]:
    """Inside, each launch is also made with every candidate of its key, and the keys
    are listed (for launches recorded on meta tensors: kernels/aot.py)."""
    global _recording
    saved, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = saved

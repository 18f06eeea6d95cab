"""The C++ CPU backend (csrc/, built by setup.py as ``inception_fused._C``)."""

from __future__ import annotations

import importlib
import weakref
from types import ModuleType

import torch

from .folding import FoldedInception

CPU_DTYPES = (torch.float32, torch.float64)

# torch.backends.cpu.get_cpu_capability() values that imply AVX2 and FMA (torch checks
# both before it reports AVX2).
AVX2_CAPABILITIES = ("AVX2", "AVX512")

_extension: ModuleType | None = None
# Winograd-transformed 3x3 weights per FoldedInception (by id, dropped with it): the
# module refolds into a new object whenever a parameter changes, so entries never go stale.
_winograd_cache: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}


def extension_name(capability: str | None = None) -> str:
    """The build of the kernels this CPU runs: ``inception_fused._C_avx2`` (AVX2 + FMA)
    where torch's CPU capability says AVX2 or better, else the baseline ``_C``.

    ``capability``: ``torch.backends.cpu.get_cpu_capability()`` by default, which reads
    the CPU (and honours ``ATEN_CPU_CAPABILITY=default`` to force the baseline).
    """
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    return (
        "inception_fused._C_avx2"
        if capability in AVX2_CAPABILITIES
        else "inception_fused._C"
    )


def load_extension() -> ModuleType:
    """The compiled extension for this CPU (:func:`extension_name`); a clear error when
    it was not built (never a silent fallback to other math)."""
    global _extension
    if _extension is None:
        name = extension_name()
        try:
            try:
                _extension = importlib.import_module(name)
            except ImportError:
                if name == "inception_fused._C":
                    raise
                # Built without the AVX2 variant (e.g. on another architecture).
                _extension = importlib.import_module("inception_fused._C")
        except ImportError as err:
            raise RuntimeError(
                "inception_fused's C++ CPU backend (inception_fused._C) is not built or "
                f"failed to load ({err}). Build it with `pip install "
                "--no-build-isolation -e .` (needs torch and a C++ compiler), or choose "
                "backend='reference' for plain PyTorch on CPU."
            ) from err
    return _extension


def winograd_transform(ext: ModuleType, w: torch.Tensor, k: int) -> torch.Tensor | None:
    """F(2x2, 3x3)-transformed packed weights of a 3x3 branch; None for other kernels
    and for weights holding an inf or NaN (the transform would smear it: direct conv
    keeps the reference's non-finite pattern)."""
    return ext.winograd_weights(w) if k == 3 and bool(w.isfinite().all()) else None


def winograd_weights(
    ext: ModuleType, f: FoldedInception
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both branches' Winograd weights (None where not 3x3), cached per fold."""
    key = id(f)
    if key not in _winograd_cache:
        _winograd_cache[key] = (
            winograd_transform(ext, f.w3, f.k3),
            winograd_transform(ext, f.w5, f.k5),
        )
        weakref.finalize(f, _winograd_cache.pop, key, None)
    return _winograd_cache[key]


def cpu_eval_forward(
    x: torch.Tensor,
    f: FoldedInception,
    winograd: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Eval-mode Inception (BN folded) on CPU in two OpenMP steps; channels_last output.

    Step 1 reads x once per pixel block: the three 1x1 convs as one GEMM (branch 1 into
    its output slice, the reduce outputs into zero-bordered scratch maps) and the max-pool
    fused into the pool projection. Step 2 runs the 3x3 convs as Winograd F(2x2, 3x3) and
    other kernel sizes as implicit GEMMs over those maps. Every branch is written into its
    slice of one output. ``winograd``: the 3x3 branches' transformed weights (default:
    :func:`winograd_weights` of ``f``, cached).
    """
    ext = load_extension()
    w3, w5 = winograd if winograd is not None else winograd_weights(ext, f)
    return ext.eval_forward(
        x,
        *f.args,
        w3,
        w5,
    )

"""The C++ CPU backend (csrc/, built by setup.py as ``inception_fused._C``)."""

from __future__ import annotations

import importlib
import weakref
from types import ModuleType

import torch

from .folding import FoldedInception

CPU_DTYPES = (torch.float32, torch.float64)

# The builds setup.py makes of the same kernels, best first, each with the
# torch.backends.cpu.get_cpu_capability() values that select it (torch checks AVX2
# together with FMA, and AVX-512 F/BW/VL/DQ, before it reports them) and the ISA the
# baseline build's ``cpu_runs`` confirms before it is imported.
BUILDS = (
    ("inception_fused._C_avx512", ("AVX512",), "avx512"),
    ("inception_fused._C_avx2", ("AVX2",), "avx2"),
)
BASELINE = "inception_fused._C"

_extension: ModuleType | None = None
# Winograd-transformed 3x3 weights per FoldedInception (by id, dropped with it): the
# module refolds into a new object whenever a parameter changes, so entries never go stale.
_winograd_cache: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}


def extension_name(capability: str | None = None) -> str:
    """The build of the kernels for torch's CPU capability: ``inception_fused._C_avx512``
    (AVX-512) for ``AVX512``, ``inception_fused._C_avx2`` (AVX2 + FMA) for ``AVX2``, else
    the baseline ``inception_fused._C``.

    ``capability``: ``torch.backends.cpu.get_cpu_capability()`` by default, which reads
    the CPU and honours ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` to force one.
    """
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    return next(
        (name for name, capabilities, _ in BUILDS if capability in capabilities),
        BASELINE,
    )


def _import_build(name: str) -> ModuleType:
    """``name``, or the next build down that is built and that this CPU runs (torch
    reports a forced capability even where the CPU lacks it: importing that build
    would die on an illegal instruction)."""
    baseline = importlib.import_module(BASELINE)
    names = [b[0] for b in BUILDS]
    start = names.index(name) if name in names else len(BUILDS)
    for build, _, isa in BUILDS[start:]:
        if baseline.cpu_runs(isa):
            try:
                return importlib.import_module(build)
            except ImportError:  # not built (another architecture, an old build)
                continue
    return baseline


def load_extension() -> ModuleType:
    """The compiled extension for this CPU (:func:`extension_name`, or the best build
    below it that exists and runs here); a clear error when none was built (never a
    silent fallback to other math)."""
    global _extension
    if _extension is None:
        try:
            _extension = _import_build(extension_name())
        except ImportError as err:
            raise RuntimeError(
                "inception_fused's C++ CPU backend (inception_fused._C) is not built or "
                f"failed to load ({err}). Build it with `pip install "
                "--no-build-isolation -e .` (needs torch and a C++ compiler), or choose "
                "backend='reference' for plain PyTorch on CPU."
            ) from err
    return _extension


def loaded_build() -> str:
    """The build this process runs, for benchmark and demo output, e.g.
    ``"_C_avx2 (256-bit vectors; torch capability AVX2)"``."""
    ext = load_extension()
    return (
        f"{ext.__name__.rsplit('.', 1)[-1]} ({ext.vector_bits()}-bit vectors; "
        f"torch capability {torch.backends.cpu.get_cpu_capability()})"
    )


# The output tile side m of the Winograd F(m x m, 3x3) every 3x3 stride-1 conv runs (the
# kernels run m = 2 and 4; the transformed weights' rows, (m + 2)^2 * C_in, tell which).
# F(4x4) (4x fewer multiplies than direct convolution, F(2x2) 2.25x) measured faster
# summed over GoogLeNet's and Inception-v3's 3x3 convs at batch 1 and 8; per layer it
# ties at 14x14 and loses at 7x7 / 8x8 at batch 1 (2.25x the weight bytes to stream).
WINOGRAD_TILE = 4


def winograd_transform(ext: ModuleType, w: torch.Tensor, k: int) -> torch.Tensor | None:
    """F(4x4, 3x3)-transformed packed weights of a 3x3 branch; None for other kernels
    and for weights holding an inf or NaN (the transform would smear it: direct conv
    keeps the reference's non-finite pattern)."""
    if k != 3 or not bool(w.isfinite().all()):
        return None
    return ext.winograd_weights(w, WINOGRAD_TILE)


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
    fused into the pool projection. Step 2 runs the 3x3 convs as Winograd F(4x4, 3x3) and
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

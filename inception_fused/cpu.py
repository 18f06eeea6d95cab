"""The C++ CPU backend (csrc/, built by setup.py as ``inception_fused._C``)."""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable, Iterable
from types import ModuleType

import torch
from torch.nn.modules import module as nn_module

from .fold_cache import capturing, epoch, refold, tensor_versions
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


class _ContentEntry:
    """A Program with a copy of the weights it was built from, and the tensors it last
    matched (weak references and version counters). A frozen graph hands the op the same
    constant tensors every call, and those skip the compare; only what the graph makes
    anew (Inductor computes its tiniest constants in a kernel each call) is compared."""

    def __init__(self, tensors: list[torch.Tensor], versions: list[int], program: object) -> None:
        self.weights = [t.clone() for t in tensors]
        self.program = program
        self.remember(tensors, versions)

    def remember(self, tensors: list[torch.Tensor], versions: list[int]) -> None:
        self.last = [weakref.ref(t) for t in tensors]
        self.versions = versions

    def matches(self, tensors: list[torch.Tensor], versions: list[int]) -> bool:
        for t, weight, last, version, then in zip(
            tensors, self.weights, self.last, versions, self.versions
        ):
            unchanged = version != -1 and version == then and last() is t  # -1: no counter
            if not unchanged and not torch.equal(weight, t):
                return False
        self.remember(tensors, versions)
        return True


_extension: ModuleType | None = None
# fold_program's Programs: (weight versions, Program) by the weights' ids; and for the
# custom op, by the weights' shapes, a _ContentEntry.
_program_cache: dict[tuple[int, ...], tuple[list[int], object]] = {}
_programs_by_content: dict[tuple, _ContentEntry] = {}


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


class Confirmed:
    """A network's last full test (which program runs an input under a key, or None) and
    what that test read, so that the next calls with the same key test only for change:
    nothing in :func:`fold_cache.epoch` moved (module registrations, optimizer steps, a
    fold cache cleared anywhere), no global forward hook is set, and one C++ pass
    (``_C.ModuleWatch``) finds every module's class, attributes, tensors (identity,
    version, requires_grad), submodules and forward hooks as they were. The forward
    evicts every cache level and Python then waits on each cold object in turn:
    GoogLeNet's full test took 0.3 ms after a cache flush.

    Attributes matter as much as tensors: a program reads a BatchNorm's ``eps`` and every
    conv's geometry, which no tensor version counts; when one changed, the owner's folds
    are dropped (:func:`fold_cache.refold`) before the full test runs again. One per
    network, kept in its ``__dict__`` (the watch sees that dict too: replacing the
    holder would look like a change)."""

    def __init__(self) -> None:
        self.key: object = None  # None: nothing confirmed
        self.program: Callable[[torch.Tensor], torch.Tensor] | None = None

    def program_for(
        self,
        key: object,
        owner: torch.nn.Module,
        test: Callable[[], Callable[[torch.Tensor], torch.Tensor] | None],
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The program for ``key``: the confirmed one while nothing changed, else
        ``test()``'s answer (``owner``'s folds dropped first if an attribute changed),
        confirmed unless a CUDA graph is being captured (a program built then holds
        nothing until the graph's first replay)."""
        if self.key is not None:
            changes = self.watch.changes()
            if not changes and key == self.key and epoch() == self.epoch and not _global_hooks():
                return self.program
            if changes & self.watch.ATTRIBUTES:
                refold(owner)
        self.key = None
        program = test()
        if not capturing():
            self.held: list[object] = []  # what the watch compares by address
            self.watch = load_extension().ModuleWatch(tuple(owner.modules()), self.held)
            self.key, self.program, self.epoch = key, program, epoch()
        return program


def confirmed_program(
    owner: torch.nn.Module,
    x: torch.Tensor,
    backend: str,
    test: Callable[[], Callable[[torch.Tensor], torch.Tensor] | None],
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``owner``'s program for ``x`` on ``backend`` through its :class:`Confirmed` (kept
    in ``owner.__dict__["_confirmed"]``), keyed by what of ``x`` and torch's modes a
    full test reads: dtype, device, channels, grad mode."""
    confirmed = owner.__dict__.get("_confirmed")
    if confirmed is None:
        confirmed = owner.__dict__["_confirmed"] = Confirmed()
    key = (x.dtype, x.get_device(), x.shape[1], backend, torch.is_grad_enabled())
    return confirmed.program_for(key, owner, test)


def _global_hooks() -> bool:
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def has_forward_hooks(modules: Iterable[torch.nn.Module]) -> bool:
    """Whether a global forward (pre-)hook is set or one of ``modules`` has its own."""
    return _global_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in modules)


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


# A block's two steps as a C++ Program (csrc/program.h's encoding): maps x, the
# output, the 3x3 and 5x5 branches' reduce maps (bordered by their conv's padding).
_X, _OUT, _RED3, _RED5 = range(4)


def _check_fold(f: FoldedInception) -> None:
    """The fold's shapes agree (the custom op passes tensors through unchecked): a clear
    error naming the problem before anything runs."""
    for name, w, b in (("stem_b", f.stem_w, f.stem_b), ("pool_b", f.pool_w, f.pool_b),
                       ("b3", f.w3, f.b3), ("b5", f.w5, f.b5)):  # fmt: skip
        if b.dim() != 1 or w.dim() != 2 or b.shape[0] != w.shape[1]:
            raise RuntimeError(
                f"inception_fused CPU backend: {name} has {b.numel()} elements, its "
                f"weight has {w.shape[-1]} output channels"
            )
    c_in, r5 = f.stem_w.shape[0], f.stem_w.shape[1] - f.c1 - f.r3
    if f.c1 < 0 or f.r3 <= 0 or r5 <= 0 or f.k3 % 2 == 0 or f.k5 % 2 == 0:
        raise RuntimeError(
            f"inception_fused CPU backend: bad split of stem_w's {f.stem_w.shape[1]} "
            f"columns (c1 {f.c1}, r3 {f.r3}, r5 {r5}) or kernel sizes ({f.k3}, {f.k5})"
        )
    if (f.pool_w.shape[0], f.w3.shape[0], f.w5.shape[0]) != (
        c_in, f.k3 * f.k3 * f.r3, f.k5 * f.k5 * r5
    ):
        raise RuntimeError(
            f"inception_fused CPU backend: folded weights do not fit {c_in} input "
            f"channels, reduces of {f.r3} and {r5}, kernels {f.k3} and {f.k5}"
        )


def _fold_program(ext: ModuleType, f: FoldedInception):
    """Step 1 reads x (branch 1 and both reduces as one packed GEMM, the pool branch
    with its max taken while loading), step 2 the 3x3 / 5x5 convs (3x3 as Winograd)."""
    _check_fold(f)
    c1, r3, c3, c5 = f.c1, f.r3, f.w3.shape[1], f.w5.shape[1]
    r5 = f.stem_w.shape[1] - c1 - r3
    tensors = [f.stem_w, f.stem_b, f.pool_w, f.pool_b, f.w3, f.b3, f.w5, f.b5]
    ints = [4]  # maps: channels, border, slot
    ints += [f.stem_w.shape[0], 0, 0, c1 + c3 + c5 + f.pool_w.shape[1], 0, -1]
    ints += [r3, f.k3 // 2, 1, r5, f.k5 // 2, 2]
    ints += [0, _X, -1]  # the input op

    def branch(src, dst, channel, k, pool, w, col_begin, col_end, u=-1):
        return [src, dst, channel, k, k, 1, k // 2, k // 2, pool, w, w + 1, col_begin,
                col_end, u]  # fmt: skip

    step1 = [branch(_X, _RED3, 0, 1, 0, 0, c1, c1 + r3),
             branch(_X, _RED5, 0, 1, 0, 0, c1 + r3, c1 + r3 + r5),
             branch(_X, _OUT, c1 + c3 + c5, 1, 1, 2, 0, f.pool_w.shape[1])]  # fmt: skip
    if c1:
        step1.insert(0, branch(_X, _OUT, 0, 1, 0, 0, 0, c1))
    step2 = []
    for src, channel, k, w in ((_RED3, c1, f.k3, 4), (_RED5, c1 + c3, f.k5, 6)):
        u = winograd_transform(ext, tensors[w], k)
        if u is not None:
            tensors.append(u)
        step2.append(branch(src, _OUT, channel, k, 0, w, 0, tensors[w].shape[1],
                            -1 if u is None else len(tensors) - 1))  # fmt: skip
    for step in (step1, step2):
        ints += [1, len(step), *(i for b in step for i in b)]
    return ext.Program(tensors, ints)


def fold_program(f: FoldedInception, by_content: bool = False):
    """The C++ Program of one block's fold, built once per set of weight tensors (by
    identity) and rebuilt when one of them was written in place.

    ``by_content``: the custom op's calls. A compiled graph folds per call, into new
    tensors of the same values, so those find the last Program built for the fold's
    shapes when its weights are equal (compared in full: much cheaper than packing and
    transforming them again; not at all when they are the tensors it last matched, as a
    frozen graph's constants are)."""
    tensors = [a for a in f.args if isinstance(a, torch.Tensor)]
    key = (*map(id, tensors), f.c1, f.r3, f.k3, f.k5)
    versions = tensor_versions(tensors)
    entry = _program_cache.get(key)
    if entry is not None and entry[0] == versions:
        return entry[1]
    if by_content:
        shapes = (f.c1, f.r3, f.k3, f.k5, *(t.shape for t in tensors), tensors[0].dtype)
        seen = _programs_by_content.get(shapes)
        if seen is None or not seen.matches(tensors, versions):
            program = _fold_program(load_extension(), f)
            seen = _programs_by_content[shapes] = _ContentEntry(tensors, versions, program)
        return seen.program
    if entry is None:  # dropped with the first of its tensors
        for t in tensors:
            weakref.finalize(t, _program_cache.pop, key, None)
    entry = _program_cache[key] = (versions, _fold_program(load_extension(), f))
    return entry[1]


def cpu_eval_forward(
    x: torch.Tensor, f: FoldedInception, by_content: bool = False
) -> torch.Tensor:
    """Eval-mode Inception (BN folded) on CPU as one C++ Program of two OpenMP steps
    (:func:`fold_program`); channels_last output. Every branch is written into its
    slice of one output."""
    return fold_program(f, by_content).forward(x)

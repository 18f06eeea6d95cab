"""Host overhead per call of a fused Inception block, with every kernel launch stubbed.

At batch 1 a block's kernels take microseconds on a GPU, so the Python and dispatcher
work around them decides the latency. This script replaces every Triton launch
(``kernel[grid](...)``) and the C++ backend's entry with no-ops and times what is left,
per call, for each of the nine GoogLeNet configurations at batch 1:

    eval        FusedInceptionModule eval forward, Triton backend, under no_grad, with
                its two launchers (launch_pointwise, launch_spatial) stubbed: the
                module's own host work, as issue 15 measures it
    eval+launch the same with only the kernel launches stubbed (the launchers' grid and
                argument work included)
    eval-cpp    the same through the C++ CPU backend (its compute stubbed)
    train-fwd   train-mode forward (batch statistics) of an input that requires grad
    train-bwd   the backward of that forward
    train-step  both, timed as one call

Provider ``autograd-only`` (train rows): one autograd.Function over the block's input
and parameters that computes nothing, timed the same way: the floor of any train step
of the block through autograd (function call, saved inputs, the engine, a grad handed to
each parameter).

Before every train call the parameters' grads are set to None (untimed), as a training
loop's ``zero_grad()`` leaves them: the backward then hands its gradients over instead of
adding them to old ones.

Tensors (column ``tensors``):

- ``cuda`` (where present): the real thing. The reference is the eager block's enqueue
  time (no synchronisation between calls); the fused rows include the aten ops the path
  runs besides its Triton kernels (weight packing, conv weight gradients), each of which
  enqueues CUDA work.
- ``cpu``: the module and input on CPU tensors at 2x2 maps. Every aten op really computes
  (tiny), allocations are real: an upper bound of the host time, honest for eval (the
  fused eval path runs no aten compute) but not for train, whose small aten ops (weight
  packing, conv weight gradients via aten.convolution_backward, mm) would be
  asynchronous launches on a GPU.
- ``meta`` (train rows, without CUDA): the module and input on meta tensors at the
  config's native map size, Triton launches stubbed. ``launch.compiled_for_gpu`` treats
  meta as CUDA, so the GPU tile and grid code runs. A meta op does the dispatcher's and
  the shape function's work and nothing else: no compute, no allocation, no CUDA launch.
  torch registers Python meta kernels (``torch._meta_registrations``) over most C++ ones,
  which would inflate these rows several times over, so before the meta rows this script
  drops them where a C++ meta kernel exists (process-wide; the meta rows run last). The
  ops left without one keep their Python kernel and are counted in ``python_meta``.
  Comparable to a CUDA run with launches stubbed: Python, autograd, dispatcher, shape
  checks. Not included: the caching allocator (a few hundred ns per allocation) and the
  CUDA launch of each aten op that enqueues a kernel (a few us each on a GPU host; counted
  in ``aten_launches``). No reference rows on meta: conv and batch_norm have no C++ meta
  kernels, their Python ones would make it look ~5x slower than it is.

Op counts (train rows; one untimed, separate pass under a TorchDispatchMode, which the
fused path's eager shortcut is told to ignore): ``aten_ops`` aten operators per call,
``aten_launches`` those that would launch a CUDA kernel (not views, not bare
allocations), ``triton_launches`` stubbed Triton launches, ``python_meta`` ops served by
a Python meta kernel (meta rows) and ``python_meta_us`` the time spent in them in that
pass: part of the meta row's time that a CUDA run spends in C++ instead.

Calls are timed one by one, in runs of consecutive calls of one path that alternate
between paths (warm caches as in a loop, load from other processes spread alike), up to
``--rounds`` calls or ``--seconds`` per path; medians and 20/80 quantiles in microseconds
are printed and appended to ``benchmarks/results/overhead-<device>.csv``. CPU runs use
one thread: host work is serial, and a loaded machine's OpenMP spinning would swamp it.

    python benchmarks/bench_overhead.py [--configs 3a,5b] [--batch 1] [--spatial N]
                                        [--rounds 2000] [--seconds 3] [--quick]
                                        [--no-meta]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import functools
import importlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    # CPU tensors take the Triton path only through the interpreter (no kernel runs).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.runtime.jit
from common import RESULTS_DIR, device_name, git_commit, parse_csv_arg, slugify

import inception_fused.training
from inception_fused import FusedInceptionModule, InceptionModule
from inception_fused.configs import GOOGLENET_CONFIGS
from inception_fused.cpu import load_extension

FIELDS = (
    "time_utc",
    "device",
    "torch",
    "triton",
    "commit",
    "config",
    "batch",
    "spatial",
    "tensors",
    "path",
    "provider",
    "median_us",
    "q20_us",
    "q80_us",
    "calls",
    "aten_ops",
    "aten_launches",
    "triton_launches",
    "python_meta",
    "python_meta_us",
)
TRAIN_PATHS = ("train-fwd", "train-bwd", "train-step")
# Non-view aten ops that enqueue no CUDA kernel: bare allocations, metadata.
NO_LAUNCH = frozenset(
    {
        "aten::empty.memory_format",
        "aten::empty_strided",
        "aten::empty_like",
        "aten::empty_permuted",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::_unsafe_view",
    }
)


def _eval_launch_module():
    try:
        return importlib.import_module("inception_fused.eval_launch")
    except ImportError:  # before the rename, to measure the old code the same way
        return importlib.import_module("inception_fused.ops")


@contextlib.contextmanager
def launchers_stubbed() -> Iterator[None]:
    """The eval forward's two launchers become no-ops."""
    mod = _eval_launch_module()
    saved = mod.launch_pointwise, mod.launch_spatial
    mod.launch_pointwise = mod.launch_spatial = lambda *a, **k: None
    try:
        yield
    finally:
        mod.launch_pointwise, mod.launch_spatial = saved


class LaunchCounter:
    """Counts the stubbed Triton launches (read by the op-count pass)."""

    count = 0

    @classmethod
    def stub(cls, *args: object, **kwargs: object) -> None:
        cls.count += 1


@contextlib.contextmanager
def launches_stubbed() -> Iterator[None]:
    """Every ``kernel[grid](...)`` and the C++ entry become no-ops."""
    interface = triton.runtime.jit.KernelInterface
    getitem = interface.__getitem__
    program = load_extension().Program
    cpp_entry = program.forward

    def cpp_stub(self: object, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(0)  # one allocation, as the real entry's output

    interface.__getitem__ = lambda self, grid: LaunchCounter.stub
    program.forward = cpp_stub
    try:
        yield
    finally:
        interface.__getitem__ = getitem
        program.forward = cpp_entry


# Their C++ "meta" kernel is a composite that does not run on meta tensors.
NO_CPP_META = frozenset({"convolution", "convolution_backward"})
_KEPT: list[torch.library.Library] = []


@functools.cache  # cleared by use_cpp_meta_kernels
def _meta_kernel_is_python(name: str) -> bool:
    meta = [
        line
        for line in torch._C._dispatch_dump_table(name).splitlines()
        if line.startswith("Meta:")
    ]
    return bool(meta) and ".py:" in meta[0]


def use_cpp_meta_kernels() -> None:
    """Drop torch's Python meta kernels where a C++ one exists (process-wide, for good).

    ``torch._meta_registrations`` registers a Python meta kernel over most aten ops (for
    FakeTensor and symbolic shapes); a CUDA tensor never runs them, and they cost several
    us each. Ops that have no C++ meta kernel (e.g. flip) get their Python one back.
    """
    from torch._decomp import global_decomposition_table
    from torch._meta_registrations import _meta_lib_dont_use_me_use_register_meta as lib

    names = {key.split("/")[1] for key in lib._op_impls}
    lib._destroy()
    python_kernels = {}  # as torch's activate_meta picks them: meta first
    for kind in ("pre_autograd", "post_autograd", "meta"):
        python_kernels.update(
            {op.name(): fn for op, fn in global_decomposition_table[kind].items()}
        )
    restored = torch.library.Library("aten", "IMPL", "Meta")
    for name in sorted(names):
        qualified = f"aten::{name}"
        table = torch._C._dispatch_dump_table(qualified)
        meta = [line for line in table.splitlines() if line.startswith("Meta:")]
        if qualified in python_kernels and (
            not meta or "backend fallback" in meta[0] or name in NO_CPP_META
        ):
            restored.impl(name, python_kernels[qualified])
    _KEPT.append(restored)  # its registrations live as long as it does
    _meta_kernel_is_python.cache_clear()


class OpCounter(TorchDispatchMode):
    """Counts aten ops: all, those that would launch a CUDA kernel, and (on meta) those
    run by a Python meta kernel, with the time spent in them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.python_meta_seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        self.ops[name] += 1
        if not _meta_kernel_is_python(name):
            return func(*args, **(kwargs or {}))
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.python_meta_seconds += time.perf_counter() - t0
        return out

    def counts(self, meta: bool) -> dict[str, int | str]:
        views = {n for n in self.ops if _is_view(n)}
        python = sum(c for n, c in self.ops.items() if _meta_kernel_is_python(n))
        return {
            "aten_ops": sum(self.ops.values()),
            "aten_launches": sum(
                c for n, c in self.ops.items() if n not in views and n not in NO_LAUNCH
            ),
            "python_meta": python if meta else "",
            "python_meta_us": round(self.python_meta_seconds * 1e6) if meta else "",
        }


def _is_view(name: str) -> bool:
    packet, _, overload = name.removeprefix("aten::").partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default").is_view


@contextlib.contextmanager
def counting() -> Iterator[OpCounter]:
    """An OpCounter over the block; the fused path takes its eager shortcut under it
    (eval_op.unobserved would otherwise send it through the custom ops)."""
    training = inception_fused.training
    unobserved = training.unobserved
    training.unobserved = lambda x: type(x) is torch.Tensor
    try:
        with OpCounter() as counter:
            yield counter
    finally:
        training.unobserved = unobserved


@contextlib.contextmanager
def meta_autocast_off() -> Iterator[None]:
    """Autocast has no meta device: asked about meta, answer "off" (as on CUDA outside
    autocast) instead of raising."""
    is_enabled = torch.is_autocast_enabled

    def answer(device_type: str | None = None) -> bool:
        if device_type == "meta":
            return False
        return is_enabled() if device_type is None else is_enabled(device_type)

    torch.is_autocast_enabled = answer
    try:
        yield
    finally:
        torch.is_autocast_enabled = is_enabled


class _Untouched(torch.autograd.Function):
    """Saves its inputs, returns an empty output; its backward an empty grad for each."""

    @staticmethod
    def forward(ctx, shape: torch.Size, x: torch.Tensor, *params: torch.Tensor):
        ctx.save_for_backward(x, *params)
        return torch.empty(shape, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return (None, *(torch.empty_like(t) for t in ctx.saved_tensors))


class AutogradOnly(torch.nn.Module):
    """The block's autograd shell: one Function over x and its parameters that computes
    nothing. What any autograd train step of the block costs at least (the function
    call, saving the inputs, the engine, a grad allocated and handed to each
    parameter), timed like the blocks."""

    def __init__(self, block: InceptionModule) -> None:
        super().__init__()
        self.block = block
        self.params = list(block.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        shape = torch.Size((n, self.block.out_channels, h, w))
        return _Untouched.apply(shape, x, *self.params)


class Paths:
    """The timed calls of one configuration; each returns the seconds it measured."""

    def __init__(
        self, name: str, device: torch.device, batch: int, side: int | None
    ) -> None:
        cfg = GOOGLENET_CONFIGS[name]
        side = side or cfg.spatial
        torch.manual_seed(0)
        ref = InceptionModule(*cfg.channels).to(device)
        self.x = torch.randn(batch, cfg.in_channels, side, side, device=device)
        self.grad = torch.randn(batch, ref.out_channels, side, side, device=device)
        self.eval_triton = FusedInceptionModule.from_module(
            ref.eval(), backend="triton"
        )
        self.eval_cpp = FusedInceptionModule.from_module(ref, backend="cpu")
        self.train = FusedInceptionModule.from_module(ref.train(), backend="triton")
        self.ref_eval = InceptionModule(*cfg.channels).to(device).eval()
        self.ref_train = InceptionModule(*cfg.channels).to(device).train()
        self.autograd_only = AutogradOnly(InceptionModule(*cfg.channels).to(device))
        self.sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def launcher_calls(self) -> dict[tuple[str, str], Callable[[], float]]:
        """Timed under launchers_stubbed()."""
        return {("eval", "fused"): lambda: _timed_eval(self.eval_triton, self.x)}

    def calls(self, device: torch.device) -> dict[tuple[str, str], Callable[[], float]]:
        """Timed under launches_stubbed()."""
        fused = {
            ("eval+launch", "fused"): lambda: _timed_eval(self.eval_triton, self.x),
        } | self.train_calls(self.train, "fused")
        if device.type == "cpu":
            fused[("eval-cpp", "fused")] = lambda: _timed_eval(self.eval_cpp, self.x)
        return (
            fused
            | {("eval", "reference"): lambda: _timed_eval(self.ref_eval, self.x)}
            | self.train_calls(self.ref_train, "reference")
            | self.train_calls(self.autograd_only, "autograd-only")
        )

    def train_calls(
        self, module: torch.nn.Module, provider: str
    ) -> dict[tuple[str, str], Callable[[], float]]:
        timed = {"train-fwd": (True, False), "train-bwd": (False, True)}
        timed["train-step"] = (True, True)
        return {
            (path, provider): (
                lambda fwd=fwd, bwd=bwd: _timed_train(
                    module, self.x, self.grad, fwd, bwd
                )
            )
            for path, (fwd, bwd) in timed.items()
        }

    def op_counts(
        self,
        meta: bool,
        providers: tuple[str, ...] = ("fused", "reference"),
        passes: int = 5,
    ) -> dict[tuple[str, str], dict[str, int]]:
        """Per train path and provider: counts of an untimed call under an OpCounter
        (after a warm-up call); ``python_meta_us`` the least of ``passes`` calls."""
        counts = {}
        modules = {"fused": self.train, "reference": self.ref_train}
        for provider in providers:
            module = modules[provider]
            _timed_train(module, self.x, self.grad, True, True)  # warm caches
            for _ in range(passes):
                rows = self._counted_step(module, meta)
                for path, row in rows.items():
                    best = counts.get((path, provider), row)["python_meta_us"]
                    if meta:
                        row["python_meta_us"] = min(row["python_meta_us"], best)
                    counts[path, provider] = row
            counts["train-step", provider] = {
                key: (a + b if isinstance(a, int) else a)
                for (key, a), b in zip(
                    counts["train-fwd", provider].items(),
                    counts["train-bwd", provider].values(),
                    strict=True,
                )
            }
        return counts

    def _counted_step(
        self, module: torch.nn.Module, meta: bool
    ) -> dict[str, dict[str, int]]:
        module.zero_grad(set_to_none=True)
        x = self.x.detach().requires_grad_()
        launches = LaunchCounter.count
        with counting() as fwd:
            out = module(x)
        fwd_launches = LaunchCounter.count - launches
        with counting() as bwd:
            out.backward(self.grad)
        bwd_launches = LaunchCounter.count - launches - fwd_launches
        return {
            "train-fwd": fwd.counts(meta) | {"triton_launches": fwd_launches},
            "train-bwd": bwd.counts(meta) | {"triton_launches": bwd_launches},
        }


def _timed_eval(module: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        module(x)
        return time.perf_counter() - t0


def _timed_train(
    module: torch.nn.Module,
    x: torch.Tensor,
    grad: torch.Tensor,
    time_forward: bool,
    time_backward: bool,
) -> float:
    """The forward's, the backward's or both's time; grads start as None (a training
    loop's zero_grad)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    t0 = time.perf_counter()
    out = module(x)
    seconds = time.perf_counter() - t0 if time_forward else 0.0
    if time_backward:
        t0 = time.perf_counter()
        out.backward(grad)
        seconds += time.perf_counter() - t0
    return seconds


def measure(
    paths: dict[tuple[str, str], Callable[[], float]],
    rounds: int,
    seconds: float,
    sync: Callable,
    chunks: int = 10,
) -> dict[tuple[str, str], list[float]]:
    """Up to ``rounds`` timed calls per path (fewer where they would take more than
    ``seconds``; at least one per chunk), in ``chunks`` runs of consecutive calls that
    alternate between paths: caches stay as warm as in a loop of one block's calls,
    while load from other processes is spread over every path alike."""
    for fn in paths.values():  # warm up: folds, caches, lazy imports
        for _ in range(5):
            fn()
    sync()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in paths}
    per_chunk = max(1, rounds // chunks)
    for _ in range(chunks):
        for key, fn in paths.items():
            start = time.perf_counter()
            for _ in range(per_chunk):
                times[key].append(fn() * 1e6)
                sync()  # keep the CUDA queue short; outside every timed region
                if time.perf_counter() - start > seconds / chunks:
                    break
    return times


class Results:
    """Rows to the CSV (rewritten with the current header if an older one differs) and
    to stdout."""

    def __init__(self, path: Path, common: dict) -> None:
        self.common = common
        rows = []
        if path.exists():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                if tuple(reader.fieldnames or ()) != FIELDS:
                    rows = list(reader)
        self.file = path.open("w" if rows else "a", newline="")
        self.writer = csv.DictWriter(self.file, FIELDS, restval="")
        if rows or self.file.tell() == 0:
            self.writer.writeheader()
            self.writer.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)

    def add(
        self,
        name: str,
        spatial: int | str,
        tensors: str,
        times: dict[tuple[str, str], list[float]],
        counts: dict[tuple[str, str], dict[str, int]],
    ) -> None:
        for (mode, provider), values in times.items():
            q = statistics.quantiles(values, n=10, method="inclusive")
            median = statistics.median(values)
            ops = counts.get((mode, provider), {})
            self.writer.writerow(
                self.common
                | {
                    "config": name,
                    "spatial": spatial,
                    "tensors": tensors,
                    "path": mode,
                    "provider": provider,
                    "median_us": f"{median:.1f}",
                    "q20_us": f"{q[1]:.1f}",
                    "q80_us": f"{q[7]:.1f}",
                    "calls": len(values),
                }
                | ops
            )
            described = " ".join(f"{k}={v}" for k, v in ops.items() if v != "")
            print(
                f"{name:>3} {tensors:>4} {mode:>11} {provider:<10} {median:8.1f} us "
                f"[{q[1]:.1f}, {q[7]:.1f}] {described}",
                flush=True,
            )

    def close(self) -> None:
        self.file.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(GOOGLENET_CONFIGS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--spatial", type=int, help="map size (default: the config's on CUDA, 2 on CPU)"
    )
    parser.add_argument("--rounds", type=int, default=2000, help="calls per path")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="at most this long per path"
    )
    parser.add_argument("--quick", action="store_true", help="3a and 5b, 100 rounds")
    parser.add_argument(
        "--no-meta", action="store_true", help="without CUDA: skip the meta-tensor rows"
    )
    args = parser.parse_args()
    configs = parse_csv_arg(args.configs, GOOGLENET_CONFIGS)
    rounds = args.rounds
    if args.quick:
        configs, rounds = ["3a", "5b"], 100
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    side = args.spatial or (None if device.type == "cuda" else 2)
    if device.type == "cpu":
        torch.set_num_threads(1)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = {
        "time_utc": stamp,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "batch": args.batch,
    }
    out_dir = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    path = out_dir / f"overhead-{slugify(device_name(device))}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"{common['device']} | torch {torch.__version__} | commit {common['commit']}")
    results = Results(path, common)
    with launches_stubbed(), contextlib.closing(results):
        for name in configs:
            block = Paths(name, device, args.batch, side)
            times = measure(block.calls(device), rounds, args.seconds, block.sync)
            with launchers_stubbed():
                times |= measure(
                    block.launcher_calls(), rounds, args.seconds, block.sync
                )
            counts = block.op_counts(meta=False)
            results.add(name, side or "native", device.type, times, counts)
        if device.type == "cpu" and not args.no_meta:
            meta_rows(configs, args.batch, rounds, args.seconds, results)
    print(f"-> {path}")


def meta_rows(
    configs: list[str], batch: int, rounds: int, seconds: float, results: Results
) -> None:
    """The train paths on meta tensors at the configs' map sizes."""
    use_cpp_meta_kernels()  # for good: the meta rows come last
    meta = torch.device("meta")
    with meta_autocast_off():
        for name in configs:
            block = Paths(name, meta, batch, None)
            paths = block.train_calls(block.train, "fused")
            paths |= block.train_calls(block.autograd_only, "autograd-only")
            times = measure(paths, rounds, seconds, block.sync)
            counts = block.op_counts(meta=True, providers=("fused",))
            results.add(name, "native", "meta", times, counts)


if __name__ == "__main__":
    main()

"""Shared benchmark plumbing: timing, device naming, environment capture, result CSVs.

Every script appends long-format rows (one metric per row) to
``benchmarks/results/<device-slug>.csv``; plot.py and make_table.py read them back.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch._inductor.config
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.append(str(REPO_ROOT))
RESULTS_DIR = BENCH_DIR / "results"
PLOTS_DIR = BENCH_DIR / "plots"
# --quick runs are smoke tests: keep them apart from real measurements.
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"
QUICK_PLOTS_DIR = PLOTS_DIR / "quick"

COLUMNS = (
    "timestamp",
    "device",
    "dtype",
    "batch",
    "config",
    "mode",
    "provider",
    "metric",
    "median",
    "q20",
    "q80",
    "peak_mem_bytes",
    "torch",
    "triton",
    "commit",
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
MODES = ("eval", "train")
EAGER = "eager"
FUSED = "fused"
# torch.compile variants: keyword arguments of torch.compile (freezing: FrozenCompiled),
# and the modes they serve. Freezing folds BN into the convs, which only holds for inference.
COMPILE_PROVIDERS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "compile": ({}, MODES),
    "compile-max-autotune": ({"mode": "max-autotune"}, MODES),
    "compile-freezing": ({"freezing": True}, ("eval",)),
    "fused-compile": ({}, MODES),  # torch.compile around our module
}
PROVIDERS = (FUSED, EAGER, *COMPILE_PROVIDERS)

# Rows that describe the device rather than a benchmark point.
DEVICE_CONFIG = "device"
COPY_METRIC = "copy_gbps"
GEMM_METRIC = "gemm_tflops"


# ----------------------------------------------------------------------------- device


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {cpu_model()}"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """File-name key of a device: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc'."""
    return slugify(device_name(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------ environment


def git_commit() -> str:
    """Short HEAD hash, '-dirty' when tracked files differ from it.

    Untracked files and benchmarks/results are ignored: runs create and append to result
    files, which must not mark the next run dirty.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git(
            "status", "--porcelain", "--untracked-files=no", "--", ".",
            ":(exclude)benchmarks/results",
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "n/a"
    return triton.__version__


@dataclass(frozen=True)
class RunInfo:
    """What every row of one run shares."""

    timestamp: str
    device: str
    torch: str
    triton: str
    commit: str


def capture_run(device: torch.device) -> RunInfo:
    return RunInfo(
        timestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=device_name(device),
        torch=torch.__version__,
        triton=triton_version(),
        commit=git_commit(),
    )


def configure_backends(device: torch.device) -> None:
    """Eager PyTorch at its best: cuDNN picks the fastest algorithm per shape."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Milliseconds: median and the 20th/80th percentiles."""

    median: float
    q20: float
    q80: float

    def rate(self, amount: float) -> Timing:
        """``amount`` per second at each quantile; the fastest time gives the q80 rate."""
        return Timing(
            amount / (self.median * 1e-3),
            amount / (self.q80 * 1e-3),
            amount / (self.q20 * 1e-3),
        )


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    grad_to_none: Sequence[torch.Tensor] = (),
    quick: bool = False,
) -> Timing:
    """Time ``fn``: triton.testing.do_bench on CUDA, a wall-clock loop on CPU.

    Gradients in ``grad_to_none`` are reset before every call, outside the timed region, so
    a train step never pays for accumulating into last call's gradients.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (25, 100)
        q50, q20, q80 = do_bench(
            fn,
            warmup=warmup,
            rep=rep,
            grad_to_none=list(grad_to_none) or None,
            quantiles=[0.5, 0.2, 0.8],
        )
        return Timing(q50, q20, q80)
    return _wall_clock(fn, grad_to_none, *((2, 5, 0.2) if quick else (5, 20, 2.0)))


def _wall_clock(
    fn: Callable[[], object],
    grad_to_none: Sequence[torch.Tensor],
    warmup: int,
    min_reps: int,
    min_seconds: float,
) -> Timing:
    for _ in range(warmup):
        _clear_grads(grad_to_none)
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) < 2:
        return Timing(times[0], times[0], times[0])
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), q[1], q[7])


def first_call_seconds(
    fn: Callable[[], object],
    device: torch.device,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> float:
    """Seconds of the first call: compilation, autotuning, weight folding included."""
    _clear_grads(grad_to_none)
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def peak_memory(
    fn: Callable[[], object],
    device: torch.device,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> int | None:
    """Bytes one call allocates above what was live before it; None on CPU (not tracked)."""
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


class Budget:
    """Wall-clock allowance for the expensive (compile) providers of one script."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()
        self.skipped = 0

    def exceeded(self) -> bool:
        return (
            self.seconds is not None and time.perf_counter() - self.start > self.seconds
        )


# ------------------------------------------------------------------------ device peaks


@dataclass(frozen=True)
class DevicePeaks:
    """Measured copy bandwidth (bytes/s) and dense GEMM rate (FLOP/s) in one dtype."""

    copy_bytes_per_s: Timing
    gemm_flops_per_s: Timing

    def roofline_ms(self, min_bytes: float, flops: float) -> float:
        """The time neither memory nor math could beat, from the median rates."""
        return 1e3 * max(
            min_bytes / self.copy_bytes_per_s.median,
            flops / self.gemm_flops_per_s.median,
        )


def measure_peaks(
    device: torch.device, dtype: torch.dtype, quick: bool = False
) -> DevicePeaks:
    """Copy bandwidth from a large tensor copy; GEMM rate from a large square matmul.

    fp32 matmuls use TF32 exactly when cuDNN convs may (torch.backends.cudnn.allow_tf32),
    so the rate matches the precision eager and fused kernels run at.
    """
    gpu = device.type == "cuda"
    copy_rate = _copy_rate(
        device, dtype, (1 << 28 if gpu else 1 << 24) >> (2 * quick), quick
    )
    gemm_rate = _gemm_rate(device, dtype, (8192 if gpu else 1024) >> quick, quick)
    return DevicePeaks(copy_rate, gemm_rate)


def _copy_rate(
    device: torch.device, dtype: torch.dtype, numel: int, quick: bool
) -> Timing:
    src = torch.empty(numel, device=device, dtype=dtype).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, quick=quick)
    return t.rate(2 * src.numel() * src.element_size())  # read + write


def _gemm_rate(device: torch.device, dtype: torch.dtype, n: int, quick: bool) -> Timing:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        t = time_fn(lambda: a @ b, device, quick=quick)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    return t.rate(2.0 * n**3)


# ---------------------------------------------------------------------------- results


def results_path(device: torch.device, quick: bool, results_dir: Path | None) -> Path:
    base = results_dir or (QUICK_RESULTS_DIR if quick else RESULTS_DIR)
    return base / f"{device_slug(device)}.csv"


class ResultWriter:
    """Appends rows to one CSV as they are measured, so an interrupted run keeps them."""

    def __init__(self, path: Path, run: RunInfo) -> None:
        self.path = path
        self.run = run
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size == 0:
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    def add(
        self,
        *,
        dtype: str,
        batch: int | str,
        config: str,
        mode: str,
        provider: str,
        metric: str,
        value: Timing,
        peak_mem_bytes: int | None = None,
    ) -> None:
        r = self.run
        row = (
            r.timestamp,
            r.device,
            dtype,
            batch,
            config,
            mode,
            provider,
            metric,
            f"{value.median:.6g}",
            f"{value.q20:.6g}",
            f"{value.q80:.6g}",
            "" if peak_mem_bytes is None else peak_mem_bytes,
            r.torch,
            r.triton,
            r.commit,
        )
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(row)

    def add_peaks(self, dtype: str, peaks: DevicePeaks) -> None:
        for metric, rate, unit in (
            (COPY_METRIC, peaks.copy_bytes_per_s, 1e9),
            (GEMM_METRIC, peaks.gemm_flops_per_s, 1e12),
        ):
            scaled = Timing(rate.median / unit, rate.q20 / unit, rate.q80 / unit)
            self.add(
                dtype=dtype,
                batch="",
                config=DEVICE_CONFIG,
                mode="",
                provider=DEVICE_CONFIG,
                metric=metric,
                value=scaled,
            )

    def add_measurement(
        self,
        *,
        dtype: str,
        batch: int,
        config: str,
        mode: str,
        provider: str,
        timing: Timing,
        first_call_s: float,
        peak_mem_bytes: int | None,
        min_bytes: float,
        flops: float,
        peaks: DevicePeaks,
    ) -> None:
        """One benchmark point: time, first-call time, GB/s, TFLOP/s, roofline fraction."""
        rows = {
            "time_ms": timing,
            "first_call_s": Timing(first_call_s, first_call_s, first_call_s),
            "gbps": _scale(timing.rate(min_bytes), 1e-9),
            "tflops": _scale(timing.rate(flops), 1e-12),
            # 1.0 = at the roofline; the fastest time gives the highest fraction.
            "roofline_frac": _scale(
                timing.rate(1.0), peaks.roofline_ms(min_bytes, flops) * 1e-3
            ),
        }
        for metric, value in rows.items():
            self.add(
                dtype=dtype,
                batch=batch,
                config=config,
                mode=mode,
                provider=provider,
                metric=metric,
                value=value,
                peak_mem_bytes=peak_mem_bytes if metric == "time_ms" else None,
            )


def _scale(t: Timing, factor: float) -> Timing:
    return Timing(t.median * factor, t.q20 * factor, t.q80 * factor)


def read_results(paths: Iterable[Path]) -> list[dict[str, str]]:
    """Rows of every CSV in ``paths`` that has this harness's columns; others are skipped."""
    rows: list[dict[str, str]] = []
    for path in paths:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not set(COLUMNS) <= set(reader.fieldnames or ()):
                print(f"skipping {path}: not a benchmark result file", file=sys.stderr)
                continue
            rows.extend(reader)
    return rows


def result_files(inputs: Sequence[Path]) -> list[Path]:
    """CSV files named directly or found (non-recursively) in named directories."""
    files: list[Path] = []
    for p in inputs:
        files.extend(sorted(p.glob("*.csv")) if p.is_dir() else [p])
    return files


def latest(rows: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """The most recent row per (device, dtype, batch, config, mode, provider, metric).

    Re-running part of the grid (say, only the fused provider after a tuning change)
    replaces just those points; compare the commit column to see what came from where.
    """
    keep: dict[tuple, dict[str, str]] = {}
    for row in rows:
        key = tuple(row[c] for c in COLUMNS[1:8])
        if key not in keep or row["timestamp"] >= keep[key]["timestamp"]:
            keep[key] = row
    return list(keep.values())


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# -------------------------------------------------------------------------- providers


def make_provider(
    name: str,
    eager: nn.Module,
    fuse: Callable[[nn.Module], nn.Module],
) -> nn.Module:
    """The module a provider times, built from the eager (reference) module.

    Each provider gets its own copy, so BN running-stat updates in train mode and compiled
    state never leak between providers; all copies hold the same parameter values.
    """
    if name == EAGER:
        return copy.deepcopy(eager)
    if name == FUSED:
        return fuse(copy.deepcopy(eager))
    kwargs = dict(COMPILE_PROVIDERS[name][0])
    base = copy.deepcopy(eager)
    if name == "fused-compile":
        base = fuse(base)
    # Static shapes: each point compiles for its own shape, as a deployed model would;
    # the reset keeps Dynamo's per-function recompile limit from being reached.
    torch._dynamo.reset()
    if kwargs.pop("freezing", False):
        return FrozenCompiled(base, dynamic=False, **kwargs)
    return torch.compile(base, dynamic=False, **kwargs)


class FrozenCompiled(nn.Module):
    """torch.compile with Inductor's freezing: parameters become constants, BN folds into
    the convs. ``options={"freezing": True}`` alone does not freeze (seen on torch 2.7.1
    and 2.14.1): Dynamo decides whether parameters become graph constants while it
    traces, from the global config, which that option does not set. So the first call,
    the one that traces, runs with the global config set; later calls run the frozen
    graph as is (a benchmark point keeps one shape and grad mode, so nothing retraces)."""

    def __init__(self, model: nn.Module, **compile_kwargs: object) -> None:
        super().__init__()
        self.compiled = torch.compile(model, **compile_kwargs)
        self.traced = False

    def forward(self, *args: torch.Tensor) -> object:
        if self.traced:
            return self.compiled(*args)
        with torch._inductor.config.patch(freezing=True):
            out = self.compiled(*args)
        self.traced = True
        return out


def provider_tier(name: str) -> int:
    """Run order: cheap providers over the whole grid first, max-autotune last.

    The time budget then cuts the most expensive compiles, never eager or fused points.
    """
    if name in (FUSED, EAGER):
        return 0
    return 2 if name == "compile-max-autotune" else 1


@dataclass(frozen=True)
class Point:
    dtype: str
    batch: int
    config: str
    mode: str


@dataclass
class Case:
    """What a script supplies for one point: the eager model and how to step a copy."""

    eager: nn.Module
    fuse: Callable[[nn.Module], nn.Module]
    # Returns the timed callable and the tensors whose .grad it fills.
    make_step: Callable[[nn.Module], tuple[Callable[[], object], list[torch.Tensor]]]
    min_bytes: float
    flops: float


@dataclass
class GridRun:
    """One script's run: where rows go, which device, how hard to try."""

    writer: ResultWriter
    device: torch.device
    quick: bool
    budget: Budget
    peaks: dict[str, DevicePeaks]

    def peaks_for(self, dtype: str) -> DevicePeaks:
        if dtype not in self.peaks:
            self.peaks[dtype] = measure_peaks(self.device, DTYPES[dtype], self.quick)
            self.writer.add_peaks(dtype, self.peaks[dtype])
        return self.peaks[dtype]

    def run(
        self,
        points: Sequence[Point],
        providers: Sequence[str],
        setup: Callable[[Point], Case],
        allowed: Callable[[Point, str], bool],
    ) -> None:
        """Measure every allowed (point, provider), cheapest tier of providers first."""
        for tier in sorted({provider_tier(p) for p in providers}):
            names = [p for p in providers if provider_tier(p) == tier]
            todo = points if tier == 0 else _compile_order(points)
            for point in todo:
                chosen = [
                    p
                    for p in names
                    if provider_applies(p, point.mode) and allowed(point, p)
                ]
                if tier > 0 and chosen and self.budget.exceeded():
                    self.budget.skipped += len(chosen)
                    continue
                if chosen:
                    self._run_point(point, chosen, setup(point))
        if self.budget.skipped:
            print(
                f"budget of {self.budget.seconds:.0f} s spent: skipped "
                f"{self.budget.skipped} compile measurements",
                file=sys.stderr,
            )

    def _run_point(self, point: Point, providers: Sequence[str], case: Case) -> None:
        peaks = self.peaks_for(point.dtype)
        for name in providers:
            try:
                timing, first_s, mem = self._measure(point, name, case)
            except Exception as exc:  # noqa: BLE001 - one failing provider must not end the run
                print(f"{_label(point, name)}: FAILED {exc!r}"[:500], file=sys.stderr)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            self.writer.add_measurement(
                dtype=point.dtype,
                batch=point.batch,
                config=point.config,
                mode=point.mode,
                provider=name,
                timing=timing,
                first_call_s=first_s,
                peak_mem_bytes=mem,
                min_bytes=case.min_bytes,
                flops=case.flops,
                peaks=peaks,
            )
            mem_text = "n/a" if mem is None else f"{mem / 2**20:.1f} MiB"
            print(
                f"{_label(point, name)}: {timing.median:.4f} ms "
                f"[{timing.q20:.4f}, {timing.q80:.4f}], first call {first_s:.2f} s, "
                f"peak {mem_text}",
                flush=True,
            )

    def _measure(
        self, point: Point, name: str, case: Case
    ) -> tuple[Timing, float, int | None]:
        model = make_provider(name, case.eager, case.fuse)
        step, grads = case.make_step(model)
        # Eval runs without autograd, as inference does; compiled graphs are specialised
        # on grad mode, so the first (compiling) call runs under the same mode as the rest.
        with torch.no_grad() if point.mode == "eval" else contextlib.nullcontext():
            first_s = first_call_seconds(step, self.device, grads)
            timing = time_fn(step, self.device, grad_to_none=grads, quick=self.quick)
            mem = peak_memory(step, self.device, grads)
        return timing, first_s, mem


def _compile_order(points: Sequence[Point]) -> list[Point]:
    """Compile tiers go eval before train and big batches first: the targets that the
    budget should reach (eval at batch 256) come before the ones it may cut."""
    return sorted(points, key=lambda p: (p.mode != "eval", -p.batch))


def _label(point: Point, provider: str) -> str:
    return (
        f"{point.config:>9} {point.dtype:>8} b{point.batch:<3} {point.mode:>5} "
        f"{provider:<20}"
    )


def provider_applies(name: str, mode: str) -> bool:
    return name not in COMPILE_PROVIDERS or mode in COMPILE_PROVIDERS[name][1]


# ------------------------------------------------------------------------------- CLI


def parse_csv_arg(text: str, allowed: Iterable[str] | None = None) -> list[str]:
    """Split a comma-separated flag value, checking each item against ``allowed``."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if allowed is not None:
        allowed = list(allowed)
        bad = [s for s in items if s not in allowed]
        if bad:
            raise SystemExit(f"unknown value(s) {bad}; choose from {allowed}")
    return items


def parse_int_list(text: str) -> list[int]:
    return [int(s) for s in parse_csv_arg(text)]


def add_grid_args(parser: argparse.ArgumentParser) -> None:
    """Flags both benchmark scripts share; None defaults are filled per script/--quick."""
    parser.add_argument("--batches", help="comma-separated batch sizes")
    parser.add_argument("--dtypes", help=f"comma-separated, from {list(DTYPES)}")
    parser.add_argument("--modes", help=f"comma-separated, from {list(MODES)}")
    parser.add_argument("--providers", help=f"comma-separated, from {list(PROVIDERS)}")
    parser.add_argument(
        "--compile-batches",
        help="batches at which the compile providers other than max-autotune run",
    )
    parser.add_argument(
        "--autotune-batches", help="batches at which compile-max-autotune runs"
    )
    parser.add_argument(
        "--compile-dtypes", help="dtypes at which any compile provider runs"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help="seconds after which remaining compile measurements are skipped "
        "(eager and fused always run)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny grid: a smoke test, not a measurement",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        help="where <device-slug>.csv is appended (default benchmarks/results, "
        "or benchmarks/results/quick with --quick)",
    )


@dataclass(frozen=True)
class Grid:
    batches: list[int]
    dtypes: list[str]
    modes: list[str]
    providers: list[str]
    compile_batches: list[int]
    autotune_batches: list[int]
    compile_dtypes: list[str]

    def allows(self, point: Point, provider: str) -> bool:
        """Whether the grid restrictions let ``provider`` run at ``point``."""
        if provider_tier(provider) == 0:
            return True
        batches = (
            self.autotune_batches
            if provider == "compile-max-autotune"
            else self.compile_batches
        )
        return point.dtype in self.compile_dtypes and point.batch in batches


def resolve_grid(args: argparse.Namespace, defaults: dict[str, str]) -> Grid:
    """Flag values where given, else the script's defaults (``defaults`` holds strings
    in flag syntax, keyed by flag name with underscores)."""

    def pick(key: str) -> str:
        value = getattr(args, key)
        return defaults[key] if value is None else value

    return Grid(
        batches=parse_int_list(pick("batches")),
        dtypes=parse_csv_arg(pick("dtypes"), DTYPES),
        modes=parse_csv_arg(pick("modes"), MODES),
        providers=parse_csv_arg(pick("providers"), PROVIDERS),
        compile_batches=parse_int_list(pick("compile_batches")),
        autotune_batches=parse_int_list(pick("autotune_batches")),
        compile_dtypes=parse_csv_arg(pick("compile_dtypes"), DTYPES),
    )


def start_run(args: argparse.Namespace) -> GridRun:
    """Device setup, environment capture and the result file for one script's run."""
    device = pick_device()
    configure_backends(device)
    run = capture_run(device)
    path = results_path(device, args.quick, args.results_dir)
    print(
        f"{run.device} | torch {run.torch} | triton {run.triton} | commit {run.commit}"
        f" -> {path}",
        flush=True,
    )
    return GridRun(
        writer=ResultWriter(path, run),
        device=device,
        quick=args.quick,
        budget=Budget(args.budget_s),
        peaks={},
    )


# --------------------------------------------------------------------------- reading

PointKey = tuple[str, str, int, str, str]  # device, dtype, batch, config, mode


def timings_by_point(
    rows: Iterable[dict[str, str]], metric: str = "time_ms"
) -> dict[PointKey, dict[str, Timing]]:
    """{(device, dtype, batch, config, mode): {provider: Timing}} for one metric."""
    table: dict[PointKey, dict[str, Timing]] = {}
    for row in rows:
        if row["metric"] != metric or row["config"] == DEVICE_CONFIG:
            continue
        key = (
            row["device"],
            row["dtype"],
            int(row["batch"]),
            row["config"],
            row["mode"],
        )
        table.setdefault(key, {})[row["provider"]] = Timing(
            float(row["median"]), float(row["q20"]), float(row["q80"])
        )
    return table


def speedup(base: Timing, other: Timing) -> Timing:
    """``base`` time over ``other`` time; the spread pairs opposite quantiles, so it
    covers both measurements' noise."""
    return Timing(
        base.median / other.median, base.q20 / other.q80, base.q80 / other.q20
    )


def best_compile(timings: dict[str, Timing]) -> Timing | None:
    """The fastest torch.compile mode at a point (our fused-compile excluded)."""
    found = [
        t
        for name, t in timings.items()
        if name in COMPILE_PROVIDERS and name != "fused-compile"
    ]
    return min(found, key=lambda t: t.median) if found else None

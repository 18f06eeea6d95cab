"""CPU benchmark: the C++ backend vs eager PyTorch vs torch.compile, every GoogLeNet config.

Eval mode, float32, batch 1 and 8 at the real feature-map sizes. "eager" is the faster of
the reference module in channels_last and in NCHW; "compile" is torch.compile (default
mode) of the channels_last reference. Methods are timed in interleaved rounds (wall clock,
after warmup) so that load from other processes hits them alike; medians and 20/80
quantiles are printed and appended to benchmarks/results/cpu-<machine>.csv with the
machine's description.

    python benchmarks/bench_cpu.py [--configs 3a 5b] [--batches 1 8] [--no-compile]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from inception_fused import FusedInceptionModule, InceptionModule
from inception_fused.configs import GOOGLENET_CONFIGS

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "time_utc",
    "cpu",
    "cores",
    "threads",
    "torch",
    "commit",
    "config",
    "batch",
    "dtype",
    "method",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "runs",
    "speedup_vs_eager",
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_slug(model: str, cores: int) -> str:
    return f"{re.sub(r'[^a-z0-9]+', '-', model.lower()).strip('-')}-{cores}c"


def time_interleaved(
    fns: dict[str, Callable[[], object]], min_runs: int, budget_s: float
) -> dict[str, list[float]]:
    """Run every fn once per round until min_runs rounds and budget_s have passed."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_runs or time.perf_counter() - start < budget_s:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= 10 * min_runs:
            break
    return times


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def cell(times: dict[str, list[float]], method: str) -> str:
    """'median [q20,q80]' of one method, in ms."""
    if method not in times:
        return f"{'-':>16}"
    values = times[method]
    return (
        f"{statistics.median(values):>7.3f} "
        f"[{quantile(values, 0.2):.2f},{quantile(values, 0.8):.2f}]"
    ).rjust(16)


def bench_config(
    name: str, batch: int, use_compile: bool, min_runs: int, budget_s: float
) -> dict[str, list[float]]:
    cfg = GOOGLENET_CONFIGS[name]
    torch.manual_seed(0)
    ref = InceptionModule(*cfg.channels).eval()
    fused = FusedInceptionModule.from_module(ref, backend="cpu").eval()
    ref_cl = InceptionModule(*cfg.channels).eval()
    ref_cl.load_state_dict(ref.state_dict())
    ref_cl = ref_cl.to(memory_format=torch.channels_last)
    x = torch.randn(batch, cfg.in_channels, cfg.spatial, cfg.spatial)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fns: dict[str, Callable[[], object]] = {
        "fused": lambda: fused(x_cl),
        "eager_channels_last": lambda: ref_cl(x_cl),
        "eager_nchw": lambda: ref(x),
    }
    if use_compile:
        # Every config shares InceptionModule.forward's code object: without a reset,
        # dynamo's recompile limit would silently leave later configs uncompiled.
        torch._dynamo.reset()
        compiled = torch.compile(ref_cl)
        fns["compile"] = lambda: compiled(x_cl)
    with torch.no_grad():
        torch.testing.assert_close(fused(x_cl), ref(x), atol=1e-4, rtol=1e-4)
        for fn in fns.values():  # warmup: compilation, oneDNN primitives, fold cache
            for _ in range(3):
                fn()
        return time_interleaved(fns, min_runs, budget_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(GOOGLENET_CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--min-runs", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=1.5, help="per config/batch")
    args = parser.parse_args()

    model, cores = cpu_model(), os.cpu_count() or 1
    meta = {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": model,
        "cores": cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "dtype": "float32",
    }
    print(
        f"{model}, {cores} cores, {meta['threads']} threads, torch {torch.__version__}, "
        f"commit {meta['commit']}"
    )
    header = f"{'config':>6} {'batch':>5} {'fused ms':>16} {'eager ms':>16} "
    print(header + f"{'compile ms':>16} {'vs eager':>8} {'vs compile':>10}")
    rows = []
    for name in args.configs:
        for batch in args.batches:
            times = bench_config(
                name, batch, not args.no_compile, args.min_runs, args.budget_s
            )
            med = {k: statistics.median(v) for k, v in times.items()}
            eager = min(("eager_channels_last", "eager_nchw"), key=med.__getitem__)
            for method, values in times.items():
                rows.append(
                    meta
                    | {
                        "config": name,
                        "batch": batch,
                        "method": "eager" if method == eager else method,
                        "median_ms": f"{med[method]:.4f}",
                        "q20_ms": f"{quantile(values, 0.2):.4f}",
                        "q80_ms": f"{quantile(values, 0.8):.4f}",
                        "runs": len(values),
                        "speedup_vs_eager": f"{med[eager] / med[method]:.3f}",
                    }
                )
            vs_compile = (
                f"{med['compile'] / med['fused']:>9.2f}x" if "compile" in med else ""
            )
            print(
                f"{name:>6} {batch:>5} {cell(times, 'fused')} {cell(times, eager)} "
                f"{cell(times, 'compile')} "
                f"{med[eager] / med['fused']:>7.2f}x {vs_compile}",
                flush=True,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"cpu-{machine_slug(model, cores)}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"eager = faster of channels_last / NCHW; [q20,q80]; appended to {path}")


if __name__ == "__main__":
    main()

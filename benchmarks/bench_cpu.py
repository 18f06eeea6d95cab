"""CPU benchmark: the C++ backend vs eager PyTorch vs torch.compile, every GoogLeNet config.

Eval mode, float32, batch 1 and 8 at the real feature-map sizes. "eager" is the faster of
the reference module in channels_last and in NCHW; "compile" is torch.compile (default
mode) of the channels_last reference. Methods are timed in interleaved rounds (wall clock,
after warmup) so that load from other processes hits them alike (in one process: they all
run on torch's OpenMP threads, no other pool spins between them); medians and 20/80
quantiles are printed and appended to benchmarks/results/cpu-<machine>.csv with the
machine's description.

    python benchmarks/bench_cpu.py [--configs 3a 5b] [--batches 1 8] [--no-compile]
    python benchmarks/bench_cpu.py --table [--readme README.md]   # markdown from the CSVs

``--table`` renders the newest run of every results/cpu-*.csv (fused, eager and compile
medians, speedups) and with ``--readme`` rewrites that file's CPU results section.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from common import cpu_model, git_commit, slugify
from make_table import replace_section

from inception_fused import FusedInceptionModule, InceptionModule, cpu
from inception_fused.configs import GOOGLENET_CONFIGS

RESULTS = Path(__file__).resolve().parent / "results"
# Which machine and build a run is: the first columns of every CPU results CSV.
RUN_FIELDS = ["time_utc", "cpu", "cores", "threads", "torch", "commit"]
FIELDS = [
    *RUN_FIELDS,
    "capability",
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


def machine_slug(model: str, cores: int, capability: str) -> str:
    """A results file's machine key: 'amd-epyc-2c-avx512' (torch's CPU capability names
    the ISA the kernels run: the same CPU name is sold with and without AVX-512)."""
    return f"{slugify(model)}-{cores}c-{capability.lower()}"


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


CPU_BEGIN, CPU_END = "<!-- cpu-results:begin -->", "<!-- cpu-results:end -->"


def append_rows(name: str, fields: list[str], rows: list[dict]) -> Path:
    """Append rows to results/<name> (header first when the file is new)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def newest_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a results CSV's newest run (latest time_utc)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    newest = max(r["time_utc"] for r in rows)
    return [r for r in rows if r["time_utc"] == newest]


def results_table() -> str:
    """Markdown table of the newest run (latest time_utc) in each results/cpu-*.csv."""
    out = []
    for path in sorted(RESULTS.glob("cpu-*.csv")):
        if path.name.startswith("cpu-network-") or "-isolated-" in path.name:
            continue  # bench_cpu_network.py's
        rows = newest_rows(path)
        first = rows[0]
        out += [
            (
                f"{first['cpu']} (torch capability {first['capability']}), {first['cores']} "
                f"cores, {first['threads']} threads, torch {first['torch']}, commit "
                f"{first['commit']}, {first['dtype']}, eval, "
                f"median ms [q20, q80] over {min(int(r['runs']) for r in rows)}+ runs:"
            ),
            "",
            "| config | batch | fused | eager | torch.compile | vs eager | vs compile |",
            "|---|---|---|---|---|---|---|",
        ]
        points: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
        for r in rows:
            points.setdefault((r["config"], r["batch"]), {})[r["method"]] = r
        for (config, batch), m in points.items():

            def ms(method: str, m=m) -> str:
                if method not in m:
                    return "-"
                r = m[method]
                return f"{float(r['median_ms']):.2f} [{float(r['q20_ms']):.2f}, {float(r['q80_ms']):.2f}]"

            fused = float(m["fused"]["median_ms"])
            vs_compile = (
                f"{float(m['compile']['median_ms']) / fused:.2f}x"
                if "compile" in m
                else "-"
            )
            out.append(
                f"| {config} | {batch} | {ms('fused')} | {ms('eager')} | {ms('compile')} "
                f"| {float(m['fused']['speedup_vs_eager']):.2f}x | {vs_compile} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="render results, no runs")
    parser.add_argument(
        "--readme", help="with --table: file whose CPU section to rewrite"
    )
    parser.add_argument("--configs", nargs="+", default=list(GOOGLENET_CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--min-runs", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=1.5, help="per config/batch")
    args = parser.parse_args()
    if args.table:
        text = results_table()
        if args.readme and replace_section(args.readme, text, CPU_BEGIN, CPU_END):
            print(f"wrote the CPU results section of {args.readme}")
        else:
            print(text)
        return

    model, cores = cpu_model(), os.cpu_count() or 1
    meta = {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": model,
        "cores": cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": "float32",
    }
    print(
        f"{model}, {cores} cores, {meta['threads']} threads, torch {torch.__version__}, "
        f"C++ build {cpu.loaded_build()}, commit {meta['commit']}"
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
    slug = machine_slug(model, cores, meta["capability"])
    path = append_rows(f"cpu-{slug}.csv", FIELDS, rows)
    print(f"eager = faster of channels_last / NCHW; [q20,q80]; appended to {path}")


if __name__ == "__main__":
    main()

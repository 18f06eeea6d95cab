"""make gpu-check: everything a GPU machine should check, in one command.

    python benchmarks/gpu_check.py                 # on a machine with a CUDA torch
    python benchmarks/gpu_check.py --quick --out D # first contact: ~9 minutes, logs in D
    python benchmarks/gpu_check.py --dry-run       # print the steps, run nothing

Full (about an hour):
1. the test suite on CUDA (every kernel compiled and run for real);
2. the sm_90a report with --check and --live: each compile's registers and spills as the
   driver reports them must equal what the cubin says, and every row must pass;
3. the tile tuner (benchmarks/tune_tiles.py) over every module, bf16, batches 1/32/256,
   under an 8-minute budget: winners go into inception_fused/kernels/tile_table.json;
4. the benchmark grid (benchmarks/run_all.py: results, plots, README table) under a hard
   25-minute budget, with its own progress lines.

``--quick`` (``make gpu-check QUICK=1``) is the first contact with a GPU lent for minutes:
the GPU-only tests, whole-GoogLeNet eval in bf16 at batch 1 and 256 (fused, eager, the
compile modes), per-module eval at 1/32/256, a short tuning run and the table, each step
under a hard limit (9 minutes in all), in the order that keeps the most valuable rows when
time runs out. Every step writes as it goes into ``--out`` (a log per step, result rows
appended per measurement, the tile table and the README table), so a run stopped anywhere
keeps what it measured.

Every step runs; the exit status is non-zero if any failed, and the summary names them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TUNE_BUDGET_S = 8 * 60
BENCH_BUDGET_S = 25 * 60
# The tests that only a GPU runs (everything else passes on the CPU in CI): capture and
# graph pools, TF32 and 16-bit numerics, 64-bit offsets, every tuner candidate, the
# compiled kernels' PTX.
GPU_TESTS = (
    "tests/test_gpu_hazards.py",
    "tests/test_device.py",
    "tests/test_tiles.py",
    "tests/test_autocast.py",
    "tests/test_gpu_compile.py",
    "tests/test_eval_forward.py::test_64bit_offsets",
    "tests/test_eval_forward.py::test_64bit_offsets_train",
    "tests/test_training.py::test_autocast",
    "tests/test_training.py::test_deterministic_bitwise_repeatable",
)

Step = tuple[str, list[str], float | None]


def steps(python: str) -> list[Step]:
    return [
        ("CUDA test suite", [python, "-m", "pytest", "tests", "-q"], None),
        (
            "sm_90a report vs the live device",
            [python, f"{BENCH}/sm90_report.py", "--check", "--live", "--readme",
             "docs/gpu.md"],
            None,
        ),
        (
            "tile tuning",
            [python, f"{BENCH}/tune_tiles.py", "--batches", "1,32,256", "--dtypes",
             "bf16"],
            TUNE_BUDGET_S,
        ),
        ("benchmark grid", [python, f"{BENCH}/run_all.py"], BENCH_BUDGET_S),
    ]  # fmt: skip


def quick_steps(python: str, out: Path) -> list[Step]:
    """First contact, most valuable first; the limits add up to 9 minutes."""
    results = ["--results-dir", str(out / "results")]
    # Every compile mode but max-autotune (minutes of compiles per point).
    bf16_eval = ["--dtypes", "bfloat16", "--modes", "eval", "--compile-dtypes",
                 "bfloat16", "--providers",
                 "fused,eager,compile,compile-freezing,fused-compile"]  # fmt: skip
    return [
        ("GPU-only tests", [python, "-m", "pytest", "-q", "-rfEs", *GPU_TESTS], 180),
        (
            "GoogLeNet eval, bf16, batch 1 and 256",
            [python, f"{BENCH}/bench_googlenet.py", *bf16_eval, "--batches", "1,256",
             "--compile-batches", "1,256", "--budget-s", "100", *results],
            150,
        ),
        (
            "per-module eval, bf16, batch 1/32/256",
            [python, f"{BENCH}/bench_module.py", *bf16_eval, "--batches", "1,32,256",
             "--compile-batches", "32,256", "--budget-s", "80", *results],
            120,
        ),
        (
            "tile tuning (3a, 4b, 5b)",
            [python, f"{BENCH}/tune_tiles.py", "--configs", "3a,4b,5b", "--batches",
             "32,256", "--dtypes", "bf16"],
            60,
        ),
        (
            "results table",
            [python, f"{BENCH}/make_table.py", "--results", str(out / "results")],
            30,
        ),
    ]  # fmt: skip


def run_step(cmd: list[str], budget: float | None, log: Path | None) -> bool:
    """Run one step (its output also to ``log``, line by line); False on failure or
    when its budget ends it."""
    out = None if log is None else log.open("w")
    try:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = None if budget is None else time.monotonic() + budget
        timer = None
        if budget is not None:
            timer = threading.Timer(budget, proc.kill)
            timer.start()
        for line in proc.stdout:
            print(line, end="", flush=True)
            if out is not None:
                out.write(line)
                out.flush()
        code = proc.wait()
        if timer is not None:
            timer.cancel()
        if deadline is not None and time.monotonic() >= deadline:
            print(f"stopped at its {budget:.0f} s budget", flush=True)
            return False
        return code == 0
    finally:
        if out is not None:
            out.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the steps only")
    parser.add_argument("--quick", action="store_true", help="first contact, 9 minutes")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "first-contact",
        help="--quick: logs, result rows, tile table and README table go here",
    )
    args = parser.parse_args(argv)
    plan = (
        quick_steps(sys.executable, args.out) if args.quick else steps(sys.executable)
    )
    if args.dry_run:
        total = 0.0
        for i, (name, cmd, budget) in enumerate(plan, 1):
            limit = f" (hard limit {budget:.0f} s)" if budget else ""
            total += budget or 0.0
            print(f"step {i}: {name}{limit}: {' '.join(cmd)}")
        if args.quick:
            print(f"limits add up to {total:.0f} s ({total / 60:.1f} min)")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device (use --dry-run to see the steps)")
        return 2
    if args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for i, (name, cmd, budget) in enumerate(plan, 1):
        print(f"== step {i}/{len(plan)}: {name}", flush=True)
        start = time.monotonic()
        log = args.out / f"step{i}.log" if args.quick else None
        ok = run_step(cmd, budget, log)
        print(
            f"== step {i}: {'ok' if ok else 'FAILED'} in {time.monotonic() - start:.0f} s",
            flush=True,
        )
        if not ok:
            failed.append(name)
        if args.quick:  # what tuning has found so far, kept even if a later step dies
            shutil.copy(ROOT / "inception_fused/kernels/tile_table.json", args.out)
    print(
        "gpu-check:",
        "all steps passed" if not failed else f"failed: {', '.join(failed)}",
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""make gpu-check: everything a GPU machine should check, in one command.

    python benchmarks/gpu_check.py             # on a machine with a CUDA torch
    python benchmarks/gpu_check.py --dry-run   # print the steps, run nothing (any machine)

1. the test suite on CUDA (every kernel compiled and run for real);
2. the sm_90a report with --check and --live: each compile's registers and spills as the
   driver reports them must equal what the cubin says, and every row must pass;
3. the tile tuner (benchmarks/tune_tiles.py) over every module, bf16, batches 1/32/256,
   under an 8-minute budget: winners go into inception_fused/kernels/tile_table.json;
4. the benchmark grid (benchmarks/run_all.py: results, plots, README table) under a hard
   25-minute budget, with its own progress lines.

Every step runs; the exit status is non-zero if any failed, and the summary names them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUNE_BUDGET_S = 8 * 60
BENCH_BUDGET_S = 25 * 60


def steps(python: str) -> list[tuple[str, list[str], float | None]]:
    bench = str(ROOT / "benchmarks")
    return [
        ("CUDA test suite", [python, "-m", "pytest", "tests", "-q"], None),
        (
            "sm_90a report vs the live device",
            [python, f"{bench}/sm90_report.py", "--check", "--live", "--readme",
             "README.md"],
            None,
        ),
        (
            "tile tuning",
            [python, f"{bench}/tune_tiles.py", "--batches", "1,32,256", "--dtypes",
             "bf16"],
            TUNE_BUDGET_S,
        ),
        ("benchmark grid", [python, f"{bench}/run_all.py"], BENCH_BUDGET_S),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the steps only")
    args = parser.parse_args(argv)
    plan = steps(sys.executable)
    if args.dry_run:
        for i, (name, cmd, budget) in enumerate(plan, 1):
            limit = f" (hard limit {budget / 60:.0f} min)" if budget else ""
            print(f"step {i}: {name}{limit}: {' '.join(cmd)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device (use --dry-run to see the steps)")
        return 2
    failed = []
    for i, (name, cmd, budget) in enumerate(plan, 1):
        print(f"== step {i}/{len(plan)}: {name}", flush=True)
        start = time.monotonic()
        try:
            ok = (
                subprocess.run(cmd, cwd=ROOT, check=False, timeout=budget).returncode
                == 0
            )
        except subprocess.TimeoutExpired:
            print(f"{name}: stopped at its {budget / 60:.0f}-minute budget")
            ok = False
        print(
            f"== step {i}: {'ok' if ok else 'FAILED'} in {time.monotonic() - start:.0f} s"
        )
        if not ok:
            failed.append(name)
    print(
        "gpu-check:",
        "all steps passed" if not failed else f"failed: {', '.join(failed)}",
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

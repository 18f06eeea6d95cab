"""make bench: module and network benchmarks, then plots and the results table.

    python benchmarks/run_all.py             # full grid on a GPU, --quick without one
    python benchmarks/run_all.py --quick     # smoke test anywhere

On a GPU the compile providers get a time budget per script (defaults below), so the
whole run takes about 20 minutes on an H100; eager and fused always cover the full grid.
Without a GPU the run is a smoke test: rows go to benchmarks/results/quick/, plots to
benchmarks/plots/quick/, and the table is printed, never written into README.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from common import (
    BENCH_DIR,
    PLOTS_DIR,
    QUICK_PLOTS_DIR,
    QUICK_RESULTS_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    pick_device,
)


def _run(script: str, *args: str) -> bool:
    """Run one script in its own process: a crash or OOM there cannot end the others."""
    cmd = [sys.executable, str(BENCH_DIR / script), *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO_ROOT, check=False).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny grid (default on CPU)"
    )
    parser.add_argument("--module-budget-s", type=float, default=900.0)
    parser.add_argument("--network-budget-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    quick = args.quick or pick_device().type != "cuda"
    if quick:
        bench_flags = ["--quick"]
        results, plots, table_flags = QUICK_RESULTS_DIR, QUICK_PLOTS_DIR, []
    else:
        bench_flags = []
        results, plots = RESULTS_DIR, PLOTS_DIR
        table_flags = ["--readme", str(REPO_ROOT / "README.md")]

    ok = [
        _run("bench_module.py", *bench_flags, "--budget-s", str(args.module_budget_s)),
        _run(
            "bench_googlenet.py", *bench_flags, "--budget-s", str(args.network_budget_s)
        ),
        _run("plot.py", "--results", str(results), "--out", str(plots)),
        _run("make_table.py", "--results", str(results), *table_flags),
    ]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())

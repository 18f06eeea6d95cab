"""make gpu-check QUICK=1, rehearsed without a GPU: its steps fit the first-contact window
and every command in it would start (the scripts accept its flags, the tests it names
exist), so the minutes of a lent GPU are not lost to a typo."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("matplotlib")  # the benchmark scripts import their plotting helpers

import bench_googlenet
import bench_module
import gpu_check
from common import resolve_grid

SCRIPTS = {"bench_googlenet.py": bench_googlenet, "bench_module.py": bench_module}


def test_quick_steps_fit_the_window(tmp_path):
    plan = gpu_check.quick_steps(sys.executable, tmp_path)
    assert sum(budget for _, _, budget in plan) <= 9 * 60
    assert plan[0][0] == "GPU-only tests"  # correctness first


def test_quick_benchmark_flags_parse_into_a_grid(tmp_path):
    for _, cmd, _ in gpu_check.quick_steps(sys.executable, tmp_path):
        script = SCRIPTS.get(Path(cmd[1]).name)
        if script is None:
            continue
        args = script.parse_args(cmd[2:])
        grid = resolve_grid(args, script.DEFAULTS)
        assert grid.dtypes == ["bfloat16"] and grid.modes == ["eval"]
        assert "compile-max-autotune" not in grid.providers
        assert args.results_dir == tmp_path / "results"


@pytest.mark.parametrize("node", gpu_check.GPU_TESTS)
def test_named_gpu_tests_exist(node):
    path, _, name = node.partition("::")
    source = (ROOT / path).read_text()
    if name:
        functions = {
            f.name
            for f in ast.walk(ast.parse(source))
            if isinstance(f, ast.FunctionDef)
        }
        assert name in functions

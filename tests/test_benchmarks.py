"""The benchmark harness: quick path end to end (CSV rows, plots, table) on one tiny case.

Timings here mean nothing; what is checked is the plumbing a GPU run relies on.
"""

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("matplotlib")  # plot.py's; in the bench extra

import bench_module
import common
import make_table
import plot

from inception_fused.configs import GOOGLENET_CONFIGS

ON_GPU = torch.cuda.is_available()


def _bench(tmp_path: Path, providers: str, modes: str = "eval,train") -> Path:
    # 3a at 4x4: the real channel counts, tiny enough for the Triton interpreter.
    bench_module.main(
        [
            "--quick",
            "--configs=3a",
            "--spatial=4",
            "--batches=1",
            "--dtypes=float32",
            f"--modes={modes}",
            f"--providers={providers}",
            "--compile-dtypes=float32",
            "--compile-batches=1",
            f"--results-dir={tmp_path}",
        ]
    )
    (path,) = tmp_path.glob("*.csv")
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bench(tmp_path_factory.mktemp("results"), "fused,eager")


def test_csv_rows(results: Path) -> None:
    with results.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == common.COLUMNS
        rows = list(reader)
    points = {
        (r["provider"], r["mode"], r["metric"])
        for r in rows
        if r["config"] == "3a-s4" and r["batch"] == "1" and r["dtype"] == "float32"
    }
    for provider in ("fused", "eager"):
        for mode in ("eval", "train"):
            for metric in (
                "time_ms",
                "first_call_s",
                "gbps",
                "tflops",
                "roofline_frac",
            ):
                assert (provider, mode, metric) in points
    device_metrics = {r["metric"] for r in rows if r["config"] == common.DEVICE_CONFIG}
    assert device_metrics == {common.COPY_METRIC, common.GEMM_METRIC}
    for r in rows:
        assert 0 < float(r["q20"]) <= float(r["median"]) <= float(r["q80"])
        assert r["commit"] and r["torch"] == torch.__version__
        assert r["device"] == common.device_name(common.pick_device())
        assert (r["peak_mem_bytes"] != "") == (ON_GPU and r["metric"] == "time_ms")


def test_plots_and_table(results: Path, tmp_path: Path) -> None:
    written = plot.main(["--results", str(results.parent), "--out", str(tmp_path)])
    assert {p.name.split("-module-")[1] for p in written} == {
        "float32-eval.png",
        "float32-train.png",
    }
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{make_table.BEGIN}\nold\n{make_table.END}\nrest\n")
    text = make_table.main(["--results", str(results), "--readme", str(readme)])
    content = readme.read_text()
    assert "old" not in content and content.startswith("intro\n")
    assert content.endswith(f"{make_table.END}\nrest\n") and text in content
    assert "| float32 | eval |" in text and "| float32 | train |" in text

    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    make_table.main(["--results", str(results), "--readme", str(plain)])
    assert plain.read_text() == "no markers\n"


def test_module_cost_counts_every_conv() -> None:
    cfg = GOOGLENET_CONFIGS["3a"]
    min_bytes, flops = bench_module.module_cost(cfg, 2, 28, 5, "eval", 2)
    macs = 192 * (64 + 96 + 16 + 32) + 96 * 128 * 9 + 16 * 32 * 25
    assert flops == 2 * 2 * 28 * 28 * macs
    biases = 64 + 96 + 128 + 16 + 32 + 32
    assert min_bytes == 2 * (2 * 28 * 28 * (192 + 256) + macs + biases)
    _, train_flops = bench_module.module_cost(cfg, 2, 28, 5, "train", 2)
    assert train_flops == 3 * flops


def test_grid_restricts_compile_providers() -> None:
    args = bench_module.parse_args([])
    grid = common.resolve_grid(args, bench_module.DEFAULTS)
    at = common.Point("bfloat16", 256, "3a", "eval")
    assert grid.allows(at, "compile-max-autotune") and grid.allows(at, "compile")
    small = common.Point("bfloat16", 8, "3a", "eval")
    assert grid.allows(small, "fused") and not grid.allows(small, "compile")
    assert not grid.allows(common.Point("float32", 256, "3a", "eval"), "compile")
    assert not common.provider_applies("compile-freezing", "train")


def test_compile_freezing_provider_freezes() -> None:
    """compile-freezing makes the weights constants (BN folded into the conv), so a later
    in-place edit of a weight is not seen; torch.compile(options={"freezing": True})
    does not freeze, and would see it."""
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    frozen = common.make_provider("compile-freezing", eager, lambda m: m)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        out = frozen(x)
        torch.testing.assert_close(out, eager(x))
        next(frozen.parameters()).mul_(2)
        torch.testing.assert_close(frozen(x), out)


@pytest.mark.skipif(not ON_GPU, reason="torch.compile on CPU takes minutes here")
def test_compile_provider(tmp_path: Path) -> None:
    path = _bench(tmp_path, "eager,compile", modes="eval")
    with path.open(newline="") as f:
        providers = {
            r["provider"] for r in csv.DictReader(f) if r["metric"] == "time_ms"
        }
    assert providers == {"eager", "compile"}


def test_cpu_results_are_kept_per_capability(tmp_path: Path, monkeypatch) -> None:
    """bench_cpu keeps a results file per CPU name, cores and torch capability (the same
    EPYC name comes with and without AVX-512), and its table names each file's."""
    import bench_cpu

    monkeypatch.setattr(bench_cpu, "RESULTS", tmp_path)
    for capability in ("AVX2", "AVX512"):
        slug = bench_cpu.machine_slug("AMD EPYC", 2, capability)
        row = dict.fromkeys(bench_cpu.FIELDS, "1") | {
            "time_utc": "2026-12-01",
            "cpu": "AMD EPYC",
            "capability": capability,
            "config": "3a",
        }
        rows = [row | {"method": method} for method in ("fused", "eager")]
        bench_cpu.append_rows(f"cpu-{slug}.csv", bench_cpu.FIELDS, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cpu-amd-epyc-2c-avx2.csv",
        "cpu-amd-epyc-2c-avx512.csv",
    ]
    table = bench_cpu.results_table()
    assert "AMD EPYC (torch capability AVX2)" in table
    assert "AMD EPYC (torch capability AVX512)" in table

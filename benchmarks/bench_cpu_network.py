"""CPU benchmark of the whole GoogLeNet: fuse_googlenet as the README shows vs the rest.

torchvision GoogLeNet (random weights, BN statistics randomised), 224x224, float32, eval,
every engine in one process on the same input, timed in interleaved rounds (wall clock,
after warmup) so load from other processes hits them alike. Providers:

  eager-nchw              torchvision as a user has it (NCHW model and input)
  eager-channels-last     model and input converted to channels_last
  compile-freezing        torch.compile(options={"freezing": True}), channels_last
  fused                   fuse_googlenet(model), NCHW model and input (the README path)
  fused-compile-freezing  the fused model inside torch.compile with freezing
  onnxruntime             torch.onnx.export -> onnxruntime, CPU provider
  openvino                the same ONNX file -> OpenVINO, CPU

onnxruntime / openvino are optional (``pip install -e .[bench]``): a missing one is
skipped with a line saying so. One command measures, appends the medians and 20/80
quantiles to benchmarks/results/cpu-network-<machine>.csv and rewrites the README's table:

    python benchmarks/bench_cpu_network.py [--batches 1 8] [--threads 2] [--rounds 30]
    python benchmarks/bench_cpu_network.py --table    # the markdown only, from the CSVs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torchvision
from bench_cpu import (
    RUN_FIELDS,
    append_rows,
    machine_slug,
    newest_rows,
    quantile,
    time_interleaved,
)
from common import cpu_model, git_commit
from make_table import replace_section

from inception_fused import fuse_googlenet

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- cpu-network-results:begin -->", "<!-- cpu-network-results:end -->"
FIELDS = [
    *RUN_FIELDS,
    "batch",
    "provider",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "runs",
    "fused_speedup",
]
PROVIDERS = (
    "eager-nchw",
    "eager-channels-last",
    "compile-freezing",
    "fused",
    "fused-compile-freezing",
    "onnxruntime",
    "openvino",
)
BASELINE = "onnxruntime"


def randomized_googlenet() -> torch.nn.Module:
    """torchvision GoogLeNet with non-trivial BN statistics (a stand-in for weights=)."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(
        weights=None, init_weights=True, aux_logits=False
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    with torch.no_grad():
        torch.onnx.export(
            model,
            (x,),
            path,
            dynamo=True,
            input_names=["x"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )


def onnxruntime_fn(path: str, threads: int) -> Callable[[torch.Tensor], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.numpy()})[0]


def openvino_fn(path: str, threads: int) -> Callable[[torch.Tensor], object]:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(path),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x.numpy()})[compiled.output(0)]


def make_providers(
    batch: int, threads: int, names: list[str], onnx_path: str
) -> tuple[dict[str, Callable[[], object]], torch.Tensor]:
    """name -> zero-argument call on the same input; skipped providers are reported."""
    model = randomized_googlenet()
    x = torch.randn(batch, 3, 224, 224)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fused = fuse_googlenet(copy.deepcopy(model))  # the README path: nothing else
    fns: dict[str, Callable[[], object]] = {}
    for name in names:
        if name == "eager-nchw":
            fns[name] = lambda: model(x)
        elif name == "eager-channels-last":
            fns[name] = lambda: model_cl(x_cl)
        elif name == "compile-freezing":
            compiled = torch.compile(model_cl, options={"freezing": True})
            fns[name] = lambda c=compiled: c(x_cl)
        elif name == "fused":
            fns[name] = lambda: fused(x)
        elif name == "fused-compile-freezing":
            fused_cl = fuse_googlenet(copy.deepcopy(model_cl))
            compiled = torch.compile(fused_cl, options={"freezing": True})
            fns[name] = lambda c=compiled: c(x_cl)
        elif name in ("onnxruntime", "openvino"):
            try:
                make = onnxruntime_fn if name == "onnxruntime" else openvino_fn
                if not os.path.exists(onnx_path):
                    export_onnx(model, x, onnx_path)
                run = make(onnx_path, threads)
            except ImportError as err:
                print(
                    f"skipping {name}: not installed ({err}); pip install -e .[bench]"
                )
                continue
            fns[name] = lambda r=run: r(x)
    return fns, x


def check_outputs(
    fns: dict[str, Callable[[], object]], reference: torch.Tensor
) -> None:
    for name, fn in fns.items():
        out = torch.as_tensor(fn())
        err = (out - reference).abs().max().item()
        if err > 1e-3:
            raise AssertionError(f"{name}: max |out - eager| = {err:.3g}")


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    meta = {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": git_commit(),
    }
    print(
        f"{meta['cpu']}, {meta['cores']} cores, {meta['threads']} threads, torch "
        f"{meta['torch']}, commit {meta['commit']}; median ms [q20, q80]"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "googlenet.onnx")
        for batch in args.batches:
            # Models built outside inference_mode (their tensors stay normal ones).
            fns, x = make_providers(batch, meta["threads"], args.providers, onnx_path)
            with torch.inference_mode():
                check_outputs(fns, randomized_googlenet()(x))
                for fn in fns.values():  # warmup: compilation, primitives, plan
                    for _ in range(3):
                        fn()
                times = time_interleaved(fns, args.rounds, args.budget_s)
            med = {k: statistics.median(v) for k, v in times.items()}
            for name, values in times.items():
                rows.append(
                    meta
                    | {
                        "batch": batch,
                        "provider": name,
                        "median_ms": f"{med[name]:.3f}",
                        "q20_ms": f"{quantile(values, 0.2):.3f}",
                        "q80_ms": f"{quantile(values, 0.8):.3f}",
                        "runs": len(values),
                        "fused_speedup": f"{med[name] / med['fused']:.3f}"
                        if "fused" in med
                        else "",
                    }
                )
                print(
                    f"batch {batch:>2}  {name:<24} {med[name]:8.2f} "
                    f"[{quantile(values, 0.2):.2f}, {quantile(values, 0.8):.2f}]"
                    + (
                        f"  fused is {med[name] / med['fused']:.2f}x"
                        if "fused" in med
                        else ""
                    ),
                    flush=True,
                )
    return rows


def results_table() -> str:
    """Markdown table of the newest run in each results/cpu-network-*.csv."""
    out = []
    for path in sorted(RESULTS.glob("cpu-network-*.csv")):
        rows = newest_rows(path)
        first = rows[0]
        batches = sorted({int(r["batch"]) for r in rows})
        cells = {(r["provider"], int(r["batch"])): r for r in rows}
        out += [
            (
                f"{first['cpu']}, {first['cores']} cores, {first['threads']} threads, torch "
                f"{first['torch']}, commit {first['commit']}, float32, 224x224, eval; median "
                f"ms [q20, q80] over {min(int(r['runs']) for r in rows)}+ interleaved "
                f"rounds; \"fused is\": that provider's median / fused's:"
            ),
            "",
            "| provider | "
            + " | ".join(f"batch {b} | fused is" for b in batches)
            + " |",
            "|---|" + "---|---|" * len(batches),
        ]
        for provider in PROVIDERS:
            if not any((provider, b) in cells for b in batches):
                continue
            line = f"| {provider} |"
            for b in batches:
                r = cells.get((provider, b))
                line += (
                    f" {float(r['median_ms']):.1f} [{float(r['q20_ms']):.1f}, "
                    f"{float(r['q80_ms']):.1f}] | {float(r['fused_speedup']):.2f}x |"
                    if r
                    else " - | - |"
                )
            out.append(line)
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="print the table, no runs")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument(
        "--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS
    )
    parser.add_argument("--rounds", type=int, default=30, help="at least this many")
    parser.add_argument("--budget-s", type=float, default=20.0, help="per batch")
    parser.add_argument("--no-readme", action="store_true", help="leave README alone")
    args = parser.parse_args()
    if args.table:
        print(results_table())
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    slug = machine_slug(cpu_model(), os.cpu_count() or 1)
    path = append_rows(f"cpu-network-{slug}.csv", FIELDS, rows)
    print(f"appended to {path}")
    if not args.no_readme:
        with contextlib.suppress(FileNotFoundError):
            if replace_section(README, results_table(), BEGIN, END):
                print(f"rewrote the network table in {README}")


if __name__ == "__main__":
    main()

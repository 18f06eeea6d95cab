"""CPU benchmark of a whole network: GoogLeNet or Inception-v3, fused as the README shows,
vs the rest.

torchvision GoogLeNet (224x224, fuse_googlenet) or Inception-v3 (299x299,
fuse_inception_v3), random weights with randomised BN statistics, float32, eval.
Each engine runs in its own worker process (a thread pool left spinning by one engine
must not share the cores with the next: ONNX Runtime's and torch's OpenMP threads both
spin after a run), in rounds whose engine order rotates, so slow drifts of the machine's
load hit every engine alike. A worker builds its engine, checks its output against eager
PyTorch's, warms up and times it with torch.utils.benchmark (blocked_autorange). Engines:

  eager-nchw              torchvision as a user has it (NCHW model and input)
  eager-channels-last     model and input converted to channels_last
  compile-freezing        torch.compile with Inductor's freezing, channels_last
  fused                   fuse_googlenet / fuse_inception_v3, NCHW model and input (the
                          README path)
  fused-compile-freezing  the fused model inside torch.compile with freezing
  onnxruntime             torch.onnx.export -> ONNX Runtime, CPU provider, its defaults
  openvino                the same ONNX file -> OpenVINO CPU, its default precision
                          (bf16 where the CPU has AVX512_BF16 or AMX)
  openvino-f32            the same with INFERENCE_PRECISION_HINT f32

onnxruntime / openvino are optional (``pip install -e .[bench]``): a missing one is
skipped with a line saying so. Each run prints and appends to
benchmarks/results/cpu-<model>-isolated-<machine>.csv the CPU model, its ISA flags, torch's
capability, the C++ build loaded, and per engine the median and 20/80 quantiles, the
achieved GFLOP/s (per image: GoogLeNet 3.0 GFLOP, Inception-v3 11.4, direct-conv count)
and its fraction of the machine's fp32 peak; then it rewrites the README's table:

    python benchmarks/bench_cpu_network.py [--model googlenet|inception_v3]
        [--batches 1 8] [--rounds 6] [--min-time-s 2]
    python benchmarks/bench_cpu_network.py --table    # the markdown only, from the CSVs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torchvision
from bench_cpu import RUN_FIELDS, append_rows, machine_slug, newest_rows, quantile
from common import FrozenCompiled, cpu_model, git_commit
from make_table import replace_section

from inception_fused import cpu, fuse_googlenet, fuse_inception_v3

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
FIELDS = [
    *RUN_FIELDS,
    "isa",
    "capability",
    "build",
    "peak_gflops",
    "batch",
    "provider",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "runs",
    "rounds",
    "gflops",
    "peak_fraction",
    "max_abs_err",
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
    "openvino-f32",
)
# Max |logits - eager| over max(1, max |eager logit|): fp32 engines agree to rounding;
# OpenVINO's default may be bf16 (7e-4 off on GoogLeNet's logits, 0.2 on Inception-v3's).
TOLERANCE = {"openvino": 5e-2}
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq")
ISA_EXTRA = ("avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def randomized(model: str) -> torch.nn.Module:
    """torchvision's network with non-trivial BN statistics (a stand-in for weights=);
    Inception-v3 He-initialised (its own init makes the activations explode)."""
    torch.manual_seed(0)
    if model == "googlenet":
        net = torchvision.models.googlenet(weights=None, init_weights=True, aux_logits=False)
    else:
        net = torchvision.models.inception_v3(
            weights=None, init_weights=False, aux_logits=False
        )
    with torch.no_grad():
        for m in net.modules():
            if model != "googlenet" and isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


# Per model: image side, GFLOP per image (direct convolution, multiply-adds x 2, FC
# included), the fuse call of the README, and the README section the table goes to.
MODELS = {
    "googlenet": (224, 3.0, fuse_googlenet, "cpu-network-results"),
    "inception_v3": (299, 11.4, fuse_inception_v3, "cpu-inception-v3-results"),
}


def csv_glob(model: str) -> str:
    return "cpu-network-isolated-*.csv" if model == "googlenet" else f"cpu-{model}-isolated-*.csv"


def cpuinfo() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields (empty off Linux)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def fp32_peak(threads: int) -> tuple[float, str]:
    """(GFLOP/s, how it was got): the loaded build's FMA loop on ``threads`` threads
    (the extension's fp32_peak_gflops, best of three), and the clock it implies from
    threads x FMA pipes x fp32 lanes x 2. Two FMA pipes: Zen 2-5 and Intel's server
    cores (Zen 4 runs a 512-bit FMA over both). A VM's /proc/cpuinfo "cpu MHz" is its
    host's nominal clock, below the boost clock the loop (and every engine) runs at:
    measuring is what keeps the fraction under 100%."""
    ext = cpu.load_extension()
    peak = max(ext.fp32_peak_gflops() for _ in range(3))
    info = cpuinfo()
    lanes = ext.vector_bits() // 32
    # AMD family 25 with AVX-512 is Zen 4: a 512-bit op takes both 256-bit pipes.
    zen4 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
    pipes = 1 if zen4 and lanes == 16 else 2
    ghz = peak / (threads * pipes * lanes * 2)
    nominal = float(info.get("cpu MHz", "0")) / 1e3
    how = (
        f"fp32 peak {peak:.0f} GFLOP/s, measured (FMA loop, {cpu.loaded_build().split()[0]}) = "
        f"{threads} threads x {pipes} FMA pipes x {lanes} lanes x 2 x {ghz:.2f} GHz "
        f"(/proc/cpuinfo says {nominal:.2f} GHz)"
    )
    return peak, how


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


def openvino_fn(path: str, threads: int, f32: bool) -> Callable[[torch.Tensor], object]:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x.numpy()})[compiled.output(0)]


def make_engine(
    name: str, threads: int, onnx_path: str, model_name: str
) -> tuple[Callable[[torch.Tensor], object], bool]:
    """One engine as a call, and whether it takes its input channels_last (converted
    before the timing, as a user of that layout has it)."""
    model = randomized(model_name)
    fuse = MODELS[model_name][2]
    if name == "eager-nchw":
        return model, False
    if name == "fused":
        return fuse(model), False  # the README path: nothing else
    if name == "onnxruntime":
        return onnxruntime_fn(onnx_path, threads), False
    if name.startswith("openvino"):
        return openvino_fn(onnx_path, threads, f32=name == "openvino-f32"), False
    model = model.to(memory_format=torch.channels_last)
    if name == "eager-channels-last":
        return model, True
    if name == "fused-compile-freezing":
        model = fuse(model)
    return FrozenCompiled(model), True


def worker(args: argparse.Namespace) -> None:
    """One engine, every batch: prints one JSON line per batch (times in ms)."""
    from torch.utils.benchmark import Timer

    threads = torch.get_num_threads()
    onnx_path = str(Path(args.data) / "model.onnx")
    fn, channels_last = make_engine(args.worker, threads, onnx_path, args.model)
    for batch in args.batches:
        x, expected = torch.load(Path(args.data) / f"batch{batch}.pt")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            err = (torch.as_tensor(fn(x)) - expected).abs().max().item()
            scale = max(1.0, expected.abs().max().item())
            for _ in range(2):  # warmup: compilation, primitives, the plan
                fn(x)
            timer = Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=threads)
            m = timer.blocked_autorange(min_run_time=args.min_time_s)
        times = [t * 1e3 for t in m.times]
        result = {"batch": batch, "times_ms": times, "err": err, "scale": scale}
        print(json.dumps(result), flush=True)


def run_worker(
    name: str, batches: list[int], data: str, min_time_s: float, model: str
) -> list[dict] | None:
    """One worker process; None (and why, printed) when the engine cannot run here."""
    cmd = [sys.executable, __file__, "--worker", name, "--data", data, "--model", model]
    cmd += ["--batches", *map(str, batches), "--min-time-s", str(min_time_s)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"skipping {name}: {last}", flush=True)
        return None
    return [json.loads(line) for line in result.stdout.splitlines() if line[:1] == "{"]


def prepare(data: str, batches: list[int], providers: list[str], name: str) -> None:
    """Inputs and eager outputs per batch, and the ONNX file, for the workers."""
    model = randomized(name)
    side = MODELS[name][0]
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        x = torch.randn(batch, 3, side, side, generator=g)
        with torch.no_grad():
            torch.save((x, model(x)), Path(data) / f"batch{batch}.pt")
    if any(p.startswith(("onnxruntime", "openvino")) for p in providers):
        export_onnx(model, x, str(Path(data) / "model.onnx"))


def run_meta(threads: int) -> dict[str, object]:
    flags = set(cpuinfo().get("flags", "").split())
    peak, how = fp32_peak(threads)
    return {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "threads": threads,
        "torch": torch.__version__,
        "commit": git_commit(),
        "isa": " ".join(f for f in ISA_FLAGS + ISA_EXTRA if f in flags),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "build": cpu.loaded_build().split()[0],
        "peak_gflops": f"{peak:.0f}",
        "_peak_how": how,
    }


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    meta = run_meta(torch.get_num_threads())
    print(
        f"{meta['cpu']} ({meta['isa']}), {meta['cores']} cores, {meta['threads']} "
        f"threads, torch {meta['torch']} capability {meta['capability']}, C++ build "
        f"{cpu.loaded_build()}, commit {meta['commit']}\n{meta.pop('_peak_how')}",
        flush=True,
    )
    times: dict[tuple[str, int], list[float]] = {}
    rounds: dict[str, int] = {}
    errors: dict[tuple[str, int], float] = {}
    providers = list(args.providers)
    with tempfile.TemporaryDirectory() as data:
        prepare(data, args.batches, providers, args.model)
        for r in range(args.rounds):
            order = providers[r % len(providers) :] + providers[: r % len(providers)]
            for name in order:
                out = run_worker(name, args.batches, data, args.min_time_s, args.model)
                if out is None:
                    providers.remove(name)
                    continue
                rounds[name] = rounds.get(name, 0) + 1
                for res in out:
                    key = (name, res["batch"])
                    times.setdefault(key, []).extend(res["times_ms"])
                    errors[key] = max(errors.get(key, 0.0), res["err"])
                    if res["err"] > TOLERANCE.get(name, 1e-3) * res["scale"]:
                        raise AssertionError(f"{key}: max |out - eager| = {res['err']}")
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    peak = float(meta["peak_gflops"])
    for batch in args.batches:
        med = {n: statistics.median(times[n, batch]) for n in providers}
        for name in providers:
            values = times[name, batch]
            gflops = MODELS[args.model][1] * batch / (med[name] / 1e3)
            speedup = med[name] / med["fused"] if "fused" in med else None
            rows.append(
                meta
                | {
                    "batch": batch,
                    "provider": name,
                    "median_ms": f"{med[name]:.3f}",
                    "q20_ms": f"{quantile(values, 0.2):.3f}",
                    "q80_ms": f"{quantile(values, 0.8):.3f}",
                    "runs": len(values),
                    "rounds": rounds[name],
                    "gflops": f"{gflops:.1f}",
                    "peak_fraction": f"{gflops / peak:.3f}" if peak else "",
                    "max_abs_err": f"{errors[name, batch]:.2g}",
                    "fused_speedup": f"{speedup:.3f}" if speedup else "",
                }
            )
            print(
                f"batch {batch:>2}  {name:<24} {med[name]:8.2f} ms "
                f"[{quantile(values, 0.2):.2f}, {quantile(values, 0.8):.2f}] "
                f"{gflops:6.1f} GFLOP/s"
                + (f" ({gflops / peak:.0%} of peak)" if peak else "")
                + (f"  fused is {speedup:.2f}x" if speedup else ""),
                flush=True,
            )
    return rows


def results_table(model: str) -> str:
    """Markdown table of the newest run in each of the model's results CSVs."""
    out = []
    side = MODELS[model][0]
    for path in sorted(RESULTS.glob(csv_glob(model))):
        rows = newest_rows(path)
        first = rows[0]
        batches = sorted({int(r["batch"]) for r in rows})
        cells = {(r["provider"], int(r["batch"])): r for r in rows}
        out += [
            (
                f"{first['cpu']} ({first['isa']}), {first['cores']} cores, "
                f"{first['threads']} threads, torch {first['torch']} (capability "
                f"{first['capability']}), C++ build {first['build']}, commit "
                f"{first['commit']}, float32, {side}x{side}, eval; each engine in its own "
                f"process, {min(int(r['rounds']) for r in rows)} rotating rounds; median "
                f"ms [q20, q80], GFLOP/s (fraction of the {first['peak_gflops']} GFLOP/s "
                "fp32 peak); \"fused is\": that engine's median / fused's:"
            ),
            "",
            "| engine | "
            + " | ".join(f"batch {b} | GFLOP/s | fused is" for b in batches)
            + " |",
            "|---|" + "---|---|---|" * len(batches),
        ]
        for provider in PROVIDERS:
            if not any((provider, b) in cells for b in batches):
                continue
            line = f"| {provider} |"
            for b in batches:
                r = cells.get((provider, b))
                line += (
                    f" {float(r['median_ms']):.1f} [{float(r['q20_ms']):.1f}, "
                    f"{float(r['q80_ms']):.1f}] | {float(r['gflops']):.0f} "
                    f"({float(r['peak_fraction'] or 0):.0%}) | "
                    f"{float(r['fused_speedup'] or 0):.2f}x |"
                    if r
                    else " - | - | - |"
                )
            out.append(line)
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="print the table, no runs")
    parser.add_argument("--model", choices=MODELS, default="googlenet")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument(
        "--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS
    )
    parser.add_argument(
        "--rounds", type=int, default=6, help="processes per engine (the VM's phases last minutes)"
    )
    parser.add_argument(
        "--min-time-s", type=float, default=2.0, help="timed per engine, batch, round"
    )
    parser.add_argument("--no-readme", action="store_true", help="leave README alone")
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.table:
        print(results_table(args.model))
        return
    rows = measure(args)
    slug = machine_slug(cpu_model(), os.cpu_count() or 1, str(rows[0]["capability"]))
    path = append_rows(csv_glob(args.model).replace("*", slug), FIELDS, rows)
    print(f"appended to {path}")
    if not args.no_readme:
        with contextlib.suppress(FileNotFoundError):
            marker = MODELS[args.model][3]
            begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
            if replace_section(README, results_table(args.model), begin, end):
                print(f"rewrote the network table in {README}")


if __name__ == "__main__":
    main()

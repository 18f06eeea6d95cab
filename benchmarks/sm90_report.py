"""What an H100 would make of the kernels, read without one: an sm_90a codegen report.

Every Triton launch the launchers make (eval forward, train forward, backward) for the
nine GoogLeNet configurations, the whole GoogLeNet eval forward (``googlenet``) and one
layer of each kind Inception-v3's eval forward launches (``inception_v3``: rectangular and
unpadded strided convs, pooled 1x1s, floor-mode max pools into channel slices) at batches
1 to 256, for channels_last and NCHW inputs, in
bf16, fp16, fp32 with TF32 (torch's default for convs), fp32 with TF32 off
(``fp32-ieee``: FMA dots, no tensor cores) and fp64 (at batch 1: gradcheck's dtype), is
recorded on meta tensors and compiled for sm_90a as
Triton's runtime would specialise it (inception_fused/kernels/aot.py); identical compiles
are read once. From the cubin (cuobjdump and nvdisasm from the Triton wheel):
registers, spilled (local) and stack bytes, LDL/STL count, shared memory, the MMA
instructions (HGMMA, HMMA, or FFMA/DFMA only), whether loads are asynchronous (LDGSTS or
TMA: a software-pipelined main loop) and CTAs per SM.

    python benchmarks/sm90_report.py                 # full grid -> CSVs + table
    python benchmarks/sm90_report.py --check         # exit 1 naming failing rows
    python benchmarks/sm90_report.py --configs 3a --batches 32 --dtypes bf16 --check
    python benchmarks/sm90_report.py --configs inception_v3 --kernels conv_relu_kernel --check
    python benchmarks/sm90_report.py --readme docs/gpu.md

``--check`` fails a row on any spill, a tensor-core tl.dot kernel without HGMMA, a tl.dot
conv main loop without asynchronous loads (the head's is a pooling loop: UNPIPELINED), or
shared memory over 227 KiB per block.

Writes benchmarks/results/sm90-static.csv (one row per distinct compile; a run narrowed
by --configs, --kernels or the grid's other options replaces the rows of its Triton version
that it compiled again and keeps the rest),
benchmarks/results/sm90-roofline.csv (FLOPs, minimum bytes and the H100 lower bound per
configuration x batch x dtype x mode, to read GPU timings against) and
benchmarks/results/sm90-network-bytes.csv (the whole network's bytes per image, eager
torchvision against the Triton plan, per layer).
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inception_fused.configs import GOOGLENET_CONFIGS
from inception_fused.kernels import launch as launch_settings
from inception_fused.kernels.aot import (
    MODES,
    Launch,
    compile_launch,
    inception_v3_layer_launches,
    launch_key,
    module_launches,
    network_launches,
    specialise,
)
from inception_fused.kernels.tiles import (
    TABLE_PATH,
    TileKey,
    choice,
    save_table,
    table_entries,
)

RESULTS = ROOT / "benchmarks" / "results"
STATIC_CSV = RESULTS / "sm90-static.csv"
ROOFLINE_CSV = RESULTS / "sm90-roofline.csv"
NETWORK_BYTES_CSV = RESULTS / "sm90-network-bytes.csv"
BEGIN, END = "<!-- sm90-report:begin -->", "<!-- sm90-report:end -->"
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp32-ieee": torch.float32,  # recorded with TF32 off: FMA dots
    "fp64": torch.float64,
}
LAYOUTS = ("channels_last", "nchw")
# The head's tl.dot multiplies a pooled tile summed over the map's pixels: its main loop
# is those loads (vectorised, not fed to a dot), its GEMM 1/49th of them.
UNPIPELINED = {"avg_pool_fc_kernel"}
NETWORK = "googlenet"  # the whole network's plan: its stem, pools and head kernels
INCEPTION_V3 = "inception_v3"  # Inception-v3's layer kinds (aot.INCEPTION_V3_CONVS)
NETWORKS = {NETWORK: network_launches, INCEPTION_V3: inception_v3_layer_launches}
CONFIGS = (*GOOGLENET_CONFIGS, *NETWORKS)
BATCHES = (1, 8, 32, 128, 256)  # the benchmark grid's
FP64_BATCHES = (1,)
BRANCH3_KERNEL = 5  # the paper's; 3 (torchvision) compiles to the same binaries

# H100 SXM limits per block and SM, and the roofline peaks.
SMEM_PER_BLOCK = 227 * 1024
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
PEAK_TFLOPS = {"bf16": 800.0, "fp16": 800.0, "tf32": 400.0, "fp32": 60.0, "fp64": 60.0}
PEAK_TBPS = 3.0

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SASS_OPS = re.compile(
    r"\b(HGMMA|HMMA|FFMA|DFMA|LDGSTS|UTMALDG|UBLKCP|LDL|STL)(?=[.\s])"
)
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass
class Row:
    kernel: str
    mode: str
    dtype: str
    variant: str  # the constexprs and launch options that make this compile distinct
    registers: int
    spill_bytes: int  # local memory per thread outside the stack frame
    stack_bytes: int  # stack frame per thread: where ptxas puts spilled registers
    ldl: int
    stl: int
    shared_bytes: int
    mma: str  # HGMMA, HMMA, FFMA/DFMA (no tensor cores) or none
    async_loads: int  # LDGSTS + TMA instructions in the SASS
    ctas_per_sm: int
    uses_dot: bool
    role: str = "choice"  # "choice": launched as picked; "candidate": tuner-only config
    used_by: list[str] = field(default_factory=list)
    triton: str = triton.__version__
    live_registers: int | None = None  # --live: as the CUDA driver reports them
    live_spills: int | None = None

    def problems(self) -> list[str]:
        found = []
        if self.spill_bytes or self.stack_bytes or self.ldl or self.stl:
            found.append(
                f"spills: {self.stack_bytes} B stack, {self.spill_bytes} B local, "
                f"{self.ldl} LDL/{self.stl} STL"
            )
        if self.shared_bytes > SMEM_PER_BLOCK:
            found.append(f"shared {self.shared_bytes // 1024} KiB > 227 KiB")
        if self.uses_dot and self.mma != "HGMMA" and self.dtype != "fp32-ieee":
            found.append(f"tl.dot without HGMMA ({self.mma})")
        if self.uses_dot and not self.async_loads and self.kernel not in UNPIPELINED:
            found.append("main loop not pipelined (no LDGSTS/TMA)")
        if self.live_registers is not None and (
            self.live_registers != self.registers or self.live_spills
        ):
            found.append(
                f"driver reports {self.live_registers} regs, {self.live_spills} spills"
            )
        return found

    def csv_row(self) -> dict:
        row = asdict(self)
        row["used_by"] = " ".join(self.used_by)
        row["check"] = "; ".join(self.problems()) or "ok"
        return row


def ctas_per_sm(registers: int, num_warps: int, shared: int) -> int:
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps if regs_per_warp else 99
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_BLOCK)
    return min(by_regs, by_smem, MAX_WARPS_PER_SM // num_warps, MAX_CTAS_PER_SM)


def run_tool(tool: str, *args: str) -> str:
    out = subprocess.run(
        [str(BIN / tool), *args], capture_output=True, text=True, check=True
    )
    return out.stdout


def variant(launch: Launch) -> str:
    """The constexprs and options that make this compile distinct, and how many of its
    arguments carry the divisible-by-16 fact."""
    source, options = specialise(launch)
    shown = [
        f"{k}={v}"
        for k, v in launch.kwargs.items()
        if k.isupper() and k not in ("ACC_DTYPE", "ACC", "INPUT_PRECISION")
    ]
    shown.append(f"warps={options['num_warps']}")
    shown.append(f"stages={options['num_stages']}")
    shown.append(f"div16={len(source.attrs)}")
    return " ".join(shown)


def analyse(launch: Launch, mode: str, dtype: str, live: bool = False) -> Row:
    compiled = compile_launch(launch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        regs, stack, _, local = map(
            int,
            RESOURCES.search(run_tool("cuobjdump", "-res-usage", str(cubin))).groups(),
        )
        sass = run_tool("nvdisasm", "-c", str(cubin))
    ops = Counter(SASS_OPS.findall(sass))
    mma = next(
        (op for op in ("HGMMA", "HMMA") if ops[op]),
        "FFMA/DFMA" if ops["FFMA"] or ops["DFMA"] else "none",
    )
    uses_dot = bool(launch.kwargs.get("USE_DOT", False))
    num_warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    if live:  # load the same cubin on the device: the driver's own counts
        compiled._init_handles()
    return Row(
        kernel=launch.name,
        mode=mode,
        dtype=dtype,
        variant=variant(launch),
        registers=regs,
        spill_bytes=local,
        stack_bytes=stack,
        ldl=ops["LDL"],
        stl=ops["STL"],
        shared_bytes=shared,
        mma=mma,
        async_loads=ops["LDGSTS"] + ops["UTMALDG"] + ops["UBLKCP"],
        ctas_per_sm=ctas_per_sm(regs, num_warps, shared),
        uses_dot=uses_dot,
        live_registers=compiled.n_regs if live else None,
        live_spills=compiled.n_spills if live else None,
    )


def collect(
    configs, batches, dtypes, modes, live=False, candidates=True, layouts=LAYOUTS,
    kernels=None, log=print,
) -> tuple[list[Row], list[TileKey]]:  # fmt: skip
    """The distinct compiles of every launch (and, with ``candidates``, of every tile
    config the GPU tuner may try; with ``kernels``, of those kernels only), and the tile
    keys seen."""
    rows: dict[str, Row] = {}
    keys: list[TileKey] = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        # What input_precision reads from torch's flags, as a user would set them.
        tf32 = mock.patch.object(
            launch_settings, "_cudnn_conv_allows_tf32", lambda d=dname: d == "fp32"
        )
        for name in configs:
            if name in NETWORKS and "eval" not in modes:
                continue
            for batch in FP64_BATCHES if dname == "fp64" else batches:
                for layout in layouts:
                    cl = layout == "channels_last"
                    if name == NETWORK:
                        record = functools.partial(
                            network_launches, batch, 224, dtype, channels_last=cl
                        )
                    elif name in NETWORKS:
                        record = functools.partial(
                            NETWORKS[name], batch, dtype, channels_last=cl
                        )
                    else:
                        cfg = GOOGLENET_CONFIGS[name]
                        record = functools.partial(
                            module_launches, cfg.channels, batch, cfg.spatial, dtype,
                            BRANCH3_KERNEL, modes, channels_last=cl,
                        )  # fmt: skip
                    with tf32:
                        recorded = [("choice", record())]
                        if candidates:
                            recorded.append(("candidate", record(keys=keys)))
                    point = f"{name}/{batch}" + ("" if cl else "/nchw")
                    for role, found in recorded:
                        for mode, launches in found.items():
                            for launch in launches:
                                if kernels and launch.name not in kernels:
                                    continue
                                key = launch_key(launch)
                                if key not in rows:
                                    start = time.perf_counter()
                                    rows[key] = analyse(launch, mode, dname, live)
                                    rows[key].role = role
                                    log(
                                        f"[{len(rows)}] {launch.name} {dname} {mode} "
                                        f"{role} {point}: {rows[key].registers} regs, "
                                        f"{time.perf_counter() - start:.1f} s",
                                        flush=True,
                                    )
                                if point not in rows[key].used_by:
                                    rows[key].used_by.append(point)
    return list(rows.values()), list(dict.fromkeys(keys))


def write_table(keys: list[TileKey]) -> None:
    """The committed per-shape tile table: every tensor-core key's current choice,
    keeping an entry's source (a winner measured on a GPU stays one)."""
    sources = {TileKey.from_json(e["key"]): e["source"] for e in table_entries()}
    default = f"rule; sm_90a --check ok under Triton {triton.__version__}"
    entries = [
        {
            "key": key.as_json(),
            "config": asdict(cfg),
            "source": sources.get(key, default),
        }
        for key in keys
        if (cfg := choice(key, True)).use_dot
    ]
    save_table(entries)


def module_flops_bytes(
    channels, batch: int, side: int, itemsize: int
) -> tuple[int, int, int]:
    """Eval forward FLOPs and minimum bytes (x, weights and output once)."""
    c_in, c1, r3, c3, r5, c5, cp = channels
    m = batch * side * side
    k5 = BRANCH3_KERNEL
    macs = m * (c_in * (c1 + r3 + r5 + cp) + 9 * r3 * c3 + k5 * k5 * r5 * c5)
    weights = c_in * (c1 + r3 + r5 + cp) + 9 * r3 * c3 + k5 * k5 * r5 * c5
    c_out = c1 + c3 + c5 + cp
    return 2 * macs, (m * c_in + weights + m * c_out) * itemsize, weights


def roofline_rows(configs, batches) -> list[dict]:
    """Eval forward, and a train step (forward + backward: 3x the FLOPs; also reads dy
    and writes dx and dW once), per configuration x batch x precision."""
    rows = []
    for name in configs:
        if name in NETWORKS:
            continue
        cfg = GOOGLENET_CONFIGS[name]
        for batch in batches:
            for precision, itemsize in (
                ("bf16", 2),
                ("fp16", 2),
                ("tf32", 4),
                ("fp32", 4),
            ):
                flops, nbytes, weights = module_flops_bytes(
                    cfg.channels, batch, cfg.spatial, itemsize
                )
                train_bytes = 2 * nbytes + weights * itemsize
                for mode, f, b in (
                    ("eval", flops, nbytes),
                    ("train", 3 * flops, train_bytes),
                ):
                    t_compute = f / (PEAK_TFLOPS[precision] * 1e12) * 1e6
                    t_memory = b / (PEAK_TBPS * 1e12) * 1e6
                    rows.append(
                        {
                            "config": name,
                            "batch": batch,
                            "precision": precision,
                            "mode": mode,
                            "gflop": round(f / 1e9, 4),
                            "min_mbytes": round(b / 1e6, 4),
                            "compute_us": round(t_compute, 3),
                            "memory_us": round(t_memory, 3),
                            "lower_bound_us": round(max(t_compute, t_memory), 3),
                            "bound": "compute" if t_compute > t_memory else "memory",
                        }
                    )
    return rows


def network_bytes_rows(batch: int = 256, itemsize: int = 2) -> list[dict]:
    """The bytes model of a whole GoogLeNet eval forward (224x224, torchvision's 3x3
    "5x5" branch): per layer, the global-memory bytes per image that eager torchvision
    moves (every op reads its inputs and writes its output once; BN and the in-place ReLU
    each read and write the conv's output; torch.cat reads and writes the block output)
    and that the Triton plan moves (each launch reads its inputs and writes its outputs
    once: launch A's stem and pool tiles each read x, the reduce scratch is written and
    read once). Weights are read once per batch. Last row: the totals, the FLOPs and the
    H100 lower bound per image (bytes at PEAK_TBPS, FLOPs at the bf16 peak)."""

    def conv_flops(c_in: int, c_out: int, k: int, hw: int) -> int:
        return 2 * c_in * c_out * k * k * hw

    def eager_conv(i: int, o: int) -> int:  # conv, then BN and ReLU over its output
        return i + 5 * o

    rows = []
    total = {"eager": 0.0, "fused": 0.0, "flops": 0.0}

    def add(layer: str, eager: int, fused: int, flops: int, weights: int) -> None:
        per_image = weights / batch
        row = {
            "layer": layer,
            "eager_kb_per_image": round((eager + per_image) * itemsize / 1e3, 1),
            "fused_kb_per_image": round((fused + per_image) * itemsize / 1e3, 1),
            "mflop_per_image": round(flops / 1e6, 1),
        }
        rows.append(row)
        total["eager"] += row["eager_kb_per_image"]
        total["fused"] += row["fused_kb_per_image"]
        total["flops"] += flops

    image, s1, s2 = 3 * 224 * 224, 112 * 112, 56 * 56
    add("conv1 (+transform)", eager_conv(image, 64 * s1) + 2 * image, image + 64 * s1,
        conv_flops(3, 64, 7, s1), 3 * 64 * 49)  # fmt: skip
    add("maxpool1 + conv2", 64 * s1 + 64 * s2 + eager_conv(64 * s2, 64 * s2),
        64 * s1 + 64 * s2, conv_flops(64, 64, 1, s2), 64 * 64)  # fmt: skip
    add("conv3", eager_conv(64 * s2, 192 * s2), 64 * s2 + 192 * s2,
        conv_flops(64, 192, 3, s2), 64 * 192 * 9)  # fmt: skip
    pools = {"3a": (192, 56), "4a": (480, 28), "5a": (832, 14)}  # input channels, side
    for name, cfg in GOOGLENET_CONFIGS.items():
        if name in pools:
            c, side = pools[name]
            pooled = c * (side // 2) ** 2
            add(f"maxpool before {name}", c * side * side + pooled,
                c * side * side + pooled, 0, 0)  # fmt: skip
        c_in, c1, r3, c3, r5, c5, cp = cfg.channels
        hw = cfg.spatial**2
        x, c_out = c_in * hw, (c1 + c3 + c5 + cp) * hw
        eager = (
            eager_conv(x, c1 * hw) + eager_conv(x, r3 * hw) + eager_conv(r3 * hw, c3 * hw)
            + eager_conv(x, r5 * hw) + eager_conv(r5 * hw, c5 * hw) + 2 * x
            + eager_conv(x, cp * hw) + 2 * c_out
        )  # fmt: skip
        fused = 2 * x + 2 * (r3 + r5) * hw + c_out
        flops = (
            conv_flops(c_in, c1 + r3 + r5 + cp, 1, hw) + conv_flops(r3, c3, 3, hw)
            + conv_flops(r5, c5, 3, hw)
        )  # fmt: skip
        weights = c_in * (c1 + r3 + r5 + cp) + 9 * (r3 * c3 + r5 * c5)
        add(f"inception {name}", eager, fused, flops, weights)
    head = 1024 * 49
    add("avgpool + fc", head + 1024 + 1024 + 1000, head + 1000, 2 * 1024 * 1000,
        1024 * 1000)  # fmt: skip
    bound = max(
        total["fused"] * 1e3 / (PEAK_TBPS * 1e12),
        total["flops"] / (PEAK_TFLOPS["bf16"] * 1e12),
    )
    rows.append(
        {
            "layer": f"total (batch {batch}, {8 * itemsize}-bit; H100 lower bound "
            f"{bound * 1e6:.2f} us/image)",
            "eager_kb_per_image": round(total["eager"], 1),
            "fused_kb_per_image": round(total["fused"], 1),
            "mflop_per_image": round(total["flops"] / 1e6, 1),
        }
    )
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def kept_rows(args: argparse.Namespace) -> list[dict]:
    """The CSV rows a run keeps: other Triton versions', and this version's that the run
    did not compile again (a narrowed run: --configs, --batches, --dtypes, --modes,
    --layouts or --kernels). A row is compiled again when its kernel, mode and dtype were
    in the run and every point (configuration/batch[/nchw]) that used it was."""
    if not STATIC_CSV.exists():
        return []

    def covered(point: str) -> bool:
        name, batch, *nchw = point.split("/")
        layout = "nchw" if nchw else "channels_last"
        return (
            name in args.configs
            and int(batch) in args.batches
            and layout in args.layouts
        )

    def rerun(r: dict) -> bool:
        return (
            (not args.kernels or r["kernel"] in args.kernels)
            and r["mode"] in args.modes
            and r["dtype"] in args.dtypes
            and all(covered(point) for point in r["used_by"].split())
        )

    with STATIC_CSV.open(newline="") as f:
        return [
            r
            for r in csv.DictReader(f)
            if r["triton"] != triton.__version__ or not rerun(r)
        ]


def table(rows: list[Row]) -> str:
    """Markdown: one line per kernel x mode x dtype, worst case over its compiles."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.mode, r.dtype), []).append(r)
    lines = [
        (
            f"sm_90a, Triton {triton.__version__}, {len(rows)} distinct compiles "
            f"(worst over each kernel's tile configs):"
        ),
        "",
        (
            "| kernel | mode | dtype | compiles (tuner-only) | max regs | stack B "
            "| max shared KiB "
            "| MMA | async loads | min CTAs/SM | check |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, mode, dtype), rs in groups.items():
        failing = sum(1 for r in rs if r.problems())
        mmas = "/".join(sorted({r.mma for r in rs}))
        pipelined = sum(1 for r in rs if r.async_loads)
        lines.append(
            f"| {kernel} | {mode} | {dtype} | {len(rs)} "
            f"({sum(r.role == 'candidate' for r in rs)}) | {max(r.registers for r in rs)} "
            f"| {max(r.stack_bytes + r.spill_bytes for r in rs)} "
            f"| {max(r.shared_bytes for r in rs) / 1024:.0f} | {mmas} "
            f"| {pipelined}/{len(rs)} | {min(r.ctas_per_sm for r in rs)} "
            f"| {'ok' if not failing else f'{failing} failing'} |"
        )
    return "\n".join(lines) + "\n"


def rewrite_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        print(text)
        return
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--kernels", nargs="+", help="only these kernels' compiles")
    parser.add_argument("--check", action="store_true", help="exit 1 on failing rows")
    parser.add_argument("--readme", type=Path, help="rewrite its sm90-report section")
    parser.add_argument(
        "--live",
        action="store_true",
        help="on a GPU: also load each cubin and compare the driver's counts",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="do not write the result CSVs"
    )
    parser.add_argument(
        "--no-candidates",
        action="store_true",
        help="only the launches as picked, not every config the GPU tuner may try",
    )
    parser.add_argument(
        "--write-table",
        action="store_true",
        help="rewrite kernels/tile_table.json with every key's choice (when all pass)",
    )
    args = parser.parse_args(argv)

    if args.live and not torch.cuda.is_available():
        parser.error("--live needs a CUDA device")
    rows, keys = collect(
        args.configs,
        args.batches,
        args.dtypes,
        tuple(args.modes),
        args.live,
        candidates=not args.no_candidates,
        layouts=args.layouts,
        kernels=args.kernels,
    )
    if not args.no_write:
        # Rows of other Triton versions stay: the CSV holds one grid per Triton.
        write_csv(STATIC_CSV, kept_rows(args) + [r.csv_row() for r in rows])
        # The roofline is arithmetic, not compiles: always the whole grid (a narrowed
        # run wrote only its own points).
        write_csv(ROOFLINE_CSV, roofline_rows(GOOGLENET_CONFIGS, BATCHES))
        write_csv(NETWORK_BYTES_CSV, network_bytes_rows())
    text = table(rows)
    if args.readme:
        rewrite_readme(args.readme, text)
    else:
        print(text)
    failing = [r for r in rows if r.problems()]
    for r in failing:
        print(
            f"FAIL {r.kernel} {r.mode} {r.dtype} {r.role} [{r.variant}] "
            f"({' '.join(r.used_by[:4])}{' ...' if len(r.used_by) > 4 else ''}): "
            f"{'; '.join(r.problems())}"
        )
    print(f"{len(rows)} compiles, {len(failing)} failing")
    if args.write_table:
        if failing:
            print(f"not writing {TABLE_PATH.name}: failing compiles")
            return 1
        write_table(keys)
        print(f"-> {TABLE_PATH} ({len(keys)} keys)")
    return 1 if args.check and failing else 0


if __name__ == "__main__":
    sys.exit(main())

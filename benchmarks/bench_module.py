"""Per-module benchmark: GoogLeNet's nine Inception configurations, every provider.

    python benchmarks/bench_module.py                     # full grid (meant for a GPU)
    python benchmarks/bench_module.py --quick             # smoke test, seconds
    python benchmarks/bench_module.py --configs 3a,4e --batches 32 --dtypes bfloat16 \\
        --modes eval --providers fused,eager,compile

Rows go to benchmarks/results/<device-slug>.csv (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse

import torch
from common import (
    Case,
    Grid,
    GridRun,
    Point,
    add_grid_args,
    parse_csv_arg,
    pick_device,
    resolve_grid,
    start_run,
)
from torch import nn

from inception_fused import FusedInceptionModule, InceptionModule
from inception_fused.configs import GOOGLENET_CONFIGS, InceptionConfig

DEFAULTS = {
    "batches": "1,8,32,128,256",
    "dtypes": "bfloat16,float16,float32",  # bfloat16 (the targets' dtype) first
    "modes": "eval,train",
    "providers": "fused,eager,compile,compile-max-autotune,compile-freezing",
    "compile_batches": "1,32,256",
    "autotune_batches": "32,256",
    "compile_dtypes": "bfloat16",
}
QUICK_CONFIGS = "3a,5b"
QUICK_DEFAULTS_GPU = {
    **DEFAULTS,
    "batches": "1,32",
    "dtypes": "bfloat16",
    "providers": "fused,eager,compile",
    "compile_batches": "32",
}
# On CPU compiling is too slow for a smoke test; float32 is what CPU kernels serve best.
QUICK_DEFAULTS_CPU = {
    **DEFAULTS,
    "batches": "1",
    "dtypes": "float32",
    "providers": "fused,eager",
}


def conv_shapes(
    cfg: InceptionConfig, branch3_kernel: int
) -> list[tuple[int, int, int]]:
    """(in, out, kernel) of the six convolutions."""
    c_in, c1, r3, c3, r5, c5, pool = cfg.channels
    return [
        (c_in, c1, 1),
        (c_in, r3, 1),
        (r3, c3, 3),
        (c_in, r5, 1),
        (r5, c5, branch3_kernel),
        (c_in, pool, 1),
    ]


def module_cost(
    cfg: InceptionConfig,
    batch: int,
    side: int,
    branch3_kernel: int,
    mode: str,
    element_size: int,
) -> tuple[float, float]:
    """(minimum bytes moved, conv FLOPs) of one call.

    Eval: x read once, conv weights and one folded bias per channel read once, output
    written once. Train (forward + backward): the forward's traffic, plus grad_out read,
    x read again for the weight gradients, grad_x written and every weight gradient written;
    FLOPs are 3x the forward's (forward, data gradient, weight gradient).
    """
    convs = conv_shapes(cfg, branch3_kernel)
    pixels = batch * side * side
    macs_per_pixel = sum(ci * co * k * k for ci, co, k in convs)
    biases = sum(co for _, co, _ in convs)
    x = pixels * cfg.in_channels
    out = pixels * cfg.out_channels
    flops = 2.0 * pixels * macs_per_pixel
    if mode == "eval":
        elements = x + out + macs_per_pixel + biases
    else:
        weights = macs_per_pixel + 2 * biases  # conv weights + BN gamma and beta
        elements = 3 * x + 2 * out + 2 * weights
        flops *= 3
    return float(elements * element_size), flops


def randomize_bn(module: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so eval mode folds real numbers."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return module


def fuse_module(module: nn.Module) -> nn.Module:
    return FusedInceptionModule.from_module(module, share_parameters=True)


def make_case(
    point: Point,
    cfg: InceptionConfig,
    device: torch.device,
    branch3_kernel: int,
    side: int,
) -> Case:
    """The reference module and inputs of one point; the same seed gives every provider
    (and every tier of the run) the same values."""
    dtype = getattr(torch, point.dtype)
    torch.manual_seed(0)
    eager = randomize_bn(InceptionModule(*cfg.channels, branch3_kernel=branch3_kernel))
    eager = eager.to(device, dtype, memory_format=torch.channels_last)
    eager.train(point.mode == "train")
    shape = (point.batch, cfg.in_channels, side, side)
    x = torch.randn(shape, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(
        (point.batch, cfg.out_channels, side, side), device=device, dtype=dtype
    ).contiguous(memory_format=torch.channels_last)

    def make_step(model: nn.Module) -> tuple:
        if point.mode == "eval":
            return (lambda: model(x)), []
        x_train = x.detach().requires_grad_(True)  # the module is mid-network: dx too

        def step() -> None:
            model(x_train).backward(grad_out)

        return step, [x_train, *model.parameters()]

    min_bytes, flops = module_cost(
        cfg, point.batch, side, branch3_kernel, point.mode, x.element_size()
    )
    return Case(eager, fuse_module, make_step, min_bytes, flops)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        help=f"comma-separated, from {list(GOOGLENET_CONFIGS)} (default all; "
        f"--quick: {QUICK_CONFIGS})",
    )
    parser.add_argument(
        "--branch3-kernel",
        type=int,
        default=5,
        help="kernel of the '5x5' branch: 5 as in the paper, 3 as in torchvision",
    )
    parser.add_argument(
        "--spatial",
        type=int,
        help="override every configuration's feature-map side (default: 28/14/7)",
    )
    add_grid_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        gpu = pick_device().type == "cuda"
        defaults = QUICK_DEFAULTS_GPU if gpu else QUICK_DEFAULTS_CPU
    else:
        defaults = DEFAULTS
    grid = resolve_grid(args, defaults)
    names = parse_csv_arg(
        args.configs or (QUICK_CONFIGS if args.quick else ",".join(GOOGLENET_CONFIGS)),
        GOOGLENET_CONFIGS,
    )
    run(args, grid, {name: GOOGLENET_CONFIGS[name] for name in names})


def run(
    args: argparse.Namespace, grid: Grid, configs: dict[str, InceptionConfig]
) -> GridRun:
    """Benchmark ``configs`` over ``grid``; returns the run (its writer knows the CSV).

    Non-default shapes get labelled configs ('3a-k3', '3a-s4') so their rows never mix
    with the paper's shapes.
    """
    runner = start_run(args)
    cases: dict[str, tuple[InceptionConfig, int]] = {}
    for name, cfg in configs.items():
        side = args.spatial or cfg.spatial
        label = name
        if args.branch3_kernel != 5:
            label += f"-k{args.branch3_kernel}"
        if side != cfg.spatial:
            label += f"-s{side}"
        cases[label] = (cfg, side)
    points = [
        Point(dtype, batch, label, mode)
        for dtype in grid.dtypes
        for label in cases
        for batch in grid.batches
        for mode in grid.modes
    ]

    def setup(point: Point) -> Case:
        cfg, side = cases[point.config]
        return make_case(point, cfg, runner.device, args.branch3_kernel, side)

    runner.run(points, grid.providers, setup, grid.allows)
    return runner


if __name__ == "__main__":
    main()

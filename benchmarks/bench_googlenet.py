"""Whole-network benchmark: torchvision GoogLeNet with its nine Inception blocks swapped.

    python benchmarks/bench_googlenet.py                  # batch 1, 32, 256; bfloat16
    python benchmarks/bench_googlenet.py --quick          # smoke test
    python benchmarks/bench_googlenet.py --providers fused,eager,fused-compile

Eval is a forward pass at 224x224; train is forward, the loss torchvision's reference
recipe uses (main + 0.3 x each auxiliary head) and backward, without the optimizer step
(identical for every provider). Rows use config "googlenet".
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from common import (
    Case,
    Grid,
    GridRun,
    Point,
    add_grid_args,
    pick_device,
    resolve_grid,
    start_run,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.googlenet import Inception

from inception_fused import FusedInceptionModule

CONFIG = "googlenet"
IMAGE = 224
CLASSES = 1000
AUX_WEIGHT = 0.3  # torchvision's GoogLeNet training recipe
DEFAULTS = {
    "batches": "1,32,256",
    "dtypes": "bfloat16",
    "modes": "eval,train",
    "providers": "fused,eager,compile,compile-freezing",
    "compile_batches": "1,32,256",
    "autotune_batches": "256",
    "compile_dtypes": "bfloat16",
}
QUICK_DEFAULTS = {
    **DEFAULTS,
    "batches": "1",
    "providers": "fused,eager",
}


def fuse_googlenet(model: nn.Module) -> nn.Module:
    """Swap every Inception block for the fused module, sharing parameters.

    Prefers the package's own ``fuse_googlenet``; until it exists, swaps torchvision's
    ``Inception`` children directly (GoogLeNet holds them as direct attributes).
    """
    try:
        from inception_fused import fuse_googlenet as package_fuse
    except ImportError:
        for name, child in model.named_children():
            if isinstance(child, Inception):
                fused = FusedInceptionModule.from_module(child, share_parameters=True)
                setattr(model, name, fused)
        return model
    swapped = package_fuse(model)
    return model if swapped is None else swapped


def make_case(point: Point, device: torch.device) -> Case:
    dtype = getattr(torch, point.dtype)
    torch.manual_seed(0)
    eager = torchvision.models.googlenet(weights=None, init_weights=True)
    eager = eager.to(device, dtype, memory_format=torch.channels_last)
    eager.train(point.mode == "train")
    x = torch.randn(point.batch, 3, IMAGE, IMAGE, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (point.batch,), device=device)

    def make_step(model: nn.Module) -> tuple:
        if point.mode == "eval":
            return (lambda: model(x)), []

        def step() -> None:
            outputs = model(x)  # GoogLeNetOutputs(logits, aux2, aux1) in train mode
            loss = F.cross_entropy(outputs[0], labels)
            for aux in outputs[1:]:
                loss = loss + AUX_WEIGHT * F.cross_entropy(aux, labels)
            loss.backward()

        return step, list(model.parameters())

    flops = point.batch * _flops_per_image(eager, point.mode, device, dtype)
    params = sum(p.numel() for p in eager.parameters())
    # Minimum traffic: images read, weights read, logits written; train adds the weight
    # gradients written (the images need no gradient).
    elements = point.batch * (3 * IMAGE * IMAGE + CLASSES) + params
    if point.mode == "train":
        elements += params
    return Case(
        eager, fuse_googlenet, make_step, float(elements * x.element_size()), flops
    )


def _flops_per_image(
    model: nn.Module, mode: str, device: torch.device, dtype: torch.dtype
) -> float:
    """FLOPs (convs, matmuls and their gradients) of one image, counted by PyTorch."""
    x = torch.randn(2, 3, IMAGE, IMAGE, device=device, dtype=dtype)  # BN trains on >1
    counter = FlopCounterMode(display=False)
    with counter:
        if mode == "eval":
            with torch.no_grad():
                model(x)
        else:
            outputs = model(x)
            sum(o.float().sum() for o in outputs).backward()
            model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_grid_args(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, grid: Grid) -> GridRun:
    runner = start_run(args)
    points = [
        Point(dtype, batch, CONFIG, mode)
        for dtype in grid.dtypes
        for batch in grid.batches
        for mode in grid.modes
    ]
    runner.run(
        points,
        grid.providers,
        lambda point: make_case(point, runner.device),
        grid.allows,
    )
    return runner


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else DEFAULTS
    if args.quick and pick_device().type != "cuda":
        defaults = {**defaults, "dtypes": "float32"}
    run(args, resolve_grid(args, defaults))


if __name__ == "__main__":
    main()

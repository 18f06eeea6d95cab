"""Bytes saved for backward by one Inception module in train mode: eager vs fused.

Counts every tensor autograd saves (torch.autograd.graph.saved_tensors_hooks), once per
storage, split into the input x, parameters/buffers and activations. Usage:
    python benchmarks/saved_bytes.py [config] [batch]
"""

from __future__ import annotations

import os
import sys

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":  # the fused op's kernels run in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from inception_fused import FusedInceptionModule, InceptionModule
from inception_fused.configs import GOOGLENET_CONFIGS


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in module.buffers()}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == x.untyped_storage().data_ptr():
            kind = "input x"
        elif ptr in params:
            kind = "parameters/buffers"
        else:
            kind = "activations"
        seen[ptr] = (kind, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    totals: dict[str, int] = {}
    for kind, nbytes in seen.values():
        totals[kind] = totals.get(kind, 0) + nbytes
    return totals


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "3a"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    cfg = GOOGLENET_CONFIGS[name]
    ref = InceptionModule(*cfg.channels).to(DEVICE).train()
    fused = FusedInceptionModule.from_module(ref, backend="triton").train()
    side = cfg.spatial
    x = torch.randn(
        batch, cfg.in_channels, side, side, device=DEVICE, requires_grad=True
    )
    print(f"config {name}, batch {batch}, {side}x{side}, float32, {DEVICE.type}")
    for label, module in (("eager", ref), ("fused", fused)):
        totals = saved_bytes(module, x)
        parts = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(totals.items()))
        print(f"{label}: {parts}")


if __name__ == "__main__":
    main()

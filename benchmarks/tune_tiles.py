"""On a GPU: tune every launch of the nine GoogLeNet modules and commit the winners.

Each module runs once per batch and dtype in eval and in train (forward + backward), with
the tuner on (kernels/tiles.py): a launch's first call times each of its key's
candidates. The fastest per key is written into inception_fused/kernels/tile_table.json
with its source (the device, the date, Triton's version), so the next machine starts
tuned; keys this run did not tune keep their entries.

    python benchmarks/tune_tiles.py [--configs 3a,5b] [--batches 1,32] [--dtypes bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from datetime import UTC, datetime

import torch
import triton
from common import device_name, parse_csv_arg

from inception_fused import FusedInceptionModule, InceptionModule
from inception_fused.configs import GOOGLENET_CONFIGS
from inception_fused.kernels import tiles

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BATCHES = (1, 8, 32, 128, 256)


def merge(
    entries: list[dict],
    winners: dict[tiles.TileKey, dict[tiles.TileConfig, float]],
    source: str,
) -> list[dict]:
    """``entries`` with each tuned key's fastest config (and its time) in place."""
    merged = {tiles.TileKey.from_json(e["key"]): e for e in entries}
    for key, times in winners.items():
        best = min(times, key=times.get)
        merged[key] = {
            "key": key.as_json(),
            "config": dataclasses.asdict(best),
            "source": f"{source}: {times[best] * 1e3:.1f} us",
        }
    return list(merged.values())


def run_module(name: str, batch: int, dtype: torch.dtype) -> None:
    """One eval and one train step of a module: each launch tunes at its first call."""
    cfg = GOOGLENET_CONFIGS[name]
    ref = InceptionModule(*cfg.channels).cuda()
    x = torch.randn(batch, cfg.in_channels, cfg.spatial, cfg.spatial, device="cuda")
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    fused = FusedInceptionModule.from_module(ref).to(dtype)
    with torch.no_grad():
        fused.eval()(x)
    fused.train()(x.requires_grad_()).sum().backward()
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(GOOGLENET_CONFIGS))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_tiles needs a CUDA device")
    if not tiles.autotuning():
        raise SystemExit("the tuner is off (INCEPTION_FUSED_AUTOTUNE=0 or determinism)")
    os.environ.pop("TRITON_INTERPRET", None)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    device = device_name(torch.device("cuda"))
    source = f"tuned on {device}, {stamp}, Triton {triton.__version__}"
    for dname in parse_csv_arg(args.dtypes, DTYPES):
        for name in parse_csv_arg(args.configs, GOOGLENET_CONFIGS):
            for batch in map(int, args.batches.split(",")):
                run_module(name, batch, DTYPES[dname])
                # Written after every module: a run stopped at its budget keeps its work.
                write_winners(source)
                print(f"{name} batch {batch} {dname}: {len(tiles.tuned())} keys tuned",
                      flush=True)  # fmt: skip
    print(f"-> {tiles.TABLE_PATH}")


def write_winners(source: str) -> None:
    tiles.save_table(merge(tiles.table_entries(), tiles.tuned(), source))


if __name__ == "__main__":
    main()

"""Host overhead per call of a fused Inception block, with every kernel launch stubbed.

At batch 1 a block's kernels take microseconds on a GPU, so the Python and dispatcher
work around them decides the latency. This script replaces every Triton launch
(``kernel[grid](...)``) and the C++ backend's entry with no-ops and times what is left,
per call, for each of the nine GoogLeNet configurations at batch 1:

    eval        FusedInceptionModule eval forward, Triton backend, under no_grad
    eval-cpp    the same through the C++ CPU backend (its compute stubbed)
    train-fwd   train-mode forward (batch statistics) of an input that requires grad
    train-bwd   the backward of that forward

The reference block is timed the same way: on CUDA, the eager block's enqueue time (no
synchronisation between calls); on CPU, the eager block on CPU tensors, whose tiny compute
at the default CPU shape (2x2 maps) is included: an upper bound of its host time. (Meta
tensors are no proxy: their BatchNorm runs Python decompositions.) On CPU the fused rows
include real allocations and the train path's small real CPU ops (weight packing, conv
weight gradients through aten), which on a GPU are asynchronous launches. CPU runs use one
thread: host work is serial, and a loaded machine's OpenMP spinning would swamp it.

Calls are timed one by one in interleaved rounds (every path once per round, so load from
other processes hits them alike); medians and 20/80 quantiles in microseconds are printed
and appended to ``benchmarks/results/overhead-<device>.csv``.

    python benchmarks/bench_overhead.py [--configs 3a,5b] [--batch 1] [--spatial N]
                                        [--rounds 2000] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import torch

if not torch.cuda.is_available():
    # CPU tensors take the Triton path only through the interpreter (no kernel runs).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.runtime.jit
from common import RESULTS_DIR, device_name, git_commit, parse_csv_arg, slugify

from inception_fused import FusedInceptionModule, InceptionModule
from inception_fused.configs import GOOGLENET_CONFIGS
from inception_fused.cpu import load_extension

FIELDS = (
    "time_utc",
    "device",
    "torch",
    "triton",
    "commit",
    "config",
    "batch",
    "spatial",
    "tensors",
    "path",
    "provider",
    "median_us",
    "q20_us",
    "q80_us",
    "calls",
)


@contextlib.contextmanager
def launches_stubbed() -> Iterator[None]:
    """Every ``kernel[grid](...)`` and the C++ entry become no-ops."""
    interface = triton.runtime.jit.KernelInterface
    getitem = interface.__getitem__
    ext = load_extension()
    cpp_entry = ext.eval_forward

    def cpp_stub(x: torch.Tensor, *args: object) -> torch.Tensor:
        return x.new_empty(0)  # one allocation, as the real entry's output

    interface.__getitem__ = lambda self, grid: lambda *a, **k: None
    ext.eval_forward = cpp_stub
    try:
        yield
    finally:
        interface.__getitem__ = getitem
        ext.eval_forward = cpp_entry


class Paths:
    """The timed calls of one configuration; each returns the seconds it measured."""

    def __init__(
        self, name: str, device: torch.device, batch: int, side: int | None
    ) -> None:
        cfg = GOOGLENET_CONFIGS[name]
        side = side or cfg.spatial
        torch.manual_seed(0)
        ref = InceptionModule(*cfg.channels).to(device)
        self.x = torch.randn(batch, cfg.in_channels, side, side, device=device)
        self.grad = torch.randn(batch, ref.out_channels, side, side, device=device)
        self.eval_triton = FusedInceptionModule.from_module(
            ref.eval(), backend="triton"
        )
        self.eval_cpp = FusedInceptionModule.from_module(ref, backend="cpu")
        self.train = FusedInceptionModule.from_module(ref.train(), backend="triton")
        self.ref_eval = InceptionModule(*cfg.channels).to(device).eval()
        self.ref_train = InceptionModule(*cfg.channels).to(device).train()
        self.sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def calls(self, device: torch.device) -> dict[tuple[str, str], Callable[[], float]]:
        fused = {
            ("eval", "fused"): lambda: _timed_eval(self.eval_triton, self.x),
            ("train-fwd", "fused"): lambda: _timed_train(self.train, self.x, None),
            ("train-bwd", "fused"): lambda: _timed_train(self.train, self.x, self.grad),
        }
        if device.type == "cpu":
            fused[("eval-cpp", "fused")] = lambda: _timed_eval(self.eval_cpp, self.x)
        return fused | {
            ("eval", "reference"): lambda: _timed_eval(self.ref_eval, self.x),
            ("train-fwd", "reference"): lambda: _timed_train(
                self.ref_train, self.x, None
            ),
            ("train-bwd", "reference"): lambda: _timed_train(
                self.ref_train, self.x, self.grad
            ),
        }


def _timed_eval(module: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        module(x)
        return time.perf_counter() - t0


def _timed_train(
    module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor | None
) -> float:
    """The forward's time, or with ``grad`` the backward's (its forward untimed)."""
    x = x.detach().requires_grad_()
    t0 = time.perf_counter()
    out = module(x)
    if grad is None:
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    out.backward(grad)
    return time.perf_counter() - t0


def measure(
    paths: dict[tuple[str, str], Callable[[], float]], rounds: int, sync: Callable
) -> dict[tuple[str, str], list[float]]:
    for fn in paths.values():  # warm up: folds, caches, lazy imports
        for _ in range(5):
            fn()
    sync()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in paths}
    for _ in range(rounds):
        for key, fn in paths.items():
            times[key].append(fn() * 1e6)
        sync()  # keep the CUDA queue short; outside every timed region
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(GOOGLENET_CONFIGS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--spatial", type=int, help="map size (default: the config's on CUDA, 2 on CPU)"
    )
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="3a and 5b, 100 rounds")
    args = parser.parse_args()
    configs = parse_csv_arg(args.configs, GOOGLENET_CONFIGS)
    rounds = args.rounds
    if args.quick:
        configs, rounds = ["3a", "5b"], 100
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    side = args.spatial or (None if device.type == "cuda" else 2)
    if device.type == "cpu":
        torch.set_num_threads(1)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = {
        "time_utc": stamp,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "batch": args.batch,
        "spatial": side or "native",
        "tensors": device.type,
        "calls": rounds,
    }
    out_dir = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    path = out_dir / f"overhead-{slugify(device_name(device))}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    print(f"{common['device']} | torch {torch.__version__} | commit {common['commit']}")
    with launches_stubbed(), path.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new_file:
            writer.writeheader()
        for name in configs:
            block = Paths(name, device, args.batch, side)
            times = measure(block.calls(device), rounds, block.sync)
            for (mode, provider), values in times.items():
                q = statistics.quantiles(values, n=10, method="inclusive")
                median = statistics.median(values)
                writer.writerow(
                    common
                    | {
                        "config": name,
                        "path": mode,
                        "provider": provider,
                        "median_us": f"{median:.1f}",
                        "q20_us": f"{q[1]:.1f}",
                        "q80_us": f"{q[7]:.1f}",
                    }
                )
                print(
                    f"{name:>3} {mode:>9} {provider:<15} {median:8.1f} us "
                    f"[{q[1]:.1f}, {q[7]:.1f}]",
                    flush=True,
                )
    print(f"-> {path}")


if __name__ == "__main__":
    main()

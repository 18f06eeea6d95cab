"""Speedup-over-eager plots from the result CSVs.

    python benchmarks/plot.py                              # benchmarks/results -> plots
    python benchmarks/plot.py --results R.csv --out DIR

Per device: ``<slug>-module-<dtype>-<mode>.png`` (one panel per batch, configurations on
the x axis, one bar per provider) and ``<slug>-googlenet.png`` (one panel per dtype/mode,
batches on the x axis). Bars are eager time / provider time (> 1: faster than eager);
whiskers pair the 20th/80th percentiles of both timings.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
from common import (
    EAGER,
    PLOTS_DIR,
    PROVIDERS,
    RESULTS_DIR,
    PointKey,
    Timing,
    latest,
    read_results,
    result_files,
    slugify,
    speedup,
    timings_by_point,
)
from matplotlib.axes import Axes

NETWORK = "googlenet"


def _bars(
    ax: Axes,
    groups: list[str],
    per_group: list[dict[str, Timing]],
    title: str,
) -> None:
    """One cluster of provider bars per group, speedup over eager, line at 1.0."""
    providers = [p for p in PROVIDERS if p != EAGER and any(p in g for g in per_group)]
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs, heights, lows, highs = [], [], [], []
        for j, timings in enumerate(per_group):
            if provider not in timings or EAGER not in timings:
                continue
            s = speedup(timings[EAGER], timings[provider])
            xs.append(j + (i - (len(providers) - 1) / 2) * width)
            heights.append(s.median)
            lows.append(max(0.0, s.median - s.q20))
            highs.append(max(0.0, s.q80 - s.median))
        ax.bar(xs, heights, width, yerr=[lows, highs], capsize=2, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("speedup over eager")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def plot_device(
    device: str, table: dict[PointKey, dict[str, Timing]], out: Path
) -> list[Path]:
    """Every plot of one device; returns the files written."""
    slug = slugify(device)
    written: list[Path] = []
    modules: dict[tuple[str, str], dict[int, dict[str, dict[str, Timing]]]] = (
        defaultdict(lambda: defaultdict(dict))
    )
    network: dict[tuple[str, str], dict[int, dict[str, Timing]]] = defaultdict(dict)
    for (dev, dtype, batch, config, mode), timings in table.items():
        if dev != device or EAGER not in timings:
            continue
        if config == NETWORK:
            network[(dtype, mode)][batch] = timings
        else:
            modules[(dtype, mode)][batch][config] = timings

    for (dtype, mode), by_batch in sorted(modules.items()):
        batches = sorted(by_batch)
        configs = sorted({c for b in by_batch.values() for c in b})
        fig, axes = plt.subplots(
            len(batches),
            1,
            figsize=(max(6.0, 1.1 * len(configs) + 2), 2.6 * len(batches) + 0.6),
            squeeze=False,
        )
        for ax, batch in zip(axes[:, 0], batches, strict=True):
            per = [by_batch[batch].get(c, {}) for c in configs]
            _bars(ax, configs, per, f"batch {batch}")
        axes[0, 0].legend(fontsize=7, ncol=3)
        fig.suptitle(f"Inception modules, {device}, {dtype}, {mode}", fontsize=10)
        written.append(_save(fig, out / f"{slug}-module-{dtype}-{mode}.png"))

    if network:
        keys = sorted(network)
        fig, axes = plt.subplots(
            1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False
        )
        for ax, (dtype, mode) in zip(axes[0], keys, strict=True):
            batches = sorted(network[(dtype, mode)])
            per = [network[(dtype, mode)][b] for b in batches]
            _bars(ax, [f"batch {b}" for b in batches], per, f"{dtype}, {mode}")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"GoogLeNet (torchvision, blocks swapped), {device}", fontsize=10)
        written.append(_save(fig, out / f"{slug}-googlenet.png"))
    return written


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results",
        type=Path,
        nargs="+",
        default=[RESULTS_DIR],
        help="CSV files or directories of them",
    )
    parser.add_argument("--out", type=Path, default=PLOTS_DIR)
    args = parser.parse_args(argv)
    table = timings_by_point(latest(read_results(result_files(args.results))))
    written: list[Path] = []
    for device in sorted({key[0] for key in table}):
        written += plot_device(device, table, args.out)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()

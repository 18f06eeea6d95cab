"""Markdown results table (and issue-6 target check) from the result CSVs.

    python benchmarks/make_table.py                        # print it
    python benchmarks/make_table.py --readme README.md     # rewrite the marked section

The section between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is replaced;
a README without both markers is left alone and the table is printed instead.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from common import (
    COMPILE_PROVIDERS,
    EAGER,
    FUSED,
    RESULTS_DIR,
    PointKey,
    Timing,
    best_compile,
    geomean,
    latest,
    read_results,
    result_files,
    speedup,
    timings_by_point,
)

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
NETWORK = "googlenet"
TARGET_DTYPE = "bfloat16"
ROOFLINE_BATCH = 256
COMPILES = [p for p in COMPILE_PROVIDERS if p != "fused-compile"]

Table = dict[PointKey, dict[str, Timing]]


def _ratio_stats(
    table: Table, pick: Callable[[dict[str, Timing]], Timing | None]
) -> tuple[float, float, int] | None:
    """(geomean, minimum, count) of fused's speedup over ``pick``'s time, where both exist."""
    values = []
    for timings in table.values():
        base = pick(timings)
        if base is not None and FUSED in timings:
            values.append(speedup(base, timings[FUSED]).median)
    return (geomean(values), min(values), len(values)) if values else None


def _fmt(stats: tuple[float, float, int] | None) -> str:
    return (
        "–" if stats is None else f"{stats[0]:.2f}x (min {stats[1]:.2f}x, n={stats[2]})"
    )


def module_table(table: Table) -> list[str]:
    """Geometric-mean speedups per dtype and mode over every configuration and batch."""
    lines = [
        "| dtype | mode | fused vs eager | fused vs best compile | "
        + " | ".join(f"{p} vs eager" for p in COMPILES)
        + " |",
        "|---|---|---|---|" + "---|" * len(COMPILES),
    ]
    groups: dict[tuple[str, str], Table] = defaultdict(dict)
    for key, timings in table.items():
        if key[3] != NETWORK:
            groups[(key[1], key[4])][key] = timings
    for (dtype, mode), group in sorted(groups.items()):
        cells = [
            _fmt(_ratio_stats(group, lambda t: t.get(EAGER))),
            _fmt(_ratio_stats(group, best_compile)),
        ]
        for provider in COMPILES:
            ratios = [
                speedup(t[EAGER], t[provider]).median
                for t in group.values()
                if EAGER in t and provider in t
            ]
            cells.append(f"{geomean(ratios):.2f}x (n={len(ratios)})" if ratios else "–")
        lines.append(f"| {dtype} | {mode} | " + " | ".join(cells) + " |")
    return lines


def network_table(table: Table) -> list[str]:
    lines = [
        (
            "| dtype | mode | batch | eager ms | fused ms | fused vs eager | "
            "fused vs best compile |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for key, t in sorted(table.items()):
        if key[3] != NETWORK or EAGER not in t or FUSED not in t:
            continue
        best = best_compile(t)
        vs_compile = "–" if best is None else f"{speedup(best, t[FUSED]).median:.2f}x"
        lines.append(
            f"| {key[1]} | {key[4]} | {key[2]} | {t[EAGER].median:.3f} | "
            f"{t[FUSED].median:.3f} | {speedup(t[EAGER], t[FUSED]).median:.2f}x | "
            f"{vs_compile} |"
        )
    return lines if len(lines) > 2 else []


def _target(name: str, value: float | None, goal: float, detail: str = "") -> str:
    if value is None:
        status = "no data"
    elif value >= goal:
        status = "met"
    else:
        status = f"missed by {100 * (1 - value / goal):.0f}%"
    shown = "–" if value is None else f"{value:.2f}"
    return f"| {name} | ≥ {goal:g} | {shown} {detail}| {status} |"


def targets(table: Table, roofline: Table) -> list[str]:
    """Issue 6's targets, all in bfloat16: measured value and whether it is met."""

    def group(mode: str, network: bool) -> Table:
        return {
            k: t
            for k, t in table.items()
            if k[1] == TARGET_DTYPE and k[4] == mode and (k[3] == NETWORK) == network
        }

    def stat(mode: str, pick: Callable, index: int) -> float | None:
        s = _ratio_stats(group(mode, False), pick)
        return None if s is None else s[index]

    def net(batch: int) -> float | None:
        for k, t in group("eval", True).items():
            if k[2] == batch and EAGER in t and FUSED in t:
                return speedup(t[EAGER], t[FUSED]).median
        return None

    fracs = {
        k[3]: t[FUSED].median
        for k, t in roofline.items()
        if k[1] == TARGET_DTYPE
        and k[4] == "eval"
        and k[2] == ROOFLINE_BATCH
        and k[3] != NETWORK
        and FUSED in t
    }
    worst = min(fracs, key=fracs.get) if fracs else None

    def eager(t: dict[str, Timing]) -> Timing | None:
        return t.get(EAGER)

    return [
        "| target (bfloat16) | goal | measured | status |",
        "|---|---|---|---|",
        _target("module eval: geomean vs eager", stat("eval", eager, 0), 2.0),
        _target(
            "module eval: geomean vs best compile", stat("eval", best_compile, 0), 1.3
        ),
        _target("module eval: slowest point vs eager", stat("eval", eager, 1), 1.0),
        _target("module train: geomean vs eager", stat("train", eager, 0), 1.5),
        _target(
            "module train: geomean vs best compile", stat("train", best_compile, 0), 1.1
        ),
        _target("GoogLeNet eval, batch 256, vs eager", net(256), 1.3),
        _target("GoogLeNet eval, batch 1, vs eager", net(1), 2.0),
        _target(
            f"module eval, batch {ROOFLINE_BATCH}: worst fraction of roofline",
            fracs.get(worst) if worst else None,
            0.5,
            f"({worst}) " if worst else "",
        ),
    ]


def render(rows: list[dict[str, str]]) -> str:
    """One section per device: provenance, module table, network table, targets."""
    rows = latest(rows)
    times = timings_by_point(rows)
    roofline = timings_by_point(rows, "roofline_frac")
    out: list[str] = []
    for device in sorted({r["device"] for r in rows}):
        mine = [r for r in rows if r["device"] == device]
        versions = sorted({f"torch {r['torch']}, triton {r['triton']}" for r in mine})
        commits = sorted({r["commit"] for r in mine})
        when = max(r["timestamp"] for r in mine)
        out += [
            f"### {device}",
            "",
            (
                f"Commit {', '.join(commits)}; {'; '.join(versions)}; latest run {when}. "
                "Speedup = eager time / fused time (medians), geometric mean over "
                "configurations x batches; n = points measured."
            ),
        ]
        if device.startswith("cpu"):
            out.append(
                "CPU data: a smoke test of the harness, not a performance claim; "
                "the targets below are defined for bfloat16 on an H100/H200."
            )
        dev_times = {k: t for k, t in times.items() if k[0] == device}
        dev_roof = {k: t for k, t in roofline.items() if k[0] == device}
        for title, lines in (
            ("Inception modules", module_table(dev_times)),
            ("Whole GoogLeNet", network_table(dev_times)),
            ("Issue 6 targets", targets(dev_times, dev_roof)),
        ):
            if len(lines) > 2:
                out += ["", f"**{title}**", "", *lines]
        out.append("")
    return "\n".join(out)


def replace_section(
    readme: Path | str, text: str, begin_mark: str = BEGIN, end_mark: str = END
) -> bool:
    """Rewrite the marked section of ``readme``; False when it has no markers."""
    readme = Path(readme)
    content = readme.read_text() if readme.exists() else ""
    begin, end = content.find(begin_mark), content.find(end_mark)
    if begin < 0 or end < begin:
        return False
    head = content[: begin + len(begin_mark)]
    readme.write_text(f"{head}\n{text}\n{content[end:]}")
    return True


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results",
        type=Path,
        nargs="+",
        default=[RESULTS_DIR],
        help="CSV files or directories of them",
    )
    parser.add_argument(
        "--readme", type=Path, help="file whose marked section to rewrite"
    )
    args = parser.parse_args(argv)
    text = render(read_results(result_files(args.results)))
    if args.readme is not None and replace_section(args.readme, text):
        print(f"wrote the results section of {args.readme}")
    else:
        if args.readme is not None:
            print(f"{args.readme} has no {BEGIN} / {END} markers", file=sys.stderr)
        print(text)
    return text


if __name__ == "__main__":
    main()

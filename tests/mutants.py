"""Mutation check: deliberate bugs the test suite must catch (``make mutants``).

Each mutant is one small edit (an exact snippet of the source replaced by a wrong one)
applied alone to a scratch copy of the working tree; the tests chosen to catch it run
against that copy (``pytest -x``), and the mutant is caught when one of their checks
fails. The script fails if any mutant survives, if its tests fail other than by a check
(an assertion), or if a snippet is no longer found exactly once (the code moved:
re-anchor the mutant, do not drop it). The working tree is never modified.

Why a short targeted list rather than mutmut or cosmic-ray: those mutate every operator
of the Python source and run the whole suite per mutant. Here a suite run costs ~9
minutes on two cores (the Triton interpreter), most of the code that matters is Triton
kernel source or C++ (csrc/, rebuilt per mutant) that they do not mutate meaningfully,
and their generic mutants (``+`` -> ``-``) die in the block-level parity tests anyway. The
bugs that slipped past the suite were structural (a merge reading one tile, a network
plan blind to its input, a test comparing the reference with itself): each is named
here with the tests that must see it, so a survivor points at a missing test.

Usage: python tests/mutants.py [NAME ...]   (--list names them)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
# pytest's traceback lines that name what was raised: "E   TypeError: ...", "E   assert ..."
RAISED = re.compile(r"E\s+(\w+(Error|Exception)\b|assert )")
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv*", "__pycache__", ".pytest_cache", "build", "*.egg-info"
)


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments


MUTANTS = [
    # --- the whole-network plan (inception_fused/network.py, csrc/program.cpp)
    Mutant(
        "network-plan-ignores-transform-input",
        "inception_fused/network.py",
        "affine = TRANSFORM_AFFINE if model.transform_input else None",
        "affine = TRANSFORM_AFFINE if False else None",
        ("tests/test_network.py", "-k", "parity_aux_and_transform_input"),
    ),
    Mutant(
        "triton-network-plan-ignores-transform-input",
        "inception_fused/network.py",
        "        if model.transform_input:\n            transform = transform_rows(",
        "        if False:\n            transform = transform_rows(",
        ("tests/test_triton_network.py", "-k", "eval_matches_torchvision"),
    ),
    Mutant(
        "network-plan-runs-on-zeros",
        "inception_fused/network.py",
        "                return plan(x)\n",
        "                return plan(torch.zeros_like(x))\n",
        ("tests/test_network.py", "-k", "parity_sizes and not empty"),
    ),
    Mutant(  # the per-call watch compares tensors by version alone, attributes not at all
        "csrc-watch-ignores-identity",
        "csrc/bindings.cpp",
        "if (key != e->key || value != e->value || (e->state && state(value) != e->state)) {",
        "if (key != e->key || (e->state && state(value) != e->state)) {",
        ("tests/test_network.py", "-k", "replaced_in_the_dicts or attribute_edits"),
    ),
    Mutant(  # the per-call watch blind to hooks added after the plan ran
        "csrc-watch-skips-pre-hooks",
        "csrc/bindings.cpp",
        '{PyUnicode_InternFromString("_forward_pre_hooks"), kHooks}',
        '{PyUnicode_InternFromString("_forward_hooks"), kHooks}',
        ("tests/test_network.py", "-k", "hooks_added_after"),
    ),
    Mutant(  # an attribute edit seen, but the folds it went into kept
        "confirmed-keeps-folds-after-attribute-edits",
        "inception_fused/cpu.py",
        "if changes & self.watch.ATTRIBUTES:\n                refold(owner)",
        "if False:\n                refold(owner)",
        ("tests/test_network.py", "tests/test_inception_v3.py", "-k", "attribute_edits"),
    ),
    Mutant(  # a standalone block's fold blind to its BNs' eps
        "block-fold-ignores-bn-eps",
        "inception_fused/module.py",
        "key = (dtype, *(bn.eps for bn in layout.bns))",
        "key = (dtype,)",
        ("tests/test_module.py", "-k", "fold_cache_invalidation"),
    ),
    Mutant(  # Inception-v3's program cache blind to tensors inside its layers' submodules
        "v3-program-watches-only-its-layers-own-tensors",
        "inception_fused/inception_v3.py",
        "cache.get(module_tensors(modules), build",
        "cache.get(module_tensors(layers), build",
        ("tests/test_inception_v3.py", "-k", "edits_and_train_mode"),
    ),
    Mutant(
        "network-plan-reads-bgr",
        "csrc/layers.cpp",
        "const T* x_row = src + n * sn + c * sc + h * sh;",
        "const T* x_row = src + n * sn + (c_in - 1 - c) * sc + h * sh;",
        ("tests/test_network.py", "-k", "parity_aux_and_transform_input"),
    ),
    # --- Triton kernels, one or more per family
    Mutant(  # conv_tile: every KxK conv of the whole Triton network reads flipped taps
        "whole-network-flipped-spatial-taps",
        "inception_fused/kernels/conv_tile.py",
        "+ (tap * w_tap_rows + kk)[:, None] * w_s_k",
        "+ ((KH * KW - 1 - tap) * w_tap_rows + kk)[:, None] * w_s_k",
        ("tests/test_googlenet.py", "-k", "whole_network_through_triton"),
    ),
    Mutant(  # pointwise: the first reduce column never reaches the scratch
        "pointwise-drops-first-reduce-column",
        "inception_fused/kernels/pointwise.py",
        "col_ok & (cols >= C1),",
        "col_ok & (cols > C1),",
        ("tests/test_eval_forward.py",),
    ),
    Mutant(  # pointwise: a merged launch's pool tiles skip the pool's first columns
        "pointwise-merged-pool-columns-shifted",
        "inception_fused/kernels/pointwise.py",
        "pid_m, pid_n - stem_col_tiles, rows",
        "pid_m, pid_n, rows",
        ("tests/test_eval_forward.py", "-k", "odd_shapes and merged"),
    ),
    Mutant(  # the Triton plan frees a map before the launch that reads it has run
        "network-workspace-frees-live-map",
        "inception_fused/network.py",
        "release(done)  # read by",
        "release(result)  # read by",
        ("tests/test_triton_network.py", "-k", "nchw"),
    ),
    Mutant(  # the interpreter's max propagates NaN anyway: only the PTX check sees it
        "pool-max-drops-nan-in-ptx",
        "inception_fused/kernels/conv_tile.py",
        "a = tl.maximum(a, v, propagate_nan=tl.PropagateNan.ALL)",
        "a = tl.maximum(a, v)",
        ("tests/test_gpu_compile.py", "-k", "compile_for_sm90 and eval"),
    ),
    Mutant(  # spatial: the eval (and train) launch B covers its first row tile only
        "spatial-first-row-tile-only",
        "inception_fused/kernels/spatial.py",
        "            ceil_div(m, cfg.block_m),\n"
        "            ceil_div(c3, cfg.block_n) + ceil_div(c5, cfg.block_n),",
        "            1,\n            ceil_div(c3, cfg.block_n) + ceil_div(c5, cfg.block_n),",
        ("tests/test_row_tiles.py", "-k", "eval"),
    ),
    Mutant(  # batch_norm: statistics merge the first BLOCK_T tiles' partials only
        "bn-stats-first-chunk-of-tiles-only",
        "inception_fused/kernels/batch_norm.py",
        "for t0 in range(0, num_tiles, BLOCK_T):",
        "for t0 in range(0, BLOCK_T, BLOCK_T):",
        ("tests/test_row_tiles.py",),
    ),
    Mutant(
        "bn-wrong-eps",
        "inception_fused/kernels/batch_norm.py",
        "var_eps = div_rn(m2, n_a) + eps",
        "var_eps = div_rn(m2, n_a) + 2 * eps",
        ("tests/test_training.py",),
    ),
    Mutant(
        "bn-biased-running-var",
        "inception_fused/kernels/batch_norm.py",
        "div_rn(m2, n_a - 1.0)",
        "div_rn(m2, n_a)",
        ("tests/test_training.py",),
    ),
    Mutant(  # relu_bn_backward: BN backward sums tile 0's partials only
        "bn-backward-sums-tile-0-only",
        "inception_fused/kernels/relu_bn_backward.py",
        "ok = (t < TILES)[:, None] & col_ok[None, :]",
        "ok = (t < 1)[:, None] & col_ok[None, :]",
        ("tests/test_row_tiles.py",),
    ),
    Mutant(  # reduce_grad: the data-gradient conv reads its kernel unflipped
        "reduce-grad-unflipped-kernel",
        "inception_fused/kernels/reduce_grad.py",
        "w_ptr = tl.where(is3, w3_ptr, w5_ptr) + (ks * ks - 1) * tap_size",
        "w_ptr = tl.where(is3, w3_ptr, w5_ptr)",
        ("tests/test_train_backward.py",),
    ),
    Mutant(  # input_grad: the pool gradient goes to the argmax and every later tap
        "input-grad-pool-argmax",
        "inception_fused/kernels/input_grad.py",
        "acc += tl.where(best == t, dpooled, 0.0)",
        "acc += tl.where(best >= t, dpooled, 0.0)",
        ("tests/test_train_backward.py",),
    ),
    Mutant(  # train_backward: the pool projection's weight gradient against x, not pooled
        "train-backward-pool-proj-weight-grad",
        "inception_fused/kernels/train_backward.py",
        "pool_w=g[:, pool_col:].t() @ pooled,",
        "pool_w=g[:, pool_col:].t() @ x.permute(0, 2, 3, 1).reshape(m, c_in),",
        ("tests/test_googlenet.py", "-k", "train_parity"),
    ),
    # --- the C++ backend (rebuilt in the scratch copy)
    Mutant(  # after the first C++ mutant's full build, one file's rebuild
        "csrc-pool-window-misses-right-column",
        "csrc/conv.cpp",
        "w1 = std::min(w + 2, s.width);",
        "w1 = std::min(w + 1, s.width);",
        ("tests/test_cpu_backend.py",),
    ),
    Mutant(  # every pool's 4-vector pass reads its first vector four times
        "csrc-pool-reads-one-vector-of-four",
        "csrc/inception_cpu.h",
        "load<U>(row + w * in.channels + v * kLanes)",
        "load<U>(row + w * in.channels)",
        ("tests/test_network.py", "-k", "parity_sizes and not empty"),
    ),
    Mutant(  # a batch-1 7x7 map runs Winograd on its 4 tiles
        "csrc-winograd-on-few-tiles",
        "csrc/inception_cpu.h",
        "return br.winograd && winograd_tiles(br.out_shape, br.winograd_tile) >= kTileRows;",
        "return br.winograd;",
        ("tests/test_winograd.py", "-k", "few_tiles"),
    ),
    Mutant(  # the last block leaves its short remainder uncomputed
        "csrc-last-block-drops-its-remainder",
        "csrc/inception_cpu.h",
        "return block + 1 < block_count(rows, size) ? size : rows - block * size;",
        "return std::min(size, rows - block * size);",
        ("tests/test_winograd.py", "-k", "remainder"),
    ),
    Mutant(  # Inception-v3's pool branches: TensorFlow's average counts the padding
        "csrc-avg-pool-counts-padding",
        "csrc/conv.cpp",
        "br.pool == Pool::kAvg ? T(9)",
        "br.pool != Pool::kMax ? T(9)",
        ("tests/test_inception_v3.py", "-k", "block_matches"),
    ),
]


def check_anchors(mutants: list[Mutant]) -> None:
    moved = [
        f"{m.name}: {m.path} has the snippet {count} times"
        for m in mutants
        if (count := (ROOT / m.path).read_text().count(m.old)) != 1
    ]
    if moved:
        sys.exit("mutants whose code moved (re-anchor them):\n  " + "\n  ".join(moved))


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, float, str]:
    start = time.monotonic()
    done = subprocess.run(
        cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True
    )
    return done.returncode, time.monotonic() - start, done.stdout + done.stderr


def build(tree: Path, env: dict[str, str]) -> None:
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    code, seconds, output = run(cmd, tree, env)
    if code:
        sys.exit(f"build_ext failed in the scratch copy:\n{output[-3000:]}")
    print(f"  (extension rebuilt in {seconds:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants")
    args = parser.parse_args()
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:42} {m.path}  ->  {' '.join(m.tests)}")
        return
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"unknown mutants: {sorted(unknown)}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    check_anchors(chosen)
    # C++ mutants last: each rebuilds the extension, and the copy is thrown away after.
    chosen.sort(key=lambda m: m.path.startswith("csrc/"))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="inception-mutants-") as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(ROOT, tree, ignore=COPY_IGNORE, symlinks=True)
        env = os.environ | {"PYTHONPATH": str(tree)}
        probe = "import inception_fused; print(inception_fused.__file__)"
        where = run([sys.executable, "-c", probe], tree, env)[2].strip().splitlines()
        if not where or not where[-1].startswith(str(tree)):
            sys.exit(f"the scratch copy's package is not the one imported: {where}")
        survivors, broken = [], []
        for m in chosen:
            target = tree / m.path
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            if m.path.startswith("csrc/"):
                build(tree, env)
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
            code, seconds, output = run([*cmd, *m.tests], tree, env)
            target.write_text(original)
            failed = [ln for ln in output.splitlines() if ln.startswith("FAILED")]
            # Caught means a check failed: the first exception pytest reports is an
            # assertion. Any other error (an import, a TypeError in a half-edited tree)
            # would count every mutant as caught.
            raised = [
                ln.split(maxsplit=1)[1]
                for ln in output.splitlines()
                if RAISED.match(ln)
            ]
            by_check = bool(raised) and raised[0].startswith(
                ("AssertionError", "assert ")
            )
            if code == 0:
                verdict = "SURVIVED"
                survivors.append(m.name)
            elif code == 1 and by_check:
                verdict = "caught"
            else:
                verdict = "ERROR"
                broken.append(m.name)
                print(output[-2000:])
            print(f"{verdict:9} {m.name:42} {seconds:5.0f} s  {' '.join(failed[:1])}")
    print(f"{len(chosen)} mutants in {time.monotonic() - start:.0f} s")
    if survivors or broken:
        sys.exit(f"survived: {survivors}; failed other than by a check: {broken}")


if __name__ == "__main__":
    main()

"""Compile every kernel launch for an sm_90 GPU, without one, and read the PTX.

The interpreter runs the kernels' Python, not Triton's compiler, so what only the
compiler sees (bf16 promotion, constexpr branches, alignment, rounding, NaN semantics)
would first show on a GPU. kernels/aot.py records the launchers' real launches on meta
tensors (eval, train forward, backward) and compiles them as the runtime would specialise
them, with the ptxas bundled in the Triton wheel, in a subprocess because the test session
imports the kernels in interpreter mode. Checked in the PTX:

* ReLU and max-pool propagate NaN (``max.NaN``), as torch.relu and max_pool2d do: no
  float max drops NaN, and the eval pool tiles count more ``max.NaN`` than the stem
  tiles (the pool's on top of the ReLU's);
* no fp32 division is approximate (``div.full.f32``): statistics round as torch's do;
* the conv main loops load asynchronously (``cp.async``): the kernels keep the
  divisible-by-16 facts of their strides and offsets.

Where a GPU is present the other tests compile every kernel for real: skipped there.
"""

import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
from triton.runtime.jit import JITFunction

# A GoogLeNet-like module whose channel counts are all multiples of 16 (as in the
# network), at a small batch so that M <= 8192 picks the smaller GPU tiles.
CHANNELS = (64, 32, 48, 64, 16, 32, 32)
DTYPES = (torch.bfloat16, torch.float64)  # fp32 shares the bf16 code path
CONV_KERNELS = {
    "inception_pointwise_kernel",
    "inception_spatial_kernel",
    "reduce_grad_kernel",
    "input_grad_kernel",
}
RELU_OR_POOL_KERNELS = {
    "inception_pointwise_kernel",  # max-pool (pool tiles), ReLU (eval)
    "inception_spatial_kernel",  # ReLU (eval) or BN+ReLU prologue (train)
    "bn_relu_pass_kernel",
}


# A float max that drops NaN (the operand that is not NaN wins): max.f32, max.ftz.f32,
# max.bf16x2 ...; the NaN-propagating forms are spelled max.NaN.
PLAIN_FLOAT_MAX = re.compile(r"\bmax(\.ftz)?\.(f32|f16|bf16|f16x2|bf16x2)\b")


def check_launch(launch, dtype) -> tuple[list[str], int]:
    """Compile one launch; return what is wrong with its PTX and its max.NaN count."""
    from inception_fused.kernels.aot import compile_launch

    ptx = compile_launch(launch).asm["ptx"]
    problems = []
    if launch.name in RELU_OR_POOL_KERNELS and PLAIN_FLOAT_MAX.search(ptx):
        problems.append("a float max without NaN propagation")
    if "div.full.f32" in ptx:
        problems.append("approximate fp32 division (div.full.f32)")
    if dtype != torch.float64:
        takes_max = launch.name in RELU_OR_POOL_KERNELS and not (
            # launch A's train stem tiles store pre-activations: no ReLU, no pool
            launch.kwargs.get("TRAIN") and launch.kwargs.get("TILES") == "stem"
        )
        if takes_max and "max.NaN" not in ptx:
            problems.append("max without NaN propagation")
        if launch.name in CONV_KERNELS and "cp.async" not in ptx:
            problems.append("main loop without asynchronous loads (cp.async)")
    return problems, ptx.count("max.NaN")


def run_stage(stage: str) -> int:
    """Compile every distinct launch of one stage in both dtypes; returns the count."""
    from inception_fused.kernels.aot import launch_key, module_launches

    seen, failures = set(), []
    eval_stem_tiles = {}  # max.NaN counts of launch A's eval tiles, by (dtype, TILES)
    # Batch 2 (M = 288): launch A's eval tiles in one launch; batch 8: stem, then pool.
    batches = (2, 8) if stage == "eval" else (2,)
    for dtype, batch in itertools.product(DTYPES, batches):
        launches = module_launches(CHANNELS, batch, 12, dtype, modes=(stage,))
        for launch in launches[stage]:
            key = launch_key(launch)
            if key in seen:
                continue
            seen.add(key)
            problems, nan_max = check_launch(launch, dtype)
            for problem in problems:
                failures.append(f"{launch.name} {dtype}: {problem}")
            if launch.name == "inception_pointwise_kernel" and stage == "eval":
                eval_stem_tiles[dtype, launch.kwargs["TILES"]] = nan_max
            print(launch.name, dtype, "compiled", flush=True)
    for dtype in DTYPES:
        # Pool tiles take the window's max and then the ReLU: more max.NaN than the
        # stem tiles' ReLU alone, or the pool's max dropped NaN behind the ReLU's; the
        # merged launch has both.
        stem, pool, both = (
            eval_stem_tiles.get((dtype, t), 0) for t in ("stem", "pool", "both")
        )
        if dtype != torch.float64 and stage == "eval" and not both >= pool > stem > 0:
            failures.append(
                f"{dtype}: max.NaN in pool tiles {pool}, stem tiles {stem}, both {both}"
            )
    assert not failures, "\n".join(failures)
    return len(seen)


STAGES = ("eval", "train", "backward")


# kernels/aot.py specialises a launch with the runtime's JITFunction._pack_args, which
# the oldest supported Triton (3.3) lacks: the pinned stack's CI pass runs these checks.
needs_aot = pytest.mark.skipif(
    not hasattr(JITFunction, "_pack_args"), reason="this Triton has no _pack_args"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="kernels compile on the GPU")
@needs_aot
@pytest.mark.parametrize("stage", STAGES)
def test_kernels_compile_for_sm90(stage):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, os.path.abspath(__file__), stage],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    expected = run.stdout.strip().splitlines()[-1]
    assert expected.startswith("expected ")
    assert run.stdout.count(" compiled") == int(expected.split()[1]) > 0


if __name__ == "__main__":
    print(f"expected {run_stage(sys.argv[1])}")


# (report arguments, whether tuner candidates are compiled)
SM90_SUBSETS = {
    # The widest GEMMs and the big tiles, every mode, every tuner candidate.
    "4b-256-bf16-fp32": ("--configs 4b --batches 256 --dtypes bf16 fp32", True),
    # fp64's elementwise backward tiles, the first to spill when a kernel grows; fp64
    # has no tuner candidates.
    "3a-1-fp64-backward": (
        "--configs 3a --batches 1 --dtypes fp64 --modes backward",
        False,
    ),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="kernels compile on the GPU")
@needs_aot
@pytest.mark.parametrize("subset", list(SM90_SUBSETS))
def test_sm90_report_check_passes_on_a_subset(subset):
    """benchmarks/sm90_report.py --check on a subset: no spills, HGMMA, pipelined main
    loops, shared memory within 227 KiB."""
    args, tuned = SM90_SUBSETS[subset]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "benchmarks", "sm90_report.py"),
            *args.split(),
            *("--check", "--no-write"),
        ],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert " 0 failing" in run.stdout
    assert ("candidate" in run.stdout) == tuned  # the tuner's configs were compiled too


def test_gpu_check_dry_run_lists_its_steps():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "gpu_check.py"), "--dry-run"],
        capture_output=True,
        check=True,
        text=True,
        timeout=120,
    )
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"step {i}" for i in (1, 2, 3, 4)]
    assert "pytest" in lines[0] and "sm90_report.py --check --live" in lines[1]
    assert "tune_tiles.py" in lines[2] and "hard limit 480 s" in lines[2]
    assert "run_all.py" in lines[3] and "hard limit 1500 s" in lines[3]

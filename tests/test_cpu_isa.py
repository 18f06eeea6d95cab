"""The C++ CPU backend's per-ISA builds (setup.py, csrc/gemm.h): one kernel source
compiled for 128-bit (baseline), 256-bit (AVX2 + FMA) and 512-bit (AVX-512) vectors.

Each build this CPU runs is checked for parity in its own process, forced through
ATEN_CPU_CAPABILITY (a process loads one build); builds the CPU lacks are skipped with
the reason, but must still have been compiled. Dispatch is checked as the pure function
it is, so the AVX-512 choice is tested on any machine.
"""

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from inception_fused import cpu


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


X86_64 = platform.machine() == "x86_64"
# (ATEN_CPU_CAPABILITY, the build it loads, its vector bits, the CPU flags it needs)
BUILDS = [
    ("default", "inception_fused._C", 128, set()),
    ("avx2", "inception_fused._C_avx2", 256, {"avx2", "fma"}),
    (
        "avx512",
        "inception_fused._C_avx512",
        512,
        {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    ),
]

# Runs in the forced process: the build it loaded, then Inception blocks whose channel
# counts hit full panels, single vectors and masked edges at every width (3x3 through
# Winograd and 5x5 direct), in float32 and float64, and a whole GoogLeNet at 64x64 with
# logits that depend on the input (He init, BN statistics of its own activations).
PARITY = """
import copy
import sys
import torch
sys.path.insert(0, {tests!r})
from conftest import assert_sees_input, googlenet_that_sees_input, make_reference
from inception_fused import FusedInceptionModule, cpu, fuse_googlenet

ext = cpu.load_extension()
assert ext.__name__ == {name!r}, ext.__name__
assert ext.vector_bits() == {bits}, ext.vector_bits()
tol = {{torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-8)}}
for channels in [(5, 3, 4, 7, 2, 9, 3), (19, 17, 13, 33, 5, 47, 1), (32, 16, 32, 64, 8, 16, 32)]:
    for k in (3, 5):
        for dtype in tol:
            ref = make_reference(*channels, branch3_kernel=k).to(dtype).eval()
            fused = FusedInceptionModule.from_module(ref, backend="cpu").eval()
            x = torch.randn(2, channels[0], 9, 7, dtype=dtype)
            with torch.no_grad():
                torch.testing.assert_close(fused(x), ref(x), atol=tol[dtype][0], rtol=tol[dtype][1])
ref = googlenet_that_sees_input(0, 10)
x = torch.randn(2, 3, 64, 64)
assert_sees_input(ref, x, 1e-4, 1e-4)
fused = fuse_googlenet(copy.deepcopy(ref), backend="cpu")
with torch.no_grad():
    torch.testing.assert_close(fused(x), ref(x), atol=1e-4, rtol=1e-4)
assert fused._network_plan is not None, "the one-call plan did not run"
print("loaded", cpu.loaded_build())
"""


def run_forced(capability: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("capability", "name", "bits", "flags"), BUILDS, ids=[b[0] for b in BUILDS]
)
def test_build_parity(capability, name, bits, flags):
    if not X86_64 and capability != "default":
        pytest.skip(f"{name} is an x86-64 build; this is {platform.machine()}")
    missing = flags - cpu_flags()
    if missing:
        pytest.skip(
            f"this CPU lacks {' '.join(sorted(missing))}: {name} cannot run here"
        )
    code = PARITY.format(tests=str(Path(__file__).parent), name=name, bits=bits)
    result = run_forced(capability, code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[1] == name.rsplit(".", 1)[1]


@pytest.mark.parametrize(
    ("_capability", "name", "_bits", "_flags"), BUILDS, ids=[b[0] for b in BUILDS]
)
def test_every_build_compiled(_capability, name, _bits, _flags):
    """Every build exists, including the ones this CPU cannot import (found, not loaded)."""
    if not X86_64 and name != cpu.BASELINE:
        pytest.skip(f"{name} is an x86-64 build; this is {platform.machine()}")
    assert importlib.util.find_spec(name) is not None, f"{name} was not built"


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ("AVX512", "inception_fused._C_avx512"),
        ("AVX2", "inception_fused._C_avx2"),
        ("DEFAULT", "inception_fused._C"),  # x86-64 without AVX2/FMA, or forced
        ("NO AVX", "inception_fused._C"),
        ("VSX", "inception_fused._C"),
        ("ZVECTOR", "inception_fused._C"),
    ],
)
def test_extension_name_follows_torch_capability(capability, expected):
    assert cpu.extension_name(capability) == expected


@pytest.mark.skipif(not X86_64, reason="x86-64 builds only")
def test_capability_forced_past_the_cpu_falls_back():
    """torch reports a forced ATEN_CPU_CAPABILITY even where the CPU lacks the ISA: the
    best build the CPU runs loads instead of dying on an illegal instruction."""
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        pytest.skip("this CPU runs AVX-512: no capability to force past it")
    expected = "_C_avx2" if {"avx2", "fma"} <= flags else "_C"
    code = (
        "import torch\nfrom inception_fused import cpu\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'AVX512'\n"
        "print(cpu.load_extension().__name__)\n"
    )
    result = run_forced("avx512", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == f"inception_fused.{expected}"

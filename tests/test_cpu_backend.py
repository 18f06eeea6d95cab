"""The C++ CPU backend (csrc/): parity with the reference, layouts, errors, dispatch."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close, make_reference

from inception_fused import FusedInceptionModule, cpu, eval_op, module
from inception_fused.configs import GOOGLENET_CONFIGS
from inception_fused.folding import FoldedInception

ODD = (37, 5, 7, 11, 3, 9, 6)  # channel counts not multiples of the SIMD width


def cpu_pair(channels, dtype=torch.float32, backend="cpu", **kwargs):
    ref = make_reference(*channels, **kwargs).to(dtype).eval()
    return FusedInceptionModule.from_module(ref, backend=backend).eval(), ref


def run_both(fused, ref, x):
    with torch.no_grad():
        return fused(x), ref(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "bias"])
@pytest.mark.parametrize("branch3_kernel", [3, 5])
@pytest.mark.parametrize("name", list(GOOGLENET_CONFIGS))
def test_googlenet_configs_real_size(name, branch3_kernel, batch_norm, dtype):
    cfg = GOOGLENET_CONFIGS[name]
    fused, ref = cpu_pair(
        cfg.channels, dtype, branch3_kernel=branch3_kernel, batch_norm=batch_norm
    )
    x = torch.randn(2, cfg.in_channels, cfg.spatial, cfg.spatial, dtype=dtype)
    out, expected = run_both(fused, ref, x)
    assert out.shape == (2, cfg.out_channels, cfg.spatial, cfg.spatial)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (3, 5, 7), (2, 1, 9), (1, 13, 1), (2, 2, 3), (1, 17, 23)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("branch3_kernel", [1, 3, 5, 7])
def test_odd_shapes(shape, branch3_kernel, dtype):
    fused, ref = cpu_pair(ODD, dtype, branch3_kernel=branch3_kernel)
    n, h, w = shape
    x = torch.randn(n, ODD[0], h, w, dtype=dtype)
    out, expected = run_both(fused, ref, x)
    assert_close(out, expected)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "permuted"])
def test_input_layouts(layout):
    fused, ref = cpu_pair((24, 8, 12, 16, 4, 8, 8))
    x = torch.randn(2, 24, 12, 10)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # non-contiguous in W
        x = torch.randn(2, 24, 12, 20)[..., ::2]
    elif layout == "permuted":  # memory order N, W, H, C
        x = torch.randn(2, 10, 12, 24).permute(0, 3, 2, 1)
    out, expected = run_both(fused, ref, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, expected)


def test_empty_batch():
    fused, _ = cpu_pair((16, 4, 4, 8, 4, 8, 4))
    with torch.no_grad():
        assert fused(torch.randn(0, 16, 5, 5)).shape == (0, 24, 5, 5)


def test_result_independent_of_thread_count():
    # Each output element is one thread's fixed-order dot product: bitwise repeatable.
    fused, _ = cpu_pair(GOOGLENET_CONFIGS["4a"].channels)
    x = torch.randn(1, 480, 14, 14)
    threads = torch.get_num_threads()
    with torch.no_grad():
        many = fused(x)
        torch.set_num_threads(1)
        try:
            one = fused(x)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(many, one)


def test_train_mode_dispatches_to_the_reference_math():
    """The C++ backend is eval-only: train mode runs the reference's own ops, so
    outputs, gradients and running statistics are bit-identical to the reference's
    (the Triton kernels' train parity is tests/test_training.py's)."""
    fused, ref = cpu_pair(ODD)
    fused.train()
    ref.train()
    x = torch.randn(3, ODD[0], 6, 5)
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    out, expected = fused(x), ref(x_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(out, expected) and torch.equal(x.grad, x_ref.grad)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for (name, a), b in zip(fused.named_buffers(), ref.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_grad_requiring_eval_call_uses_autograd():
    fused, ref = cpu_pair(ODD)
    x = torch.randn(2, ODD[0], 4, 4)
    x_fused, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fused(x_fused)
    assert out.requires_grad
    out.sum().backward()
    ref(x_ref).sum().backward()
    assert_close(x_fused.grad, x_ref.grad)


def test_missing_extension_raises_clearly(monkeypatch):
    monkeypatch.setattr(cpu, "_extension", None)
    for name in ("_C", "_C_avx2", "_C_avx512"):  # every build: import fails
        monkeypatch.setitem(sys.modules, f"inception_fused.{name}", None)
    fused, _ = cpu_pair(ODD, backend="auto")
    with (
        pytest.raises(RuntimeError, match="C\\+\\+ CPU backend.*not built"),
        torch.no_grad(),
    ):
        fused(torch.randn(1, ODD[0], 3, 3))


@pytest.fixture
def calls(monkeypatch):
    """Record which eval path each forward takes."""
    taken = []
    monkeypatch.setattr(
        eval_op, "cpu_eval_forward", lambda x, *_: taken.append("cpu") or x.clone()
    )
    monkeypatch.setattr(
        eval_op,
        "inception_eval_forward",
        lambda x, f: taken.append("triton") or x.clone(),
    )
    return taken


@pytest.mark.parametrize(
    "backend, interpret, expected",
    [
        ("auto", False, "cpu"),
        ("auto", True, "cpu"),  # the interpreter only when asked for
        ("cpu", True, "cpu"),
        ("triton", True, "triton"),
        ("reference", False, None),
    ],
)
def test_backend_selection(calls, monkeypatch, backend, interpret, expected):
    monkeypatch.setattr(module, "interpreting", lambda: interpret)
    fused, _ = cpu_pair(ODD, backend=backend)
    with torch.no_grad():
        fused(torch.randn(1, ODD[0], 3, 3))
    assert calls == ([expected] if expected else [])


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("INCEPTION_FUSED_BACKEND", "cpu")
    assert FusedInceptionModule(*ODD).backend == "cpu"
    monkeypatch.setenv("INCEPTION_FUSED_BACKEND", "auto")
    assert FusedInceptionModule(*ODD).backend == "auto"


def test_triton_on_cpu_without_interpreter_raises(calls, monkeypatch):
    monkeypatch.setattr(module, "interpreting", lambda: False)
    fused, _ = cpu_pair(ODD, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"), torch.no_grad():
        fused(torch.randn(1, ODD[0], 3, 3))


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_other_dtypes(calls, backend):
    fused, ref = cpu_pair(ODD, torch.bfloat16, backend=backend)
    x = torch.randn(1, ODD[0], 3, 3, dtype=torch.bfloat16)
    if backend == "cpu":
        with pytest.raises(TypeError, match="float32 and float64"):
            run_both(fused, ref, x)
    else:  # auto: plain PyTorch, the only CPU path for bfloat16
        out, expected = run_both(fused, ref, x)
        assert torch.equal(out, expected) and calls == []


def test_baseline_extension_loads_when_capability_is_default():
    """ATEN_CPU_CAPABILITY=default (a CPU without AVX2): the baseline build loads and
    agrees with the reference. In a fresh process: one process loads one build."""
    code = (
        "import torch\n"
        "from inception_fused import FusedInceptionModule, InceptionModule, cpu\n"
        f"ref = InceptionModule(*{ODD!r}).eval()\n"
        "fused = FusedInceptionModule.from_module(ref, backend='cpu').eval()\n"
        f"x = torch.randn(2, {ODD[0]}, 7, 6)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(fused(x), ref(x), atol=1e-4, rtol=1e-4)\n"
        "print(cpu.load_extension().__name__)\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "inception_fused._C"


def eval_op_args(fused, x):
    """Arguments of torch.ops.inception_fused.eval_forward for ``fused`` on ``x``."""
    f = fused.folded(x.dtype)
    return dict(
        zip(
            [
                "stem_w",
                "stem_b",
                "pool_w",
                "pool_b",
                "w3",
                "b3",
                "w5",
                "b5",
                "c1",
                "r3",
                "k3",
                "k5",
            ],
            f.args,
            strict=True,
        )
    )


@pytest.mark.parametrize(
    ("name", "length"),
    [
        ("stem_b", 0),
        ("stem_b", 5),
        ("b3", 0),
        ("b5", 3),
        ("pool_b", 0),
        ("pool_b", 100),
    ],
)
def test_bias_length_checked_through_the_op(name, length):
    """A bias shorter or longer than its weight's columns: a clear error, no crash."""
    fused, _ = cpu_pair(ODD)
    x = torch.randn(1, ODD[0], 4, 4)
    args = eval_op_args(fused, x)
    args[name] = torch.zeros(length)
    with pytest.raises(RuntimeError, match=f"{name} has {length} elements"):
        torch.ops.inception_fused.eval_forward(x, **args, backend="cpu")


@pytest.mark.parametrize(("c1", "r3"), [(-1, 4), (0, 0), (20, 4)])
def test_bad_channel_split_checked_through_the_op(c1, r3):
    fused, _ = cpu_pair(ODD)
    x = torch.randn(1, ODD[0], 4, 4)
    args = eval_op_args(fused, x) | {"c1": c1, "r3": r3}
    with pytest.raises(RuntimeError, match="bad split"):
        torch.ops.inception_fused.eval_forward(x, **args, backend="cpu")


def counted_fold_programs(monkeypatch):
    """An input, a fold of ODD, the list of folds a Program gets built for, and the real
    builder."""
    fused, _ = cpu_pair(ODD)
    built = []
    build = cpu._fold_program
    monkeypatch.setattr(cpu, "_fold_program", lambda ext, f: built.append(f) or build(ext, f))
    return torch.randn(2, ODD[0], 5, 6), fused.folded(torch.float32), built, build


def test_fold_program_built_once_and_again_after_a_write(monkeypatch):
    """A fold's C++ Program is built once: eager calls and the custom op (which gets the
    fold's tensors, not the fold) find it by the weights' identity. A weight written in
    place gets a new Program, not the stale copy the old one packed."""
    x, f, built, build = counted_fold_programs(monkeypatch)
    first = cpu.cpu_eval_forward(x, f)
    assert_close(torch.ops.inception_fused.eval_forward(x, *f.args, "cpu"), first)
    assert len(built) == 1
    with torch.no_grad():
        f.w3.mul_(2)
    second = cpu.cpu_eval_forward(x, f)
    assert len(built) == 2
    assert_close(second, build(cpu.load_extension(), f).forward(x))
    assert not torch.equal(second, first)


def test_op_finds_the_program_of_equal_weights(monkeypatch):
    """The custom op's calls from a compiled graph fold per call (new tensors, the same
    values): they reuse the Program built for equal weights, and weights of other values
    get their own."""
    x, f, built, build = counted_fold_programs(monkeypatch)

    def refolded():
        return [a.clone() if isinstance(a, torch.Tensor) else a for a in f.args]

    first = torch.ops.inception_fused.eval_forward(x, *refolded(), "cpu")
    assert_close(torch.ops.inception_fused.eval_forward(x, *refolded(), "cpu"), first)
    assert len(built) == 1
    other = refolded()
    other[4] = other[4] * 2  # w3
    out = torch.ops.inception_fused.eval_forward(x, *other, "cpu")
    assert len(built) == 2
    assert_close(out, build(cpu.load_extension(), FoldedInception(*other)).forward(x))
    assert not torch.equal(out, first)


def counted_compares(monkeypatch):
    """The list of weight copies torch.equal is asked to compare, as calls append them."""
    compared = []
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: compared.append(a) or equal(a, b))
    return compared


@pytest.mark.parametrize("inference", [False, True])
def test_op_skips_the_compare_for_the_tensors_it_last_matched(monkeypatch, inference):
    """A frozen graph hands the op the same constant tensors every call: once matched
    they are not compared again, until one of them is written in place; a tensor made
    anew is compared alone. Inference tensors keep no version counter, so they are
    compared every call."""
    x, f, built, build = counted_fold_programs(monkeypatch)
    monkeypatch.setattr(cpu, "_programs_by_content", {})
    compared = counted_compares(monkeypatch)
    with torch.inference_mode(inference):
        frozen = [a.clone() if isinstance(a, torch.Tensor) else a for a in f.args]
    op = torch.ops.inception_fused.eval_forward
    first = op(x, *frozen, "cpu")
    assert_close(op(x, *frozen, "cpu"), first)
    assert len(built) == 1 and bool(compared) == inference
    with torch.inference_mode(inference), torch.no_grad():
        frozen[4].mul_(2)  # w3
        out = op(x, *frozen, "cpu")
    assert len(built) == 2 and compared
    assert_close(out, build(cpu.load_extension(), FoldedInception(*frozen)).forward(x))
    compared.clear()
    assert_close(op(x, *frozen, "cpu"), out)
    assert len(built) == 2 and bool(compared) == inference
    if not inference:
        frozen[5] = frozen[5].clone()  # b3, as Inductor's inlined constants come
        assert_close(op(x, *frozen, "cpu"), out)
        assert len(built) == 2 and [c.shape for c in compared] == [frozen[5].shape]


def test_frozen_compile_hands_the_op_constants(monkeypatch):
    """Under Inductor's freezing the fold in the graph is constant-folded: the op gets the
    same weight matrices every call, so it builds one Program and never compares them
    again (without freezing each call folds anew and is compared in full). Inductor
    computes its tiniest constants in a kernel each call: those 1-d shifts are compared."""
    fused, ref = cpu_pair(ODD)
    x = torch.randn(2, ODD[0], 5, 6)
    monkeypatch.setattr(cpu, "_programs_by_content", {})
    compared = counted_compares(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(fused)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        first = compiled(x)  # compiles (Inductor compares constants too)
        compared.clear()
        outs = [first, compiled(x), compiled(x)]
        expected = ref(x)
    for out in outs:
        assert_close(out, expected)
    assert len(cpu._programs_by_content) == 1
    assert all(t.dim() == 1 for t in compared)

"""Training through FusedInceptionModule: parity of outputs, gradients and buffers with the
reference in train mode and eval-with-gradients, gradcheck, an SGD loop, determinism."""

import pytest
import torch
from conftest import DEVICE, ON_GPU, TOLERANCES, assert_close, make_reference

from inception_fused import FusedInceptionModule
from inception_fused.configs import GOOGLENET_CONFIGS
from inception_fused.training import (
    _train_backward_op,
    _train_forward_op,
    fused_train_forward,
)

SMALL = (20, 6, 5, 10, 3, 7, 4)  # in, c1, r3, c3, r5, c5, pool: none a multiple of 16
BATCH = 4 if ON_GPU else 2


def pair(channels=SMALL, dtype=torch.float32, train=True, **kwargs):
    ref = make_reference(*channels, **kwargs).to(DEVICE, dtype).train(train)
    return FusedInceptionModule.from_module(ref, backend="triton"), ref


def forward_backward(module, x, grad_out):
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    return out, x.grad


def assert_same_step(fused, ref, x, seed=1):
    """One forward + backward on both: output, input grad, every param grad and buffer."""
    n, _, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(n, ref.out_channels, h, w, generator=g, dtype=x.dtype)
    grad_out = grad_out.to(DEVICE)
    fused.zero_grad()
    ref.zero_grad()
    out, gx = forward_backward(fused, x, grad_out)
    expected, gx_expected = forward_backward(ref, x, grad_out)
    assert_close(out, expected)
    assert_close(gx, gx_expected)
    for (name, p), p_ref in zip(
        fused.named_parameters(), ref.parameters(), strict=True
    ):
        assert p.grad is not None, name
        assert_close(p.grad, p_ref.grad)
    for b, b_ref in zip(fused.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(GOOGLENET_CONFIGS))
def test_googlenet_configs_train(name):
    cfg = GOOGLENET_CONFIGS[name]
    fused, ref = pair(cfg.channels)
    side = cfg.spatial if ON_GPU else 4
    x = torch.randn(BATCH, cfg.in_channels, side, side, device=DEVICE)
    assert_same_step(fused, ref, x)


@pytest.mark.parametrize(
    "shape", [(3, 5, 7), (2, 1, 9), (1, 13, 1), (1, 2, 1)], ids=str
)
@pytest.mark.parametrize("branch3_kernel", [3, 5])
def test_odd_shapes(shape, branch3_kernel):
    fused, ref = pair(branch3_kernel=branch3_kernel)
    n, h, w = shape
    assert_same_step(fused, ref, torch.randn(n, 20, h, w, device=DEVICE))


def test_consecutive_steps_with_sgd():
    # Running stats, num_batches_tracked and parameters evolve identically over steps.
    fused, ref = pair()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (fused, ref)]
    for step in range(3):
        x = torch.randn(2, 20, 5, 6, device=DEVICE) + step
        assert_same_step(fused, ref, x, seed=step)
        for opt in opts:
            opt.step()
    assert int(fused.branch1.bn.num_batches_tracked) == 3


def test_momentum_none_cumulative_average():
    fused, ref = pair()
    for m in (fused, ref):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = None
    for step in range(2):
        assert_same_step(fused, ref, torch.randn(2, 20, 4, 5, device=DEVICE), step)


def test_batch_norm_false():
    # Without BN, train and eval mode are the same computation.
    fused, ref = pair(batch_norm=False)
    assert_same_step(fused, ref, torch.randn(2, 20, 5, 5, device=DEVICE))


def test_frozen_bn_eval_backward():
    # Fine-tuning: eval mode (running stats, no update) with gradients.
    fused, ref = pair(train=False)
    assert_same_step(fused, ref, torch.randn(2, 20, 5, 5, device=DEVICE))
    assert int(fused.branch1.bn.num_batches_tracked) == 0


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_running_stats(train):
    fused, ref = pair(train=train)
    for m in (fused, ref):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.track_running_stats = False
                bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    assert_same_step(fused, ref, torch.randn(2, 20, 5, 5, device=DEVICE))


def test_bn_layers_in_mixed_modes_match_reference():
    # A frozen BN inside a training module: the fused op serves one mode, so this runs
    # the reference math - and must still be right.
    fused, ref = pair()
    fused.branch2[1].bn.eval()
    ref.branch2[1].bn.eval()
    assert_same_step(fused, ref, torch.randn(2, 20, 5, 5, device=DEVICE))


def test_single_value_per_channel_raises():
    fused, _ = pair()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 20, 1, 1, device=DEVICE))


@pytest.mark.parametrize(
    "train, batch_norm",
    [(True, True), (False, True), (True, False)],  # without BN, train = eval
    ids=["bn-train", "bn-eval", "bias"],
)
def test_gradcheck(train, batch_norm):
    fused, _ = pair((6, 2, 3, 4, 2, 3, 2), torch.float64, train, batch_norm=batch_norm)
    x = torch.randn(2, 6, 3, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    # x and one parameter of each kind and place (each costs forwards in the interpreter;
    # every gradient is compared with the reference's in the parity tests).
    names = ["branch3.0.conv.weight", "branch2.1.conv.weight", "branch4.1.conv.weight"]
    if batch_norm:
        names += ["branch2.0.bn.weight", "branch3.1.bn.bias"]
    else:
        names += ["branch2.0.conv.bias", "branch3.1.conv.bias"]
    params = fused.state_dict(keep_vars=True)

    def run(x, *p):  # the parameters as explicit inputs so gradcheck perturbs them
        return torch.func.functional_call(fused, dict(zip(names, p, strict=True)), x)

    # Running stats move on every call in train mode; gradcheck must see a pure function.
    for bn in fused.modules():
        if isinstance(bn, torch.nn.BatchNorm2d) and train:
            bn.momentum = 0.0
    inputs = (x, *(params[name] for name in names))
    assert torch.autograd.gradcheck(run, inputs, fast_mode=True)


def test_sgd_loop_losses_match():
    fused, ref = pair((16, 4, 6, 8, 2, 4, 4))
    target = torch.randn(4, 20, 6, 6, device=DEVICE)
    inputs = torch.randn(4, 16, 6, 6, device=DEVICE)
    losses = {}
    for key, module in (("fused", fused), ("ref", ref)):
        opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
        losses[key] = []
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(module(inputs), target)
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    assert losses["ref"][-1] < 0.8 * losses["ref"][0], "the loop should learn"
    torch.testing.assert_close(losses["fused"], losses["ref"], atol=1e-4, rtol=1e-4)


def test_deterministic_bitwise_repeatable():
    fused, _ = pair()
    x = torch.randn(2, 20, 5, 5, device=DEVICE)
    grad_out = torch.randn(2, 27, 5, 5, device=DEVICE)
    results = []
    with torch.random.fork_rng():
        torch.use_deterministic_algorithms(True)
        try:
            for _ in range(2):
                fused.zero_grad()
                out, gx = forward_backward(fused, x, grad_out)
                results.append([out, gx, *(p.grad for p in fused.parameters())])
        finally:
            torch.use_deterministic_algorithms(False)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_double_backward_raises():
    fused, _ = pair()
    x = torch.randn(2, 20, 4, 4, device=DEVICE, requires_grad=True)
    (gx,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def _op_args(train: bool):
    fused, _ = pair((6, 2, 3, 4, 2, 3, 2), train=train)
    blocks = [fused.branch1, fused.branch2[0], fused.branch3[0]]
    blocks += [fused.branch2[1], fused.branch3[1], fused.branch4[1]]
    bns = [b.bn for b in blocks]
    x = torch.randn(2, 6, 3, 4, device=DEVICE)
    weights = [b.conv.weight.detach() for b in blocks]
    return x, weights, (
        x, weights, [None] * 6, [bn.weight.detach() for bn in bns],
        [bn.bias.detach() for bn in bns], [bn.running_mean for bn in bns],
        [bn.running_var for bn in bns], [bn.num_batches_tracked for bn in bns],
        [bns[0].eps] * 6, [0.1] * 6, [False] * 6, train,
    )  # fmt: skip


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_opcheck(train):
    x, weights, args = _op_args(train)
    torch.library.opcheck(_train_forward_op, args)
    out, z_out, z_red, stats = _train_forward_op(*args)
    bn_weights, bn_biases, eps = args[3], args[4], args[8]
    torch.library.opcheck(
        _train_backward_op,
        (torch.randn_like(out), x, weights, bn_weights, bn_biases, eps, z_out, z_red,
         stats, train, True),
    )  # fmt: skip


@pytest.mark.skipif(not ON_GPU, reason="autocast dtypes need the compiled kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast(dtype):
    """Values against the fp32 computation of the same step, at the dtype's tolerances:
    outputs, the input's and every parameter's gradient, the BN buffers."""
    fused, ref = pair((64, 16, 24, 32, 8, 16, 16))
    x = torch.randn(4, 64, 14, 14, device=DEVICE)
    grad_out = torch.randn(4, 128, 14, 14, device=DEVICE)
    x_low = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        out = fused(x_low)
    assert out.dtype == dtype
    out.float().backward(grad_out)
    x_ref = x.clone().requires_grad_()
    expected = ref(x_ref)
    expected.backward(grad_out)
    assert_close(out.float(), expected, dtype)
    assert x_low.grad.dtype == torch.float32
    atol, rtol = TOLERANCES[dtype]
    for name, g, g_ref in [
        ("x", x_low.grad, x_ref.grad),
        *(
            (name, p.grad, q.grad)
            for (name, p), q in zip(
                fused.named_parameters(), ref.parameters(), strict=True
            )
        ),
    ]:
        assert g.dtype == torch.float32, name
        # Gradients sum 16-bit products over the batch: tolerance scaled to their size.
        scale = float(g_ref.abs().max())
        torch.testing.assert_close(g, g_ref, atol=atol * scale, rtol=rtol, msg=name)
    for (name, b), b_ref in zip(fused.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(
            b.float(), b_ref.float(), atol=atol, rtol=rtol, msg=name
        )


def test_saves_only_pre_bn_outputs_for_backward():
    # Besides x and the parameters, autograd keeps z_out, z_red and four stat vectors.
    fused, ref = pair()
    x = torch.randn(2, 20, 5, 5, device=DEVICE, requires_grad=True)
    keep = {p.untyped_storage().data_ptr() for p in fused.parameters()}
    keep.add(x.untyped_storage().data_ptr())
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in keep:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused(x)
    m, c_out, c_red = 2 * 5 * 5, ref.out_channels, 5 + 3
    assert sum(saved.values()) == 4 * (m * (c_out + c_red) + 2 * (c_out + c_red))


def test_torch_compile_fullgraph_train_step():
    # The op pair and its autograd.Function trace without a graph break, backward included.
    fused, ref = pair()
    step = torch.compile(
        lambda x: fused_train_forward(fused, x, batch_stats=True), fullgraph=True
    )
    x = torch.randn(2, 20, 5, 5, device=DEVICE)
    grad_out = torch.randn(2, 27, 5, 5, device=DEVICE)
    out, gx = forward_backward(step, x, grad_out)
    expected, gx_expected = forward_backward(ref, x, grad_out)
    assert_close(out, expected)
    assert_close(gx, gx_expected)
    assert_close(fused.branch2[1].conv.weight.grad, ref.branch2[1].conv.weight.grad)
    assert_close(fused.branch3[0].bn.running_var, ref.branch3[0].bn.running_var)

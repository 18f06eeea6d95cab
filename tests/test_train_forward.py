"""Train-mode forward kernels (train_forward) against the reference module in train mode.

Checks the output, the saved pre-activations z_out / z_red, the batch statistics and every
BatchNorm buffer after the call. The module dispatch is tested with the autograd op.
"""

import copy

import pytest
import torch
from conftest import DEVICE, DTYPES, ON_GPU, assert_close, make_reference

from inception_fused.configs import GOOGLENET_CONFIGS
from inception_fused.folding import (
    BLOCK_ORDER,
    BNParams,
    accumulator_dtype,
    conv_blocks,
    pack_raw_inception,
)
from inception_fused.kernels.batch_norm import finalize_stats
from inception_fused.kernels.train_forward import train_forward

BATCH = 4 if ON_GPU else 2
SMALL = (37, 5, 7, 11, 3, 9, 6)  # channel counts that are not multiples of 16


def as_rows(t):
    """[N, C, H, W] -> [N*H*W, C], the layout of z_out / z_red."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def reference_run(ref, x):
    """Run the reference; return (output, pre-activation conv outputs by block name)."""
    z = {}
    hooks = [
        block.conv.register_forward_hook(
            lambda mod, inp, out, name=name: z.__setitem__(name, out)
        )
        for name, block in zip(BLOCK_ORDER, conv_blocks(ref), strict=True)
    ]
    try:
        with torch.no_grad():
            out = ref(x)
    finally:
        for h in hooks:
            h.remove()
    return out, z


def fused_run(ref, x, batch_stats=True):
    """train_forward on a copy of ``ref`` (its buffers are updated in place)."""
    mine = copy.deepcopy(ref)
    w = pack_raw_inception(mine, x.dtype)
    bn = BNParams.from_module(mine, x.dtype)
    return train_forward(x, w, bn, batch_stats), mine


def bn_buffers(module):
    return [
        (name, getattr(b.bn, attr))
        for name, b in zip(BLOCK_ORDER, conv_blocks(module), strict=True)
        for attr in ("running_mean", "running_var", "num_batches_tracked")
    ]


def assert_buffers_match(mine, ref, dtype=torch.float32):
    for (name, got), (_, want) in zip(bn_buffers(mine), bn_buffers(ref), strict=True):
        if want is None:
            assert got is None, name
        elif want.dtype == torch.int64:
            assert torch.equal(got, want), name
        else:
            assert_close(got, want, dtype)


def check_against_reference(ref, x, batch_stats=True, dtype=None):
    """Compare every TrainForward field and every BN buffer with the reference."""
    dtype = dtype or x.dtype
    result, mine = fused_run(ref, x, batch_stats)
    ref.train(batch_stats)
    expected, z = reference_run(ref, x)
    acc = accumulator_dtype(x.dtype)

    assert result.out.shape == expected.shape
    assert result.out.is_contiguous(memory_format=torch.channels_last)
    assert_close(result.out, expected, dtype)
    out_order = ("branch1", "conv3", "conv5", "pool")
    assert_close(result.z_out, as_rows(torch.cat([z[k] for k in out_order], 1)), dtype)
    assert_close(result.z_red, as_rows(torch.cat([z["red3"], z["red5"]], 1)), dtype)

    blocks = dict(zip(BLOCK_ORDER, conv_blocks(ref), strict=True))
    if blocks["branch1"].bn is None:
        assert result.mean_out is None and result.invstd_red is None
        return result
    for names, mean, invstd in (
        (out_order, result.mean_out, result.invstd_out),
        (("red3", "red5"), result.mean_red, result.invstd_red),
    ):
        if batch_stats:
            zz = torch.cat([z[k] for k in names], 1).to(torch.float64)
            exp_mean = zz.mean((0, 2, 3))
            exp_var = zz.var((0, 2, 3), unbiased=False)
        else:
            exp_mean = torch.cat([blocks[k].bn.running_mean for k in names]).double()
            exp_var = torch.cat([blocks[k].bn.running_var for k in names]).double()
        eps = torch.cat(
            [torch.full((blocks[k].bn.num_features,), blocks[k].bn.eps) for k in names]
        ).to(DEVICE, torch.float64)
        assert mean.dtype == invstd.dtype == acc
        assert_close(mean, exp_mean.to(acc), dtype)
        assert_close(invstd, torch.rsqrt(exp_var + eps).to(acc), dtype)
    assert_buffers_match(mine, ref, dtype)
    return result


@pytest.mark.parametrize("branch3_kernel", [3, 5])
@pytest.mark.parametrize("name", list(GOOGLENET_CONFIGS))
def test_googlenet_configs(name, branch3_kernel):
    cfg = GOOGLENET_CONFIGS[name]
    ref = make_reference(*cfg.channels, branch3_kernel=branch3_kernel).to(DEVICE)
    side = cfg.spatial if ON_GPU else 5
    x = torch.randn(BATCH, cfg.in_channels, side, side, device=DEVICE)
    check_against_reference(ref, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(dtype):
    ref = make_reference(*SMALL).to(DEVICE, dtype)
    x = torch.randn(3, 37, 6, 5, device=DEVICE, dtype=dtype)
    result = check_against_reference(ref, x)
    assert result.out.dtype == result.z_out.dtype == result.z_red.dtype == dtype


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 1), (1, 1, 7), (3, 5, 1), (1, 13, 1), (2, 3, 3)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("branch3_kernel", [3, 5])
def test_odd_shapes(shape, branch3_kernel):
    ref = make_reference(*SMALL, branch3_kernel=branch3_kernel).to(DEVICE)
    n, h, w = shape
    check_against_reference(ref, torch.randn(n, 37, h, w, device=DEVICE))


def test_momentum_none_over_steps():
    """momentum=None: cumulative average via num_batches_tracked, over three steps."""
    ref = make_reference(*SMALL).to(DEVICE)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    mine = copy.deepcopy(ref)
    w = pack_raw_inception(mine, torch.float32)
    for step in range(3):
        x = torch.randn(2, 37, 4, 5, device=DEVICE) * (step + 1)
        result = train_forward(x, w, BNParams.from_module(mine, torch.float32), True)
        expected, _ = reference_run(ref, x)
        assert_close(result.out, expected)
    assert_buffers_match(mine, ref)
    assert int(mine.branch1.bn.num_batches_tracked) == 3


def test_custom_momentum():
    ref = make_reference(*SMALL).to(DEVICE)
    for i, m in enumerate(ref.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.05 * (i % 4 + 1)
    check_against_reference(ref, torch.randn(2, 37, 4, 4, device=DEVICE))


def test_no_running_stats():
    """track_running_stats=False: batch statistics, nothing to update."""
    ref = make_reference(*SMALL).to(DEVICE)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    check_against_reference(ref, torch.randn(2, 37, 4, 6, device=DEVICE))


def test_running_stats_normalise_without_batch_stats():
    """batch_stats=False (BN in eval mode while gradients are needed)."""
    ref = make_reference(*SMALL).to(DEVICE)
    before = [t.clone() for _, t in bn_buffers(ref)]
    _, mine = fused_run(ref, torch.randn(2, 37, 5, 4, device=DEVICE), False)
    for (name, got), old in zip(bn_buffers(mine), before, strict=True):
        assert torch.equal(got, old), f"{name} changed without batch statistics"
    check_against_reference(ref, torch.randn(2, 37, 5, 4, device=DEVICE), False)
    # A single pixel is fine when the running statistics normalise.
    check_against_reference(ref, torch.randn(1, 37, 1, 1, device=DEVICE), False)


@pytest.mark.parametrize("branch3_kernel", [3, 5])
def test_without_batch_norm(branch3_kernel):
    ref = make_reference(*SMALL, branch3_kernel=branch3_kernel, batch_norm=False)
    ref = ref.to(DEVICE)
    with torch.no_grad():  # conv biases large enough to matter
        for m in ref.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.normal_(0.0, 0.5)
    check_against_reference(ref, torch.randn(2, 37, 5, 5, device=DEVICE))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "permuted"])
def test_input_layouts(layout):
    ref = make_reference(24, 8, 12, 16, 4, 8, 8).to(DEVICE)
    x = torch.randn(2, 24, 6, 5, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":  # memory order N, W, H, C
        x = torch.randn(2, 5, 6, 24, device=DEVICE).permute(0, 3, 2, 1)
    check_against_reference(ref, x)


def test_large_mean_statistics():
    """Data with |mean| ~ 1e3 std: the one-pass E[z^2] - E[z]^2 would lose the variance."""
    ref = make_reference(*SMALL).to(DEVICE)
    x = torch.randn(4, 37, 9, 9, device=DEVICE) + 1e3  # 324 rows: several M tiles
    result, mine = fused_run(ref, x)
    z = torch.cat([result.z_out, result.z_red], 1)
    z64 = z.double()
    mean64, var64 = z64.mean(0), z64.var(0, unbiased=False)
    mean = torch.cat([result.mean_out, result.mean_red]).double()
    invstd = torch.cat([result.invstd_out, result.invstd_red]).double()
    std64 = var64.sqrt()
    assert (std64 < 1e-2 * mean64.abs()).any(), "test data lost its large mean"
    # The naive fp32 formula is far off here, so this test can tell the two apart.
    naive = (z * z).mean(0) - z.mean(0) ** 2
    assert ((naive.double() - var64).abs() / var64).max() > 1e-2
    # The mean to within ~one fp32 ulp of itself (shifted tile sums keep it that close).
    fp32_ulp = torch.finfo(torch.float32).eps * mean64.abs()
    assert ((mean - mean64).abs() <= fp32_ulp + 1e-5 * std64).all()
    eps = ref.branch1.bn.eps
    torch.testing.assert_close(invstd, torch.rsqrt(var64 + eps), atol=0, rtol=1e-4)

    # Output and running statistics against fp64 math on the same z.
    blocks = dict(zip(BLOCK_ORDER, conv_blocks(ref), strict=True))
    names = ("branch1", "conv3", "conv5", "pool", "red3", "red5")
    sizes = [blocks[k].bn.num_features for k in names]
    gamma = torch.cat([blocks[k].bn.weight for k in names]).double()
    beta = torch.cat([blocks[k].bn.bias for k in names]).double()
    y64 = torch.relu(gamma * (z64 - mean64) * torch.rsqrt(var64 + eps) + beta)
    c_out = result.z_out.shape[1]
    assert_close(as_rows(result.out).double(), y64[:, :c_out], torch.float32)
    m = z.shape[0]
    new_mean = torch.split(mean64, sizes)
    new_var = torch.split(var64 * m / (m - 1), sizes)
    mine_blocks = dict(zip(BLOCK_ORDER, conv_blocks(mine), strict=True))
    for k, bm, bv in zip(names, new_mean, new_var, strict=True):
        old, new = blocks[k].bn, mine_blocks[k].bn
        mom = old.momentum
        want_mean = (1 - mom) * old.running_mean.double() + mom * bm
        want_var = (1 - mom) * old.running_var.double() + mom * bv
        torch.testing.assert_close(
            new.running_mean.double(), want_mean, atol=0, rtol=1e-6
        )
        torch.testing.assert_close(
            new.running_var.double(), want_var, atol=0, rtol=1e-5
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_finalize_merges_many_tiles(dtype):
    """63 tiles (the last one short) of data with a large mean, merged in chunks."""
    m, block_m, c, col0 = 1000, 16, 5, 2
    g = torch.Generator().manual_seed(0)
    z = torch.randn(m, c, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, c)
    z = (z + torch.linspace(-1e3, 1e3, c)).to(DEVICE)
    tiles = z.split(block_m)
    width = c + 3  # columns outside [col0, col0 + c) must stay untouched
    part_mean = torch.zeros(len(tiles), width, dtype=torch.float64, device=DEVICE)
    part_m2 = torch.zeros_like(part_mean)
    for i, t in enumerate(tiles):
        part_mean[i, col0 : col0 + c] = t.mean(0)
        part_m2[i, col0 : col0 + c] = ((t - t.mean(0)) ** 2).sum(0)
    outputs = [torch.full((width,), float("nan"), dtype=dtype, device=DEVICE)] * 3
    mean, invstd, var = (o.clone() for o in outputs)
    eps = torch.full((c,), 1e-3, dtype=dtype, device=DEVICE)
    partials = (part_mean.to(dtype), part_m2.to(dtype))
    finalize_stats(partials, eps, mean, invstd, var, m, block_m, col0, c)
    cols = slice(col0, col0 + c)
    assert torch.isnan(mean[:col0]).all() and torch.isnan(var[col0 + c :]).all()
    # Partial means are rounded to dtype at |mean|/std up to 1e4: a few hundred eps of
    # the variance. The one-pass E[z^2] - E[z]^2 would be off by ~1e4**2 eps.
    tol = torch.finfo(dtype).eps
    exp_mean, exp_var = z.mean(0), z.var(0, unbiased=False)
    bound = 2 * tol * exp_mean.abs() + 10 * tol * exp_var.sqrt()
    assert ((mean[cols].double() - exp_mean).abs() <= bound).all()
    torch.testing.assert_close(
        invstd[cols].double(), torch.rsqrt(exp_var + 1e-3), atol=0, rtol=1000 * tol
    )
    torch.testing.assert_close(var[cols].double(), z.var(0), atol=0, rtol=1000 * tol)


def test_bitwise_repeatable():
    ref = make_reference(*SMALL).to(DEVICE)
    x = torch.randn(3, 37, 7, 6, device=DEVICE)
    (a, mine_a), (b, mine_b) = fused_run(ref, x), fused_run(ref, x)
    for field in ("out", "z_out", "z_red", "mean_out", "invstd_out", "mean_red"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    for (name, ta), (_, tb) in zip(bn_buffers(mine_a), bn_buffers(mine_b), strict=True):
        assert torch.equal(ta, tb), name


def test_bad_input_raises_before_launch():
    ref = make_reference(*SMALL).to(DEVICE)
    w = pack_raw_inception(ref, torch.float32)
    bn = BNParams.from_module(ref, torch.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        train_forward(torch.randn(1, 37, 1, 1, device=DEVICE), w, bn, True)
    with pytest.raises(ValueError, match="input channels"):
        train_forward(torch.randn(2, 36, 3, 3, device=DEVICE), w, bn, True)
    with pytest.raises(TypeError, match="dtype and device"):
        train_forward(torch.randn(2, 37, 3, 3, device=DEVICE).double(), w, bn, True)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean = m.running_var = None
    no_stats = BNParams.from_module(ref, torch.float32)
    with pytest.raises(ValueError, match="running statistics"):
        train_forward(torch.randn(2, 37, 3, 3, device=DEVICE), w, no_stats, False)
    assert int(ref.branch1.bn.num_batches_tracked) == 0

"""The single-layer Triton kernels every Inception-v3 conv and max pool runs on, against
torch under the interpreter (on a GPU, compiled): kernels/conv.py's conv + bias + ReLU
(rectangular kernels, any stride and zero padding, a 3x3 max or average pool taken while
loading before a 1x1 conv) and kernels/max_pool.py (3x3/2, floor or ceil mode), each into
a new channels_last tensor or a channel slice of a wider one. Tiny maps of odd sizes: every
edge mask is taken; sizes where avg's two divisors and floor/ceil mode differ.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close

from inception_fused.folding import pack_weight
from inception_fused.kernels.aot import captured_launches
from inception_fused.kernels.conv import launch_conv_relu
from inception_fused.kernels.max_pool import launch_max_pool
from inception_fused.kernels.tiles import TileKey, launching_every_candidate

# (kernel (kh, kw), stride, padding; None: the launcher's default (kh // 2, kw // 2))
CONVS = {
    "1x7": ((1, 7), 1, (0, 3)),
    "7x1": ((7, 1), 1, (3, 0)),
    "1x3": ((1, 3), 1, (0, 1)),
    "3x1": ((3, 1), 1, (1, 0)),
    "3x3/2 valid": ((3, 3), 2, 0),
    "3x3 valid": ((3, 3), 1, 0),
    "3x3 pad 1": ((3, 3), 1, (1, 1)),
    "5x5 pad 2": ((5, 5), 1, 2),
    "1x1": ((1, 1), 1, 0),
    "googlenet 7x7/2": (7, 2, None),  # conv1: padding 3 by default
    "googlenet 3x3": (3, 1, None),
    "3x3/2 pad 1": ((3, 3), 2, 1),
}
# (dtype, channels_last input, shape [N, C_in, H, W])
RUNS = {
    "fp32-nchw": (torch.float32, False, (2, 5, 5, 7)),
    "fp64-cl": (torch.float64, True, (1, 3, 9, 9)),
}
POOLS = {
    "max": lambda x: F.max_pool2d(x, 3, 1, 1),
    "avg": lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=True),
    "avg_exclude": lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
    "max_s2": lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True),
}


def pair(v):
    return (v, v) if isinstance(v, int) else v


def layer(c_in, c_out, ks, dtype, seed=0):
    """A conv weight [c_out, c_in, kh, kw], its packed matrix and a bias."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = pair(ks)
    w = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=dtype) / (c_in * kh * kw)
    b = torch.randn(c_out, generator=g, dtype=dtype) * 0.1
    return w.to(DEVICE), pack_weight(w, dtype).to(DEVICE), b.to(DEVICE)


def image(shape, dtype, channels_last=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype).to(DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def reference(x, w, b, stride, padding):
    kh, kw = w.shape[2:]
    padding = (kh // 2, kw // 2) if padding is None else pair(padding)
    return F.relu(F.conv2d(x, w, b, stride, padding))


def slab(shape, dtype, seed=7):
    """A channels_last destination full of random values (to see what was written)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=dtype).to(DEVICE)
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_matches_conv2d(conv, run):
    ks, stride, padding = CONVS[conv]
    dtype, cl, shape = RUNS[run]
    x = image(shape, dtype, cl)
    w, packed, b = layer(shape[1], 6, ks, dtype)
    got = launch_conv_relu(x, packed, b, ks, stride, padding=padding)
    expected = reference(x, w, b, stride, padding)
    assert got.shape == expected.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert expected.abs().max() > 0  # not all clipped by the ReLU
    assert_close(got, expected)


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("pool", list(POOLS))
def test_pool_taken_while_loading_matches_pool_then_conv(pool, run):
    dtype, cl, shape = RUNS[run]
    x = image(shape, dtype, cl)
    w, packed, b = layer(shape[1], 4, 1, dtype)
    got = launch_conv_relu(x, packed, b, 1, pool=pool)
    expected = F.relu(F.conv2d(POOLS[pool](x), w, b))
    assert got.shape == expected.shape
    assert_close(got, expected)


def test_the_two_averages_differ_at_the_border():
    """What tells count_include_pad apart: a map of ones averages to 1 everywhere when the
    padding is not counted, to 4/9 in a corner when it is."""
    x = torch.ones(1, 2, 4, 5, device=DEVICE)
    _, packed, b = layer(2, 1, 1, torch.float32)
    packed = torch.ones_like(packed)
    b = torch.zeros_like(b)
    exclude = launch_conv_relu(x, packed, b, 1, pool="avg_exclude")
    include = launch_conv_relu(x, packed, b, 1, pool="avg")
    assert_close(exclude, torch.full_like(exclude, 2.0))
    assert_close(include[0, 0, 0, 0], torch.tensor(2 * 4 / 9, device=DEVICE))
    assert_close(include[0, 0, 1, 1], torch.tensor(2.0, device=DEVICE))


@pytest.mark.parametrize("pool", [None, "avg"])
def test_an_empty_batch(pool):
    x = torch.empty(0, 3, 5, 7, device=DEVICE)
    _, packed, b = layer(3, 4, (1, 7) if pool is None else 1, torch.float32)
    ks, padding = ((1, 7), (0, 3)) if pool is None else (1, None)
    got = launch_conv_relu(x, packed, b, ks, pool=pool, padding=padding)
    assert got.shape == (0, 4, 5, 7)
    out = slab((0, 9, 5, 7), torch.float32)
    assert (
        launch_conv_relu(
            x, packed, b, ks, pool=pool, padding=padding, out=out, out_channel=5
        )
        is out
    )


@pytest.mark.parametrize(
    ("ks", "stride", "padding", "pool"),
    [((7, 1), 1, (3, 0), None), ((3, 3), 2, 0, None), (1, 1, None, "avg_exclude")],
)
def test_conv_into_a_channel_slice_leaves_the_rest(ks, stride, padding, pool):
    x = image((2, 3, 5, 7), torch.float32, channels_last=True)
    w, packed, b = layer(3, 5, ks, torch.float32)
    if pool is None:
        expected = reference(x, w, b, stride, padding)
    else:
        expected = F.relu(F.conv2d(POOLS[pool](x), w, b))
    out = slab((2, 12, *expected.shape[2:]), torch.float32)
    before = out.clone()
    got = launch_conv_relu(
        x, packed, b, ks, stride, pool, padding=padding, out=out, out_channel=4
    )
    assert got is out
    assert_close(out[:, 4:9], expected)
    torch.testing.assert_close(out[:, :4], before[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 9:], before[:, 9:], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 9, 8), (1, 3, 7, 10)])
def test_max_pool_floor_and_ceil_into_a_slice(shape, ceil_mode, dtype):
    x = image(shape, dtype, channels_last=shape[0] == 1)
    expected = F.max_pool2d(x, 3, 2, ceil_mode=ceil_mode)
    got = launch_max_pool(x, 3, ceil_mode)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    c = shape[1]
    out = slab((shape[0], c + 6, *expected.shape[2:]), dtype)
    before = out.clone()
    assert launch_max_pool(x, 3, ceil_mode, out=out, out_channel=2) is out
    torch.testing.assert_close(out[:, 2 : 2 + c], expected, rtol=0, atol=0)
    torch.testing.assert_close(out[:, :2], before[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 2 + c :], before[:, 2 + c :], rtol=0, atol=0)


def test_floor_and_ceil_mode_differ_here():
    """The sizes above are ones where the modes' outputs differ (8 and 10 wide)."""
    x = torch.zeros(1, 1, 9, 8)
    assert F.max_pool2d(x, 3, 2).shape != F.max_pool2d(x, 3, 2, ceil_mode=True).shape


def nonfinite_image(shape, dtype=torch.float32):
    x = image(shape, dtype)
    x[0, 0, 0, 0] = float("nan")  # a corner: in the edge windows only
    x[0, 1, 3, 4] = float("nan")
    x[-1, 2, 2, 2] = float("inf")
    x[-1, 0, 4, 6] = float("-inf")
    return x


@pytest.mark.parametrize("ceil_mode", [True, False])
def test_nan_propagates_through_max_pool(ceil_mode):
    x = nonfinite_image((2, 3, 7, 9))
    expected = F.max_pool2d(x, 3, 2, ceil_mode=ceil_mode)
    assert expected.isnan().any()
    got = launch_max_pool(x, 3, ceil_mode)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's
@pytest.mark.parametrize("pool", list(POOLS))
def test_nonfinite_values_flow_through_the_pooled_conv(pool):
    x = nonfinite_image((2, 3, 5, 7))
    w, packed, b = layer(3, 4, 1, torch.float32)
    expected = F.relu(F.conv2d(POOLS[pool](x), w, b))
    assert expected.isnan().any()
    got = launch_conv_relu(x, packed, b, 1, pool=pool)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, equal_nan=True)


def bad_destinations():
    """(out, out_channel, what the error names) for a launch writing 4 channels of a
    [2, C, 5, 7] fp32 map."""
    good = (2, 10, 5, 7)
    return [
        (slab(good, torch.float64), 0, "dtype"),
        (slab((2, 10, 5, 6), torch.float32), 0, "shape"),
        (slab((3, 10, 5, 7), torch.float32), 0, "shape"),
        (torch.zeros(2, 10, 35), 0, "shape"),
        (torch.zeros(good), 0, "channels_last"),  # NCHW
        (slab((2, 20, 5, 7), torch.float32)[:, ::2], 0, "channels_last"),
        (slab(good, torch.float32), 7, "channels"),
        (slab(good, torch.float32), -1, "channels"),
        (None, 3, "out_channel"),
    ]


@pytest.mark.parametrize("case", range(len(bad_destinations())))
def test_a_bad_destination_is_refused_before_launching(case):
    out, channel, named = bad_destinations()[case]
    before = None if out is None else out.clone()
    x = image((2, 3, 5, 7), torch.float32)
    _, packed, b = layer(3, 4, (1, 3), torch.float32)
    with pytest.raises(ValueError, match=named):
        launch_conv_relu(
            x, packed, b, (1, 3), padding=(0, 1), out=out, out_channel=channel
        )
    if out is not None:  # nothing was written
        torch.testing.assert_close(out, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("out", "channel", "named"),
    [
        (slab((2, 6, 2, 3), torch.float64), 0, "dtype"),
        (slab((2, 6, 3, 3), torch.float32), 0, "shape"),  # a ceil-mode map
        (torch.zeros(2, 6, 2, 3), 0, "channels_last"),
        (slab((2, 6, 2, 3), torch.float32), 3, "channels"),
        (None, 1, "out_channel"),
    ],
)
def test_a_bad_max_pool_destination_is_refused(out, channel, named):
    x = image((2, 4, 5, 7), torch.float32)  # floor mode: 2x3
    with pytest.raises(ValueError, match=named):
        launch_max_pool(x, 3, False, out=out, out_channel=channel)


def test_bad_layer_arguments_are_refused():
    x = image((1, 3, 5, 7), torch.float32)
    _, packed, b = layer(3, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="rows"):  # a 3x3 weight for a 1x3 conv
        launch_conv_relu(x, packed, b, (1, 3))
    _, packed1, b1 = layer(3, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="1x1"):
        launch_conv_relu(x, packed1, b1, 1, padding=1, pool="avg")
    with pytest.raises(ValueError, match="pool must be"):
        launch_conv_relu(x, packed1, b1, 1, pool="min")
    with pytest.raises(ValueError, match="no output"):
        launch_conv_relu(x[..., :2, :], packed, b, 3, padding=0)
    with pytest.raises(ValueError, match="empty"):
        launch_max_pool(x[..., :2, :], 3, False)


def test_tile_keys_tell_kernel_shapes_apart():
    """A 1x7 and a 7x1 conv are keyed apart from each other and from a 7x7 conv (the
    rectangular ones with their width); square keys keep the table's form."""
    x = torch.empty(1, 16, 17, 17, device="meta")
    keys = {}
    for ks, padding in (((1, 7), (0, 3)), ((7, 1), (3, 0)), (7, 3)):
        kh, kw = pair(ks)
        w = torch.empty(kh * kw * 16, 32, device="meta")
        with launching_every_candidate() as seen, captured_launches():
            launch_conv_relu(x, w, torch.empty(32, device="meta"), ks, padding=padding)
        keys[ks] = seen[0]
    assert len(set(keys.values())) == 3
    assert (keys[(1, 7)].ks, keys[(1, 7)].kw) == (1, 7)
    assert "kw" not in keys[7].as_json()
    assert TileKey.from_json(keys[(7, 1)].as_json()) == keys[(7, 1)]

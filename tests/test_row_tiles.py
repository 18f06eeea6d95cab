"""Work split over many row tiles, merged: BN statistics partials (train forward),
reduce_grad's and relu_bn_backward's partials (backward), the eval launches' row tiles.

The interpreter's tiles are as large as the problem (up to 256 rows), so the other
tests' shapes fit in one row tile, where a merge that read tile 0 only would pass. Here
the launchers' row tiles are forced to 16 rows (M = 60: three full tiles and a partial
one; M = 288: 18 tiles, more than the 16 a merge step reads), and one shape runs past
256 rows with the launchers' own tiles.
"""

import dataclasses

import pytest
import torch
from conftest import ON_GPU, assert_close
from test_training import assert_same_step, pair

from inception_fused.kernels import batch_norm, relu_bn_backward, tiles

ROWS = 16


@pytest.fixture
def small_row_tiles(monkeypatch: pytest.MonkeyPatch):
    """Every interpreter launch takes at most ROWS rows per tile; yields the count of
    launcher calls that took them (zero would mean the fixture forced nothing)."""
    calls = {"gemm": 0, "elementwise": 0, "bn": 0}
    rule, blocks, block = (
        tiles.rule,
        relu_bn_backward._elementwise_blocks,
        batch_norm._block,
    )

    def small_rule(key: tiles.TileKey, on_gpu: bool) -> tiles.TileConfig:
        calls["gemm"] += 1
        return dataclasses.replace(rule(key, on_gpu), block_m=ROWS)

    def small_blocks(m: int, c: int, dtype: torch.dtype, on_gpu: bool):
        calls["elementwise"] += 1
        return ROWS, blocks(m, c, dtype, on_gpu)[1]

    def small_block(n: int, on_gpu: bool, gpu_block: int, cpu_cap: int) -> int:
        calls["bn"] += 1
        return min(ROWS, block(n, on_gpu, gpu_block, cpu_cap))

    monkeypatch.setattr(tiles, "rule", small_rule)
    monkeypatch.setattr(relu_bn_backward, "_elementwise_blocks", small_blocks)
    monkeypatch.setattr(batch_norm, "_block", small_block)
    tiles.choice.cache_clear()
    yield calls
    monkeypatch.undo()
    tiles.choice.cache_clear()


pytestmark = pytest.mark.skipif(ON_GPU, reason="GPU tiles are 64-128 rows already")


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((2, 6, 5), torch.float32),
        ((2, 6, 5), torch.float64),
        ((2, 12, 12), torch.float64),
    ],
    ids=["60-rows-fp32", "60-rows-fp64", "288-rows-fp64"],
)
def test_train_step_over_row_tiles(small_row_tiles, shape, dtype):
    n, h, w = shape
    fused, ref = pair(dtype=dtype)
    x = torch.randn(n, ref.in_channels, h, w, dtype=dtype)
    assert_same_step(fused, ref, x)
    assert all(small_row_tiles.values()), small_row_tiles


def test_frozen_bn_backward_over_row_tiles(small_row_tiles):
    # BN in eval mode with gradients: running statistics, reduce_grad's partials unused.
    fused, ref = pair(dtype=torch.float64, train=False)
    x = torch.randn(2, ref.in_channels, 6, 5, dtype=torch.float64)
    assert_same_step(fused, ref, x)
    assert small_row_tiles["gemm"] and small_row_tiles["elementwise"]


@pytest.mark.parametrize("branch3_kernel", [3, 5])
def test_eval_over_row_tiles(small_row_tiles, branch3_kernel):
    fused, ref = pair(train=False, branch3_kernel=branch3_kernel)
    x = torch.randn(2, ref.in_channels, 7, 5)
    with torch.no_grad():
        assert_close(fused(x), ref(x))
    assert small_row_tiles["gemm"]


def test_train_step_past_256_rows():
    """The launchers' own tiles: 2 x 17 x 9 = 306 rows, a full 256-row tile and a part."""
    fused, ref = pair()
    assert tiles.rows_per_tile(torch.float32, 306, False) < 306
    assert_same_step(fused, ref, torch.randn(2, ref.in_channels, 17, 9))
    with torch.no_grad():
        x = torch.randn(2, ref.in_channels, 17, 9)
        assert_close(fused.eval()(x), ref.eval()(x))

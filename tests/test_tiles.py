"""Tile choice: the committed table, the rule, the GPU tuner's candidates and its pick."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, assert_close, make_reference

from inception_fused import FusedInceptionModule
from inception_fused.kernels import tiles
from inception_fused.kernels.launch import TileConfig
from inception_fused.kernels.tiles import TileKey

KEY = TileKey("spatial", "eval", torch.bfloat16, 25088, 128, 96, 5)


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    """A temporary tile table in place of the committed one."""
    path = tmp_path / "tile_table.json"
    monkeypatch.setattr(tiles, "TABLE_PATH", path)
    tiles.table.cache_clear()
    tiles.choice.cache_clear()
    yield path
    tiles.table.cache_clear()
    tiles.choice.cache_clear()


def write_table(path, key, cfg):
    entry = {"key": key.as_json(), "config": dataclasses.asdict(cfg), "source": "test"}
    tiles.save_table([entry])
    assert json.loads(path.read_text())["entries"] == [entry]


def test_committed_table_loads_and_covers_the_network():
    found = tiles.table()
    # Nine modules x five batches x three tensor-core dtypes, several launches each.
    assert len(found) >= 9 * 5 * 3 * 4
    assert all(cfg.use_dot and key.dtype != torch.float64 for key, cfg in found.items())
    kernels = {key.kernel for key in found}
    assert kernels == set(tiles.KERNELS)


def test_gpu_takes_the_table_entry_and_the_interpreter_the_rule(table_file):
    cfg = TileConfig(64, 32, 64, num_warps=4, num_stages=4)
    write_table(table_file, KEY, cfg)
    assert tiles.choice(KEY, True) == cfg
    assert tiles.choice(KEY, False) == tiles.rule(KEY, False)
    other = KEY._replace(m=KEY.m + 1)
    assert tiles.choice(other, True) == tiles.rule(other, True)
    assert tiles.candidates(KEY)[0] == cfg


def test_train_entries_must_keep_the_rows_per_tile(table_file):
    key = KEY._replace(mode="train")
    write_table(table_file, key, TileConfig(64, 64, 64))  # the rule has 128 rows here
    with pytest.raises(ValueError, match="BLOCK_M"):
        tiles.table()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_candidates_are_distinct_and_train_keeps_block_m(dtype, mode):
    key = KEY._replace(dtype=dtype, mode=mode)
    found = tiles.candidates(key)
    assert len(found) == len(set(found)) >= 2
    assert found[0] == tiles.choice(key, True)
    if mode == "train":
        assert {c.block_m for c in found} == {tiles.rows_per_tile(dtype, key.m, True)}
    if dtype == torch.float32:
        assert all(c.block_n == 64 for c in found)


def test_fp64_has_one_config():
    key = KEY._replace(dtype=torch.float64)
    assert tiles.candidates(key) == [tiles.rule(key, True)]


def test_tuner_times_every_candidate_and_keeps_the_fastest(monkeypatch):
    key = KEY._replace(m=12345)
    cands = tiles.candidates(key)
    fastest = cands[2]
    launched = []

    def fake_bench(fn, warmup, rep):
        fn()
        return 1.0 if launched[-1] == fastest else 2.0

    monkeypatch.setattr("triton.testing.do_bench", fake_bench)
    monkeypatch.setattr(tiles, "_tuned", {})
    monkeypatch.setattr(tiles, "_timings", {})
    assert tiles._tune(key, launched.append) == fastest
    assert launched == cands
    assert tiles._tuned[key] == fastest
    assert tiles.tuned()[key][fastest] == 1.0


def test_autotuning_switches(monkeypatch):
    monkeypatch.delenv("INCEPTION_FUSED_AUTOTUNE")  # conftest turns it off
    assert tiles.autotuning()
    monkeypatch.setenv("INCEPTION_FUSED_AUTOTUNE", "0")
    assert not tiles.autotuning()
    monkeypatch.delenv("INCEPTION_FUSED_AUTOTUNE")
    torch.use_deterministic_algorithms(True)
    try:
        assert not tiles.autotuning()  # a timed pick could differ between runs
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the tuner runs on CUDA")
def test_pick_off_gpu_returns_the_rule_without_launching():
    def launch(cfg):
        raise AssertionError("launched while picking")

    x = torch.empty(1)
    assert tiles.pick(KEY, x, launch) == tiles.rule(KEY, False)
    meta = torch.empty(1, device="meta")
    assert tiles.pick(KEY, meta, launch) == tiles.choice(KEY, True)


def test_recording_launches_every_candidate():
    seen = []
    with tiles.launching_every_candidate() as keys:
        tiles.pick(KEY, torch.empty(1, device="meta"), seen.append)
    assert keys == [KEY]
    assert seen == tiles.candidates(KEY)


def test_train_partials_with_other_rows_are_refused():
    partials = (torch.empty(3, 8), torch.empty(3, 8))
    tiles.check_partial_rows(partials, 40, TileConfig(16, 16, 16))
    with pytest.raises(ValueError, match="partials have 3 rows"):
        tiles.check_partial_rows(partials, 40, TileConfig(32, 16, 16))


def test_module_output_does_not_depend_on_the_tiles(monkeypatch):
    """The interpreter's rule at two tile sizes gives the same module output."""
    torch.manual_seed(0)
    ref = make_reference(24, 8, 6, 8, 4, 8, 8).to(DEVICE).eval()
    x = torch.randn(2, 24, 5, 7, device=DEVICE)
    fused = FusedInceptionModule.from_module(ref).eval()
    with torch.no_grad():
        expected = ref(x)
        assert_close(fused(x), expected)
        small = TileConfig(16, 16, 16)
        monkeypatch.setattr(tiles, "rule", lambda key, on_gpu: small)
        tiles.choice.cache_clear()
        try:
            assert_close(fused(x), expected)
        finally:
            tiles.choice.cache_clear()


def test_tuned_winners_replace_their_entries_and_keep_the_rest():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tune_tiles import merge

    kept = KEY._replace(m=1)
    old = [
        {"key": k.as_json(), "config": dataclasses.asdict(tiles.rule(k, True)),
         "source": "rule"}
        for k in (KEY, kept)
    ]  # fmt: skip
    slow, fast = tiles.candidates(KEY)[:2]
    merged = merge(old, {KEY: {slow: 0.02, fast: 0.01}}, "tuned on test")
    by_m = {e["key"]["m"]: e for e in merged}
    assert by_m[KEY.m]["config"] == dataclasses.asdict(fast)
    assert by_m[KEY.m]["source"] == "tuned on test: 10.0 us"
    assert by_m[1]["source"] == "rule"


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the tuner runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_candidate_computes_the_same_on_the_gpu(monkeypatch, dtype):
    """Tune one module's eval, train and backward launches, then force each key's every
    candidate: outputs and grad_x match the table's tiles' (only the summation order
    differs) and the eval output matches the reference."""
    monkeypatch.setenv("INCEPTION_FUSED_AUTOTUNE", "1")
    monkeypatch.setattr(tiles, "_tuned", {})
    monkeypatch.setattr(tiles, "_timings", {})
    torch.manual_seed(0)
    ref = make_reference(192, 64, 96, 128, 16, 32, 32).to(DEVICE).to(dtype)
    x = torch.randn(8, 192, 28, 28, device=DEVICE, dtype=dtype)
    grad_out = torch.randn(8, 256, 28, 28, device=DEVICE, dtype=dtype)
    fused = FusedInceptionModule.from_module(ref)
    # Train steps leave the running statistics (eval's) as they are.
    for bn in fused.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = 0.0

    def outputs():
        with torch.no_grad():
            ev = fused.eval()(x)
        xg = x.detach().requires_grad_()
        tr = fused.train()(xg)
        tr.backward(grad_out)
        return ev, tr.detach(), xg.grad

    outputs()  # tunes every key
    keys = list(tiles.tuned())
    assert {k.kernel for k in keys} == set(tiles.KERNELS)
    for key in keys:
        monkeypatch.setitem(tiles._tuned, key, tiles.choice(key, True))
    expected = outputs()
    with torch.no_grad():
        assert_close(expected[0], ref.eval()(x))
    for key in keys:
        for cfg in tiles.candidates(key):
            monkeypatch.setitem(tiles._tuned, key, cfg)
            for got, want in zip(outputs(), expected, strict=True):
                assert_close(got, want)
        monkeypatch.setitem(tiles._tuned, key, tiles.choice(key, True))

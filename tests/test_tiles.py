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

KEY = TileKey.of("spatial", "eval", torch.bfloat16, 25088, 128, 96, 5)


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
    assert any(key.ieee for key in found)  # TF32-off fp32 has its own tiles


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
    # The pool tiles: TF32 train spatial tiles have one config (a fourth stage spills).
    key = KEY._replace(kernel="pool", ks=1, dtype=dtype, mode=mode)
    found = tiles.candidates(key)
    assert len(found) == len(set(found)) >= 2
    assert found[0] == tiles.choice(key, True)
    if mode == "train":
        assert {c.block_m for c in found} == {tiles.rows_per_tile(dtype, key.m, True)}
    if dtype == torch.float32:
        assert all(c.block_n == 64 for c in found)


def test_tf32_train_spatial_tiles_have_one_config():
    key = KEY._replace(dtype=torch.float32, mode="train")
    assert tiles.candidates(key) == [tiles.choice(key, True)]


def test_fp64_has_one_config():
    key = KEY._replace(dtype=torch.float64)
    assert tiles.candidates(key) == [tiles.rule(key, True)]


class SimulatedGPU:
    """The tuner's pick on meta tensors standing for one GPU model's tensors: timings
    from a table (``times[cfg]``, else 2.0 ms), ``fail`` raises as a config that does not
    fit that GPU, ``capturing`` as during a CUDA graph capture."""

    def __init__(self, monkeypatch, model="GPU-A"):
        self.model = model
        self.times: dict[TileConfig, float] = {}
        self.fail: set[TileConfig] = set()
        self.timed: list[TileConfig] = []
        self.capturing = False
        monkeypatch.setenv("INCEPTION_FUSED_AUTOTUNE", "1")
        monkeypatch.setattr(tiles, "_tuned", {})
        monkeypatch.setattr(tiles, "_timings", {})
        monkeypatch.setattr(tiles, "tuning_device", lambda t: self.model)
        monkeypatch.setattr(tiles, "_time", self._time)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(
            torch.cuda, "is_current_stream_capturing", lambda: self.capturing
        )
        self.tensor = torch.empty(1, device="meta")

    def _time(self, launch):
        return launch()

    def pick(self, key):
        def launch(cfg):
            self.timed.append(cfg)
            if cfg in self.fail:
                raise tiles._CANDIDATE_ERRORS[0](100, 99, "shared memory")
            return self.times.get(cfg, 2.0)

        return tiles.pick(key, self.tensor, launch)


def test_tuner_times_every_candidate_and_keeps_the_fastest(monkeypatch):
    gpu = SimulatedGPU(monkeypatch)
    cands = tiles.candidates(KEY)
    gpu.times[cands[2]] = 1.0
    assert gpu.pick(KEY) == cands[2]
    assert gpu.timed == cands
    assert tiles.tuned()[KEY][cands[2]] == 1.0
    assert gpu.pick(KEY) == cands[2]
    assert gpu.timed == cands  # kept for the process: not timed again


def test_a_new_m_in_the_same_bucket_is_not_tuned_again(monkeypatch):
    gpu = SimulatedGPU(monkeypatch)
    first = TileKey.of("pointwise", "eval", torch.bfloat16, 1000 * 49, 256, 512)
    gpu.pick(first)
    timed = len(gpu.timed)
    assert timed >= 2
    same = TileKey.of("pointwise", "eval", torch.bfloat16, 1000 * 49 - 700, 256, 512)
    assert same == first
    gpu.pick(same)
    assert len(gpu.timed) == timed
    gpu.pick(TileKey.of("pointwise", "eval", torch.bfloat16, 2000 * 49, 256, 512))
    assert len(gpu.timed) > timed  # the next bucket tunes


def test_every_m_of_a_bucket_gets_the_buckets_tiles():
    """What makes bucketing safe: the rule gives an exact M the same tiles as its bucket
    (a threshold that is not a power of two would break it)."""
    for kernel in tiles.KERNELS:
        for mode in ("eval", "train", "backward"):
            for dtype in (torch.bfloat16, torch.float32, torch.float64):
                for m in (*range(1, 70), 783, 784, 785, 8191, 8192, 8193, 12544, 50176):
                    for ieee in {False, dtype == torch.float32}:
                        bucket = TileKey.of(kernel, mode, dtype, m, 96, 128, 3)
                        bucket = bucket._replace(ieee=ieee)
                        exact = bucket._replace(m=m)
                        for on_gpu in (True, False):
                            assert tiles.rule(exact, on_gpu) == tiles.rule(
                                bucket, on_gpu
                            )


def test_tiny_launches_are_not_timed(monkeypatch):
    gpu = SimulatedGPU(monkeypatch)
    tiny = TileKey.of("spatial", "eval", torch.bfloat16, 49, 128, 96, 3)
    assert gpu.pick(tiny) == tiles.choice(tiny, True)
    assert gpu.timed == []


def test_a_failing_candidate_is_skipped(monkeypatch):
    gpu = SimulatedGPU(monkeypatch)
    cands = tiles.candidates(KEY)
    gpu.fail = {cands[0], cands[2]}
    gpu.times[cands[2]] = 0.5  # fastest, had it compiled
    gpu.times[cands[1]] = 1.0
    assert gpu.pick(KEY) == cands[1]
    assert set(tiles.tuned()[KEY]) == set(cands) - gpu.fail
    gpu.fail = set(cands)
    with pytest.raises(tiles._CANDIDATE_ERRORS[0]):
        gpu.pick(KEY._replace(n=256))


def test_picks_are_kept_per_gpu_model_and_fp32_precision(monkeypatch):
    gpu = SimulatedGPU(monkeypatch)
    precision = "tf32"
    monkeypatch.setattr(tiles, "input_precision", lambda dtype: precision)
    key = TileKey.of("spatial", "eval", torch.float32, 25088, 128, 96, 5)
    cands = tiles.candidates(key)
    gpu.times[cands[1]] = 1.0
    assert gpu.pick(key) == cands[1]
    timed = len(gpu.timed)
    gpu.model = "GPU-B"
    gpu.times = {cands[2]: 1.0}
    assert gpu.pick(key) == cands[2]  # another model tunes for itself
    assert len(gpu.timed) == 2 * timed
    gpu.model = "GPU-A"
    assert gpu.pick(key) == cands[1]
    precision = "ieee"  # TF32 off: FMA dots, their own tiles, nothing to time
    ieee = TileKey.of("spatial", "eval", torch.float32, 25088, 128, 96, 5)
    assert ieee == key._replace(ieee=True)
    assert gpu.pick(ieee) == tiles.rule(ieee, True) != cands[1]
    assert len(gpu.timed) == 2 * timed


def test_a_capture_replays_the_tuned_tiles_and_tunes_nothing(monkeypatch):
    gpu = SimulatedGPU(monkeypatch)
    cands = tiles.candidates(KEY)
    gpu.times[cands[2]] = 1.0
    gpu.pick(KEY)  # warmup, before the capture
    timed = len(gpu.timed)
    gpu.capturing = True
    assert gpu.pick(KEY) == cands[2]
    other = KEY._replace(n=256)  # first seen during the capture: the table's tiles
    assert gpu.pick(other) == tiles.choice(other, True)
    assert len(gpu.timed) == timed


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
    tune_keys = list(tiles._tuned)
    # The merged stem and pool launch is batch 1's: too small to time (TINY_GEMM).
    assert {key.kernel for _, _, key in tune_keys} == set(tiles.KERNELS) - {
        "pointwise_pool"
    }
    for tune_key in tune_keys:
        monkeypatch.setitem(tiles._tuned, tune_key, tiles.choice(tune_key[2], True))
    expected = outputs()
    with torch.no_grad():
        assert_close(expected[0], ref.eval()(x))
    for tune_key in tune_keys:
        for cfg in tiles.candidates(tune_key[2]):
            monkeypatch.setitem(tiles._tuned, tune_key, cfg)
            for got, want in zip(outputs(), expected, strict=True):
                assert_close(got, want)
        monkeypatch.setitem(tiles._tuned, tune_key, tiles.choice(tune_key[2], True))

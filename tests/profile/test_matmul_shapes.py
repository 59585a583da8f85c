"""The device profile's measured matmul shape table: lookup, validation, pricing and calibration."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from rannc.errors import ConfigError
from rannc.profile.analytic import estimate_block
from rannc.profile.calibrate import _matmul_shapes
from rannc.profile.devices import get_device_profile, load_profile, save_profile

# m in {16, 256}, k in {64}, n in {64, 1024}: factors 0.2 (16, 64), 0.4 (16, 1024), 0.6 (256, 64), 0.8 (256, 1024)
TABLE = {"m": [16.0, 256.0], "k": [64.0], "n": [64.0, 1024.0], "factor": [0.2, 0.4, 0.6, 0.8]}


def with_table(table=TABLE):
    return dataclasses.replace(get_device_profile("cpu"), matmul_shapes=table)


def test_lookup_is_exact_on_the_grid_log_linear_between_and_clamped_outside() -> None:
    profile = with_table()
    assert profile.matmul_shape_factor(16, 64, 64) == pytest.approx(0.2)
    assert profile.matmul_shape_factor(256, 64, 1024) == pytest.approx(0.8)
    assert profile.matmul_shape_factor(64, 64, 64) == pytest.approx(
        0.4
    )  # 64 is halfway from 16 to 256 in log
    assert profile.matmul_shape_factor(16, 64, 256) == pytest.approx(0.3)
    assert profile.matmul_shape_factor(64, 64, 256) == pytest.approx(0.5)  # both axes halfway
    assert profile.matmul_shape_factor(1, 1, 1) == pytest.approx(0.2)  # clamped to the smallest shape
    assert profile.matmul_shape_factor(1e6, 1e6, 1e6) == pytest.approx(0.8)
    assert get_device_profile("cpu").matmul_shape_factor(1, 1, 1) == 1.0  # no table


@pytest.mark.parametrize(
    "table, words",
    [
        ({"m": [1.0], "k": [1.0], "n": [1.0]}, "'m', 'k', 'n' and 'factor'"),
        ({"m": [2.0, 1.0], "k": [1.0], "n": [1.0], "factor": [0.5, 0.5]}, "strictly increasing"),
        ({"m": [1.0], "k": [1.0], "n": [1.0, 2.0], "factor": [0.5]}, "must list 2 values"),
        ({"m": [1.0], "k": [1.0], "n": [1.0], "factor": [1.5]}, r"factor'\] entries"),
        ({"m": [], "k": [1.0], "n": [1.0], "factor": []}, "non-empty"),
    ],
)
def test_bad_tables_are_config_errors(table, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        with_table(table)


def test_table_survives_json(tmp_path: Path) -> None:
    save_profile(with_table(), tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == with_table()


def test_matmuls_are_priced_at_their_shape_factor() -> None:
    plain, shaped = get_device_profile("cpu"), with_table()
    x = torch.empty(16, 64, device="meta")
    w = torch.empty(1024, 64, device="meta", requires_grad=True)

    def block(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
        return ((x @ w.t()).relu(),)

    base = estimate_block(block, [x, w], plain, param_indices=frozenset({1}))
    priced = estimate_block(block, [x, w], shaped, param_indices=frozenset({1}))
    for before, after in zip(base.ops, priced.ops):
        assert before.op == after.op and before.flops == after.flops
        if after.op == "aten.mm" and after.phase == "fwd":  # (16 x 64) @ (64 x 1024): factor 0.4
            assert after.shape_factor == pytest.approx(0.4)
            compute = after.flops / (shaped.flop_rate("float32") * 0.4)
            assert after.time == pytest.approx(
                max(compute, after.bytes / shaped.byte_rate()) + shaped.op_overhead
            )
        elif after.flops == 0:  # elementwise and accumulation: no shape factor
            assert after.shape_factor == 1.0 and after.time == before.time
    factors = {op.shape_factor for op in priced.ops if op.flops}
    assert factors and all(0.2 <= f <= 0.8 for f in factors)
    assert priced.fwd_time > base.fwd_time and priced.bwd_time > base.bwd_time


def test_calibration_measures_the_grid_and_fills_shapes_above_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rannc.profile.calibrate as calibrate_module

    monkeypatch.setitem(calibrate_module._SHAPE_FLOPS, "quick", 2.0 * 16 * 8 * 8)  # (16, 8, 8) is the largest
    peak = 1e9
    table = _matmul_shapes(torch.device("cpu"), True, peak)
    assert table["m"] == [4.0, 16.0] and table["k"] == [8.0, 32.0] and table["n"] == [8.0, 32.0]
    factors = table["factor"]
    assert len(factors) == 8 and all(0 < f <= 1 for f in factors)

    def at(i: int, j: int, k: int) -> float:
        return factors[(i * 2 + j) * 2 + k]

    # (16, 32, 32) has more FLOPs than the cap: the best of its smaller neighbours, here all filled or measured.
    assert at(1, 1, 1) == max(at(0, 1, 1), at(1, 0, 1), at(1, 1, 0))
    assert not math.isnan(at(1, 1, 1))
    with_measured = with_table(table)  # a valid profile field
    assert 0 < with_measured.matmul_shape_factor(8, 16, 16) <= 1

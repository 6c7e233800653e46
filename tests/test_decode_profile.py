"""benchmarks/decode_profile.py: the step breakdown adds up (tiny model, no real timings)."""

from __future__ import annotations

import pytest
import torch
from conftest import benchmark_module, tiny_model


@pytest.fixture(scope="module")
def decode_profile():
    return benchmark_module("decode_profile")


def test_breakdown_is_non_negative_and_sums_to_the_step(decode_profile):
    model, categories = decode_profile.with_backend(tiny_model("llama"), "dense")
    assert sum(c == "linears" for c in categories.values()) == 14  # 2 blocks x 7 linears
    step = decode_profile.DecodeStep(model, categories, torch.randint(0, 256, (1, 12)))

    result = decode_profile.measure({"dense": step}, threads=1, rounds=2, warmup=0, profile=True)

    row = result["dense"]
    parts = row["breakdown_ms"]
    assert set(parts) == set(decode_profile.CATEGORIES)
    assert all(value >= 0 for value in parts.values()), parts
    rounding = 0.0005 * (len(parts) + 1)  # every part and the total are rounded to 1 us
    assert sum(parts.values()) == pytest.approx(row["profiled_ms"], abs=rounding)
    assert parts["linears"] > 0 and parts["attention"] > 0 and parts["head_embeddings"] > 0
    assert step.cache.get_seq_length() == 12  # every step is cropped back to the prompt


def test_amdahl_ceiling_from_the_linear_fraction(decode_profile):
    dense = {"plain_ms": 10.0, "breakdown_ms": {"linears": 5.0}}
    report = decode_profile.amdahl({"dense": dense, "nm24": {"plain_ms": 8.0}})
    assert report["linear_fraction"] == 0.5
    assert report["ceiling_s_1.6"] == pytest.approx(1 / (0.5 + 0.5 / 1.6), abs=1e-3)
    assert report["ceiling_s_inf"] == 2.0
    assert report["measured_speedup"] == {"nm24": 1.25}

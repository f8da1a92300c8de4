"""Device profiles: the bundled ones load, bad files are reported."""

from __future__ import annotations

import pytest

from lorasp_edge.errors import UserError
from lorasp_edge.plan.profiles import (
    format_profiles,
    list_profiles,
    load_profile,
    profile_names,
)


def test_at_least_eight_devices_load():
    profiles = list_profiles()
    assert len(profiles) >= 8
    kinds = {p.device_kind for p in profiles}
    assert kinds == {"cpu", "cuda", "mps"}
    for p in profiles:
        assert p.memory_bytes >= 2**30 and 0 <= p.reserved < 1 and p.quant_bits and p.source
    table = format_profiles(profiles)
    assert all(name in table for name in profile_names())


def test_profile_budget():
    pi = load_profile("raspberry-pi-5-8gb")
    assert pi.memory_bytes == 8 * 2**30 and pi.device_kind == "cpu" and not pi.bf16
    assert pi.budget_bytes == int(8 * 2**30 * 0.85)
    assert load_profile("jetson-orin-nano-8gb").unified_memory


def test_profile_from_a_file_and_bad_files(tmp_path):
    good = tmp_path / "board.yaml"
    good.write_text("name: board\ndevice_kind: cpu\nmemory: 2GiB\nreserved: 0.2\nbf16: false\nquant_bits: [4, 16]\n")
    board = load_profile(str(good))
    assert board.budget_bytes == int(2 * 2**30 * 0.8) and board.quant_bits == (16, 4)
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_kind: tpu\nmemory: lots\nreserved: 1.5\nquant_bits: [3]\n")
    with pytest.raises(UserError) as raised:
        load_profile(str(bad))
    message = str(raised.value)
    assert "device_kind" in message and "memory" in message and "reserved" in message and "quant_bits" in message
    with pytest.raises(UserError, match="unknown profile 'nope'.*raspberry-pi-5-8gb"):
        load_profile("nope")

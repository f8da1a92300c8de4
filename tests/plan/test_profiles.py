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


@pytest.mark.parametrize("model, fits", [("qwen2.5-1.5b", True), ("mistral-7b-v0.3", True), ("llama-3.1-8b", False)])
def test_jetson_orin_nano_plans_or_names_the_smallest_budget(model, fits, capsys):
    # issue 13: `plan --model X --profile jetson-orin-nano-8gb` gives a plan inside the profile's
    # budget, or exits 2 naming the smallest budget, and that budget then plans.
    from lorasp_edge.cli import main
    from lorasp_edge.plan.search import NoFitError, plan_training

    jetson = load_profile("jetson-orin-nano-8gb")
    assert jetson.budget_bytes == int(8 * 2**30 * 0.75)
    code = main(["plan", "--model", model, "--profile", "jetson-orin-nano-8gb"])
    out, err = capsys.readouterr()
    if fits:
        assert code == 0 and "device       cuda, profile jetson-orin-nano-8gb" in out
        plan = plan_training(model, profile="jetson-orin-nano-8gb")
        assert plan.memory["total_bytes"] <= 0.9 * jetson.budget_bytes
        return
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nothing fits in 6.44 GB" in err
    with pytest.raises(NoFitError) as raised:
        plan_training(model, profile="jetson-orin-nano-8gb")
    needed = raised.value.needed_bytes
    assert f"--mem {-(-needed // 10**7) / 100:.2f}GB" in err
    plan = plan_training(model, profile="jetson-orin-nano-8gb", budget_bytes=needed)
    assert plan.quant_bits == 4 and plan.memory["total_bytes"] <= 0.9 * needed

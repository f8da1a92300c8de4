"""The planner: memory terms against hand-computed figures, the search, the plan file, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from lorasp_edge.cli import main
from lorasp_edge.errors import UserError
from lorasp_edge.plan import memory
from lorasp_edge.plan.catalog import Architecture, Linear, model_info
from lorasp_edge.plan.planfile import Plan
from lorasp_edge.plan.search import (
    QUANTIZED_ORDER,
    Device,
    NoFitError,
    format_plan,
    plan_training,
    quality_key,
    throughput_class,
)
from lorasp_edge.plan.units import parse_memory

CPU_BF16 = Device("cpu", True, (16, 8, 4))
CPU_FP32 = Device("cpu", False, (16, 8, 4))

# The tiny llama of tests/tiny.py: h 64, i 128, 2 layers, 4 heads of 16, 2 kv heads, vocab 300.
TINY = Architecture("llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, vocab_size=300, tie_embeddings=False, max_positions=256)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_setting(**changes) -> memory.Candidate:
    fields = dict(quant_bits=16, compute_dtype="float32", rank=8, target_modules=ALL_LINEAR, adapted_layers=2,
                  gradient_checkpointing=False, micro_batch=2, seq_len=32, loss_chunk_tokens=1024, packed=False)
    return memory.Candidate(**{**fields, **changes})


# ------------------------------------------------------------------------------- --mem parsing


@pytest.mark.parametrize("text, expected", [
    ("8GB", 8 * 10**9), ("8G", 8 * 10**9), ("8GiB", 8 * 2**30), ("7.5 GB", 7_500_000_000),
    ("8192MB", 8_192_000_000), ("512MiB", 512 * 2**20), ("8gb", 8 * 10**9), (" 2 TiB ", 2 * 2**40),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "eight GB", "8XB", "8 G B", "0GB", "-1GB", "0.0000000001B", "8", "8..5GB"])
def test_parse_memory_rejects(text):
    with pytest.raises(UserError):
        parse_memory(text)


# ------------------------------------------------------------------------------- memory terms


def test_parameter_count_of_tiny_by_hand():
    # linears per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 + 3 * 64*128 = 36864
    parts = TINY.parameters()
    assert parts["linear"] == 2 * 36864
    assert parts["embedding"] == parts["lm_head"] == 300 * 64
    assert parts["norms_and_biases"] == 2 * 2 * 64 + 64
    assert parts["total"] == 73728 + 38400 + 320


def test_frozen_weight_bytes_by_format():
    q = Linear("q_proj", 64, 64)
    assert memory.quantized_weight_bytes(q, 16, 2) == 4096 * 2
    assert memory.quantized_weight_bytes(q, 16, 4) == 4096 * 4
    # LLM.int8: one byte a weight + an fp32 scale per output row
    assert memory.quantized_weight_bytes(q, 8, 2) == 4096 + 4 * 64
    # NF4: half a byte a weight + 64 blocks of 8-bit absmax + one fp32 second-level absmax
    # (64 blocks < 256) + the 256-entry fp32 code + fp32 offset
    assert memory.quantized_weight_bytes(q, 4, 2) == 2048 + 64 + 4 + 1024 + 4
    assert memory.weight_bytes(TINY, 16, 2) == {"weights_linear": 73728 * 2, "weights_float": 38720 * 2}
    assert memory.weight_bytes(TINY, 8, 2)["weights_linear"] == 2 * (4352 + 2176 + 2176 + 4352 + 8704 + 8704 + 8448)
    assert memory.weight_bytes(TINY, 4, 4)["weights_linear"] == 2 * (2 * 3144 + 2 * 2088 + 3 * 5256)


def test_nf4_double_quant_is_4_127_bits_per_parameter():
    # QLoRA (arXiv 2305.14314) Sec. 3: 4 + 8/64 + 32/(64*256) = 4.127 bits
    big = Linear("up_proj", 4096, 14336)
    bits = memory.quantized_weight_bytes(big, 4, 2) * 8 / big.weight_params
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)


def test_lora_sp_state_by_hand():
    # rank 8, per layer: q 8*64+64*8, k and v 8*64+32*8, o 1024, gate/up 8*64+128*8, down 8*128+64*8
    total, trainable = memory.lora_entries(TINY, tiny_setting())
    assert total == 2 * (1024 + 768 + 768 + 1024 + 1536 + 1536 + 1536) == 16384
    assert trainable == total // 2
    state = memory.lora_state_bytes(TINY, tiny_setting())
    # the flat layout (lorasp_edge.train.flat): full + rebuilt + values; rebuilt's and values' gradients;
    # an int64 index and AdamW m, v per trainable entry
    assert state == {"lora_weights": 4 * 16384 * 2 + 4 * 8192, "lora_grads": 4 * 16384 + 4 * 8192, "lora_index": 8 * 8192,
                     "optimizer_state": 8 * 8192}
    mixed = memory.lora_state_bytes(TINY, tiny_setting(compute_dtype="bfloat16"))
    assert mixed["lora_weights"] == 4 * 16384 * 2 + 4 * 8192 + 2 * 16384  # autocast's bf16 copies
    assert memory.lora_state_bytes(TINY, tiny_setting(world_size=2))["ddp_buckets"] == 4 * 8192
    # adapters on the last layer only, q and v only
    total, _ = memory.lora_entries(TINY, tiny_setting(target_modules=("q_proj", "v_proj"), adapted_layers=1))
    assert total == 1024 + 768


def test_activations_fp32_by_hand():
    # T = 2 x 32 = 64 tokens, fp32 (c = 4), rank 8, all linears adapted, 16-bit base
    norms = 2 * (4 * 64 * 64 + 4 * 64)                    # fp32 input + rsqrt, two norms
    attention = 64 * (64 + 32 + 32 + 64) * 4 + 4 * 2 * 4 * 32  # q, k, v, out + logsumexp
    mlp = 3 * 64 * 128 * 4                                # gate, act(gate), up
    inputs = 64 * 64 * 4 + 64 * 64 * 4 + 64 * 128 * 4 + 7 * 64 * 8 * 4  # qkv in, gate/up in, down in, A outputs
    per_layer = norms + attention + mlp + inputs
    assert memory.layer_activation_bytes(TINY, tiny_setting()) == per_layer == 261632
    final = 4 * 64 * 64 + 4 * 64 + 64 * 64 * 4
    rope = 2 * 64 * 16 * 4
    plain = memory.activation_bytes(TINY, tiny_setting())
    assert plain == {"saved": 2 * per_layer + final + rope, "recompute": 0, "backward": 3 * 64 * 128 * 4 + 2 * 64 * 64 * 4}
    checkpointed = memory.activation_bytes(TINY, tiny_setting(gradient_checkpointing=True))
    assert checkpointed["saved"] == 2 * 64 * 64 * 4 + final + rope
    assert checkpointed["recompute"] == per_layer


def test_packed_blocks_add_the_float_mask_and_repeated_kv_heads():
    # Packed examples: sdpa gets a block-diagonal mask, made float (b x s x s x c) per layer and kept
    # for backward, and k, v repeated from 2 to 4 heads (2 x T x (q - kv) x c more); the boolean
    # mask itself (b x s x s bytes) is made once per forward.
    plain, packed = tiny_setting(), tiny_setting(packed=True)
    assert memory.layer_activation_bytes(TINY, packed) - memory.layer_activation_bytes(TINY, plain) == 2 * 32 * 32 * 4 + 2 * 64 * 32 * 4
    assert memory.activation_bytes(TINY, packed)["saved"] - memory.activation_bytes(TINY, plain)["saved"] == 2 * (2 * 32 * 32 * 4 + 2 * 64 * 32 * 4) + 2 * 32 * 32


def test_heap_holes_grow_with_accumulation():
    # The forward's holes: a share of the saved activations, another share more when micro-batches accumulate.
    one, four = memory.estimate(TINY, tiny_setting(), "cpu"), memory.estimate(TINY, tiny_setting(grad_accum=4), "cpu")
    expected = memory.HEAP_SLACK["accumulating"] * one["activations"]
    assert abs(four["allocator_slack"] - one["allocator_slack"] - expected) <= 1  # int() rounding


def test_heap_slack_terms_follow_the_setting():
    c, saved = 4, 1000
    weights = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # two layers' q, k, v, o, gate, up, down
    layer = memory.layer_activation_bytes(TINY, tiny_setting()) + memory.layer_backward_bytes(TINY, tiny_setting())
    plain = memory.heap_slack_terms(TINY, tiny_setting(), saved)
    assert plain == {"saved": saved, "accumulating": 0, "recompute": 0, "dequantized": 0, "scores": 0, "fixed": 1}
    checkpointed = memory.heap_slack_terms(TINY, tiny_setting(gradient_checkpointing=True), saved)
    assert checkpointed["recompute"] == 2 * layer  # every adapted layer runs forward again
    assert memory.heap_slack_terms(TINY, tiny_setting(gradient_checkpointing=True, adapted_layers=1), saved)["recompute"] == layer
    # A dequantized weight's hole stays where a micro-batch's hidden states (T x h) outgrow the
    # largest weight (64 x 128): 2 x 32 x 64 does not, 8 x 32 x 64 does.
    assert memory.heap_slack_terms(TINY, tiny_setting(quant_bits=4, grad_accum=3), saved)["dequantized"] == 0
    quantized = memory.heap_slack_terms(TINY, tiny_setting(quant_bits=4, grad_accum=3, micro_batch=8), saved)
    assert quantized["dequantized"] == weights * c * 3 and quantized["accumulating"] == saved
    assert memory.heap_slack_terms(TINY, tiny_setting(micro_batch=8), saved)["dequantized"] == 0  # 16-bit: none
    eager = dataclasses.replace(TINY, model_type="gemma2")
    assert eager.family.attention == "eager"
    assert memory.heap_slack_terms(eager, tiny_setting(grad_accum=2), saved)["scores"] == 2 * (2 * 4 * 32 * 32 * c) * 2
    constants = dict.fromkeys(plain, 2.0)
    assert memory.heap_slack_bytes(TINY, tiny_setting(quant_bits=4, micro_batch=8), saved, constants) == 2 * (saved + weights * c + 1)


def test_activations_bf16_share_the_input_on_a_float_base():
    # The fused LoRA layer (train/lora_linear.py) hands A the input the base read: one per group.
    per_layer = memory.layer_activation_bytes(TINY, tiny_setting(compute_dtype="bfloat16"))
    norms = 2 * (4 * 64 * 64 + 4 * 64)
    attention = 64 * 192 * 2 + 4 * 2 * 4 * 32
    mlp = 3 * 64 * 128 * 2
    inputs = (64 + 64 + 128) * 64 * 2 + 7 * 64 * 8 * 2  # q/k/v's, gate/up's and down's inputs; o's is attention's
    assert per_layer == norms + attention + mlp + inputs


def test_inputs_bf16_keep_a_copy_per_adapted_module_on_an_8bit_base():
    # PEFT's own layer (8-bit bases) casts x to the fp32 adapter dtype; autocast casts it back: a copy each.
    kept = memory.linear_input_bytes(TINY, tiny_setting(compute_dtype="bfloat16", quant_bits=8), 64)
    assert kept == (64 + 64 + 128) * 64 * 2 + (3 * 64 + 64 + 2 * 64 + 128) * 64 * 2 + 7 * 64 * 8 * 2
    # The fused 4-bit layer (train.lora_linear) shares the input the base read, as on a float base.
    four = memory.linear_input_bytes(TINY, tiny_setting(compute_dtype="bfloat16", quant_bits=4), 64)
    assert four == memory.linear_input_bytes(TINY, tiny_setting(compute_dtype="bfloat16"), 64)


def test_int8_inputs_survive_checkpointing():
    s = tiny_setting(quant_bits=8, gradient_checkpointing=True)
    kept = memory.activation_bytes(TINY, s)["saved"] - memory.activation_bytes(TINY, tiny_setting(gradient_checkpointing=True))["saved"]
    assert kept == 2 * 64 * (64 + 64 + 64 + 128) * 4  # per layer: qkv, o, gate/up and down inputs


def test_loss_chunk_and_dequant_buffer():
    # chunk = min(1024, 2 x 31 targets) tokens x vocab 300 x 8 bytes (fp32 logits and log-softmax;
    # the backward works in place); a soft-capped family keeps tanh's output too: 12 bytes
    assert memory.loss_bytes(TINY, tiny_setting()) == 62 * 300 * 8
    assert memory.loss_bytes(TINY, tiny_setting(micro_batch=64, seq_len=64, loss_chunk_tokens=256)) == 256 * 300 * 8
    assert memory.loss_bytes(dataclasses.replace(TINY, model_type="gemma2"), tiny_setting()) == 62 * 300 * 12
    assert memory.dequant_buffer_bytes(TINY, 16, 2) == 0
    assert memory.dequant_buffer_bytes(TINY, 8, 2) == 8192 * 2
    assert memory.dequant_buffer_bytes(TINY, 4, 2) == 8192 * 2 + 4 * 128


def test_estimate_sums_its_components():
    parts = memory.estimate(TINY, tiny_setting(), "cpu")
    assert parts["total_bytes"] == sum(v for k, v in parts.items() if k != "total_bytes")
    assert parts["runtime"] == memory.RUNTIME_BYTES["cpu"]
    assert parts["transient"] == max(62 * 300 * 8, 3 * 64 * 128 * 4 + 2 * 64 * 64 * 4)
    checkpointed = memory.estimate(TINY, tiny_setting(gradient_checkpointing=True), "cpu")
    assert checkpointed["transient"] == 261632 + 3 * 64 * 128 * 4 + 2 * 64 * 64 * 4
    jetson = memory.estimate(TINY, tiny_setting(), "cuda", unified_memory=True)
    assert jetson["runtime"] == memory.RUNTIME_BYTES["cuda"] + memory.RUNTIME_BYTES["cpu"]


# ------------------------------------------------------------------------------- the search


def test_default_plan_is_smollm2_and_fits():
    plan = plan_training(budget_bytes=8 * 10**9, device=CPU_BF16)
    assert plan.model["name"] == "smollm2-135m" and plan.model["params"] == 134_515_008
    assert plan.memory["total_bytes"] <= 0.9 * plan.budget_bytes
    assert plan.alpha == 2 * plan.rank and plan.ratio == 0.5 and plan.dropout == 0.0
    assert plan.micro_batch * plan.grad_accum * plan.world_size == 8 and plan.seq_len == 512
    assert plan.layers == list(range(30 - len(plan.layers), 30))
    assert plan.compute_dtype == "bfloat16"
    assert plan_training(budget_bytes=8 * 10**9, device=CPU_FP32).compute_dtype == "float32"


@pytest.mark.parametrize("prefer, best_rank", [("speed", 16), ("quality", 64)])
def test_more_memory_never_gives_a_worse_plan(prefer, best_rank):
    previous = None
    for step in range(40):
        budget = int(0.6e9 * 1.15**step)
        try:
            plan = plan_training("qwen2.5-1.5b", budget_bytes=budget, seq_len=512, batch=8, device=CPU_BF16, prefer=prefer)
        except NoFitError:
            assert previous is None, f"{budget} fails after a smaller budget fitted"
            continue
        key = quality_key(plan.quality["coverage"], plan.quant_bits, plan.rank)
        assert plan.memory["total_bytes"] <= 0.9 * budget
        if previous is not None:
            assert key >= previous, (budget, key, previous)
        previous = key
    assert previous == (1.0, True, best_rank)


def test_quantized_bases_are_one_tier_rank_decides():
    # 8- and 4-bit are equal on quality (QLoRA Table 3); rank decides; 16-bit above both.
    assert QUANTIZED_ORDER == (8, 4)
    assert quality_key(1.0, 4, 64) > quality_key(1.0, 8, 32)
    assert quality_key(1.0, 8, 32) == quality_key(1.0, 4, 32)
    assert quality_key(1.0, 16, 4) > quality_key(1.0, 8, 64)
    assert quality_key(0.5, 16, 64) < quality_key(1.0, 4, 4)  # coverage first


def test_at_one_quality_the_faster_setting_wins():
    # llama-3.1-8b, bf16 CPU, seq 512, --prefer quality: rank 64 on every layer fits at 4 bits from
    # 14 GB (with checkpointing) and at 18 GB without it; at 18 GB the 8-bit base fits too, but only
    # with checkpointing, so the faster 4-bit setting stays. 16 bits (a tier above) fit from 19 GB.
    # (The zero start: the offset start holds twice the rank, which moves these budgets.)
    plans = {gb: plan_training("llama-3.1-8b", budget_bytes=gb * 10**9, seq_len=512, device=CPU_BF16, prefer="quality", init="zeros") for gb in (14, 18, 20)}
    got = [(p.quant_bits, p.rank, p.micro_batch, p.gradient_checkpointing) for p in plans.values()]
    assert got == [(4, 64, 4, True), (4, 64, 1, False), (16, 16, 1, True)]
    assert all(p.quality["coverage"] == 1.0 for p in plans.values())
    assert all(p.host_allocator == "mmap" for p in plans.values())  # 8B on CPU: past the heap's fitted range
    eight = memory.Candidate(8, "bfloat16", 64, tuple(plans[18].target_modules), 32, True, 1, 512, 512, grad_accum=8, host_allocator="mmap")
    assert memory.estimate(model_info("llama-3.1-8b").architecture, eight)["total_bytes"] <= 0.9 * 18 * 10**9  # 8-bit fitted too


@pytest.mark.parametrize("device, prefer, rank", [(CPU_BF16, "speed", 16), (CPU_FP32, "speed", 16), (CPU_BF16, "quality", 64), (CPU_FP32, "quality", 64)])
def test_8b_on_a_16gb_cpu_plans_a_4bit_base(device, prefer, rank):
    # issue 17: an 8B model on a 16 GB laptop. The 8-bit base (weights 6.98 GB against NF4's
    # 3.60 GB) fits only at a lower rank, so the 4-bit base on every linear layer wins (the zero start;
    # test_offset_start_at_16gb covers the default).
    plan = plan_training("llama-3.1-8b", budget_bytes=16 * 10**9, seq_len=512, device=device, prefer=prefer, init="zeros")
    assert (plan.quant_bits, plan.rank, len(plan.layers), plan.quality["coverage"]) == (4, rank, 32, 1.0)
    assert plan.memory["weights_linear"] == 3_600_647_040
    assert plan.memory["total_bytes"] <= 0.9 * 16 * 10**9
    assert "checkpoint_pages" not in plan.memory  # pre-quantized on CPU: no 16-bit pages mapped
    # An 8-bit base cannot run the chosen setting (at rank 16 it fits only at a smaller micro-batch, so
    # the 4-bit base is the faster of the two; at the quality ranks it does not fit at all).
    eight = memory.Candidate(8, plan.compute_dtype, rank, tuple(plan.target_modules), 32, plan.gradient_checkpointing, plan.micro_batch, 512,
                             plan.loss_chunk_tokens, grad_accum=plan.grad_accum, host_allocator=plan.host_allocator)
    assert memory.estimate(model_info("llama-3.1-8b").architecture, eight)["total_bytes"] > 0.9 * 16 * 10**9


def test_offset_start_at_16gb_keeps_the_4bit_base_and_every_layer():
    # The offset start (the default) holds rank 2r: at --prefer quality the 8B plan steps down from
    # rank 64 to 32 to fit 16 GB; under speed it keeps rank 16. Trainable entries follow the rank.
    for prefer, rank in (("speed", 16), ("quality", 32)):
        plan = plan_training("llama-3.1-8b", budget_bytes=16 * 10**9, seq_len=512, device=CPU_FP32, prefer=prefer)
        assert (plan.init, plan.quant_bits, plan.rank, len(plan.layers)) == ("offset", 4, rank, 32)
        assert plan.memory["total_bytes"] <= 0.9 * 16 * 10**9
    # At one rank (speed: 16 both ways) the offset start holds more LoRA weights, the same optimizer state.
    offset, zeros = (plan_training("llama-3.1-8b", budget_bytes=16 * 10**9, seq_len=512, device=CPU_FP32, init=init) for init in ("offset", "zeros"))
    assert offset.rank == zeros.rank == 16
    assert offset.memory["lora_weights"] > zeros.memory["lora_weights"]
    assert offset.memory["optimizer_state"] == zeros.memory["optimizer_state"]


def test_tight_budget_turns_on_checkpointing_and_small_micro_batches():
    roomy = plan_training("smollm2-135m", budget_bytes=24 * 10**9, seq_len=1024, batch=8, device=CPU_BF16)
    tight = plan_training("smollm2-135m", budget_bytes=2 * 10**9, seq_len=1024, batch=8, device=CPU_BF16)
    assert not roomy.gradient_checkpointing and roomy.micro_batch == 8
    assert tight.micro_batch * tight.grad_accum == 8
    assert tight.gradient_checkpointing or tight.micro_batch < 8 or tight.quant_bits < 16


def test_impossible_budget_names_the_smallest_that_fits():
    with pytest.raises(NoFitError) as raised:
        plan_training("llama-3.1-8b", budget_bytes=2 * 10**9, device=CPU_BF16)
    error = raised.value
    assert error.exit_code == 2
    assert "nothing fits in 2.00 GB" in str(error) and f"--mem {math.ceil(error.needed_bytes / 1e7) / 100:.2f}GB" in str(error)
    cheapest = error.setting
    assert cheapest.gradient_checkpointing and cheapest.micro_batch == 1 and cheapest.rank == 4 and cheapest.adapted_layers == 1
    # the budget it names does fit, with that very setting; a byte less does not
    plan = plan_training("llama-3.1-8b", budget_bytes=error.needed_bytes, device=CPU_BF16)
    assert (plan.quant_bits, plan.rank, len(plan.layers)) == (cheapest.quant_bits, 4, 1)
    with pytest.raises(NoFitError):
        plan_training("llama-3.1-8b", budget_bytes=error.needed_bytes - 2, device=CPU_BF16)


def test_profile_sets_budget_device_and_formats():
    plan = plan_training("qwen2.5-0.5b", profile="macbook-air-m2-8gb")
    assert plan.device_kind == "mps" and plan.profile == "macbook-air-m2-8gb"
    assert plan.budget_bytes == int(8 * 2**30 * (1 - 0.35))
    assert plan.quant_bits in (16, 4)
    pi = plan_training("smollm2-360m", profile="raspberry-pi-5-8gb")
    assert pi.compute_dtype == "float32"  # Cortex-A76 has no bf16
    overridden = plan_training("smollm2-360m", profile="raspberry-pi-5-8gb", budget_bytes=3 * 10**9)
    assert overridden.budget_bytes == 3 * 10**9


def test_local_folder_plans_like_its_catalog_entry(tmp_path):
    from lorasp_edge.plan.catalog import catalog_entry

    (tmp_path / "config.json").write_text(json.dumps(catalog_entry("qwen2.5-0.5b")["config"]))
    local = plan_training(str(tmp_path), budget_bytes=4 * 10**9, device=CPU_BF16)
    listed = plan_training("qwen2.5-0.5b", budget_bytes=4 * 10**9, device=CPU_BF16)
    assert local.memory == listed.memory and local.model["params"] == listed.model["params"]
    assert local.model["name"] == str(tmp_path)


# ------------------------------------------------------------------------------- the plan file


def test_plan_round_trips_and_table_shows_components(tmp_path):
    plan = plan_training("qwen2.5-0.5b", budget_bytes=6 * 10**9, device=CPU_BF16)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert Plan.from_json(path) == plan
    data = json.loads(path.read_text())
    for name in ("model", "budget_bytes", "headroom", "device_kind", "profile", "quant_bits", "compute_dtype", "rank", "alpha",
                 "ratio", "dropout", "target_modules", "layers", "seq_len", "micro_batch", "grad_accum", "world_size",
                 "gradient_checkpointing", "loss_chunk_tokens", "memory"):
        assert name in data, name
    table = format_plan(plan)
    assert f"{plan.memory['total_bytes']:,d}" in table and "activations" in table and "headroom left" in table


def test_bad_plan_file_names_file_and_fields(tmp_path):
    plan = plan_training("smollm2-135m", budget_bytes=4 * 10**9, device=CPU_BF16)
    data = plan.to_dict()
    data["rank"], data["quant_bits"] = 0, 3
    del data["layers"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as raised:
        Plan.from_json(path)
    message = str(raised.value)
    assert str(path) in message and "'rank'" in message and "'quant_bits'" in message and "'layers' is missing" in message
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a JSON plan file"):
        Plan.from_json(path)


# ------------------------------------------------------------------------------- the CLI


def run_main(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_plan_writes_file_and_prints_table(capsys, tmp_path):
    out = tmp_path / "plan.json"
    code, stdout, _ = run_main(capsys, "plan", "--mem", "8GB", "--out", str(out))
    assert code == 0 and "total (predicted peak)" in stdout
    assert Plan.from_json(out).model["name"] == "smollm2-135m"
    code, stdout, _ = run_main(capsys, "plan", "--profile", "rtx-3060-12gb", "--model", "llama-3.2-3b", "--json", "--out", str(out))
    assert code == 0 and json.loads(stdout)["device_kind"] == "cuda"


@pytest.mark.parametrize("argv, expected", [
    (["--mem", "8GB", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--profile", "no-such-device"], "unknown profile 'no-such-device'"),
    (["--mem", "eight"], "memory 'eight'"),
    (["--mem", "0GB"], "must be positive"),
    (["--mem=-2GB"], "memory '-2GB'"),
    (["--mem", "8GB", "--seq-len", "0"], "--seq-len must be"),
    (["--mem", "8GB", "--batch", "0"], "--batch must be"),
    (["--mem", "8GB", "--seq-len", "abc"], "invalid int value"),
    (["--model", "qwen2.5-0.5b"], "give a memory budget"),
    (["--mem", "100MB"], "nothing fits"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, expected):
    code, stdout, stderr = run_main(capsys, "plan", *argv, "--out", str(tmp_path / "p.json"))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], stderr
    assert "Traceback" not in stderr and not (tmp_path / "p.json").exists()


def test_cli_folder_without_config(capsys, tmp_path):
    code, _, stderr = run_main(capsys, "plan", "--mem", "8GB", "--model", str(tmp_path), "--out", str(tmp_path / "p.json"))
    assert code == 2 and "has no config.json" in stderr and len(stderr.strip().splitlines()) == 1


def test_cli_entry_point_lists_profiles_and_fails_cleanly():
    done = subprocess.run([sys.executable, "-m", "lorasp_edge", "plan", "--list-profiles"], capture_output=True, text=True)
    assert done.returncode == 0
    assert len(done.stdout.strip().splitlines()) >= 9 and "raspberry-pi-5-8gb" in done.stdout
    done = subprocess.run([sys.executable, "-m", "lorasp_edge", "plan", "--mem", "8 bananas"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_loss_chunk_options_start_with_no_chunking():
    from lorasp_edge.plan.search import loss_chunks

    # The whole micro-batch's targets first (the trainer's plain full-logits path), then the fixed sizes below it.
    assert loss_chunks(8, 512) == [8 * 511, 1024, 512, 256, 128]
    assert loss_chunks(2, 32) == [62]
    assert loss_chunks(1, 200) == [199, 128]


def test_prefer_says_what_spare_memory_buys():
    from lorasp_edge.plan.search import SPEED_MAX_RANK, Device, plan_training, throughput_class

    cpu = Device("cpu", False, (16, 8, 4))
    plans = {prefer: plan_training(model="smollm2-135m", budget_bytes=8 * 10**9, seq_len=256, batch=4, device=cpu, prefer=prefer)
             for prefer in ("speed", "quality", "memory")}
    speed, quality, memory_plan = plans["speed"], plans["quality"], plans["memory"]
    # speed (the default) stops at rank 16 and spends the rest on throughput: nothing recomputed.
    assert speed.rank == SPEED_MAX_RANK == 16 and speed.quant_bits == 16
    assert not speed.gradient_checkpointing and speed.micro_batch == 4 and speed.loss_chunk_tokens == 4 * 255
    assert throughput_class(speed).startswith("full:")
    assert plan_training(model="smollm2-135m", budget_bytes=8 * 10**9, seq_len=256, batch=4, device=cpu).rank == 16
    # quality spends it on rank first.
    assert quality.rank == 64 and quality.memory["total_bytes"] > speed.memory["total_bytes"]
    # memory: the same coverage and rank at the smallest peak.
    assert memory_plan.rank == 16 and memory_plan.quant_bits == 4 and memory_plan.gradient_checkpointing and memory_plan.micro_batch == 1
    assert memory_plan.memory["total_bytes"] < speed.memory["total_bytes"] / 2
    assert memory_plan.quality["coverage"] == speed.quality["coverage"] == quality.quality["coverage"] == 1.0
    assert throughput_class(memory_plan).startswith("low: checkpointing")
    assert [plan.quality["prefer"] for plan in plans.values()] == ["speed", "quality", "memory"]


def test_prefer_refuses_an_unknown_choice():
    from lorasp_edge.plan.search import plan_training

    with pytest.raises(UserError, match="--prefer must be one of speed, quality, memory"):
        plan_training(model="smollm2-135m", budget_bytes=8 * 10**9, prefer="fast")


@pytest.mark.parametrize("extra, named", [(["--plan", "plan.json"], "--plan"), (["--resume"], "the run being resumed")])
def test_train_refuses_prefer_where_the_plan_is_already_fixed(tmp_path, capsys, monkeypatch, extra, named):
    from lorasp_edge.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.json").write_text("{}")
    (tmp_path / "data.jsonl").write_text('{"text": "x"}\n')
    code = main(["train", "--data", "data.jsonl", "--out", "run", "--prefer", "quality", *extra])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1
    assert f"--prefer applies only when train plans here: {named} already fixes the plan" in error[0]


def test_models_past_the_heaps_fitted_range_plan_mapped_allocations():
    small = plan_training("smollm2-135m", budget_bytes=8 * 10**9, seq_len=256, batch=4, device=CPU_FP32)
    large = plan_training("qwen2.5-1.5b", budget_bytes=8 * 10**9, seq_len=256, batch=4, device=CPU_FP32)
    gpu = plan_training("qwen2.5-1.5b", budget_bytes=8 * 10**9, seq_len=256, batch=4, device=Device("cuda", True, (16, 8, 4)))
    assert (small.host_allocator, large.host_allocator, gpu.host_allocator) == ("heap", "mmap", "heap")
    assert small.memory["allocator_slack"] > 10 * memory.HEAP_SLACK_BYTES  # the fitted heap holes
    assert large.memory["allocator_slack"] == memory.HEAP_SLACK_BYTES  # mapped: the live tensors, no holes
    assert "allocator_slack" not in gpu.memory
    assert "mmap" in format_plan(large) and "large allocations are mapped" in throughput_class(large)
    assert Plan.from_dict(json.loads(large.to_json())).host_allocator == "mmap"
    older = {key: value for key, value in json.loads(small.to_json()).items() if key != "host_allocator"}
    assert Plan.from_dict(older).host_allocator == "heap"  # plan files written before the field
    with pytest.raises(UserError, match="field 'host_allocator' must be heap or mmap"):
        Plan.from_dict({**older, "host_allocator": "jemalloc"})


def test_loading_a_prequantized_base_counts_the_cast_of_its_largest_float_tensor():
    # Gemma 2's widths with 8 layers: a 256,000 x 2,304 table stored bf16, cast to fp32 after loading
    arch = dataclasses.replace(model_info("gemma-2-2b").architecture, num_layers=8, checkpoint_dtype="bfloat16")
    setting = memory.Candidate(4, "float32", 8, ("q_proj", "v_proj"), 8, True, 1, 256, 255, host_allocator="mmap")
    parts = memory.estimate(arch, setting, "cpu")
    table = 256_000 * 2_304
    load_peak = memory.RUNTIME_BYTES["cpu"] + parts["weights_linear"] + parts["weights_float"] + 2 * table
    step = sum(value for key, value in parts.items() if key not in ("loading", "total_bytes"))
    assert parts["loading"] == load_peak - step > 0
    assert parts["total_bytes"] == load_peak  # the larger of loading and the step
    # computing in the stored dtype casts nothing; on a GPU or for a 16-bit base there is no such phase
    for dtype, device, bits in (("bfloat16", "cpu", 4), ("float32", "cuda", 4), ("float32", "cpu", 16)):
        other = memory.estimate(arch, dataclasses.replace(setting, compute_dtype=dtype, quant_bits=bits), device)
        assert "loading" not in other

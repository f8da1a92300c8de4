"""LoRA-SP adapter: masks, optimizer, save/load, merge, on tiny models built from a config."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorasp_edge.errors import AdapterError, UserError
from lorasp_edge.export.sources.merge import merged_model, merged_state_dict
from lorasp_edge.train import masks as masklib
from lorasp_edge.train.adapter import (
    LoRASPConfig,
    apply_lorasp,
    count_parameters,
    lora_matrices,
    lorasp_store,
    redraw_masks,
    trainable_parameters,
)
from lorasp_edge.train.adapter_files import MaskGeneratorWarning, load_adapter, save_adapter
from lorasp_edge.train.optim import LoRASPAdamW, state_bytes

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tokens(seed=1, batch=2, length=12, vocab=96):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def train(model, steps, lr=1e-2, weight_decay=0.1, batch=None):
    batch = tokens() if batch is None else batch
    optimizer = LoRASPAdamW(trainable_parameters(model), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def randomize(model, std=0.05, seed=7):
    """Give every LoRA matrix random values (B starts at zero), through the adapter's own writer."""
    generator = torch.Generator().manual_seed(seed)
    for _, _, linear in lora_matrices(model):
        linear.load_state_dict({"weight": torch.randn(linear.weight.shape, generator=generator) * std})


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_fresh_adapter_gives_base_output_exactly(make):
    base = make()
    x = tokens()
    expected = base(x).logits
    adapted = apply_lorasp(copy.deepcopy(base), LoRASPConfig(rank=4, alpha=8))
    assert torch.equal(adapted(x).logits, expected)


@pytest.mark.parametrize("init", ["zeros", "offset"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_frozen_entries_bit_identical_trainable_entries_move(make, init):
    # offset: the offset half of A and B (frozen whole) is among the frozen entries checked
    model = apply_lorasp(make(), LoRASPConfig(rank=4, alpha=8, seed=3, init=init))
    initial = {(name, part): linear.weight.detach().clone() for name, part, linear in lora_matrices(model)}
    train(model, steps=30, weight_decay=0.1)
    for name, part, linear in lora_matrices(model):
        trainable = linear.lorasp_trainable
        before, after = initial[(name, part)], linear.weight.detach()
        assert torch.equal(after[~trainable], before[~trainable]), f"{name}.{part}: a frozen entry moved"
        assert (after[trainable] != before[trainable]).all(), f"{name}.{part}: a trainable entry did not move"


def test_base_weights_never_change():
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4))
    def is_base(key):
        return "lora_" not in key and not key.startswith("lorasp_store.")

    base_before = {k: v.clone() for k, v in model.state_dict().items() if is_base(k)}
    train(model, steps=3)
    for key, value in model.state_dict().items():
        if is_base(key):
            assert torch.equal(value, base_before[key]), key


def test_trainable_count_matches_closed_form():
    rank, layers = 4, 2
    h, i, kv = 32, 48, 2 * (32 // 4)  # hidden, intermediate, kv heads x head_dim
    # (d_in, d_out) of q, k, v, o, gate, up, down
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    lora = layers * sum(rank * d_in + d_out * rank for d_in, d_out in shapes)
    frozen = layers * sum(round(0.5 * rank * d_in) + round(0.5 * d_out * rank) for d_in, d_out in shapes)
    counts = count_parameters(apply_lorasp(tiny_llama(), LoRASPConfig(rank=rank, target_modules="all-linear")))
    assert counts["lora"] == lora == 3712
    assert counts["trainable"] == lora - frozen == 1856
    assert counts["base"] == sum(p.numel() for p in tiny_llama().parameters())


def test_optimizer_state_is_half_of_peft_lora():
    from peft import LoraConfig, get_peft_model

    lorasp = apply_lorasp(tiny_llama(), LoRASPConfig(rank=8, alpha=16))
    lorasp_optimizer = train(lorasp, steps=1)
    peft = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    peft_optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    x = tokens()
    peft(x, labels=x).loss.backward()
    peft_optimizer.step()
    ratio = state_bytes(lorasp_optimizer) / state_bytes(peft_optimizer)
    assert abs(ratio - 0.5) <= 0.005, ratio


def plain_lora_twin(model, make=tiny_llama, rank=4):
    """A PEFT LoRA model (whole trainable matrices) on the same base with `model`'s LoRA values."""
    from peft import LoraConfig, get_peft_model

    twin = get_peft_model(make(), LoraConfig(r=rank, lora_alpha=model.lorasp_config.alpha, target_modules="all-linear"))
    values = {f"{name}.{part}": linear.weight.detach().clone() for name, part, linear in lora_matrices(model)}
    with torch.no_grad():
        for name, layer in twin.get_base_model().named_modules():
            if hasattr(layer, "lora_A") and f"{name}.A" in values:
                layer.lora_A["default"].weight.copy_(values[f"{name}.A"])
                layer.lora_B["default"].weight.copy_(values[f"{name}.B"])
    return twin


def test_optimizer_is_torch_adamw_over_one_flat_parameter():
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4))
    optimizer = LoRASPAdamW(trainable_parameters(model), lr=1e-3)
    (param,) = [p for group in optimizer.param_groups for p in group["params"]]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert param.dim() == 1 and param.numel() == count_parameters(model)["trainable"] == 1856
    # The only tensor of the whole model that wants a gradient.
    assert [p for p in model.parameters() if p.requires_grad] == [param]


def test_flat_adamw_equals_torch_adamw_on_plain_lora_when_nothing_is_frozen():
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4, ratio=0.0))
    randomize(model)
    reference = plain_lora_twin(model)
    ours = LoRASPAdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = tokens()
    for _ in range(5):
        for m, opt in ((model, ours), (reference, theirs)):
            m(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    by_name = {name: layer for name, layer in reference.get_base_model().named_modules() if hasattr(layer, "lora_A")}
    for name, part, linear in lora_matrices(model):
        theirs_weight = getattr(by_name[name], f"lora_{part}")["default"].weight
        torch.testing.assert_close(linear.weight, theirs_weight, rtol=0, atol=1e-6)


def test_gradient_is_lora_gradient_at_trainable_entries_and_clipping_sees_only_those():
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4))
    randomize(model)
    reference = plain_lora_twin(model)
    x = tokens()
    model(x, labels=x).loss.backward()
    reference(x, labels=x).loss.backward()
    store = lorasp_store(model)
    by_name = {name: layer for name, layer in reference.get_base_model().named_modules() if hasattr(layer, "lora_A")}
    trainable_norm_sq = 0.0
    for slot, (name, part, linear) in enumerate(lora_matrices(model)):
        full_grad = getattr(by_name[name], f"lora_{part}")["default"].weight.grad
        expected = full_grad[linear.lorasp_trainable]
        torch.testing.assert_close(store.values.grad[store.value_range(slot)], expected, rtol=1e-5, atol=1e-7)
        trainable_norm_sq += float(expected.double().pow(2).sum())
    total = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_norm=1e9)
    assert float(total) == pytest.approx(trainable_norm_sq**0.5, rel=1e-5)


def test_inf_gradient_at_a_frozen_entry_never_reaches_the_trainable_ones():
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4))
    randomize(model)
    x = tokens()
    model(x, labels=x).loss.backward()
    clean = lorasp_store(model).values.grad.clone()
    lorasp_store(model).values.grad = None
    _, _, linear = lora_matrices(model)[0]
    frozen = ~linear.lorasp_trainable
    loss = model(x, labels=x).loss
    # The matrix the forward used: poison its gradient at every frozen entry.
    linear.weight.register_hook(lambda grad: grad.masked_fill(frozen, float("inf")))
    loss.backward()
    assert torch.equal(lorasp_store(model).values.grad, clean)


def test_activation_checkpointing_gives_the_same_gradient():
    grads = []
    for checkpointing in (False, True):
        model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4))
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        randomize(model)
        model.train()
        x = tokens()
        model(x, labels=x).loss.backward()
        grads.append(lorasp_store(model).values.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_state_of_the_per_matrix_optimizer_is_refused_clearly():
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4))
    optimizer = LoRASPAdamW(trainable_parameters(model))
    earlier = {"state": {}, "param_groups": [{**optimizer.defaults, "params": list(range(len(lora_matrices(model))))}]}
    with pytest.raises(UserError, match="written by an earlier lorasp-edge"):
        optimizer.load_state_dict(earlier)


def test_masks_exact_count_and_independent_of_module_order():
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4, seed=11))
    matrices = lora_matrices(model)
    for name, part, linear in reversed(matrices):
        frozen = ~linear.lorasp_trainable
        assert int(frozen.sum()) == round(0.5 * frozen.numel())
        assert torch.equal(frozen, masklib.draw_frozen_mask(frozen.shape, 0.5, 11, name, part))
    names = [(name, part) for name, part, _ in matrices]
    assert len(set(names)) == len(names)


def test_masks_identical_across_processes():
    code = (
        "from lorasp_edge.train.masks import draw_frozen_mask, pack;"
        "import hashlib;"
        "m = draw_frozen_mask((16, 64), 0.5, 5, 'model.layers.1.mlp.up_proj', 'B');"
        "print(hashlib.sha256(pack(m).numpy().tobytes()).hexdigest())"
    )
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    here = masklib.draw_frozen_mask((16, 64), 0.5, 5, "model.layers.1.mlp.up_proj", "B")
    import hashlib

    assert outputs == {hashlib.sha256(masklib.pack(here).numpy().tobytes()).hexdigest() + "\n"}


def test_redraw_keeps_frozen_values_and_exact_counts():
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4, redraw_every=5))
    optimizer = train(model, steps=5)
    before = {(n, p): l.weight.detach().clone() for n, p, l in lora_matrices(model)}
    old_masks = {(n, p): l.lorasp_trainable.clone() for n, p, l in lora_matrices(model)}
    redraw_masks(model, draw=1)
    optimizer.reset_state()
    for name, part, linear in lora_matrices(model):
        assert not torch.equal(linear.lorasp_trainable, old_masks[(name, part)])
        assert int((~linear.lorasp_trainable).sum()) == round(0.5 * linear.weight.numel())
    x = tokens()
    model(x, labels=x).loss.backward()
    optimizer.step()
    for name, part, linear in lora_matrices(model):
        frozen = ~linear.lorasp_trainable
        assert torch.equal(linear.weight[frozen], before[(name, part)][frozen])


def test_only_chosen_layers_and_modules_are_adapted():
    model = apply_lorasp(tiny_llama(num_hidden_layers=3), LoRASPConfig(rank=2, target_modules=["q_proj", "v_proj"], layers=[2]))
    names = sorted({name for name, _, _ in lora_matrices(model)})
    assert names == ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merged_equals_adapted_and_loads_strict(make):
    model = apply_lorasp(make(), LoRASPConfig(rank=4, alpha=8))
    train(model, steps=10)
    model.eval()
    x = tokens()
    merged = merged_model(model)
    # fp32 merge vs the unmerged two-matmul path: rounding only.
    torch.testing.assert_close(merged(x).logits, model(x).logits, rtol=0, atol=1e-5)
    plain = type(merged)(merged.config)
    plain.load_state_dict(merged.state_dict(), strict=True)
    # Merging is a pure function: twice gives the same weights, and the adapter is untouched.
    again = merged_state_dict(model)
    for key, value in merged_state_dict(model).items():
        assert torch.equal(value, again[key])
    assert torch.equal(model(x).logits, model(x).logits)


def test_merge_checks_finite():
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4))
    _, _, linear = lora_matrices(model)[1]
    linear.load_state_dict({"weight": torch.full(linear.weight.shape, float("inf"))})
    with pytest.raises(ValueError, match="NaN or Inf"):
        merged_state_dict(model)


# ----------------------------------------------------------------------------- quantized bases


def quantized_tiny_llama(tmp_path, bits):
    from lorasp_edge.models import load_model

    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    return load_model(str(tmp_path / "base"), quant_bits=bits, compute_dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_trains_merges_and_keeps_frozen_entries(tmp_path, bits):
    model = apply_lorasp(quantized_tiny_llama(tmp_path, bits), LoRASPConfig(rank=4, alpha=8))
    initial = {(n, p): l.weight.detach().clone() for n, p, l in lora_matrices(model)}
    train(model, steps=5, lr=1e-2)
    model.eval()
    for name, part, linear in lora_matrices(model):
        frozen = ~linear.lorasp_trainable
        assert torch.equal(linear.weight[frozen], initial[(name, part)][frozen])
    x = tokens()
    merged = merged_model(model)
    # 4-bit: the adapted forward dequantizes the same NF4 weights the merge uses (fp32 compute).
    # 8-bit: LLM.int8 runs the matmul in int8 (activations quantized too), the merge does not.
    tolerance = 1e-4 if bits == 4 else 5e-2
    torch.testing.assert_close(merged(x).logits, model(x).logits, rtol=0, atol=tolerance)


def test_4bit_every_adapted_module_gets_gradient_after_eval_forward(tmp_path):
    model = apply_lorasp(quantized_tiny_llama(tmp_path, 4), LoRASPConfig(rank=4))
    randomize(model)
    x = tokens()
    model.eval()
    with torch.no_grad():
        model(x)  # the bitsandbytes CPU trap: this used to repack the weights
    model.train()
    model(x, labels=x).loss.backward()
    store = lorasp_store(model)
    for slot, (name, part, _) in enumerate(lora_matrices(model)):
        assert store.values.grad[store.value_range(slot)].abs().sum() > 0, f"{name}.{part}: zero gradient"


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip_and_peft_parity(tmp_path):
    from peft import PeftModel

    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4, alpha=8, seed=9))
    train(model, steps=5)
    model.eval()
    save_adapter(model, tmp_path / "adapter", {"base_model": "tiny"})
    loaded = load_adapter(tiny_llama(), tmp_path / "adapter")
    for (name, part, a), (_, _, b) in zip(lora_matrices(model), lora_matrices(loaded)):
        assert torch.equal(a.weight, b.weight), f"{name}.{part}"
        assert torch.equal(a.lorasp_trainable, b.lorasp_trainable)
    x = tokens()
    ours = model(x).logits
    assert torch.equal(loaded(x).logits, ours)
    peft = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(peft(x).logits, ours, rtol=0, atol=1e-5)
    info = json.loads((tmp_path / "adapter" / "lorasp.json").read_text())
    assert (info["ratio"], info["seed"], info["rank"], info["base_model"]) == (0.5, 9, 4, "tiny")


def test_save_overwrites_atomically(tmp_path):
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4))
    save_adapter(model, tmp_path / "adapter")
    train(model, steps=2)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    loaded = load_adapter(tiny_llama(), tmp_path / "adapter")
    assert torch.equal(lora_matrices(loaded)[1][2].weight, lora_matrices(model)[1][2].weight)


@pytest.fixture
def saved_adapter(tmp_path):
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4))
    train(model, steps=1)
    return save_adapter(model, tmp_path / "adapter")


def test_truncated_weights_give_one_line_error(saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterError, match="adapter_model.safetensors: corrupt or truncated") as error:
        load_adapter(tiny_llama(), saved_adapter)
    assert "\n" not in str(error.value)


def test_corrupt_config_names_the_file(saved_adapter):
    (saved_adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"adapter_config.json: not valid JSON"):
        load_adapter(tiny_llama(), saved_adapter)


def test_missing_file_is_named(saved_adapter):
    (saved_adapter / "lorasp_masks.safetensors").unlink()
    with pytest.raises(AdapterError, match="lorasp_masks.safetensors: missing"):
        load_adapter(tiny_llama(), saved_adapter)


def test_wrong_base_model_is_refused(saved_adapter):
    with pytest.raises(AdapterError, match=r"has shape \(4, \d+\) but this base model needs \(4, \d+\)"):
        load_adapter(tiny_llama(hidden_size=64, intermediate_size=96), saved_adapter)
    with pytest.raises(AdapterError, match="does not exist in the base model"):
        load_adapter(tiny_gpt2(), saved_adapter)


def test_same_shape_other_base_is_refused(saved_adapter):
    with pytest.raises(AdapterError, match="trained on another base model"):
        load_adapter(tiny_llama(seed=1), saved_adapter)


def test_tampered_mask_is_refused(saved_adapter):
    from safetensors.torch import load_file, save_file

    path = saved_adapter / "lorasp_masks.safetensors"
    packed = load_file(str(path))
    key = sorted(packed)[0]
    packed[key] = packed[key] ^ 1
    save_file(packed, str(path))
    with pytest.raises(AdapterError, match="masks do not match the sha256 recorded"):
        load_adapter(tiny_llama(), saved_adapter)


def test_adapter_written_before_the_hash_loads_and_a_tampered_count_is_refused(saved_adapter):
    from safetensors.torch import load_file, save_file

    info_path = saved_adapter / "lorasp.json"
    info = json.loads(info_path.read_text())
    del info["masks_sha256"]
    info_path.write_text(json.dumps(info))
    loaded = load_adapter(tiny_llama(), saved_adapter)
    assert count_parameters(loaded)["trainable"] == 1856
    path = saved_adapter / "lorasp_masks.safetensors"
    packed = load_file(str(path))
    key = sorted(packed)[0]
    packed[key] = packed[key] ^ 1
    save_file(packed, str(path))
    with pytest.raises(AdapterError, match=r"freezes \d+ entries, ratio 0.5 means"):
        load_adapter(tiny_llama(), saved_adapter)


def test_masks_come_from_the_file_when_the_generator_changed(saved_adapter, monkeypatch):
    stored = {(n, p): l.lorasp_trainable for n, p, l in lora_matrices(load_adapter(tiny_llama(), saved_adapter))}
    original = masklib.draw_frozen_mask
    # A torch release with another random stream: every draw differs from the one saved.
    monkeypatch.setattr(masklib, "draw_frozen_mask", lambda shape, ratio, seed, *rest: original(shape, ratio, seed + 1, *rest))
    with pytest.warns(MaskGeneratorWarning, match=r"28 stored mask\(s\) differ .* the stored masks are used"):
        loaded = load_adapter(tiny_llama(), saved_adapter)
    for name, part, linear in lora_matrices(loaded):
        assert torch.equal(linear.lorasp_trainable, stored[(name, part)])

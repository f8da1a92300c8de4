"""The fused LoRA linear (lorasp_edge.train.lora_linear): PEFT's function, one addmm fewer passes.

Against PEFT's own Linear on the same base and the same LoRA values: equal logits and equal
gradients (fp32: to rounding; bf16 autocast: to bf16 rounding), PEFT's fallbacks where the fused
forward does not apply, and PEFT's layer kept for quantized bases.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from test_adapter import LINEAR_NAMES, quantized_tiny_llama, tiny_llama, tokens

from lorasp_edge.train.adapter import LoRASPConfig, apply_lorasp, lora_layers
from lorasp_edge.train.lora_linear import FusedLoraLinear


def twins(dtype=torch.float32, dropout=0.0):
    """The same tiny llama with PEFT's layer and with the fused one, B random (B = 0 tests nothing)."""
    models = []
    for fused in (False, True):
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LINEAR_NAMES)
        if fused:
            config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
        torch.manual_seed(3)
        model = get_peft_model(tiny_llama().to(dtype), config)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(5)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        models.append(model)
    assert all(type(layer) is PeftLoraLinear for layer in lora_layers(models[0]).values())
    assert all(type(layer) is FusedLoraLinear for layer in lora_layers(models[1]).values())
    return models


def gradients(model, x, autocast_dtype=None):
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(x, labels=x)
    out.loss.backward()
    return out.logits.float(), {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}


def test_fp32_equals_peft_logits_and_gradients():
    peft, fused = twins()
    x = tokens()
    (logits_p, grads_p), (logits_f, grads_f) = gradients(peft, x), gradients(fused, x)
    torch.testing.assert_close(logits_f, logits_p, rtol=0, atol=1e-5)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) == 2 * 7 * 2
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_is_as_close_to_fp32_as_peft():
    """A bf16 base with fp32 LoRA weights under bf16 autocast, as a bf16 plan trains: both layers
    round differently (PEFT rounds B's output, its scaled copy and the sum; addmm once), so each
    is held against the same model in fp32, and the fused one must be no further from it."""
    peft, fused = twins(torch.bfloat16)
    for model in (peft, fused):  # PEFT keeps LoRA weights in fp32 (autocast_adapter_dtype)
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    reference = copy.deepcopy(peft).float()  # the same bf16-rounded base weights, computed in fp32
    x = tokens()
    logits_r, grads_r = gradients(reference, x)
    (logits_p, grads_p), (logits_f, grads_f) = gradients(peft, x, torch.bfloat16), gradients(fused, x, torch.bfloat16)
    assert (logits_f - logits_r).abs().max() <= 1.5 * (logits_p - logits_r).abs().max() + 1e-3
    for name in grads_r:
        error_p = float((grads_p[name] - grads_r[name]).norm() / grads_r[name].norm())
        error_f = float((grads_f[name] - grads_r[name]).norm() / grads_r[name].norm())
        assert error_f < 0.05 and error_f <= 1.5 * error_p + 5e-3, (name, error_f, error_p)


def test_peft_forward_where_the_fused_one_does_not_apply():
    peft, fused = twins()
    x = tokens()
    with peft.disable_adapter(), fused.disable_adapter():  # adapters off: the base alone
        torch.testing.assert_close(fused(x).logits, peft(x).logits, rtol=0, atol=0)
    # bf16 input to fp32 weights outside autocast: PEFT casts it, so the fused layer hands over.
    layer = next(iter(lora_layers(fused).values()))
    assert not layer._fusable(torch.zeros(2, 32, dtype=torch.bfloat16), {})
    assert layer._fusable(torch.zeros(2, 32), {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fusable(torch.zeros(2, 32, dtype=torch.bfloat16), {})
    fused.merge_adapter()
    peft.merge_adapter()
    torch.testing.assert_close(fused(x).logits, peft(x).logits, rtol=0, atol=1e-5)


def test_dropout_runs_on_the_lora_path_only():
    peft, fused = twins(dropout=0.5)
    x = tokens()
    peft.eval(), fused.eval()  # dropout off in eval: equal
    torch.testing.assert_close(fused(x).logits, peft(x).logits, rtol=0, atol=1e-5)
    fused.train()
    torch.manual_seed(0)
    first = fused(x).logits
    torch.manual_seed(1)
    assert not torch.equal(first, fused(x).logits)  # dropout acts in training


def test_lorasp_uses_it_on_float_bases_and_peft_on_quantized(tmp_path):
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4))
    assert {type(layer) for layer in lora_layers(model).values()} == {FusedLoraLinear}
    quantized = apply_lorasp(quantized_tiny_llama(tmp_path, 4), LoRASPConfig(rank=4))
    assert not any(isinstance(layer, FusedLoraLinear) for layer in lora_layers(quantized).values())


@pytest.mark.parametrize("init", ["zeros", "offset"])
def test_lorasp_model_equals_its_peft_twin(init):
    """LoRA-SP on the fused layer against the same LoRA-SP model with PEFT's layer swapped back in."""
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=4, alpha=8, init=init, seed=2))
    twin = copy.deepcopy(model)
    for layer in lora_layers(twin).values():
        layer.__class__ = PeftLoraLinear
    x = tokens()
    losses = []
    for m in (model, twin):
        loss = m(x, labels=x).loss
        loss.backward()
        losses.append((float(loss), m.lorasp_store.values.grad.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-4, atol=1e-7)


def test_one_function_equals_the_three_ops_with_a_bias():
    """LoraLinearFunction against base linear + A + addmm as separate autograd ops, fp32, with a bias."""
    from lorasp_edge.train.lora_linear import LoraLinearFunction

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=generator, requires_grad=True)
    weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
    a = torch.randn(4, 24, generator=generator, requires_grad=True)
    b = torch.randn(40, 4, generator=generator, requires_grad=True)
    out = LoraLinearFunction.apply(x, weight, bias, a, b, 2.0, None)
    grad = torch.randn(out.shape, generator=generator)
    fused = torch.autograd.grad(out, (x, a, b), grad)
    reference_out = torch.nn.functional.linear(x, weight, bias) + 2.0 * (x @ a.t()) @ b.t()
    reference = torch.autograd.grad(reference_out, (x, a, b), grad)
    torch.testing.assert_close(out, reference_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # An input that needs no gradient (the first layer's, under a frozen embedding): A's and B's
    # gradients are the same without it.
    out = LoraLinearFunction.apply(x.detach(), weight, bias, a, b, 2.0, None)
    for got, want in zip(torch.autograd.grad(out, (a, b), grad), reference[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A weight made by `dequantize` (a 4-bit base) gives the same as the weight passed in.
    out = LoraLinearFunction.apply(x, None, bias, a, b, 2.0, lambda: weight.clone())
    for got, want in zip(torch.autograd.grad(out, (x, a, b), grad), reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_model_runs_the_one_function_where_it_applies():
    _, fused = twins()
    layer = next(iter(lora_layers(fused).values()))
    x = torch.randn(2, 3, layer.in_features)
    assert type(layer(x).grad_fn).__name__ == "LoraLinearFunctionBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's casts, then the function in bf16
        out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ == "LoraLinearFunctionBackward"
    out.float().sum().backward()
    assert {p.grad.dtype for n, p in layer.named_parameters() if "lora_" in n} == {torch.float32}
    _, with_dropout = twins(dropout=0.5)  # A reads a dropped-out input: the three ops
    layer = next(iter(lora_layers(with_dropout).values()))
    assert type(layer(x).grad_fn).__name__ != "LoraLinearFunctionBackward"


def _quantized_twins(tmp_path, compute_dtype=torch.float32):
    """A LoRA-SP model on a 4-bit base with the fused 4-bit layer, and the same with PEFT's put back."""
    from lorasp_edge.models import load_model
    from lorasp_edge.train.lora_linear import FusedLoraLinear4bit, PeftLoraLinear4bit

    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    base = load_model(str(tmp_path / "base"), quant_bits=4, compute_dtype=compute_dtype, device="cpu")
    model = apply_lorasp(base, LoRASPConfig(rank=4, alpha=8, init="offset", seed=2))
    assert {type(layer) for layer in lora_layers(model).values()} == {FusedLoraLinear4bit}
    twin = copy.deepcopy(model)
    for layer in lora_layers(twin).values():
        layer.__class__ = PeftLoraLinear4bit
    return model, twin


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_4bit_one_function_equals_peft_layer(tmp_path, compute_dtype):
    """The same NF4 weights dequantized the same way: the loss and LoRA-SP gradient of PEFT's 4-bit
    layer. fp32: to rounding. bf16 (under autocast, as a bf16 plan trains): PEFT rounds the adapter's
    output, its scaled copy and the sum in bf16, addmm_ once, so to bf16 rounding."""
    model, twin = _quantized_twins(tmp_path, compute_dtype)
    x = tokens()
    results = []
    for m in (model, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16):
            out = m(x, labels=x)
            probe = next(iter(lora_layers(m).values()))
            grad_fn = type(probe(torch.randn(2, probe.in_features, dtype=compute_dtype)).grad_fn).__name__
        out.loss.backward()
        results.append((float(out.loss), m.lorasp_store.values.grad.clone(), grad_fn))
    assert results[0][2] == "LoraLinearFunctionBackward" and results[1][2] != "LoraLinearFunctionBackward"
    if compute_dtype == torch.float32:
        assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
    else:
        assert results[0][0] == pytest.approx(results[1][0], rel=1e-2)
        assert float((results[0][1] - results[1][1]).norm() / results[1][1].norm()) < 0.05


def test_4bit_layer_outside_training_is_peft_forward(tmp_path):
    model, twin = _quantized_twins(tmp_path)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, twin(x).logits, rtol=0, atol=0)
    # Under bf16 autocast over an fp32-compute base, bitsandbytes computes in fp32: PEFT's forward.
    layer = next(iter(lora_layers(model).values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._compute_dtype(torch.zeros(2, layer.in_features, dtype=torch.bfloat16)) is None
    assert layer._compute_dtype(torch.zeros(2, layer.in_features)) == torch.float32

"""The chunked loss equals transformers' own causal-LM loss."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from lorasp_edge.train.loss import ChunkedCausalLMLoss, valid_targets


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_chunked_loss_equals_model_loss(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if kind == "gemma2":  # soft-capped logits (final_logit_softcapping=30)
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, final_logit_softcapping=30.0)).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(**common)).eval()
    ids = torch.randint(0, 120, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :7] = -100  # a masked prompt
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss
        loss, _ = ChunkedCausalLMLoss(model, chunk_tokens=7)(ids, labels, valid_targets(labels))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_plain_path_when_the_logits_fit_same_loss_and_gradient_without_recompute():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).train()
    ids = torch.randint(0, 120, (3, 20), generator=torch.Generator().manual_seed(1))
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    results = {}
    for chunk in (7, 57):  # 3 x 19 = 57 targets: chunks of 7 recompute, 57 is the plain path
        calls.clear()
        model.zero_grad()
        loss, _ = ChunkedCausalLMLoss(model, chunk_tokens=chunk)(ids, ids, valid_targets(ids))
        loss.backward()
        results[chunk] = (loss.detach(), model.model.embed_tokens.weight.grad.clone(), len(calls))
    assert results[7][2] == 2 * 9  # 9 chunks, each run again in backward
    assert results[57][2] == 1
    torch.testing.assert_close(results[57][0], results[7][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[57][1], results[7][1], rtol=1e-5, atol=1e-7)


def test_lm_head_runs_only_at_targets_with_the_same_loss_and_gradients():
    """Prompt positions are dropped before lm_head: on a batch with 85% of positions masked, lm_head
    sees exactly the target rows, and the loss and every gradient equal transformers' loss over all
    positions (fp32 tolerance)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).train()
    ids = torch.randint(0, 120, (4, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :34] = -100  # 6 of 40 positions trained: the reply after a long prompt
    rows = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].numel() // inputs[0].shape[-1]))
    loss, _ = ChunkedCausalLMLoss(model, chunk_tokens=1024)(ids, labels, valid_targets(labels))
    loss.backward()
    ours = {name: param.grad.clone() for name, param in model.named_parameters()}
    assert rows == [valid_targets(labels)] == [4 * 6]
    model.zero_grad()
    rows.clear()
    expected = model(input_ids=ids, labels=labels).loss
    expected.backward()
    assert rows == [4 * 40]
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_summed_cross_entropy_equals_torch_and_runs_backward_once():
    from lorasp_edge.train.loss import SummedCrossEntropy

    torch.manual_seed(0)
    logits = (torch.randn(37, 1000) * 4).requires_grad_()
    targets = torch.randint(0, 1000, (37,))
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / 11
    (expected_grad,) = torch.autograd.grad(expected, logits)
    ours = SummedCrossEntropy.apply(logits, targets) / 11  # a scaled incoming gradient, as the trainer's normalizer gives
    (grad,) = torch.autograd.grad(ours, logits, retain_graph=True)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert abs(float(grad.sum())) < 1e-5  # each row: softmax minus one-hot sums to zero
    with pytest.raises(RuntimeError, match="runs once per forward"):
        torch.autograd.grad(ours, logits)

"""Whole-example packing: packed examples compute exactly what they compute alone.

The stream restarts position ids at each prompt/completion or chat example; transformers turns
restarting position ids into a block-diagonal causal mask (masking_utils.find_packed_sequence_indices).
These tests check that numerically on CPU, for the attention kernels and model families used here.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_data import word_tokenizer

from lorasp_edge.train.data import PackedStream
from lorasp_edge.train.loss import ChunkedCausalLMLoss


def tiny_model(arch: str, attention: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation=attention))
    else:
        fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attention)
        model = Qwen2ForCausalLM(Qwen2Config(**fields)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**fields))
    # As build_model does: with a cache, transformers skips the packed-sequence detection.
    model.config.use_cache = False
    return model.eval()


def token_losses(model, ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Per-position CE of predicting labels[t + 1] (0 where masked), fp32."""
    with torch.no_grad():
        logits = model(input_ids=ids[None], position_ids=None if position_ids is None else position_ids[None]).logits[0].float()
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")


def segments(position_ids: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts[:-1], starts[1:]))


def packed_file(tmp_path):
    records = [
        {"prompt": "1 2 3", "completion": "4 5"},
        {"prompt": "6", "completion": "7 8 9 10"},
        {"messages": [{"role": "user", "content": "11 12"}, {"role": "assistant", "content": "13"}]},
        {"prompt": "14 15", "completion": "16"},
        {"text": "20 21 22"},
        {"prompt": "30 31 32 33", "completion": "34 35"},
        {"prompt": "40 41", "completion": "42 43 44"},  # does not fit: padding ends block 2
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("arch, attention", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("gpt2", "sdpa"), ("gpt2", "eager")])
def test_packed_examples_give_the_loss_they_give_alone(tmp_path, arch, attention):
    model = tiny_model(arch, attention)
    stream = PackedStream(packed_file(tmp_path), word_tokenizer(), seq_len=20, epochs=1)
    blocks = list(stream)
    assert len(blocks) == 2
    compared = 0
    for block in blocks:
        ids, labels, positions = block["input_ids"], block["labels"], block["position_ids"]
        packed = token_losses(model, ids, labels, positions)
        assert len(segments(positions.tolist())) >= 2  # several examples share this block
        for start, end in segments(positions.tolist()):
            alone = token_losses(model, ids[start:end], labels[start:end], None)
            # Position t's loss predicts t + 1: a segment's last position predicts the next segment's
            # first token, which is masked (a whole example's first token is never a target).
            together = packed[start : end - 1]
            assert labels[end - 1 + 1 :][:1].tolist() in ([], [-100])
            torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
            compared += int((labels[start + 1 : end] != -100).sum())
    # every trained token but a run's first: completions + eos, the assistant turn + end marker + eos, text + eos
    assert compared == 3 + 5 + 3 + 2 + 3 + 3


def test_without_position_ids_packed_examples_see_each_other(tmp_path):
    """The check above can fail: today's packing (positions 0..seq_len-1) changes the losses."""
    model = tiny_model("llama", "sdpa")
    (block, _) = list(PackedStream(packed_file(tmp_path), word_tokenizer(), seq_len=20, epochs=1))
    ids, labels, positions = block["input_ids"], block["labels"], block["position_ids"]
    start, end = segments(positions.tolist())[1]
    alone = token_losses(model, ids[start:end], labels[start:end], None)
    continuous = token_losses(model, ids, labels, None)[start : end - 1]
    assert (continuous - alone).abs().max() > 1e-3


def test_chunked_loss_with_position_ids_sums_the_examples_alone(tmp_path):
    model = tiny_model("llama", "sdpa")
    loss = ChunkedCausalLMLoss(model, chunk_tokens=5).eval()
    blocks = list(PackedStream(packed_file(tmp_path), word_tokenizer(), seq_len=20, epochs=1))
    batch = {key: torch.stack([b[key] for b in blocks]) for key in blocks[0]}
    with torch.no_grad():
        _, packed = loss(batch["input_ids"], batch["labels"], 1.0, position_ids=batch["position_ids"])
        alone = sum(
            loss(b["input_ids"][None, s:e], b["labels"][None, s:e], 1.0)[1]
            for b in blocks for s, e in segments(b["position_ids"].tolist())
        )
    assert abs(float(packed) - float(alone)) <= 1e-5 * float(alone)

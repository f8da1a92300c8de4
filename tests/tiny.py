"""Tiny models and tokenizers for tests: built from a config, tokenizer trained here (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus(lines: int = 400) -> list[str]:
    """A learnable corpus: counting sequences and simple sentences."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    text = []
    for i in range(lines):
        start = i % 20
        text.append(" ".join(str(n) for n in range(start, start + 12)))
        text.append(" ".join(words[(i + k) % len(words)] for k in range(8)))
    return text


def train_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def make_model_dir(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny randomly initialised causal LM and a trained tokenizer into `path`."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = train_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, **overrides)
        model = GPT2LMHeadModel(config)
    else:
        fields = dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        ) | overrides
        model = (Qwen2ForCausalLM(Qwen2Config(**fields)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**fields)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_text_jsonl(path: Path, lines: int = 400) -> Path:
    import json

    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus(lines)))
    return path


def train_adapter(base_dir, adapter_dir, quant_bits=None, steps=5, seed=1, init="zeros"):
    """A few optimizer steps, so B != 0 and the merge changes the weights; saved like `train` does."""
    from transformers import AutoTokenizer

    from lorasp_edge.models import load_model
    from lorasp_edge.train.adapter import LoRASPConfig, apply_lorasp, trainable_parameters
    from lorasp_edge.train.adapter_files import save_adapter
    from lorasp_edge.train.optim import LoRASPAdamW

    model = load_model(str(base_dir), quant_bits=quant_bits, device="cpu")
    peft_model = apply_lorasp(model, LoRASPConfig(rank=4, alpha=8, seed=seed, init=init))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batch = tokenizer(corpus(4)[:4], return_tensors="pt", padding=True).input_ids
    optimizer = LoRASPAdamW(trainable_parameters(peft_model), lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        peft_model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    info = {"base_model": str(base_dir), "base_quant_bits": quant_bits, "compute_dtype": "float32", "plan": {"rank": 4}}
    save_adapter(peft_model.eval(), adapter_dir, info)
    return adapter_dir


def leftovers(folder):
    """Anything an export left beside its target (temp folders start with a dot)."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def export_a_different_model(monkeypatch):
    """Make every ONNX export write a graph whose final norm is 1.5x the merged model's, so its
    verification against PyTorch fails."""
    from types import SimpleNamespace

    from lorasp_edge.export import onnx_writer

    real_build = onnx_writer.build_decoder

    def build(config, weights, *args, **kwargs):
        def read(key):
            return weights.read(key) * (1.5 if key == "model.norm.weight" else 1.0)

        return real_build(config, SimpleNamespace(keys=weights.keys, read=read), *args, **kwargs)

    monkeypatch.setattr(onnx_writer, "build_decoder", build)

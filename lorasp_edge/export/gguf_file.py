"""The merged model as one GGUF file for llama.cpp and Ollama, written with the `gguf` package.

    merged fp32 model --tensor names (gguf.TensorNameMap), Q/K row order for llama.cpp's RoPE-->
      GGUF tensors in f32/f16/bf16 or a block type gguf.quants can write (q8_0, q5_0/1, q4_0/1)
    config.json       --> architecture keys (gguf.Keys: block count, heads, RoPE base, norm eps, ...)
    tokenizer         --> byte-level BPE vocab, token types, merges, pre-tokenizer name, special ids,
                          chat template (gguf.SpecialVocab reads the saved tokenizer files)

What follows llama.cpp's own converter (convert_hf_to_gguf.py, ggml-org/llama.cpp):
- Llama and Mistral are architecture `llama`, whose RoPE pairs adjacent dimensions, while Hugging
  Face pairs dimension i with i + head_dim/2: Q and K rows are permuted per head to match. Qwen2
  and Qwen3 run NeoX-style RoPE in llama.cpp and keep Hugging Face's order.
- The pre-tokenizer is named by hashing the token ids of llama.cpp's probe text (`PROBE_TEXT`);
  a tokenizer the table does not know is accepted when its tokenizer.json is plain GPT-2 byte-level.
- A 2-D weight whose rows do not fill whole blocks is stored f16, as llama.cpp's quantizer does.
Beyond it: for 4/5-bit types the embedding table (also the output head when tied) and the output
head are stored q8_0, as llama.cpp's quantize keeps the output head at a higher precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorasp_edge.errors import UserError
from lorasp_edge.families import GGUF_BPE_TOKENIZER, KNOWN_PRE_TOKENIZERS, PROBE_TEXT, SPLIT_PATTERNS, family_of, supported

from lorasp_edge.export.formats.gguf import GGUF_BITS, GGUF_TYPES
def unsupported_reason(config) -> str | None:
    """Why this model cannot be written as GGUF (its family has no llama.cpp architecture, or its RoPE
    is one llama.cpp is not told here), or None."""
    entry = family_of(config)
    if entry is None or entry.gguf_architecture is None:
        return f"--format gguf supports the model types {', '.join(supported('gguf_architecture'))}, not '{getattr(config, 'model_type', None)}'"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear"):
        return f"--format gguf: RoPE type '{rope.get('rope_type', rope.get('type'))}' is not supported (default and linear are)"
    return None


def quant_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


# ------------------------------------------------------------------------------------ tokenizer


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    pre: str


def pre_tokenizer_name(tokenizer) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = (json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None) or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's own regex, which llama.cpp's 'gpt-2' pre-tokenizer runs
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True):
        name = SPLIT_PATTERNS.get(parts[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise UserError(
        "--format gguf: this tokenizer's pre-tokenizer is not one llama.cpp names here "
        "(supported: byte-level BPE of SmolLM, Qwen2, Llama 3, Mistral Nemo, GPT-2)"
    )


def vocab(tokenizer, vocab_size: int) -> Vocab:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError("--format gguf needs a byte-level BPE tokenizer (tokenizer.json, GPT-2 style); this model's is not")
    pre = pre_tokenizer_name(tokenizer)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= vocab_size:
        raise UserError(f"--format gguf: the tokenizer has ids up to {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            if index in added:
                types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
    return Vocab(tokens, [int(t) for t in types], pre)


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    found = vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model(GGUF_BPE_TOKENIZER)
    writer.add_tokenizer_pre(found.pre)
    writer.add_token_list(found.tokens)
    writer.add_token_types(found.types)
    with tempfile.TemporaryDirectory(prefix="lorasp-gguf-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise UserError("--format gguf: the tokenizer has no BPE merges to write")
    # Whether llama.cpp prepends BOS: what the Hugging Face tokenizer does, not a config default.
    first = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(first) and tokenizer.bos_token_id is not None and first[0] == tokenizer.bos_token_id
    special.add_to_gguf(writer, quiet=True)


# -------------------------------------------------------------------------------------- tensors


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half row order -> llama.cpp's interleaved pairs, per head."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def architecture(config) -> tuple[str, bool]:
    """(gguf.MODEL_ARCH member name, Q/K rows permuted) from the model's family entry."""
    reason = unsupported_reason(config)
    if reason:
        raise UserError(reason)
    entry = family_of(config)
    return entry.gguf_architecture, entry.gguf_permute_qk


def tied(config, weights) -> bool:
    """Whether the output head is the embedding table (then stored once, as llama.cpp reads it)."""
    return bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in set(weights.keys())


def planned_tensors(config, weights, type_name: str) -> list[tuple[str, str, str]]:
    """(Hugging Face name, GGUF name, GGUF type name) for every tensor the file holds; `weights` is a
    key -> tensor view (lorasp_edge.export.sources.weights) of the model to write."""
    import gguf

    arch, _ = architecture(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], config.num_hidden_layers)
    block = gguf.GGML_QUANT_SIZES[quant_type(type_name)][0] if type_name.startswith("q") else 1
    skip_head = tied(config, weights)
    planned = []
    for hf_name in weights.keys():
        if hf_name == "lm_head.weight" and skip_head:
            continue
        shape = weights.shape(hf_name)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"--format gguf: no llama.cpp name for tensor '{hf_name}'")
        if len(shape) == 1 or type_name == "f32":
            kind = "f32"
        elif shape[-1] % block:
            kind = "f16"
        elif GGUF_BITS[type_name] < 8 and gguf_name in ("token_embd.weight", "output.weight"):
            kind = "q8_0"
        else:
            kind = type_name
        planned.append((hf_name, gguf_name, kind))
    return planned


def _tensor_data(tensor: torch.Tensor, hf_name: str, config, permute: bool, kind: str) -> np.ndarray:
    import gguf

    data = tensor.detach().float().cpu().numpy()
    if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        data = permute_rows(data, config.num_attention_heads)
    elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        data = permute_rows(data, config.num_key_value_heads)
    if kind == "f32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if kind == "f16":
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data), quant_type(kind))


def _file_type(type_name: str):
    import gguf

    return gguf.LlamaFileType.ALL_F32 if type_name == "f32" else gguf.LlamaFileType[f"MOSTLY_{type_name.upper()}"]


# ---------------------------------------------------------------------------------------- file


def write_gguf_file(config, weights, tokenizer, path: Path, type_name: str, name: str = "model") -> Path:
    """Write a transformers causal LM, given as its config and a key -> tensor view of its weights
    (lorasp_edge.export.sources.weights: a model in memory, or safetensors shards on disk), and its tokenizer
    to one GGUF file at `path`. Tensors are read and converted one at a time while writing, so memory
    holds one tensor and its converted copy at most."""
    import gguf

    if type_name not in GGUF_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, not '{type_name}'")
    arch, permute = architecture(config)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(type_name))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    plan = planned_tensors(config, weights, type_name)
    for hf_name, gguf_name, kind in plan:
        shape = tuple(weights.shape(hf_name))
        if kind in ("f32", "f16"):
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32 if kind == "f32" else np.float16), int(np.prod(shape)) * (4 if kind == "f32" else 2))
        else:
            qtype = quant_type(kind)
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    path = Path(path)
    logger = logging.getLogger("gguf.gguf_writer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs the file list at INFO
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, _gguf_name, kind in plan:
            writer.write_tensor_data(_tensor_data(weights.read(hf_name), hf_name, config, permute, kind))
        writer.close()
    finally:
        logger.setLevel(level)
    return path

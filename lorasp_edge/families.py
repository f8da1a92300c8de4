"""Architecture families as data: one declarative entry per `model_type`, below every stage.

This module is the only place in the package that names a model type or states a fact about one
(tests/test_families.py holds every other module to that). The planner, the trainer and the
exporter ask the entry; adding a family is one entry here (and its config in tests/test_families.py,
which builds the transformers model from a small config and checks the entry against it):

    linears          (PEFT short name, input width, output width) in forward order; widths are
                     expressions over h (hidden), i (intermediate), q (heads x head_dim), kv (kv heads x head_dim)
    input_groups     linears that read one same input tensor, in forward order (saved-input accounting)
    targets          the planner's target choices: all linears, attention only, the original LoRA pair
    norms            norms per decoder layer, and their kind (RMSNorm keeps no bias; LayerNorm does)
    attention        "sdpa" or "eager" (Gemma 2's logit soft-capping needs eager), sliding window or not
    fused_qkv        q, k, v come from one linear (a view of its output keeps all of it alive)
    linear_bias      which linears carry a bias: "none", "qkv" (Qwen2 hard-codes it) or "all" (GPT-2)
    activation, qk_norm, tie_embeddings (transformers' default), logit_softcap (loss),
    learned_positions (GPT-2's position table), config_names (the config.json field of each shape)
    conv1d           linear weights stored transposed, (in, out): transformers' Conv1D (GPT-2)
    transformers_class  the class AutoModelForCausalLM builds for it
    onnx_export      lorasp_edge.export.onnx_build writes its graph
    gguf_architecture, gguf_permute_qk   llama.cpp's architecture for it, and whether Q and K rows are
                     permuted for llama.cpp's RoPE (convert_hf_to_gguf.py: Llama and Mistral run
                     interleaved RoPE there; Qwen2/3 run NeoX-style and keep Hugging Face's order)

Below the families, what llama.cpp calls their tokenizers (convert_hf_to_gguf.py, get_vocab_base_pre).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasp_edge.errors import UserError

LLAMA_LINEARS = (("q_proj", "h", "q"), ("k_proj", "h", "kv"), ("v_proj", "h", "kv"), ("o_proj", "q", "h"),
                 ("gate_proj", "h", "i"), ("up_proj", "h", "i"), ("down_proj", "i", "h"))
LLAMA_GROUPS = (("h", ("q_proj", "k_proj", "v_proj")), ("q", ("o_proj",)), ("h", ("gate_proj", "up_proj")), ("i", ("down_proj",)))
LLAMA_TARGETS = (None, ("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj"))


@dataclass(frozen=True)
class ConfigNames:
    """Where a config.json keeps each shape field, and the value transformers takes when it is absent
    (None: the field is required; "hidden" / "heads": that field's value, times `intermediate_factor`)."""

    hidden_size: str = "hidden_size"
    intermediate_size: str = "intermediate_size"
    num_layers: str = "num_hidden_layers"
    num_heads: str = "num_attention_heads"
    num_kv_heads: str = "num_key_value_heads"  # absent: as many as the heads
    max_positions: str = "max_position_embeddings"
    intermediate_factor: int | None = None  # absent intermediate size: this x hidden (GPT-2's 4h)
    default_positions: int | None = None  # absent max_positions (GPT-2's 1024)


@dataclass(frozen=True)
class Family:
    model_type: str
    transformers_class: str
    linears: tuple[tuple[str, str, str], ...] = LLAMA_LINEARS
    input_groups: tuple[tuple[str, tuple[str, ...]], ...] = LLAMA_GROUPS
    targets: tuple[tuple[str, ...] | None, ...] = LLAMA_TARGETS  # None: every linear
    norms_per_layer: int = 2
    norm_kind: str = "rms"
    attention: str = "sdpa"
    sliding_window: bool = False
    fused_qkv: bool = False
    activation: str = "silu"
    qk_norm: bool = False
    linear_bias: str = "none"
    tie_embeddings: bool = False
    logit_softcap: bool = False
    learned_positions: bool = False
    config_names: ConfigNames = ConfigNames()
    conv1d: bool = False
    onnx_export: bool = False
    gguf_architecture: str | None = None  # gguf.MODEL_ARCH member name; None: no GGUF export
    gguf_permute_qk: bool = False

    def has_bias(self, name: str) -> bool:
        return self.linear_bias == "all" or (self.linear_bias == "qkv" and name in ("q_proj", "k_proj", "v_proj"))

    def width(self, expression: str, h: int, i: int, q: int, kv: int) -> int:
        """An input/output width expression ("h", "q+2kv", "3h", ...) for one model's sizes."""
        total = 0
        for term in expression.split("+"):
            factor, name = (int(term[0]), term[1:]) if term[0].isdigit() else (1, term)
            total += factor * {"h": h, "i": i, "q": q, "kv": kv}[name]
        return total


FAMILIES = {
    family.model_type: family
    for family in (
        Family("llama", "LlamaForCausalLM", onnx_export=True, gguf_architecture="LLAMA", gguf_permute_qk=True),
        Family("mistral", "MistralForCausalLM", sliding_window=True, gguf_architecture="LLAMA", gguf_permute_qk=True),
        Family("qwen2", "Qwen2ForCausalLM", linear_bias="qkv", onnx_export=True, gguf_architecture="QWEN2"),
        Family("qwen3", "Qwen3ForCausalLM", qk_norm=True, onnx_export=True, gguf_architecture="QWEN3"),
        Family("gemma", "GemmaForCausalLM", activation="gelu_tanh", tie_embeddings=True),
        Family("gemma2", "Gemma2ForCausalLM", norms_per_layer=4, attention="eager", sliding_window=True, activation="gelu_tanh",
               tie_embeddings=True, logit_softcap=True),
        Family(
            "phi3", "Phi3ForCausalLM",
            linears=(("qkv_proj", "h", "q+2kv"), ("o_proj", "q", "h"), ("gate_up_proj", "h", "2i"), ("down_proj", "i", "h")),
            input_groups=(("h", ("qkv_proj",)), ("q", ("o_proj",)), ("h", ("gate_up_proj",)), ("i", ("down_proj",))),
            targets=(None, ("qkv_proj", "o_proj"), ("qkv_proj",)),
            fused_qkv=True,
        ),
        Family(
            "gpt2", "GPT2LMHeadModel",
            # GPT-2's Conv1D layers; attn.c_proj and mlp.c_proj share a short name.
            linears=(("c_attn", "h", "3h"), ("c_proj", "h", "h"), ("c_fc", "h", "i"), ("c_proj", "i", "h")),
            input_groups=(("h", ("c_attn",)), ("h", ("c_proj",)), ("h", ("c_fc",)), ("i", ("c_proj",))),
            targets=(None, ("c_attn", "c_proj"), ("c_attn",)),
            norm_kind="layer",
            activation="gelu_new",
            linear_bias="all",
            tie_embeddings=True,
            learned_positions=True,
            config_names=ConfigNames("n_embd", "n_inner", "n_layer", "n_head", "n_head", "n_positions", intermediate_factor=4,
                                     default_positions=1024),
            conv1d=True,
        ),
    )
}


def family(model_type: str | None, source: str = "config") -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UserError(f"{source}: model_type '{model_type}' is not supported (supported: {', '.join(FAMILIES)})") from None


def family_of(config) -> Family | None:
    """The entry for a transformers config object or a config.json dict, None for a type not listed."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return FAMILIES.get(model_type)


def supported(fact: str) -> tuple[str, ...]:
    """The model types whose entry has `fact` set (e.g. "onnx_export", "gguf_architecture")."""
    return tuple(name for name, entry in FAMILIES.items() if getattr(entry, fact))


# ------------------------------------------------------------------ llama.cpp's tokenizer names

# llama.cpp's name for a byte-level BPE vocabulary (tokenizer.ggml.model).
GGUF_BPE_TOKENIZER = "gpt2"
# llama.cpp's pre-tokenizer probe (convert_hf_to_gguf.py, get_vocab_base_pre) and the names it
# gives the sha256 of str(token ids) for the tokenizers of the families above.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 "
    "33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some "
    "tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}
# A tokenizer the hash table does not know (a new vocabulary) is still named when its tokenizer.json
# splits with one of these regexes before byte-level BPE: Qwen2's and Llama 3's (which groups up to
# three digits where Qwen2 splits each).
SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}

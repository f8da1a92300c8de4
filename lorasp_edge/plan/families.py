"""Architecture families as data: one declarative entry per `model_type`.

Everything the planner, the memory model and the exporter need to know about a family's decoder
layer lives here, so that adding a family is one entry (and its test in tests/plan/test_families.py,
which builds the transformers model from a small config and checks the entry against it):

    linears          (PEFT short name, input width, output width, bias) in forward order; widths are
                     expressions over h (hidden), i (intermediate), q (heads x head_dim), kv (kv heads x head_dim)
    input_groups     linears that read one same input tensor, in forward order (saved-input accounting)
    targets          the planner's target choices: all linears, attention only, the original LoRA pair
    norms            norms per decoder layer, and their kind (RMSNorm keeps no bias; LayerNorm does)
    attention        "sdpa" or "eager" (Gemma 2's logit soft-capping needs eager), sliding window or not
    fused_qkv        q, k, v come from one linear (a view of its output keeps all of it alive)
    linear_bias      which linears carry a bias: "none", "qkv" (Qwen2 hard-codes it) or "all" (GPT-2)
    activation, qk_norm, tie_embeddings (transformers' default), logit_softcap (loss),
    learned_positions (GPT-2's position table), config_style ("gpt2": n_embd, n_layer, ... field names),
    onnx_export (lorasp_edge.export.onnx_graph traces it)
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasp_edge.errors import UserError

LLAMA_LINEARS = (("q_proj", "h", "q"), ("k_proj", "h", "kv"), ("v_proj", "h", "kv"), ("o_proj", "q", "h"),
                 ("gate_proj", "h", "i"), ("up_proj", "h", "i"), ("down_proj", "i", "h"))
LLAMA_GROUPS = (("h", ("q_proj", "k_proj", "v_proj")), ("q", ("o_proj",)), ("h", ("gate_proj", "up_proj")), ("i", ("down_proj",)))
LLAMA_TARGETS = (None, ("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj"))


@dataclass(frozen=True)
class Family:
    model_type: str
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
    config_style: str = "llama"
    onnx_export: bool = False

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
        Family("llama", onnx_export=True),
        Family("mistral", sliding_window=True),
        Family("qwen2", linear_bias="qkv", onnx_export=True),
        Family("qwen3", qk_norm=True, onnx_export=True),
        Family("gemma", activation="gelu_tanh", tie_embeddings=True),
        Family("gemma2", norms_per_layer=4, attention="eager", sliding_window=True, activation="gelu_tanh", tie_embeddings=True,
               logit_softcap=True),
        Family(
            "phi3",
            linears=(("qkv_proj", "h", "q+2kv"), ("o_proj", "q", "h"), ("gate_up_proj", "h", "2i"), ("down_proj", "i", "h")),
            input_groups=(("h", ("qkv_proj",)), ("q", ("o_proj",)), ("h", ("gate_up_proj",)), ("i", ("down_proj",))),
            targets=(None, ("qkv_proj", "o_proj"), ("qkv_proj",)),
            fused_qkv=True,
        ),
        Family(
            "gpt2",
            # GPT-2's Conv1D layers; attn.c_proj and mlp.c_proj share a short name.
            linears=(("c_attn", "h", "3h"), ("c_proj", "h", "h"), ("c_fc", "h", "i"), ("c_proj", "i", "h")),
            input_groups=(("h", ("c_attn",)), ("h", ("c_proj",)), ("h", ("c_fc",)), ("i", ("c_proj",))),
            targets=(None, ("c_attn", "c_proj"), ("c_attn",)),
            norm_kind="layer",
            activation="gelu_new",
            linear_bias="all",
            tie_embeddings=True,
            learned_positions=True,
            config_style="gpt2",
        ),
    )
}


def family(model_type: str | None, source: str = "config") -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UserError(f"{source}: model_type '{model_type}' is not supported by the planner (supported: {', '.join(FAMILIES)})") from None

"""Each architecture family entry against the transformers model it describes (built from a small config),
and the family table as the only module of the package that names a model type.

Adding a family: one entry in lorasp_edge/families.py and one config here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import lorasp_edge
from lorasp_edge.export.gguf_file import unsupported_reason as gguf_reason
from lorasp_edge.export.onnx_graph import SUPPORTED_MODEL_TYPES, unsupported_reason
from lorasp_edge.families import FAMILIES
from lorasp_edge.plan.catalog import Architecture
from lorasp_edge.plan.search import target_choices

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=128, max_position_embeddings=64)
CONFIGS = {
    "llama": dict(SMALL, tie_word_embeddings=False),
    "mistral": dict(SMALL, tie_word_embeddings=False, sliding_window=32),
    "qwen2": dict(SMALL, tie_word_embeddings=True),
    "qwen3": dict(SMALL, tie_word_embeddings=True),
    "gemma": dict(SMALL),
    "gemma2": dict(SMALL),
    "phi3": dict(SMALL, num_key_value_heads=4, pad_token_id=0, tie_word_embeddings=False),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_inner=96, vocab_size=128, n_positions=64),
}


def build(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config)


def test_every_family_has_a_config_here():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_entry_matches_the_transformers_model(model_type):
    config, model = build(model_type)
    arch = Architecture.from_config(config.to_dict())
    layer = model.base_model.layers[0] if hasattr(model.base_model, "layers") else model.base_model.h[0]
    # Linear names, shapes and biases in the entry = the modules PEFT would target in one layer.
    found = {}
    for name, module in layer.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() == 2:
            d_in, d_out = (weight.shape[0], weight.shape[1]) if model_type == "gpt2" else (weight.shape[1], weight.shape[0])
            found[name] = (name.rsplit(".", 1)[-1], d_in, d_out, getattr(module, "bias", None) is not None)
    expected = sorted((linear.name, linear.d_in, linear.d_out, linear.bias) for linear in arch.linears())
    assert sorted(found.values()) == expected
    # Parameter count, norms and biases included, = the model's.
    assert arch.parameters()["total"] == sum(p.numel() for p in model.parameters())
    # Norms per layer: modules whose class name says norm.
    norms = [m for m in layer.modules() if "norm" in type(m).__name__.lower() and not any(True for _ in m.children())]
    family = FAMILIES[model_type]
    assert len(norms) == family.norms_per_layer + (2 if family.qk_norm else 0)
    # Target choices are module names of the layer.
    names = {n.rsplit(".", 1)[-1] for n in found}
    assert all(set(choice) <= names for choice in target_choices(arch))
    assert target_choices(arch)[0] == tuple(arch.module_names())
    # Tied embeddings default and the exporter's reading of the same entry.
    assert model.config.tie_word_embeddings == arch.tie_embeddings
    assert (model_type in SUPPORTED_MODEL_TYPES) == family.onnx_export
    if not family.onnx_export:
        assert "not supported for ONNX export" in unsupported_reason(config)
    # The transformers class, the stored weight layout and the GGUF writer's reading of the entry.
    assert type(model).__name__ == family.transformers_class
    assert any(type(m).__name__ == "Conv1D" for m in model.modules()) == family.conv1d
    assert (gguf_reason(config) is None) == (family.gguf_architecture is not None)
    if family.gguf_architecture is not None:
        import gguf

        assert family.gguf_architecture in gguf.MODEL_ARCH.__members__


def test_gemma2_is_eager_with_soft_capping_and_phi3_fuses_qkv():
    assert FAMILIES["gemma2"].attention == "eager" and FAMILIES["gemma2"].logit_softcap
    config, _ = build("gemma2")
    assert config.final_logit_softcapping and config.attn_logit_softcapping
    assert FAMILIES["phi3"].fused_qkv and [name for name, _, _ in FAMILIES["phi3"].linears][0] == "qkv_proj"


def _model_type_literals(path: Path) -> list[str]:
    """String constants in a module equal to a model type, each as 'line: value'."""
    tree = ast.parse(path.read_text())
    return [f"{node.lineno}: {node.value}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FAMILIES]


def test_the_family_table_is_the_only_module_naming_a_model_type():
    """No `model_type == "gpt2"` branch, no table keyed by a model type, outside lorasp_edge/families.py:
    every stage asks the entry."""
    package = Path(lorasp_edge.__file__).parent
    found = {str(path.relative_to(package)): _model_type_literals(path) for path in sorted(package.rglob("*.py"))}
    naming = {name: hits for name, hits in found.items() if hits}
    assert list(naming) == ["families.py"], naming

"""The architecture catalog: published parameter counts and transformers' own counts."""

from __future__ import annotations

import json

import pytest

from lorasp_edge.errors import UserError
from lorasp_edge.plan.catalog import Architecture, catalog_entry, catalog_ids, model_info

REQUIRED = ["smollm2-135m", "smollm2-360m", "smollm2-1.7b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b",
            "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "mistral-7b-v0.3", "phi-3-mini-4k", "gemma-2-2b", "tinyllama-1.1b"]

# Exact counts of the released checkpoints (safetensors metadata on the Hugging Face hub); the
# catalog's published figures are the rounded ones of the model cards and reports.
EXACT = {"smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768, "llama-3.2-1b": 1_235_814_400,
         "llama-3.1-8b": 8_030_261_248, "mistral-7b-v0.3": 7_248_023_552, "phi-3-mini-4k": 3_821_079_552,
         "gemma-2-2b": 2_614_341_888}


def test_catalog_holds_the_required_models():
    assert set(REQUIRED) <= set(catalog_ids())


@pytest.mark.parametrize("model_id", REQUIRED)
def test_count_matches_published_within_one_percent(model_id):
    info = model_info(model_id)
    counted = info.architecture.parameters()["total"]
    assert abs(counted / info.published_params - 1) < 0.01, (counted, info.published_params, info.published_source)
    if model_id in EXACT:
        assert counted == EXACT[model_id]


@pytest.mark.parametrize("model_id", ["smollm2-135m", "qwen2.5-0.5b", "phi-3-mini-4k", "gemma-2-2b", "tinyllama-1.1b"])
def test_count_and_linears_match_transformers(model_id):
    """Build the model from the same config on the meta device: same parameters, same linears."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(catalog_entry(model_id)["config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    arch = model_info(model_id).architecture
    assert arch.parameters()["total"] == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    shapes = sorted((name.rsplit(".", 1)[-1], m.in_features, m.out_features) for name, m in layer.named_modules() if isinstance(m, nn.Linear))
    assert shapes == sorted((l.name, l.d_in, l.d_out) for l in arch.linears())


def test_hub_id_and_case_model_info():
    assert model_info("Qwen/Qwen2.5-0.5B").name == "qwen2.5-0.5b"
    assert model_info("SmolLM2-135M").name == "smollm2-135m"
    assert model_info(None).name == "smollm2-135m"


def test_gpt2_config_counts_like_transformers(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    (tmp_path / "config.json").write_text(config.to_json_string())
    assert model_info(str(tmp_path)).architecture.parameters()["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config, message", [
    ({"model_type": "t5"}, "not supported"),
    ({"model_type": "llama", "hidden_size": 64}, "is missing field"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_configs(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        model_info(str(tmp_path))


def test_unknown_model_lists_known_ones(tmp_path):
    with pytest.raises(UserError, match="unknown model 'gpt-17'.*smollm2-135m"):
        model_info("gpt-17")
    with pytest.raises(UserError, match="has no config.json"):
        model_info(str(tmp_path))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        model_info(str(tmp_path / "file.txt"))


def test_architecture_reads_defaults():
    arch = Architecture.from_config({"model_type": "gemma2", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 10})
    assert arch.tie_embeddings and arch.num_kv_heads == 2 and arch.head_dim == 4

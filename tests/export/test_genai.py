"""onnxruntime-genai export: genai_config.json, and onnxruntime-genai's own verification (skipped
when onnxruntime-genai is not installed)."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from tiny import leftovers, make_model_dir, train_adapter
from transformers import AutoConfig, GenerationConfig

from lorasp_edge.cli import main
from lorasp_edge.export import genai
from lorasp_edge.export.run import ExportSettings, export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    base = make_model_dir(root / "base", "qwen2", initializer_range=0.2)
    return base, train_adapter(base, root / "adapter")


def test_config_names_the_graph_and_cache_layout(tiny):
    config = AutoConfig.from_pretrained(tiny[0])
    written = genai.genai_config(config, GenerationConfig(eos_token_id=[0, 4], pad_token_id=0))
    decoder = written["model"]["decoder"]
    assert decoder["inputs"] == {
        "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
    }
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 4, 2, 16)
    assert written["model"]["type"] == "qwen2" and written["model"]["context_length"] == 256
    assert written["model"]["eos_token_id"] == [0, 4] and written["model"]["pad_token_id"] == 0
    assert written["search"]["past_present_share_buffer"] is True  # GroupQueryAttention updates one buffer in place
    assert written["search"]["do_sample"] is False and written["search"]["top_k"] == 1


def test_missing_runtime_is_one_line_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(genai, "available", lambda: False)
    code = main(["export", "--adapter", str(tiny[1]), "--out", str(tmp_path / "out"), "--format", "genai"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "onnxruntime-genai" in error
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_export_is_verified_by_onnxruntime_genai(tiny, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime_genai")
    from lorasp_edge.export import agreement

    # A random tiny model has near-tied logits: int8's agreement here falls below the 95% meant for trained models.
    monkeypatch.setitem(agreement.AGREEMENT_LIMIT, 8, 0.5)
    report = export(ExportSettings(adapter=tiny[1], out=tmp_path / "out", format="onnx,genai", quantize="int8", eval_tokens=64))
    fp32, int8 = report.verification["genai"], report.verification["genai-int8"]
    assert fp32["greedy_equal"] and fp32["agreement"]["agreement"] >= 0.95 and fp32["agreement"]["positions"] == 128
    assert int8["agreement"]["positions"] == 128 and "greedy_equal" not in int8
    # the fp32 graph is checked with pre-packing off (the largest model an export opens), int8 as users run it
    assert (fp32["pre_packing"], int8["pre_packing"]) == (False, True)
    out = tmp_path / "out"
    # the genai folders reuse the ONNX graphs: the same file, not a second copy
    assert os.path.samefile(out / "genai" / "model.onnx", out / "onnx" / "model.onnx")
    assert os.path.samefile(out / "genai-int8" / "model.onnx", out / "onnx-int8" / "model.onnx")
    model = genai.GenaiModel(out / "genai")
    ids = [5, 6, 7, 8]
    assert model.greedy(ids, 4) == genai.GenaiModel(out / "genai").greedy(ids, 4)
    unpacked = genai.GenaiModel(out / "genai", prepack=False)
    assert unpacked.greedy(ids, 4) == model.greedy(ids, 4)
    assert np.allclose(unpacked.logits(ids), model.logits(ids), rtol=0, atol=1e-5)  # the same sums in another order
    assert (out / "genai" / "tokenizer.json").is_file() and (out / "genai" / "genai_config.json").is_file()
    # transformers 4.x adds token_type_ids (which generate() rejects) unless the inputs are declared
    tokenizer_config = json.loads((out / "onnx" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]


def test_genai_alone_takes_the_onnx_graph_and_a_wrong_graph_exits_4(tiny, tmp_path, monkeypatch, capsys):
    """--format genai writes the onnx format first (it requires it) and links its graph; when the graph
    it gets computes other weights than the merged model's, genai's own check exits 4."""
    pytest.importorskip("onnxruntime_genai")
    from lorasp_edge.export.onnx_build import build_decoder

    def other_weights(context, folder, variant):  # a graph of different weights than the merged model's
        def read(key):
            return context.weights.read(key) * (-1.0 if key == "model.layers.0.mlp.down_proj.weight" else 1.0)

        build_decoder(context.merged.config, SimpleNamespace(keys=context.weights.keys, read=read), folder)

    monkeypatch.setattr(genai, "_place_graph", other_weights)
    code = main(["export", "--adapter", str(tiny[1]), "--out", str(tmp_path / "out"), "--format", "genai", "--source", "memory"])
    assert code == 4 and "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)

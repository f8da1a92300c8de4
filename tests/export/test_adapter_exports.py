"""`export --adapter-only`: the llama.cpp LoRA adapter GGUF (layout read back with gguf's reader,
the delta it encodes checked against the merge), the unmerged base beside it, refusals for formats
without a run-time adapter, and llama.cpp's own verification when llama-cpp-python is installed."""

import json

import gguf
import numpy as np
import pytest
import torch
from tiny import leftovers, make_model_dir, train_adapter

from lorasp_edge.cli import main
from lorasp_edge.export import gguf_adapter, llamacpp
from lorasp_edge.export.sources.adapter import unmerged_base
from lorasp_edge.export.gguf_file import permute_rows
from lorasp_edge.export.sources.merge import merged_model
from lorasp_edge.export.run import ExportSettings, export
from lorasp_edge.generate import GenerateSettings, generate
from lorasp_edge.models import load_model
from lorasp_edge.train.adapter_files import load_adapter

HEADS, KV_HEADS = 4, 2  # tests/tiny.py's config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-only")
    base = make_model_dir(root / "base", "llama", initializer_range=0.2)
    return base, train_adapter(base, root / "adapter", steps=10)


def adapted(base, adapter, quant_bits=None):
    return load_adapter(load_model(str(base), quant_bits=quant_bits, compute_dtype=torch.float32, device="cpu"), adapter)


def test_lora_gguf_encodes_the_trained_delta_in_llama_cpp_layout(tiny, tmp_path):
    peft_model = adapted(*tiny)
    reader = gguf.GGUFReader(gguf_adapter.write_lora_gguf(peft_model, tmp_path / "a.gguf"))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    assert (meta["general.type"], meta["adapter.type"], meta["general.architecture"]) == ("adapter", "lora", "llama")
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)  # rank 4, alpha 8: llama.cpp's alpha / r = PEFT's 2.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 2 * 7  # 2 layers x 7 linear layers x (A, B)
    q_a, q_b = (tensors[f"blk.0.attn_q.weight.lora_{part}"] for part in "ab")
    assert list(q_a.shape) == [64, 4] and list(q_b.shape) == [4, 64]  # ggml order: a [d_in, r], b [r, d_out]
    assert q_a.tensor_type == gguf.GGMLQuantizationType.F32
    # alpha / r * B A is the merged model's weight minus the base's, Q rows in llama.cpp's RoPE order
    merged = merged_model(peft_model).state_dict()
    plain = unmerged_base(peft_model).state_dict()
    for hf, ours, heads in (("self_attn.q_proj", "attn_q", HEADS), ("self_attn.k_proj", "attn_k", KV_HEADS), ("mlp.down_proj", "ffn_down", None)):
        a, b = (np.asarray(tensors[f"blk.1.{ours}.weight.lora_{part}"].data) for part in "ab")
        delta = (merged[f"model.layers.1.{hf}.weight"] - plain[f"model.layers.1.{hf}.weight"]).numpy()
        expected = permute_rows(delta, heads) if heads else delta
        assert np.abs(2.0 * b @ a - expected).max() <= 1e-5 * np.abs(expected).max()
        assert np.abs(expected).max() > 1e-3  # the trained delta is not zero


def test_unmerged_base_is_the_base_without_the_delta(tiny):
    peft_model = adapted(*tiny)
    plain = unmerged_base(peft_model).state_dict()
    original = load_model(str(tiny[0]), compute_dtype=torch.float32, device="cpu").state_dict()
    assert plain.keys() == original.keys()
    assert all(torch.equal(plain[key], original[key]) for key in original)


def test_four_bit_base_is_written_dequantized(tmp_path):
    base = make_model_dir(tmp_path / "base", "llama", initializer_range=0.2)
    peft_model = adapted(base, train_adapter(base, tmp_path / "adapter", quant_bits=4), quant_bits=4)
    plain = unmerged_base(peft_model).state_dict()
    layer = peft_model.get_base_model().model.layers[0].mlp.up_proj.base_layer
    from lorasp_edge.export.sources.merge import dequantized_weight

    assert torch.equal(plain["model.layers.0.mlp.up_proj.weight"], dequantized_weight(layer))
    original = load_model(str(base), compute_dtype=torch.float32, device="cpu").state_dict()["model.layers.0.mlp.up_proj.weight"]
    error = (plain["model.layers.0.mlp.up_proj.weight"] - original).abs().max()
    assert 0 < error <= 0.3 * original.abs().max()  # NF4: what the adapter saw, not the fp32 weights


def test_without_llama_cpp_both_files_are_written_and_marked_unrun(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    report = export(ExportSettings(adapter=tiny[1], out=tmp_path / "out", format="gguf", adapter_only=True, eval_tokens=64))
    record = report.verification["gguf"]
    assert record["runtime"] is None and record["adapter_file"] == "gguf/adapter-f32.gguf"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["adapter_only"] is True and manifest["merge_base"].startswith("the base as trained (unquantized), unmerged")
    assert sorted(p.name for p in (tmp_path / "out" / "gguf").iterdir()) == ["Modelfile", "adapter-f32.gguf", "base-f16.gguf"]
    assert (tmp_path / "out" / "gguf" / "Modelfile").read_text().startswith("FROM ./base-f16.gguf\nADAPTER ./adapter-f32.gguf\n")
    assert llamacpp.is_adapter(tmp_path / "out" / "gguf" / "adapter-f32.gguf")
    assert not llamacpp.is_adapter(tmp_path / "out" / "gguf" / "base-f16.gguf")


def test_merged_export_states_its_merge_base(tiny, tmp_path):
    report = export(ExportSettings(adapter=tiny[1], out=tmp_path / "out", format="hf", eval_tokens=64))
    assert report.manifest["merge_base"] == "the base as trained (unquantized) plus the adapter's delta (alpha/r) B A, merged in fp32"


@pytest.mark.parametrize(("fmt", "reason"), [("genai", "graph inputs of the same names"), ("both", "--adapter-only --format hf:")])
def test_formats_without_a_runtime_adapter_are_refused_in_one_line(tiny, tmp_path, capsys, fmt, reason):
    code = main(["export", "--adapter", str(tiny[1]), "--out", str(tmp_path / "out"), "--format", fmt, "--adapter-only"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and reason in error and "adapter-only formats: gguf" in error
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- with llama.cpp


def test_llama_cpp_applies_the_adapter_like_peft(tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    code = main(["export", "--adapter", str(tiny[1]), "--out", str(tmp_path / "out"), "--format", "gguf", "--adapter-only"])
    assert code == 0
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())["verification"]["gguf"]
    assert record["greedy_equal"] and record["logits"]["relative_diff"] <= record["tolerance"] == 1e-2
    assert record["agreement"]["agreement"] >= 0.95 and record["perplexity_ratio"] <= 1.02
    # Independently of the exporter: with the adapter llama.cpp follows PEFT, without it the base
    folder = tmp_path / "out" / "gguf"
    ids = list(range(5, 37))
    with torch.no_grad():
        reference = adapted(*tiny)(input_ids=torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(reference).max()
    with_lora = llamacpp.LlamaCppModel(folder / "base-f16.gguf", context=64, lora=folder / "adapter-f32.gguf").logits(ids)
    without = llamacpp.LlamaCppModel(folder / "base-f16.gguf", context=64).logits(ids)
    assert np.abs(with_lora - reference).max() <= 1e-2 * scale
    assert np.abs(without - reference).max() >= 10 * np.abs(with_lora - reference).max()
    # `generate` on the folder runs the base with the adapter applied
    result = generate(GenerateSettings(model=tmp_path / "out", prompt="alpha beta", max_new_tokens=8))
    assert result.backend == "llama.cpp" and result.model_dir.endswith("base-f16.gguf")
    tokens = llamacpp.LlamaCppModel(folder / "base-f16.gguf", context=64, lora=folder / "adapter-f32.gguf").greedy(
        list(load_tokenizer(tiny[0])("alpha beta")["input_ids"]), 8)
    assert result.token_ids == tokens[: len(result.token_ids)]


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_wrong_scale_fails_with_exit_4_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
    real = gguf_adapter.lora_tensors
    monkeypatch.setattr(gguf_adapter, "lora_tensors", lambda model: (real(model)[0], 0.25 * real(model)[1]))
    code = main(["export", "--adapter", str(tiny[1]), "--out", str(tmp_path / "out"), "--format", "gguf", "--adapter-only"])
    assert code == 4 and "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_adapter_on_a_four_bit_base_matches_its_peft_model(tmp_path):
    pytest.importorskip("llama_cpp")
    base = make_model_dir(tmp_path / "base", "llama", initializer_range=0.2)
    adapter = train_adapter(base, tmp_path / "adapter", quant_bits=4)
    report = export(ExportSettings(adapter=adapter, out=tmp_path / "out", format="gguf", adapter_only=True, eval_tokens=128))
    record = report.verification["gguf"]
    assert record["greedy_equal"] and record["logits"]["relative_diff"] <= 1e-2
    assert report.manifest["merge_base"].startswith("the dequantized 4-bit base the adapter was trained against, unmerged")


def test_adapter_on_an_int8_base_is_checked_against_its_float_equivalent(tmp_path):
    """LLM.int8 quantizes activations too: the fp32 forward over the dequantized base is held to the
    merge's 5e-2 against it, then is llama.cpp's reference (as the merged export does)."""
    pytest.importorskip("llama_cpp")
    base = make_model_dir(tmp_path / "base", "llama", initializer_range=0.2)
    adapter = train_adapter(base, tmp_path / "adapter", quant_bits=8)
    report = export(ExportSettings(adapter=adapter, out=tmp_path / "out", format="gguf", adapter_only=True, eval_tokens=128))
    record = report.verification["gguf"]
    assert 0 < record["int8_forward"]["relative_diff"] <= record["int8_forward"]["tolerance"] == 5e-2
    assert record["reference"].startswith("unmerged PEFT model over the dequantized 8-bit base")
    assert record["greedy_equal"] and record["logits"]["relative_diff"] <= record["tolerance"] == 1e-2

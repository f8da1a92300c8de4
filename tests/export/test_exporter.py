"""Export: merge, ONNX graph, verification, quantization and bad input, on tiny models built here."""

import errno
import importlib.util
import json

import onnx
import pytest
import torch
from tiny import export_a_different_model, leftovers, make_model_dir, train_adapter
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from lorasp_edge.cli import main
from lorasp_edge.errors import AdapterError, UserError, VerificationError
from lorasp_edge.export import onnx_writer
from lorasp_edge.export import manifest as export_manifest
from lorasp_edge.export.hf import write_portable_config
from lorasp_edge.export.onnx_runtime import OnnxDecoder
from lorasp_edge.export.run import ExportSettings, export
from lorasp_edge.models import load_model
from lorasp_edge.train.adapter import LoRASPConfig, apply_lorasp, trainable_parameters
from lorasp_edge.train.adapter_files import load_adapter, save_adapter
from lorasp_edge.train.optim import LoRASPAdamW

# export's default 1024 held-out tokens, scored in 512-token windows: 512 + 511 next-token positions
INT8_AGREEMENT_POSITIONS = 1023
SMALL = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = make_model_dir(root / "base", "llama")
    return base, train_adapter(base, root / "adapter")


@pytest.fixture(scope="module")
def llama_export(llama_adapter, tmp_path_factory):
    base, adapter = llama_adapter
    out = tmp_path_factory.mktemp("export") / "out"
    return base, adapter, export(ExportSettings(adapter=adapter, out=out, quantize="int8"))


# ------------------------------------------------------------------------------- merge + files


def test_merged_hf_folder_reloads_to_the_adapted_model(llama_export):
    base, adapter, report = llama_export
    out = report.out
    adapted = load_adapter(load_model(str(base), device="cpu"), adapter).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    x = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = adapted(x).logits, reloaded(x).logits
    assert (got - expected).abs().max() < 1e-5
    # The adapter moved the model: the merge is not a no-op.
    plain = load_model(str(base), device="cpu").eval()
    with torch.no_grad():
        assert (plain(x).logits - expected).abs().max() > 1e-3
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / "hf" / name).is_file(), name
    assert "quantization_config" not in json.loads((out / "hf" / "config.json").read_text())


def test_manifest_records_what_was_verified(llama_export):
    _, adapter, report = llama_export
    manifest = json.loads((report.out / "manifest.json").read_text())
    assert manifest == report.manifest
    assert manifest["base_model"].endswith("base") and manifest["base_quant_bits"] is None
    assert len(manifest["adapter"]["sha256"]) == 64 and manifest["adapter"]["sha256"] == export_manifest.adapter_hash(adapter)
    assert manifest["plan"] == {"rank": 4}
    checks = manifest["verification"]
    assert checks["merge"]["relative_diff"] < 1e-5
    assert checks["hf_reload"]["max_abs_diff"] == 0.0
    assert checks["onnx"]["relative_diff"] < 1e-5 and checks["onnx"]["tolerance"] == 1e-3
    assert checks["onnx"]["greedy_agreement"] == 1.0 and checks["onnx"]["positions"] == 21 + 2 * 3
    # the cache generate and onnxruntime-genai update in place computes what the growing cache does
    assert checks["onnx"]["in_place_relative_diff"] < 1e-5 and checks["onnx-int8"]["in_place_relative_diff"] < 1e-5
    perplexity = manifest["perplexity"]
    assert abs(perplexity["onnx"] / perplexity["pytorch"] - 1) < 1e-4
    assert manifest["files"]["onnx-int8"] < 0.7 * manifest["files"]["onnx"]
    assert not leftovers(report.out.parent)


def test_int8_onnx_keeps_top1_agreement_and_perplexity(llama_export):
    manifest = llama_export[2].manifest
    check = manifest["verification"]["onnx-int8"]
    assert check["greedy_agreement"] > 0.95
    assert check["perplexity_ratio"] < 1.01
    # gated agreement over every held-out position against the merged PyTorch model
    assert check["agreement"]["limit"] == 0.95 and check["agreement"]["agreement"] >= 0.95
    assert check["agreement"]["positions"] == INT8_AGREEMENT_POSITIONS
    nodes = onnx.load(str(llama_export[2].out / "onnx-int8" / "model.onnx")).graph.node
    assert sum(node.op_type == "MatMulNBits" for node in nodes) == 2 * 4 + 1  # q|k|v, o, gate|up, down per layer + lm_head
    assert not any(node.op_type == "MatMul" for node in nodes)


def test_portable_config_reads_rope_theta_in_both_layouts(tmp_path):
    config = LlamaConfig(**SMALL, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    config.save_pretrained(tmp_path)
    write_portable_config(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 100000.0  # what transformers 4.x reads
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 100000.0  # what 5.x reads


def test_exported_tokenizer_names_a_class_both_transformers_know(llama_export):
    folder = llama_export[2].out / "onnx"
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    original = AutoTokenizer.from_pretrained(llama_export[0])
    assert AutoTokenizer.from_pretrained(folder)("1 2 3 alpha")["input_ids"] == original("1 2 3 alpha")["input_ids"]


# ------------------------------------------------------------------------------ other bases


def test_export_from_a_4bit_trained_adapter(tmp_path):
    base = make_model_dir(tmp_path / "base", "qwen2", tie_word_embeddings=True)
    adapter = train_adapter(base, tmp_path / "adapter", quant_bits=4)
    report = export(ExportSettings(adapter=adapter, out=tmp_path / "out", quantize="int4", eval_tokens=256))
    manifest = report.manifest
    assert manifest["base_quant_bits"] == 4
    # merged = dequantized NF4 weights + delta: it reproduces the 4-bit model the adapter was trained in
    assert manifest["verification"]["merge"]["relative_diff"] < 1e-3
    assert manifest["verification"]["onnx"]["relative_diff"] < 1e-5
    int4 = manifest["verification"]["onnx-int4"]
    assert int4["perplexity_ratio"] < 1.30 and int4["greedy_agreement"] > 0.5
    agreed = int4["agreement"]
    assert agreed["limit"] == 0.70 and agreed["agreement"] >= 0.70 and agreed["positions"] == 255
    # the tied table is shared in quantized form: no float copy is left for the lookup
    graph = onnx.load(str(report.out / "onnx-int4" / "model.onnx")).graph
    assert any(node.op_type == "GatherBlockQuantized" for node in graph.node)
    assert not any(tensor.data_type == onnx.TensorProto.FLOAT and 200 <= min(tensor.dims, default=0) for tensor in graph.initializer)
    # the saved HF weights are plain fp32, loadable without bitsandbytes
    reloaded = AutoModelForCausalLM.from_pretrained(report.out / "hf")
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())


# -------------------------------------------------------------------------------- bad input


def test_missing_adapter_is_one_line_and_writes_nothing(tmp_path, capsys):
    code = main(["export", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "no such adapter folder" in error
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_model_is_rejected(llama_adapter, tmp_path):
    _, adapter = llama_adapter
    other = tmp_path / "other"  # same architecture and names, other sizes
    LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": 400, "hidden_size": 32})).save_pretrained(other)
    AutoTokenizer.from_pretrained(llama_adapter[0]).save_pretrained(other)
    with pytest.raises(AdapterError, match="shape"):
        export(ExportSettings(adapter=adapter, out=tmp_path / "out", model=str(other)))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_unsupported_architecture(tmp_path):
    base = make_model_dir(tmp_path / "base", "gpt2")
    adapter = train_adapter(base, tmp_path / "adapter", steps=1)
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
        export(ExportSettings(adapter=adapter, out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_no_room_on_disk_before_writing(llama_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(export_manifest, "free_bytes", lambda folder: 1000)
    with pytest.raises(UserError, match="no room on disk"):
        export(ExportSettings(adapter=llama_adapter[1], out=tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("source", ["memory", "streamed"])
def test_disk_full_while_writing_leaves_nothing(llama_adapter, tmp_path, monkeypatch, source):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_writer, "build_decoder", full)
    with pytest.raises(UserError, match="no space left on the device"):
        export(ExportSettings(adapter=llama_adapter[1], out=tmp_path / "out", source=source))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_verification_failure_exits_4_and_removes_files(llama_adapter, tmp_path, monkeypatch, capsys):
    export_a_different_model(monkeypatch)
    code = main(["export", "--adapter", str(llama_adapter[1]), "--out", str(tmp_path / "out"), "--format", "onnx"])
    error = capsys.readouterr().err
    assert code == VerificationError.exit_code == 4
    assert "ONNX logits differ from PyTorch" in error.splitlines()[-1]
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_quantized_onnx_below_the_agreement_gate_exits_4(llama_adapter, tmp_path, capsys):
    # int4 weights do not pick the merged model's token at every held-out position: a gate of 100% refuses them.
    code = main(["export", "--adapter", str(llama_adapter[1]), "--out", str(tmp_path / "out"), "--format", "onnx", "--quantize", "int4",
                 "--min-agreement", "1"])
    error = capsys.readouterr().err.splitlines()[-1]
    assert code == 4, error
    assert "int4 ONNX picks the merged model's greedy token at" in error and "(limit 100%, --min-agreement)" in error
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_keep_8bit_sets_the_int4_mix_and_is_recorded(llama_adapter, tmp_path, capsys):
    # --keep-8bit none: every linear layer at 4 bits (llama.cpp q4_0's bits), the lm_head at 8.
    code = main(["export", "--adapter", str(llama_adapter[1]), "--out", str(tmp_path / "out"), "--format", "onnx", "--quantize", "int4",
                 "--keep-8bit", "none", "--min-agreement", "0"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["verification"]["onnx-int4"]["kept_8bit"] == []
    nodes = [n for n in onnx.load(str(tmp_path / "out" / "onnx-int4" / "model.onnx"), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes}
    assert bits.pop("/lm_head/MatMulNBits") == 8 and set(bits.values()) == {4}
    code = main(["export", "--adapter", str(llama_adapter[1]), "--out", str(tmp_path / "bad"), "--quantize", "int4", "--keep-8bit", "v_proj,lm_head"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "--keep-8bit must name linear layers" in error[0] and "'v_proj,lm_head'" in error[0]
    assert not (tmp_path / "bad").exists()


def test_refuses_to_overwrite_a_folder_that_is_not_an_export(llama_adapter, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and was not written by lorasp-edge export"):
        export(ExportSettings(adapter=llama_adapter[1], out=tmp_path / "out"))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_settings_report_every_problem_at_once(tmp_path):
    settings = ExportSettings(adapter=tmp_path, out=tmp_path / "o", format="hf", quantize="int4", block_size=48, opset=9)
    problems = settings.problems()
    assert len(problems) == 3 and any("--quantize" in p for p in problems)


# ------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_export_with_a_trained_adapter_agrees_with_pytorch(tmp_path):
    from lorasp_edge.generate import OnnxStepper, generate_ids

    model = load_model("smollm2-135m", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(exporter_model_dir())
    peft_model = apply_lorasp(model, LoRASPConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=0))
    batch = tokenizer(["The capital of France is Paris. The capital of Italy is Rome."], return_tensors="pt").input_ids
    optimizer = LoRASPAdamW(trainable_parameters(peft_model), lr=1e-3)
    peft_model.train()
    for _ in range(2):
        peft_model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(peft_model.eval(), tmp_path / "adapter", {"base_model": "smollm2-135m", "base_quant_bits": None})
    del peft_model, model

    formats = "onnx,genai" if importlib.util.find_spec("onnxruntime_genai") else "onnx"
    report = export(ExportSettings(adapter=tmp_path / "adapter", out=tmp_path / "out", format=formats, quantize="int4", eval_tokens=64))
    checks = report.manifest["verification"]
    assert checks["onnx"]["relative_diff"] < 1e-4 and checks["onnx"]["greedy_agreement"] == 1.0
    rotary_bytes = 2 * 4 * 8192 * 32  # cos and sin for SmolLM2's 8192 positions
    assert report.manifest["files"]["onnx"] <= 1.01 * report.manifest["files"]["fp32_parameters"] + rotary_bytes
    assert checks["onnx-int4"]["agreement"]["agreement"] >= 0.70 and checks["onnx-int4"]["perplexity_ratio"] < 1.30
    if "genai" in formats:  # onnxruntime-genai's greedy search on the same graph, one cache buffer shared
        assert checks["genai"]["greedy_equal"] and checks["genai-int4"]["agreement"]["agreement"] >= 0.70

    merged = AutoModelForCausalLM.from_pretrained(exporter_model_dir(), dtype=torch.float32)
    from lorasp_edge.export.sources.merge import merged_model

    merged = merged_model(load_adapter(merged, tmp_path / "adapter")).eval()
    prompt = tokenizer("Once upon a time, in a small village,", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = merged.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, prompt.shape[1] :].tolist()
    got = list(generate_ids(OnnxStepper(OnnxDecoder(report.out / "onnx" / "model.onnx")), prompt[0].tolist(), 16))
    assert got == expected


def exporter_model_dir():
    from lorasp_edge.sources import resolve_model

    return resolve_model("smollm2-135m")


def test_quantization_flags_without_a_quantized_graph_are_refused(tmp_path):
    # --keep-8bit and --block-size change only a quantized graph: without one they would be ignored.
    for extra, message in (({"keep_8bit": "none"}, "--keep-8bit is for --quantize int4, not --quantize int8"),
                           ({"block_size": 64, "quantize": "none"}, "--block-size 64 is for --quantize int8 or int4")):
        settings = ExportSettings(adapter=tmp_path, out=tmp_path / "o", format="onnx", **{"quantize": "int8", **extra})
        assert [p for p in settings.problems() if p.startswith(message)], settings.problems()
    same_mix = ExportSettings(adapter=tmp_path, out=tmp_path / "o", format="onnx", quantize="int8", keep_8bit="up_proj,v_proj,down_proj")
    assert not [p for p in same_mix.problems() if "--keep-8bit" in p]  # the default mix in another order changes nothing

"""The streamed export: merge tensor by tensor, layer-streamed reference, ONNX written from the shards
one weight at a time, peak memory recorded and estimated beforehand. Tiny models."""

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file
from tiny import leftovers, make_model_dir, train_adapter
from transformers import AutoConfig, AutoModelForCausalLM

from lorasp_edge.cli import main
from lorasp_edge.export.sources.layered import LayerStreamed
from lorasp_edge.export.sources.weights import FolderWeights, ModelWeights
from lorasp_edge.export.memory import (
    GENAI_QUANTIZED_FACTOR,
    INLINE_WRITE_FACTOR,
    RUNTIME_BYTES,
    SESSION_FACTOR,
    _piece_bytes,
    estimate_in_memory,
    estimate_streamed,
    quantized_graph_bytes,
    session_slices,
    shapes_summary,
    slice_parameters,
)
from lorasp_edge.export.sources.merge import merged_model, merged_state_dict
from lorasp_edge.export.onnx_build import Quantization, build_decoder
from lorasp_edge.export.onnx_graph import ONNX_DATA_FILE, initializer_bytes
from lorasp_edge.export.onnx_runtime import OnnxDecoder
from lorasp_edge.export.onnx_slices import SlicedDecoder, layer_ranges
from lorasp_edge.export.formats import in_order
from lorasp_edge.export.run import ExportSettings, export
from lorasp_edge.export.sources.shards import (
    BaseWeights,
    Checkpoint,
    LoraDelta,
    StreamingSafetensors,
    stream_merge,
)
from lorasp_edge.export.verify import verify_onnx
from lorasp_edge.models import load_model
from lorasp_edge.train.adapter_files import load_adapter


@pytest.fixture(scope="module")
def tied_qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    base = make_model_dir(root / "base", "qwen2", tie_word_embeddings=True)
    return base, train_adapter(base, root / "adapter", steps=2)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_streamed_merge_equals_the_in_memory_merge(bits, tmp_path):
    base = make_model_dir(tmp_path / "base", "llama")
    adapter = train_adapter(base, tmp_path / "adapter", quant_bits=bits, steps=2)
    expected = merged_state_dict(load_adapter(load_model(str(base), quant_bits=bits, device="cpu"), adapter))
    result = stream_merge(BaseWeights(base, bits), LoraDelta.read(adapter), tmp_path / "merged")
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert sorted(got) == sorted(expected) == sorted(result.keys)
    assert all(got[key].dtype == torch.float32 for key in got)
    worst = max(float((got[key] - expected[key]).abs().max()) for key in got)
    assert worst <= 1e-6, worst  # same fp32 arithmetic on the same dequantized values
    assert result.parameters == sum(t.numel() for t in got.values())


def test_streaming_safetensors_shards_read_back(tmp_path):
    tensors = {f"t{i}": torch.randn(3 + i, 5) for i in range(5)}
    writer = StreamingSafetensors(tmp_path, [(k, tuple(v.shape), "F32") for k, v in tensors.items()], shard_bytes=200)
    for key, value in tensors.items():
        writer.write(key, value)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # 60+80, 100, 120, 140 bytes in 200-byte shards
    checkpoint = Checkpoint(tmp_path)
    assert all(torch.equal(checkpoint.read(key), value) for key, value in tensors.items())
    with pytest.raises(ValueError, match="out of the planned order"):
        StreamingSafetensors(tmp_path / "..", [("a", (2,), "F32")]).write("b", torch.zeros(2))


class CountingWeights(FolderWeights):
    def __init__(self, folder):
        super().__init__(folder)
        self.reads = []

    def read(self, key):
        self.reads.append(key)
        return super().read(key)


def test_layer_streamed_model_computes_the_whole_model_and_keeps_nothing(tied_qwen, tmp_path):
    base, _ = tied_qwen
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    weights = CountingWeights(base)
    streamed = LayerStreamed(AutoConfig.from_pretrained(base), weights)
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    got = streamed(input_ids=ids).logits
    assert float((got - expected).abs().max()) == 0.0
    # each weight read once per forward (the tied table twice: lookup and logits), none kept afterwards
    assert sorted(weights.reads) == sorted(weights.keys() + ["model.embed_tokens.weight"])
    assert all(p.device.type == "meta" for p in streamed.model.parameters())


@pytest.mark.parametrize("bits", [None, 4])
def test_graph_from_the_shards_equals_the_graph_from_memory(tied_qwen, bits, tmp_path):
    base, _ = tied_qwen
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    quantization = Quantization(bits) if bits else None
    weights = CountingWeights(base)
    build_decoder(model.config, ModelWeights(model), tmp_path / "memory", quantization)
    build_decoder(model.config, weights, tmp_path / "shards", quantization, external_threshold_bytes=0)
    assert (tmp_path / "shards" / ONNX_DATA_FILE).is_file()
    assert sorted(weights.reads) == sorted(weights.keys())  # each tensor read once, the tied table too
    decoders = [OnnxDecoder(tmp_path / folder / "model.onnx") for folder in ("memory", "shards")]
    x = np.array([[3, 9, 27, 81]])
    logits = [d(x, np.ones_like(x), np.arange(4)[None], d.empty_cache(1))[0] for d in decoders]
    assert np.abs(logits[0] - logits[1]).max() == 0.0
    if bits is None:
        input_ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(1))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :2] = 0
        check = verify_onnx(decoders[1], model, input_ids, attention_mask)
        assert check.relative_diff < 1e-5 and check.greedy_agreement == 1.0


def test_export_is_streamed_and_records_its_peak(tied_qwen, tmp_path):
    base, adapter = tied_qwen
    report = export(ExportSettings(adapter=adapter, out=tmp_path / "out", quantize="int4", eval_tokens=64, mem="8GB", source="streamed"))
    manifest = json.loads((report.out / "manifest.json").read_text())
    assert manifest["streamed"] is True and manifest["source"] == "streamed"
    assert 100 << 20 < manifest["peak_rss_bytes"] < 8 << 30
    assert manifest["verification"]["merge"]["relative_diff"] < 1e-5
    assert manifest["verification"]["hf_reload"]["max_abs_diff"] == 0.0
    assert manifest["verification"]["onnx"]["relative_diff"] < 1e-5
    # a streamed source writes every graph's weights to the data file, never a graph built whole in memory
    assert (report.out / "onnx" / ONNX_DATA_FILE).is_file() and (report.out / "onnx-int4" / ONNX_DATA_FILE).is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(report.out / "hf", dtype=torch.float32)
    expected = merged_model(load_adapter(load_model(str(base), device="cpu"), adapter))
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert float((reloaded(ids).logits - expected(ids).logits).abs().max()) < 1e-5
    assert not leftovers(tmp_path)


def test_mem_too_small_exits_2_with_the_estimate(tied_qwen, tmp_path, capsys):
    _, adapter = tied_qwen
    code = main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--mem", "1MB"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "the export needs about" in error[-1] and "over --mem 0.00 GB" in error[-1]
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# the export's settings as the onnx and genai formats read them: --quantize int4, the default mix and block
INT4 = SimpleNamespace(quantize="int4", keep_8bit="v_proj,down_proj,up_proj", block_size=32)


def test_estimate_is_the_largest_phase():
    # Qwen2.5-1.5B's shapes (tied): 28 layers, hidden 1536, intermediate 8960, vocab 151936, kv 256
    layer = {"q": (1536, 1536), "k": (256, 1536), "v": (256, 1536), "o": (1536, 1536), "g": (8960, 1536), "u": (8960, 1536), "d": (1536, 8960)}
    shapes = {f"model.layers.{i}.{name}.weight": shape for i in range(28) for name, shape in layer.items()}
    shapes["model.embed_tokens.weight"] = (151936, 1536)
    _, largest, unit, vocab = shapes_summary(shapes)
    assert largest == 151936 * 1536 and vocab == 151936 and unit == 151936 * 1536
    estimate = estimate_streamed(shapes, in_order(["onnx"]), INT4)
    assert estimate.largest_phase == "fp32 ONNX session"
    assert estimate.peak_bytes - max(estimate.phases.values()) == RUNTIME_BYTES
    assert 7e9 < estimate.peak_bytes < 9e9  # the fp32 session: 4 bytes x 1.54e9 parameters, plus the runtime
    # onnxruntime-genai checks the fp32 graph with pre-packing off: an onnxruntime session's factor, not
    # its pre-packed 1.3x, so the genai export of this shape estimates what the onnx export does (under 8 GB)
    with_genai = estimate_streamed(shapes, in_order(["onnx", "genai"]), INT4)
    parameters = shapes_summary(shapes)[0]
    assert with_genai.phases["onnxruntime-genai fp32 model"] == int(SESSION_FACTOR * 4 * parameters) + _piece_bytes(vocab)
    int4 = quantized_graph_bytes(shapes, "int4", ("v_proj", "down_proj", "up_proj"), 32)
    assert int4 < quantized_graph_bytes(shapes, "int8", (), 32) < 4 * parameters
    assert with_genai.phases["onnxruntime-genai int4 model"] == int(GENAI_QUANTIZED_FACTOR * int4) + _piece_bytes(vocab)
    assert with_genai.peak_bytes == estimate.peak_bytes < 8e9


def test_quantized_graph_bytes_count_each_weight_at_its_bits():
    # one layer: q (4-bit in the int4 mix), v (kept at 8), a norm (fp32); a tied table (8-bit head)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (64, 64), "model.layers.0.self_attn.v_proj.weight": (32, 64),
              "model.layers.0.input_layernorm.weight": (64,), "model.embed_tokens.weight": (100, 64)}
    # per row of 64 inputs in blocks of 32: 2 blocks x (packed bytes + a 4-byte scale) + the zero points' bytes
    int4_row, int8_row = 2 * (16 + 4) + 1, 2 * (32 + 4) + 2
    assert quantized_graph_bytes(shapes, "int4", ("v_proj",), 32) == 64 * int4_row + 32 * int8_row + 4 * 64 + 100 * int8_row
    assert quantized_graph_bytes(shapes, "int8", (), 32) == (64 + 32 + 100) * int8_row + 4 * 64


def test_in_memory_estimate_counts_a_graph_written_inline():
    shapes = {"model.embed_tokens.weight": (1000, 64), **{f"model.layers.{i}.q.weight": (64, 64) for i in range(2)}}
    weights = 4 * (1000 * 64 + 2 * 64 * 64)
    inline = SimpleNamespace(quantize="none", external_threshold_bytes=weights)
    estimate = estimate_in_memory(shapes, in_order(["onnx"]), inline)
    assert estimate.largest_phase == "ONNX graph written inline"
    assert estimate.phases["ONNX graph written inline"] == int((1 + INLINE_WRITE_FACTOR) * weights)
    assert estimate.peak_bytes == RUNTIME_BYTES + estimate.phases["ONNX graph written inline"]
    assert estimate_in_memory(shapes, in_order(["genai"]), inline).largest_phase == "ONNX graph written inline"  # genai requires onnx
    assert estimate_in_memory(shapes, in_order(["hf"]), inline).largest_phase == "fp32 model copies"
    external = SimpleNamespace(quantize="none", external_threshold_bytes=weights - 1)
    assert estimate_in_memory(shapes, in_order(["onnx"]), external).phases.keys() == {"fp32 model copies"}


def test_heap_calls_fork_no_child_that_would_inflate_the_peak():
    # peak_rss_bytes adds the largest child's peak; a helper forked from a large process reports the
    # parent's resident set as its own (ctypes.util.find_library forks one), so the heap calls must not fork.
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from lorasp_edge import allocator\n"
        "from lorasp_edge.export.memory import release_large_frees, trim_heap\n"
        "big = torch.ones(1 << 26)\n"
        "release_large_frees(); trim_heap(); allocator.trim_heap()\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout) == 0


@pytest.fixture(scope="module")
def four_layer_graph(tmp_path_factory):
    """A tied 4-layer Qwen2 written from its shards, weights in an external data file."""
    root = tmp_path_factory.mktemp("sliced")
    base = make_model_dir(root / "base", "qwen2", tie_word_embeddings=True, num_hidden_layers=4)
    config = AutoConfig.from_pretrained(base)
    return build_decoder(config, FolderWeights(base), root / "onnx", external_threshold_bytes=0)


@pytest.mark.parametrize("count", [2, 3, 4])
def test_layer_slices_compute_what_the_whole_graph_computes(four_layer_graph, count):
    whole = OnnxDecoder(four_layer_graph, prepack=False)
    ids = np.array([[3, 9, 27, 81, 5], [1, 1, 4, 8, 9]])
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    next_ids, next_mask = np.array([[7], [11]]), np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    expected, past = whole(ids, mask, positions, whole.empty_cache(2))
    expected_step, _ = whole(next_ids, next_mask, positions[:, -1:] + 1, past)
    graph = onnx.load(str(four_layer_graph), load_external_data=False).graph
    whole_bytes = sum(initializer_bytes(t) for t in graph.initializer)
    table_bytes = next(initializer_bytes(t) for t in graph.initializer if t.name == "model.embed_tokens.weight")
    rotary_bytes = sum(initializer_bytes(t) for t in graph.initializer if t.name.startswith("rotary."))
    with SlicedDecoder(four_layer_graph, layer_ranges(4, count)) as sliced:
        assert sliced.ranges == layer_ranges(4, count) and len(sliced.slices) == count
        got, got_past = sliced(ids, mask, positions, sliced.empty_cache(2))
        got_step, _ = sliced(next_ids, next_mask, positions[:, -1:] + 1, got_past)
        # each weight in exactly one slice, the tied table in the first (lookup) and the last (logits),
        # the rotary tables every layer reads in each (and a few shape constants of a few bytes)
        once = whole_bytes + table_bytes + (count - 1) * rotary_bytes
        assert once <= sum(part.weight_bytes for part in sliced.slices) < once + 256
        assert max(part.weight_bytes for part in sliced.slices) < whole_bytes
        files = [part.path for part in sliced.slices]
        assert all(path.is_file() for path in files)
    assert not any(path.exists() for path in files)  # removed on close
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-6 * scale
    assert np.abs(got_step - expected_step).max() <= 1e-6 * scale
    assert all(np.abs(a - b).max() <= 1e-6 for a, b in zip(got_past, past))


def test_layer_ranges_are_consecutive_and_even():
    assert layer_ranges(28, 1) == [(0, 28)]
    assert layer_ranges(28, 2) == [(0, 14), (14, 28)]
    assert layer_ranges(28, 3) == [(0, 9), (9, 19), (19, 28)]
    assert layer_ranges(2, 5) == [(0, 1), (1, 2)]  # never more slices than layers


def test_session_slices_are_the_fewest_that_fit():
    # 4 layers of 100 parameters, a tied 50-parameter table (read by the first and the last slice), a norm
    shapes = {f"model.layers.{i}.w": (10, 10) for i in range(4)}
    shapes.update({"model.embed_tokens.weight": (5, 10), "model.norm.weight": (10,)})
    assert slice_parameters(shapes, 1) == [460]
    assert slice_parameters(shapes, 2) == [250, 260]
    assert slice_parameters(shapes, 4) == [150, 100, 100, 160]
    fixed = RUNTIME_BYTES + _piece_bytes(5)

    def needs(parameters):
        return fixed + SESSION_FACTOR * 4 * parameters

    assert session_slices(shapes, None) == 1
    assert session_slices(shapes, int(needs(460)) + 1) == 1
    assert session_slices(shapes, int(needs(460)) - 1) == 2
    assert slice_parameters(shapes, 3) == [150, 200, 160]  # layers 0 | 1-2 | 3
    assert session_slices(shapes, int(needs(260)) - 1) == 3
    assert session_slices(shapes, int(needs(200)) - 1) == 4
    assert session_slices(shapes, 1) == 4  # nothing fits: one layer each, and the estimate says it is over
    estimate = estimate_streamed(shapes, in_order(["onnx"]), SimpleNamespace(quantize="none", keep_8bit=INT4.keep_8bit, block_size=32), budget_bytes=int(needs(460)) - 1)
    assert estimate.session_slices == 2
    assert estimate.phases["fp32 ONNX session (2 layer slices)"] == int(SESSION_FACTOR * 4 * 260) + _piece_bytes(5)


def test_export_verifies_the_fp32_graph_in_slices_when_one_session_would_not_fit(tied_qwen, tmp_path, monkeypatch):
    from lorasp_edge.export import memory
    from lorasp_edge.export.sources.shards import base_float_shapes

    # at this size a window's logits would be the largest phase; make the session the one that binds
    monkeypatch.setattr(memory, "ACTIVATION_WINDOW", 1)
    base, adapter = tied_qwen
    shapes = base_float_shapes(base, None)
    whole = RUNTIME_BYTES + _piece_bytes(shapes_summary(shapes)[3]) + SESSION_FACTOR * 4 * shapes_summary(shapes)[0]
    budget = f"{int(whole) - 1}B"  # one byte short of one session: the streamed export verifies in two
    report = export(ExportSettings(adapter=adapter, out=tmp_path / "out", quantize="int8", eval_tokens=64, mem=budget))
    manifest = json.loads((report.out / "manifest.json").read_text())
    onnx_check = manifest["verification"]["onnx"]
    assert manifest["source"] == "streamed"  # the in-memory estimate is over the budget: chosen by it, not forced
    assert onnx_check["session_layers"] == [[0, 1], [1, 2]]
    assert onnx_check["relative_diff"] < 1e-5 and onnx_check["greedy_agreement"] == 1.0
    assert manifest["verification"]["onnx-int8"]["session_layers"] == [[0, 2]]
    assert not list((report.out / "onnx").glob(".slice-*")) and not leftovers(tmp_path)

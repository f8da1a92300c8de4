"""The decoder graph written from the weights (onnx_build.py): logits against PyTorch on every family that
exports, tied and untied, prefill and decode with a left-padded row; fused operators; one table; the
quantized graphs' layout. Tiny models built here."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from lorasp_edge.export import agreement
from lorasp_edge.export.onnx_build import Quantization, build_decoder
from lorasp_edge.export.onnx_graph import ONNX_DATA_FILE, onnx_weight_bytes
from lorasp_edge.export.onnx_runtime import OnnxDecoder
from lorasp_edge.export.quantize import quantize_linear
from lorasp_edge.export.sources.weights import ModelWeights
from lorasp_edge.export.verify import onnx_logit_pieces, onnx_logits_fn, perplexity, torch_logits_fn, verify_onnx

SMALL = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
KINDS = ["llama", "llama-tied", "qwen2", "qwen2-tied", "qwen3", "qwen3-tied"]
TOLERANCE = 1e-5  # of the logit scale: fp32 arithmetic in another order (fused kernels)


def tiny_model(kind: str, seed: int = 0):
    family, tied = kind.removesuffix("-tied"), kind.endswith("-tied")
    config_class, model_class = FAMILIES[family]
    extra = {"head_dim": 32} if family == "qwen3" else {}  # Qwen3's head_dim is its own, not hidden / heads
    torch.manual_seed(seed)
    config = config_class(**SMALL, **extra, tie_word_embeddings=tied, initializer_range=0.1, rope_theta=100000.0)
    return model_class(config).eval()


def build(model, folder, quantization=None, **options):
    return OnnxDecoder(build_decoder(model.config, ModelWeights(model), folder, quantization, **options))


def padded_batch(batch=3, length=9, vocab=120):
    input_ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding on one row
    return input_ids, attention_mask


def op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_match_pytorch(kind, tmp_path):
    model = tiny_model(kind)
    decoder = build(model, tmp_path)
    names = [item.name for item in decoder.session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [item.name for item in decoder.session.get_outputs()][:2] == ["logits", "present.0.key"]
    check = verify_onnx(decoder, model, *padded_batch(), steps=5)  # batch 3, one row left-padded by 4
    assert check.relative_diff < TOLERANCE and check.greedy_agreement == 1.0
    assert check.positions == 27 - 4 + 3 * 5
    ops = op_counts(tmp_path / "model.onnx")
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 4 and ops["SkipSimplifiedLayerNormalization"] == 2 * 2
    assert "Softmax" not in ops


def test_kv_cache_decode_equals_full_recompute(tmp_path):
    decoder = build(tiny_model("llama"), tmp_path)
    ids = np.random.default_rng(0).integers(0, 120, (2, 12))
    positions = np.arange(12)[None].repeat(2, 0)
    full, _ = decoder(ids, np.ones_like(ids), positions, decoder.empty_cache(2))
    logits, past = decoder(ids[:, :6], np.ones((2, 6)), positions[:, :6], decoder.empty_cache(2))
    steps = [logits]
    for t in range(6, 12):
        logits, past = decoder(ids[:, t : t + 1], np.ones((2, t + 1)), positions[:, t : t + 1], past)
        steps.append(logits)
    assert past[0].shape == (2, 2, 12, 16)
    assert np.abs(np.concatenate(steps, axis=1) - full).max() < 1e-5


def test_perplexity_from_kv_cache_pieces_equals_one_forward(tmp_path):
    model = tiny_model("qwen2-tied")
    decoder = build(model, tmp_path)
    ids = np.random.default_rng(0).integers(0, 120, 43).tolist()
    whole_picks, piece_picks = [], []
    whole = perplexity(agreement.argmax_recorder(onnx_logits_fn(decoder), whole_picks), ids, 16)
    pieces = perplexity(agreement.argmax_recorder(onnx_logit_pieces(decoder, rows=5), piece_picks), ids, 16)
    reference = perplexity(torch_logits_fn(model), ids, 16)
    assert abs(pieces / whole - 1) < 1e-5 and abs(pieces / reference - 1) < 1e-5
    assert len(piece_picks) == 4 + 4 + 2  # windows of 16, 16 and 10 positions in blocks of 5
    assert (np.concatenate(piece_picks) == np.concatenate(whole_picks)).all() and len(np.concatenate(piece_picks)) == 42


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_tied_table_is_stored_once(bits, tmp_path):
    model = tiny_model("qwen2-tied")
    build_decoder(model.config, ModelWeights(model), tmp_path, Quantization(bits, 16) if bits else None)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    vocab_sized = [t.name for t in graph.initializer if 120 in t.dims]
    if bits is None:
        assert vocab_sized == ["model.embed_tokens.weight"]  # the lookup's Gather and the lm_head's Gemm read it
        parameter_bytes = 4 * sum(p.numel() for p in model.parameters())  # counts the tied table once
        rotary_bytes = 2 * 4 * model.config.max_position_embeddings * 16 // 2  # cos and sin, every position
        assert onnx_weight_bytes(tmp_path / "model.onnx") <= 1.01 * parameter_bytes + rotary_bytes
    else:  # the lm_head's blocks, read by the lookup too: no float copy
        assert vocab_sized == ["model.embed_tokens.weight_Q8", "model.embed_tokens.weight.scales", "model.embed_tokens.weight.zero_points"]
        assert op_counts(tmp_path / "model.onnx")["GatherBlockQuantized"] == 1


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied"])
def test_four_bit_head_and_table(kind, tmp_path):
    """head_bits=4: the lm_head's MatMulNBits and the lookup's GatherBlockQuantized read 4-bit blocks; the
    lookup returns exactly the table's dequantized rows (quantize_linear's blocks, unpacked here) and
    the graph is smaller than with the 8-bit head."""
    model = tiny_model(kind)
    eight, four = build(model, tmp_path / "h8", Quantization(4, 16)), build(model, tmp_path / "h4", Quantization(4, 16, head_bits=4))
    graph = onnx.load(str(tmp_path / "h4" / "model.onnx"))
    head = next(node for node in graph.graph.node if node.name == "/lm_head/MatMulNBits")
    lookup = next(node for node in graph.graph.node if node.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in head.attribute}["bits"] == 4 and {a.name: a.i for a in lookup.attribute}["bits"] == 4
    table = model.get_input_embeddings().weight.detach()
    packed, scales, zero_points = quantize_linear(table, 4, 16)
    blocks = table.shape[1] // 16
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(table.shape[0], blocks, 16).astype(np.float32)
    zero = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(table.shape[0], -1)[:, :blocks]
    expected = ((values - zero[..., None]) * scales.reshape(table.shape[0], blocks)[..., None]).reshape(table.shape)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(lookup.output[0], onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 77, 119, 0]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    feeds.update({name: cache for name, cache in zip([i.name for i in session.get_inputs()][3:], four.empty_cache(1))})
    embedded = session.run([lookup.output[0]], feeds)[0]
    assert np.abs(embedded[0] - expected[ids[0]]).max() < 1e-6
    assert np.abs(expected - table.numpy()).max() < 0.1 * np.abs(table.numpy()).max()
    check4, check8 = verify_onnx(four, model, *padded_batch()), verify_onnx(eight, model, *padded_batch())
    assert check4.relative_diff < 0.5 and check8.relative_diff < 0.5
    assert onnx_weight_bytes(tmp_path / "h4" / "model.onnx") < onnx_weight_bytes(tmp_path / "h8" / "model.onnx")


def test_quantized_graph_layout(tmp_path):
    """One MatMulNBits per run of same-bits linears reading one input, at the asked block and accuracy
    level: int8 fuses q|k|v and gate|up; int4 keeps v, up and down at 8 bits (quantize.INT4_KEEP_8BIT)."""
    model = tiny_model("qwen2")
    for bits, per_layer in ((8, 4), (4, 6)):  # int8: qkv, o, gate_up, down; int4: qk, v, o, gate, up, down
        folder = tmp_path / f"int{bits}"
        decoder = build(model, folder, Quantization(bits, 16, accuracy_level=4))
        nodes = [node for node in onnx.load(str(folder / "model.onnx")).graph.node if node.op_type == "MatMulNBits"]
        assert len(nodes) == 2 * per_layer + 1  # + the lm_head
        attributes = [{a.name: a.i for a in node.attribute} for node in nodes]
        assert all(a["block_size"] == 16 and a["accuracy_level"] == 4 for a in attributes)
        by_name = {node.name.split("/")[-2]: a["bits"] for node, a in zip(nodes, attributes) if "layers.0" in node.name}
        assert by_name == ({"qkv_proj": 8, "o_proj": 8, "gate_up_proj": 8, "down_proj": 8} if bits == 8 else
                           {"qk_proj": 4, "v_proj": 8, "o_proj": 4, "gate_proj": 4, "up_proj": 8, "down_proj": 8})
        assert "MatMul" not in op_counts(folder / "model.onnx")  # every linear and the lm_head quantized
        check = verify_onnx(decoder, model, *padded_batch())  # runs with its qkv bias; near, not equal
        assert check.relative_diff < (0.1 if bits == 8 else 0.5)


def test_external_data_holds_the_same_weights(tmp_path):
    model = tiny_model("llama")
    inline, external = build(model, tmp_path / "inline"), build(model, tmp_path / "external", external_threshold_bytes=0)
    assert (tmp_path / "external" / ONNX_DATA_FILE).stat().st_size > 4 * 0.9 * sum(p.numel() for p in model.parameters())
    assert (tmp_path / "external" / "model.onnx").stat().st_size < 200_000
    ids = np.array([[3, 9, 27, 81]])
    feeds = (ids, np.ones_like(ids), np.arange(4)[None])
    assert np.array_equal(inline(*feeds, inline.empty_cache(1))[0], external(*feeds, external.empty_cache(1))[0])


@pytest.mark.parametrize("opset", [14, 20])
def test_every_opset_export_accepts(opset, tmp_path):
    model = tiny_model("qwen3-tied")
    check = verify_onnx(build(model, tmp_path, opset=opset), model, *padded_batch())
    assert check.relative_diff < TOLERANCE


def test_unsupported_family_is_refused(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        build_decoder(GPT2Config(n_embd=32, n_layer=1, n_head=2), ModelWeights(torch.nn.Linear(1, 1)), tmp_path)


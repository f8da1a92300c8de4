"""The decoder graph written node by node from the merged weights, in onnxruntime's fused operators.

    input_ids --Gather (GatherBlockQuantized when quantized)--> x
    per layer i (nodes named /model/layers.i/...):
        h, x = SkipSimplifiedLayerNormalization(out, x)       residual add + RMSNorm in one op
        q|k|v = MatMul or MatMulNBits over h, Split           one node per run of same-bits linears
        [qwen3: q, k = SimplifiedLayerNormalization per head]
        q, k = RotaryEmbedding(q|k, position_ids)             com.microsoft
        a, present.i = GroupQueryAttention(q, k, v, past_key_values.i, seqlens_k, total_length, attention_bias)
        h, x = SkipSimplifiedLayerNormalization(a @ o_proj, x)
        out = down_proj(silu(gate_proj h) * up_proj h)
    logits = lm_head(SkipSimplifiedLayerNormalization(out, x))

Inputs and outputs keep optimum's names (onnx_graph.io_names), so optimum's ORTModelForCausalLM,
onnxruntime-genai and `lorasp-edge generate` run the same file. Choices, with the operator contracts
they rest on (onnxruntime docs/ContribOperators.md, checked against the installed schemas):

- **KV cache in place.** GroupQueryAttention writes the new keys and values into `present.i`. When the
  caller binds one buffer, preallocated to the context, as both `past_key_values.i` and `present.i`,
  onnxruntime updates it in place ("When past_key uses same tensor as present_key ... it is of length
  max_sequence_length"); with separate buffers `present.i` is past + new, optimum's growing cache.
- **Padding.** Every column of `attention_mask` is a cache slot, as in transformers' DynamicCache:
  seqlens_k = total_length - 1 for every row, and padded columns are masked by an additive
  `attention_bias`. GroupQueryAttention's own convention, seqlens_k = sum(mask) - 1 (what
  onnxruntime-genai's model builder writes), places a row's valid tokens first: a left-padded row
  would attend its padding and write its keys into the wrong slots.
- **Rotary outside the attention.** RotaryEmbedding reads `position_ids` token by token. The rotary
  inside GroupQueryAttention "uses only the first element" of a row's positions for a prompt and
  counts on from it, which gives the tokens of a left-padded row positions past their own.
- **Qwen3's q/k norm** is a SimplifiedLayerNormalization over each head: GroupQueryAttention's
  `q_norm_weight` input is honoured by the CUDA and WebGPU providers only.
- **The embedding table is stored once.** fp32: one (vocab, hidden) table for the lookup (Gather)
  and a tied lm_head (Gemm, transB=1). Quantized: the lm_head's MatMulNBits blocks, read by the
  lookup as GatherBlockQuantized rows; an untied table is quantized the same way on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorasp_edge.export.onnx_graph import (
    DEFAULT_OPSET,
    ONNX_DATA_FILE,
    ONNX_FILE,
    PROTOBUF_LIMIT_BYTES,
    SHARED_CACHE_KEY,
    io_names,
    unsupported_reason,
)
from lorasp_edge.export.onnx_tensors import MS, ExternalData, GraphWriter, matmul_weight, stored_bytes
from lorasp_edge.export.onnx_vocab import embeddings, lm_head
from lorasp_edge.export.quantize import (
    DEFAULT_ACCURACY_LEVEL,
    DEFAULT_BLOCK_SIZE,
    HEAD_BITS,
    INT4_KEEP_8BIT,
    linear_bits,
    quantize_linear,
)
from lorasp_edge.families import FAMILIES

ATTENTION = (("q_proj", "k_proj", "v_proj"), "o_proj")  # linears reading the same input, then the output
MLP = (("gate_proj", "up_proj"), "down_proj")


@dataclass(frozen=True)
class Quantization:
    bits: int  # 8, or 4 for the mix of quantize.linear_bits
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    keep_8bit: tuple[str, ...] = INT4_KEEP_8BIT
    head_bits: int = HEAD_BITS  # the lm_head and the vocabulary table (onnx_vocab)

    def bits_of(self, name: str) -> int:
        return linear_bits(name, self.bits, self.keep_8bit)


@dataclass(frozen=True)
class DecoderShape:
    """The sizes and family facts the graph is written from (a transformers config + the checkpoint keys)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    context: int
    tied: bool
    qk_norm: bool

    @classmethod
    def of(cls, config, keys) -> DecoderShape:
        text = config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        return cls(
            layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads, kv_heads=text.num_key_value_heads or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, intermediate=text.intermediate_size,
            vocab=text.vocab_size, eps=float(text.rms_norm_eps), context=text.max_position_embeddings,
            tied=bool(getattr(text, "tie_word_embeddings", False)) or "lm_head.weight" not in set(keys),
            qk_norm=FAMILIES[text.model_type].qk_norm,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def rotary_tables(config) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (context, head_dim / 2) exactly as the family's transformers rotary module computes
    them (its rope type, scaling and attention factor), for every position of the context."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rotary = model.get_decoder().rotary_emb
    text = config.get_text_config(decoder=True)
    positions = torch.arange(text.max_position_embeddings)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros((), dtype=torch.float32), positions)
    half = cos.shape[-1] // 2  # transformers repeats the frequencies: cat(freqs, freqs)
    return cos[0, :, :half].contiguous().numpy(), sin[0, :, :half].contiguous().numpy()


def build_decoder(config, weights, out_dir: Path, quantization: Quantization | None = None, opset: int = DEFAULT_OPSET,
                  external_threshold_bytes: int = PROTOBUF_LIMIT_BYTES) -> Path:
    """Write out_dir/model.onnx (+ model.onnx_data past the threshold) for `config`, reading fp32 weights
    by checkpoint key from `weights.read(key)` one tensor at a time."""
    import onnx
    from onnx import TensorProto, helper

    reason = unsupported_reason(config)
    if reason:
        raise ValueError(reason)
    shape = DecoderShape.of(config, weights.keys())
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ExternalData(out_dir / ONNX_DATA_FILE if estimated_bytes(shape, quantization) > external_threshold_bytes else None)
    graph = GraphWriter(data)
    try:
        logits = _write_decoder(graph, shape, config, weights, quantization)
    finally:
        data.close()
    inputs, outputs = io_names(shape.layers)
    cache = ["batch_size", shape.kv_heads, "past_sequence_length", shape.head_dim]
    present = ["batch_size", shape.kv_heads, "present_sequence_length", shape.head_dim]
    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        *(helper.make_tensor_value_info(name, TensorProto.FLOAT, cache) for name in inputs[3:]),
    ]
    graph_outputs = [
        helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch_size", "sequence_length", shape.vocab]),
        *(helper.make_tensor_value_info(name, TensorProto.FLOAT, present) for name in outputs[1:]),
    ]
    body = helper.make_graph(graph.nodes, "decoder", graph_inputs, graph_outputs, initializer=graph.initializers, value_info=graph.value_info)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)], producer_name="lorasp-edge")
    model.ir_version = 8  # onnxruntime 1.14+ reads it (external data, opset 17)
    helper.set_model_props(model, {SHARED_CACHE_KEY: "1"})
    path = out_dir / ONNX_FILE
    onnx.save_model(model, str(path))
    return path


def estimated_bytes(shape: DecoderShape, quantization: Quantization | None) -> int:
    """The graph's weight bytes, from the shapes alone (decides inline or external data before writing)."""
    linears = shape.linear_shapes()
    total = 0
    for name, dims in linears.items():
        bits = quantization.bits_of(name) if quantization else None
        total += shape.layers * stored_bytes([dims], bits, quantization.block_size if quantization else 0)
    table_bits = quantization.head_bits if quantization else None
    tables = 1 if shape.tied else 2
    total += tables * stored_bytes([(shape.vocab, shape.hidden)], table_bits, quantization.block_size if quantization else 0)
    return total + 4 * shape.context * shape.head_dim  # rotary tables


def _write_decoder(graph: GraphWriter, shape: DecoderShape, config, weights, quantization: Quantization | None) -> str:
    """Every node of the decoder; returns the logits' name."""
    from onnx import TensorProto

    inputs, outputs = io_names(shape.layers)
    cos, sin = rotary_tables(config)
    graph.tensor("rotary.cos", cos)
    graph.tensor("rotary.sin", sin)
    shared, head = lm_head(graph, shape, weights, quantization)
    x = embeddings(graph, shape, weights, quantization, shared)

    attention = _attention_inputs(graph)
    hidden_dims = ["batch_size", "sequence_length", shape.hidden]
    residual, out = graph.typed(x, TensorProto.FLOAT, hidden_dims), None
    for layer in range(shape.layers):
        scope, prefix = f"/model/layers.{layer}", f"model.layers.{layer}"
        h, residual = _norm(graph, out, residual, weights.read(f"{prefix}.input_layernorm.weight"), shape.eps, f"{scope}/input_layernorm")
        present = outputs[1 + 2 * layer : 3 + 2 * layer]
        attended = _attention(graph, shape, weights, quantization, h, scope, prefix, inputs[3 + 2 * layer : 5 + 2 * layer], present, attention)
        h, residual = _norm(graph, attended, residual, weights.read(f"{prefix}.post_attention_layernorm.weight"), shape.eps,
                            f"{scope}/post_attention_layernorm")
        gate, up = _linears(graph, weights, quantization, h, MLP[0], f"{scope}/mlp", f"{prefix}.mlp")
        activated = graph.one("Mul", [gate, graph.one("Sigmoid", [gate], f"{scope}/mlp/act/Sigmoid")], f"{scope}/mlp/act/Mul")
        hidden = graph.one("Mul", [activated, up], f"{scope}/mlp/Mul")
        (out,) = _linears(graph, weights, quantization, hidden, (MLP[1],), f"{scope}/mlp", f"{prefix}.mlp")
        graph.typed(out, TensorProto.FLOAT, hidden_dims)
        graph.typed(residual, TensorProto.FLOAT, hidden_dims)
    final, _ = _norm(graph, out, residual, weights.read("model.norm.weight"), shape.eps, "/model/norm")
    return head(final)


def _attention_inputs(graph: GraphWriter) -> tuple[str, str, str]:
    """What every layer's GroupQueryAttention reads besides q, k, v and its cache, from the mask alone:
    seqlens_k (batch,) = total - 1 (every mask column is a slot), total_sequence_length (a scalar), and
    attention_bias (batch, 1, seq, total): 0 where a key is a token, float32's minimum where it is padding."""
    from onnx import TensorProto

    one = graph.constant(1, np.int32)
    mask_shape = graph.one("Shape", ["attention_mask"], "/model/attention/mask_shape")
    total64 = graph.one("Gather", [mask_shape, graph.constant(1)], "/model/attention/total_length64", axis=0)
    total = graph.one("Cast", [total64], "/model/attention/total_length", to=TensorProto.INT32)
    batch = graph.one("Gather", [mask_shape, graph.constant([0])], "/model/attention/batch", axis=0)
    seqlens = graph.one("Expand", [graph.one("Sub", [total, one], "/model/attention/last_slot"), batch], "/model/attention/seqlens_k")
    query = graph.one("Gather", [graph.one("Shape", ["input_ids"], "/model/attention/ids_shape"),
                                 graph.constant([1])], "/model/attention/query_length", axis=0)
    keep = graph.one("Cast", ["attention_mask"], "/model/attention/keep", to=TensorProto.BOOL)
    bias = graph.one("Where", [keep, graph.constant(0.0, np.float32),
                               graph.constant(np.finfo(np.float32).min, np.float32)], "/model/attention/bias_2d")
    bias = graph.one("Unsqueeze", [bias, graph.constant([1, 2])], "/model/attention/bias_4d")
    target = graph.one("Concat", [batch, graph.constant([1]), query,
                                  graph.one("Unsqueeze", [total64, graph.constant([0])], "/model/attention/total_1d")],
                       "/model/attention/bias_shape", axis=0)
    return (graph.typed(seqlens, TensorProto.INT32, ["batch_size"]), graph.typed(total, TensorProto.INT32, []),
            graph.typed(graph.one("Expand", [bias, target], "/model/attention/bias"), TensorProto.FLOAT,
                        ["batch_size", 1, "sequence_length", "total_sequence_length"]))


def _norm(graph: GraphWriter, out: str | None, residual: str, weight: torch.Tensor, eps: float, name: str) -> tuple[str, str]:
    """RMSNorm of residual + out (transformers' LlamaRMSNorm, in fp32): (normed, new residual)."""
    scale = graph.tensor(f"{name}.weight", weight.numpy())
    if out is None:  # the first layer: nothing to add yet
        return graph.one("SimplifiedLayerNormalization", [residual, scale], name, axis=-1, epsilon=eps, stash_type=1), residual
    # outputs: normed, mean and inv_std_var (training only: left unnamed, so not computed), the sum
    normed, _, _, summed = graph.add("SkipSimplifiedLayerNormalization", [out, residual, scale], name,
                                     [f"{name}/output_0", "", "", f"{name}/output_3"], domain=MS, epsilon=eps)
    return normed, summed


def _linears(graph: GraphWriter, weights, quantization: Quantization | None, x: str, names: tuple[str, ...], scope: str, prefix: str) -> list[str]:
    """The linear layers `names` that read `x`, one MatMul/MatMulNBits per run of layers with the same
    bits (fewer, larger kernels), split back apart; bias added where the checkpoint has one."""
    available = set(weights.keys())
    results: list[str] = []
    runs: list[list[str]] = []
    for name in names:
        bits = quantization.bits_of(name) if quantization else None
        if runs and (quantization.bits_of(runs[-1][0]) if quantization else None) == bits:
            runs[-1].append(name)
        else:
            runs.append([name])
    for run in runs:
        parts = [part.removesuffix("_proj") for part in run]  # q, k, v -> qkv_proj; gate, up -> gate_up_proj
        node = f"{scope}/{('' if max(map(len, parts)) == 1 else '_').join(parts)}_proj"
        matrices = [weights.read(f"{prefix}.{name}.weight") for name in run]
        biases = [f"{prefix}.{name}.bias" for name in run]
        bias = graph.tensor(f"{node}.bias", torch.cat([weights.read(key) for key in biases]).numpy()) if biases[0] in available else None
        if quantization is None:
            y = graph.one("MatMul", [x, graph.tensor(f"{node}.weight", matmul_weight(matrices))], f"{node}/MatMul")
            if bias:
                y = graph.one("Add", [y, bias], f"{node}/Add")
        else:
            y = _matmul_nbits(graph, x, torch.cat(matrices), quantization.bits_of(run[0]), quantization, node, bias)
        sizes = [int(matrix.shape[0]) for matrix in matrices]
        del matrices
        if len(run) == 1:
            results.append(y)
        else:
            split = graph.tensor(f"{node}.split", np.array(sizes, np.int64))
            results += graph.add("Split", [y, split], f"{node}/Split", len(run), axis=-1)
    return results


def _matmul_nbits(graph: GraphWriter, x: str, weight: torch.Tensor, bits: int, quantization: Quantization, node: str, bias: str | None) -> str:
    packed, scales, zero_points = quantize_linear(weight, bits, quantization.block_size)
    inputs = [x, graph.tensor(f"{node}.weight_Q{bits}", packed), graph.tensor(f"{node}.scales", scales), graph.tensor(f"{node}.zero_points", zero_points)]
    if bias:
        inputs += ["", bias]  # g_idx (unused), bias
    out_features, in_features = weight.shape
    return graph.one("MatMulNBits", inputs, f"{node}/MatMulNBits", domain=MS, K=int(in_features), N=int(out_features), bits=bits,
                     block_size=quantization.block_size, accuracy_level=quantization.accuracy_level)


def _attention(graph: GraphWriter, shape: DecoderShape, weights, quantization, h: str, scope: str, prefix: str,
               past: list[str], present: list[str], shared: tuple[str, str, str]) -> str:
    seqlens, total, bias = shared
    q, k, v = _linears(graph, weights, quantization, h, ATTENTION[0], f"{scope}/attn", f"{prefix}.self_attn")
    if shape.qk_norm:  # Qwen3: RMSNorm over each head of q and k, before the rotary embedding
        q = _head_norm(graph, q, shape.heads, shape, weights.read(f"{prefix}.self_attn.q_norm.weight"), f"{scope}/attn/q_norm")
        k = _head_norm(graph, k, shape.kv_heads, shape, weights.read(f"{prefix}.self_attn.k_norm.weight"), f"{scope}/attn/k_norm")
    q = graph.one("RotaryEmbedding", [q, "position_ids", "rotary.cos", "rotary.sin"], f"{scope}/attn/q_rotary", domain=MS)
    k = graph.one("RotaryEmbedding", [k, "position_ids", "rotary.cos", "rotary.sin"], f"{scope}/attn/k_rotary", domain=MS)
    attended = graph.add("GroupQueryAttention", [q, k, v, *past, seqlens, total, "", "", "", bias], f"{scope}/attn/GroupQueryAttention",
                         [f"{scope}/attn/GroupQueryAttention/output_0", *present], domain=MS,
                         num_heads=shape.heads, kv_num_heads=shape.kv_heads, scale=float(shape.head_dim ** -0.5))[0]
    (out,) = _linears(graph, weights, quantization, attended, (ATTENTION[1],), f"{scope}/attn", f"{prefix}.self_attn")
    return out


def _head_norm(graph: GraphWriter, x: str, heads: int, shape: DecoderShape, weight: torch.Tensor, name: str) -> str:
    per_head = graph.one("Reshape", [x, graph.tensor(f"{name}.heads", np.array([0, 0, heads, shape.head_dim], np.int64))], f"{name}/Reshape")
    normed = graph.one("SimplifiedLayerNormalization", [per_head, graph.tensor(f"{name}.weight", weight.numpy())], name,
                       axis=-1, epsilon=shape.eps, stash_type=1)
    return graph.one("Reshape", [normed, graph.tensor(f"{name}.flat", np.array([0, 0, heads * shape.head_dim], np.int64))], f"{name}/Flatten")

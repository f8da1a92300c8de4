"""The two ends of the decoder graph that read the vocabulary table: the embedding lookup and the
logits.

    input_ids --Gather (fp32) | GatherBlockQuantized (int8/int4)--> (batch, seq, hidden)
    hidden --lm_head: Gemm transB (fp32) | MatMulNBits--> logits

A tied table is stored once: fp32, one (vocab, hidden) table read by the Gather and by the Gemm
(transB=1, so no transposed copy); quantized, the lm_head's MatMulNBits blocks, whose
(vocab, blocks, block * bits / 8) bytes the lookup reads as rows (GatherBlockQuantized, onnxruntime
docs/ContribOperators.md). An untied table is quantized the same way on its own. The lm_head and
the tables take `Quantization.head_bits` (8 unless asked: quantize.HEAD_BITS).
"""

from __future__ import annotations

import numpy as np

from lorasp_edge.export.onnx_tensors import MS, GraphWriter
from lorasp_edge.export.quantize import quantize_linear


def lm_head(graph: GraphWriter, shape, weights, quantization):
    """Writes the lm_head's weights now and returns (what a tied lookup shares or None, a function adding
    the head's nodes after the final norm)."""
    key = "model.embed_tokens.weight" if shape.tied else "lm_head.weight"
    table = weights.read(key)
    if quantization is None:
        name = graph.tensor(key, table.numpy())

        def head(x: str) -> str:
            rows = graph.one("Reshape", [x, graph.tensor("lm_head.rows", np.array([-1, shape.hidden], np.int64))], "/lm_head/Reshape")
            return _logits(graph, graph.one("Gemm", [rows, name], "/lm_head/Gemm", transB=1), x)

        return (name if shape.tied else None), head

    bits = quantization.head_bits
    packed, scales, zero_points = quantize_linear(table, bits, quantization.block_size)
    names = [graph.tensor(f"{key}_Q{bits}", packed), graph.tensor(f"{key}.scales", scales), graph.tensor(f"{key}.zero_points", zero_points)]

    def head(x: str) -> str:
        return graph.add("MatMulNBits", [x, *names], "/lm_head/MatMulNBits", ["logits"], domain=MS, K=shape.hidden, N=shape.vocab,
                         bits=bits, block_size=quantization.block_size, accuracy_level=quantization.accuracy_level)[0]

    return ((names, packed.shape) if shape.tied else None), head


def _logits(graph: GraphWriter, rows: str, x: str) -> str:
    """(batch * seq, vocab) back to (batch, seq, vocab), the batch and sequence taken from `x`."""
    dims = graph.one("Shape", [x], "/lm_head/input_shape")
    leading = graph.one("Slice", [dims, graph.constant([0]), graph.constant([2])],
                        "/lm_head/leading")
    target = graph.one("Concat", [leading, graph.constant([-1])], "/lm_head/logits_shape", axis=0)
    return graph.add("Reshape", [rows, target], "/lm_head/Reshape_logits", ["logits"])[0]


def embeddings(graph: GraphWriter, shape, weights, quantization, shared) -> str:
    """input_ids -> (batch, seq, hidden): a Gather of the fp32 table, or GatherBlockQuantized of its blocks;
    `shared` is the tied lm_head's table (fp32 name, or quantized names and B's shape)."""
    name = "/model/embed_tokens"
    if quantization is None:
        table = shared if shared else graph.tensor("model.embed_tokens.weight", weights.read("model.embed_tokens.weight").numpy())
        return graph.one("Gather", [table, "input_ids"], f"{name}/Gather", axis=0)
    if shape.hidden % quantization.block_size:  # GatherBlockQuantized needs whole blocks per row
        table = graph.tensor("model.embed_tokens.weight", weights.read("model.embed_tokens.weight").numpy())
        return graph.one("Gather", [table, "input_ids"], f"{name}/Gather", axis=0)
    if shared:
        (packed, scales, zero_points), packed_shape = shared
    else:
        arrays = quantize_linear(weights.read("model.embed_tokens.weight"), quantization.head_bits, quantization.block_size)
        packed_shape = arrays[0].shape
        parts = (f"weight_Q{quantization.head_bits}", "scales", "zero_points")
        packed, scales, zero_points = (graph.tensor(f"model.embed_tokens.{part}", array) for part, array in zip(parts, arrays))
    # MatMulNBits stores B as (vocab, blocks, block * bits / 8): the same bytes are the lookup's rows.
    rows = graph.one("Reshape", [packed, graph.tensor(f"{name}.rows", np.array([packed_shape[0], -1], np.int64))], f"{name}/rows")
    return graph.one("GatherBlockQuantized", [rows, "input_ids", scales, zero_points], f"{name}/GatherBlockQuantized", domain=MS,
                     gather_axis=0, quantize_axis=1, block_size=quantization.block_size, bits=quantization.head_bits)

"""Weight-only quantization of the exported decoder graph with onnxruntime's MatMulNBits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorasp_edge.export.onnx_graph import PROTOBUF_LIMIT_BYTES, TIED_TABLE, save_onnx

# Kept at 8 bits in a 4-bit model, with the lm_head: llama.cpp's Q4_K_M mix keeps attention.wv and
# feed_forward.w2 at higher precision (ggerganov/llama.cpp PR #1684, "k-quants"); up_proj is added
# because a trained adapter merged into SmolLM2-135M left v/down alone at +17.4% held-out perplexity,
# and with up_proj at +8.8% for +12% size (docs/export.md).
INT4_KEEP_8BIT = ("v_proj", "down_proj", "up_proj")


def _check_arguments(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16, not {block_size}")


def quantize_decoder(source: Path, out_dir: Path, bits: int, block_size: int = 32, accuracy_level: int = 4,
                     external_threshold_bytes: int = PROTOBUF_LIMIT_BYTES, keep_8bit: tuple[str, ...] = INT4_KEEP_8BIT) -> Path:
    """Weight-only block quantization of every MatMul with a constant weight (onnxruntime's MatMulNBits).

    Asymmetric blocks (a zero point per block). bits=4 keeps the lm_head and the `keep_8bit` modules
    (short names) at 8 bits. A tied table is shared afterwards (`_share_tied_table`).
    """
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    _check_arguments(bits, block_size)
    proto = onnx.load(str(source))
    weighted = _weighted_matmuls(proto)
    head = _head_matmuls(proto, weighted)
    if bits == 8:
        groups = {8: weighted}
    else:
        eight = [name for name in weighted if name in head or any(f"/{part}/" in name for part in keep_8bit)]
        groups = {4: [name for name in weighted if name not in eight], 8: eight}
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        for group_bits, names in groups.items():
            if not names:
                continue
            config = DefaultWeightOnlyQuantConfig(
                block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level, bits=group_bits, op_types_to_quantize=("MatMul",)
            )
            excluded = [name for name in weighted if name not in names]
            quantizer = MatMulNBitsQuantizer(proto, nodes_to_exclude=excluded, algo_config=config)
            quantizer.process()
            proto = quantizer.model.model
    finally:
        logger.setLevel(level)
    _share_tied_table(proto)
    return save_onnx(proto, out_dir, external_threshold_bytes)


def _weighted_matmuls(proto) -> list[str]:
    """Names of MatMul nodes whose second input is an initializer (a weight)."""
    initializers = {tensor.name for tensor in proto.graph.initializer}
    return [node.name for node in proto.graph.node if node.op_type == "MatMul" and node.input[1] in initializers]


def _head_matmuls(proto, weighted: list[str]) -> list[str]:
    """The MatMul producing vocabulary-wide logits: its weight has the logits' last dimension."""
    vocab = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    dims = {tensor.name: list(tensor.dims) for tensor in proto.graph.initializer}
    names = set(weighted)
    return [node.name for node in proto.graph.node if node.name in names and dims[node.input[1]][-1] == vocab]


def _share_tied_table(proto) -> None:
    """Point the tied embedding lookup at the lm_head's quantized weight and drop the float table.

    Before: Gather(table (hidden, vocab), ids, axis=1) -> Transpose -> embeddings
    After:  GatherBlockQuantized(B (vocab, hidden * bits / 8), ids, scales, zero_points) -> embeddings
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    gathers = [node for node in graph.node if node.op_type == "Gather" and node.input[0] == TIED_TABLE]
    matmuls = [node for node in graph.node if node.op_type == "MatMulNBits" and node.input[1].startswith(TIED_TABLE)]
    if not gathers or len(matmuls) != 1:
        return
    gather, matmul = gathers[0], matmuls[0]
    attributes = {attribute.name: attribute.i for attribute in matmul.attribute}
    bits, block_size = attributes["bits"], attributes["block_size"]
    if attributes["K"] % block_size:
        return  # MatMulNBits pads K to whole blocks; the padded rows are not embeddings
    transposes = [node for node in graph.node if gather.output[0] in node.input]
    if len(transposes) != 1 or transposes[0].op_type != "Transpose":
        return
    transpose = transposes[0]
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    # MatMulNBits stores B as (vocab, hidden / block, block * bits / 8); the lookup reads the same
    # bytes as (vocab, hidden * bits / 8) rows through a Reshape, not a second copy in the file.
    rows = matmul.input[1] + "_rows"
    shape = rows + "_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([0, -1], dtype=np.int64), shape))
    reshape = helper.make_node("Reshape", [matmul.input[1], shape], [rows], name=rows + "_reshape")
    inputs = [rows, gather.input[1], matmul.input[2]]
    if len(matmul.input) > 3 and matmul.input[3]:
        inputs.append(matmul.input[3])
    lookup = helper.make_node(
        "GatherBlockQuantized", inputs, [transpose.output[0]], name="tied_embedding_lookup",
        domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits,
    )
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.remove(transpose)
    graph.node.insert(position, lookup)
    graph.node.insert(position, reshape)
    if TIED_TABLE in initializers and not any(TIED_TABLE in node.input for node in graph.node):
        graph.initializer.remove(initializers[TIED_TABLE])


def quantize_decoder_streamed(source: Path, out_dir: Path, bits: int, block_size: int = 32, accuracy_level: int = 4,
                              external_threshold_bytes: int = PROTOBUF_LIMIT_BYTES, keep_8bit: tuple[str, ...] = INT4_KEEP_8BIT) -> Path:
    """`quantize_decoder`'s graph, built one weight at a time: the fp32 model is never loaded whole.

    The graph (no weights) is rewritten first: each weighted MatMul becomes the MatMulNBits node
    onnxruntime's quantizer writes (same names, attributes and packing: its `qbits_block_quant`), and
    the tied table is shared. Then each weight is read from the fp32 file, quantized and appended.
    """
    import onnx
    from onnx import helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    from lorasp_edge.export.onnx_graph import ONNX_DATA_FILE, ONNX_FILE
    from lorasp_edge.export.onnx_stream import ExternalData, read_initializer

    _check_arguments(bits, block_size)
    source = Path(source)
    proto = onnx.load(str(source), load_external_data=False)
    graph = proto.graph
    weighted = _weighted_matmuls(proto)
    head = set(_head_matmuls(proto, weighted))
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    node_bits = {name: 8 if bits == 8 or name in head or any(f"/{part}/" in name for part in keep_8bit) else 4 for name in weighted}
    quantized: dict[str, int] = {}  # fp32 weight name -> bits
    nodes = list(graph.node)
    for position, node in enumerate(nodes):
        if node.name not in node_bits or len(initializers[node.input[1]].dims) != 2:
            continue
        weight, node_bit = node.input[1], node_bits[node.name]
        K, N = initializers[weight].dims
        attributes = {"K": K, "N": N, "bits": node_bit, "block_size": block_size}
        if accuracy_level:
            attributes["accuracy_level"] = accuracy_level
        inputs = [node.input[0], f"{weight}_Q{node_bit}", f"{weight}_scales", f"{weight}_zero_points"]
        nodes[position] = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{node_bit}", domain="com.microsoft", **attributes)
        quantized[weight] = node_bit
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(entry.domain == "com.microsoft" for entry in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {name for node in graph.node for name in node.input}
    float_kept = [tensor for tensor in graph.initializer if tensor.name in used]
    # Stubs stand in for the quantized tensors while the tied table is shared (it needs their names).
    stubs = [helper.make_tensor(f"{name}_Q{b}", onnx.TensorProto.UINT8, [0], []) for name, b in quantized.items()]
    del graph.initializer[:]
    graph.initializer.extend(float_kept + stubs)
    _share_tied_table(proto)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used and not tensor.name.endswith(tuple(f"_Q{b}" for b in (4, 8)))]
    total = sum(_quantized_bytes(initializers[name].dims, b, block_size) for name, b in quantized.items())
    total += sum(4 * int(np.prod(tensor.dims)) for tensor in kept)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ExternalData(out_dir / ONNX_DATA_FILE if total > external_threshold_bytes else None)
    written = []
    try:
        for tensor in kept:
            written.append(data.add(tensor.name, read_initializer(tensor, source.parent)))
        for name, node_bit in quantized.items():
            config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level, bits=node_bit)
            packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(read_initializer(initializers[name], source.parent))
            for suffix, array in ((f"_Q{node_bit}", packed), ("_scales", scales), ("_zero_points", zero_points)):
                written.append(data.add(name + suffix, array))
            del packed, scales, zero_points
    finally:
        data.close()
    del graph.initializer[:]
    graph.initializer.extend(written)
    path = out_dir / ONNX_FILE
    onnx.save_model(proto, str(path))
    return path


def _quantized_bytes(dims, bits: int, block_size: int) -> int:
    K, N = dims
    blocks = (K + block_size - 1) // block_size
    return N * blocks * (block_size * bits // 8) + 4 * N * blocks + N * ((blocks + 8 // bits - 1) // (8 // bits))

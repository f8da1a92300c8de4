"""The decoder as one ONNX graph with a KV cache, in optimum's input/output layout.

    input_ids        (batch, seq)                                 int64
    attention_mask   (batch, past + seq)                          int64, 1 = real token, 0 = padding
    position_ids     (batch, seq)                                 int64
    past_key_values.{i}.key|value   (batch, kv_heads, past, head_dim)    float32, past may be 0
      -> logits      (batch, seq, vocab)                          float32
         present.{i}.key|value      (batch, kv_heads, past + seq, head_dim)

The same graph serves the prefill (past = 0) and every decode step (seq = 1); every column of the
attention mask is a cache slot, so a left-padded row keeps its padding in the cache, as transformers'
DynamicCache does. A graph whose metadata carries SHARED_CACHE_KEY also lets the caller bind one
buffer of the context's length as both past and present of a layer, updated in place (past is then
that buffer's length, not the number of positions cached). onnx_build.py writes the graph; this module
holds the contract every writer and runtime here shares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorasp_edge.families import FAMILIES

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx_data"  # optimum's name for the external weights of a > 2 GB model
PROTOBUF_LIMIT_BYTES = 2_000_000_000  # protobuf refuses messages of 2 GiB; stay clear of it
DEFAULT_OPSET = 17
# In a graph's metadata: a runtime may bind one buffer as both past_key_values.i and present.i.
SHARED_CACHE_KEY = "lorasp_edge.past_present_share_buffer"

# Decoders whose attention is plain causal attention over a standard KV cache, tested here.
SUPPORTED_MODEL_TYPES = tuple(name for name, family in FAMILIES.items() if family.onnx_export)


def unsupported_reason(config) -> str | None:
    """Why this model cannot be exported as a KV-cache decoder graph, or None if it can (the family's
    `onnx_export` flag, lorasp_edge.families)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"architecture '{model_type}' is not supported for ONNX export (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return f"{model_type} with sliding-window layers is not supported for ONNX export (full causal attention only)"
    return None


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def initializer_bytes(tensor) -> int:
    from onnx import external_data_helper, helper

    if external_data_helper.uses_external_data(tensor):
        info = external_data_helper.ExternalDataInfo(tensor)
        return int(info.length or 0)
    if tensor.raw_data:
        return len(tensor.raw_data)
    element = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * element


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of all initializers of an ONNX file (external data included), without loading them."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return sum(initializer_bytes(tensor) for tensor in proto.graph.initializer)


def files_bytes(folder: Path, pattern: str = "model.onnx*") -> int:
    return sum(path.stat().st_size for path in folder.glob(pattern) if path.is_file())

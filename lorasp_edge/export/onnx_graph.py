"""The decoder as one ONNX graph with a KV cache, in optimum's input/output layout.

    input_ids        (batch, seq)                                 int64
    attention_mask   (batch, past + seq)                          int64, 1 = real token, 0 = padding
    position_ids     (batch, seq)                                 int64
    past_key_values.{i}.key|value   (batch, kv_heads, past, head_dim)    float32, past may be 0
      -> logits      (batch, seq, vocab)                          float32
         present.{i}.key|value      (batch, kv_heads, past + seq, head_dim)

The same graph serves the prefill (past = 0) and every decode step (seq = 1). It is traced with
torch.onnx's TorchScript exporter (`dynamo=False`) through `DecoderWithCache`, which rebuilds a
transformers `DynamicCache` from the flat past tensors and builds the 4-D attention mask itself from
tensor ops only, so no Python branch on a shape or a mask value is frozen into the trace
(transformers returns a prepared 4-D mask unchanged: `masking_utils.create_causal_mask`).

Tied embeddings are stored once: the graph holds the (hidden, vocab) matrix that the logits MatMul
reads, and looks embeddings up as its columns (a Gather on axis 1 and a transpose of the few rows
gathered) instead of keeping the (vocab, hidden) original beside a transposed copy.

Weight-only quantization (quantize.py) uses onnxruntime's `MatMulNBitsQuantizer` (block-wise,
4 or 8 bits; `accuracy_level=4` lets the kernel quantize activations to int8 and use integer dot
products, onnxruntime's ContribOperators.md). A tied table is then shared in quantized form too: the embedding lookup becomes a `GatherBlockQuantized` over the lm_head's
`MatMulNBits` weight, whose (vocab, hidden/block, block) layout is one quantized row per token
(com.microsoft contrib operators, onnxruntime docs/ContribOperators.md).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorasp_edge.families import FAMILIES

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx_data"  # optimum's name for the external weights of a > 2 GB model
PROTOBUF_LIMIT_BYTES = 2_000_000_000  # protobuf refuses messages of 2 GiB; stay clear of it
DEFAULT_OPSET = 17
TIED_TABLE = "tied_embedding_transposed"  # initializer name of a tied (hidden, vocab) table

# Decoders whose attention is plain causal attention over a standard DynamicCache, tested here.
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


def dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    inputs, outputs = io_names(num_layers)
    axes = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in inputs[3:]})
    axes.update({name: {0: "batch_size", 2: "total_sequence_length"} for name in outputs[1:]})
    return axes


def causal_padding_mask(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, query, past + query) additive mask: 0 where a query may attend, dtype-min elsewhere.

    Query i sits at cache index past + i and sees keys at indices <= its own that are not padding.
    A padding query sees nothing; the finite minimum keeps its softmax uniform instead of NaN.
    """
    key_length = attention_mask.shape[1]
    key_index = torch.arange(key_length, device=attention_mask.device)
    query_index = torch.arange(query_length, device=attention_mask.device) + (key_length - query_length)
    allowed = (key_index[None, :] <= query_index[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _tied(model: nn.Module) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


class DecoderWithCache(nn.Module):
    """A causal LM with flat past/present tensors, the shape the ONNX graph exposes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.decoder = model.get_decoder()
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.tied = _tied(model)
        if self.tied:
            # The (hidden, vocab) table both the lookup and the logits MatMul read: one copy in the graph.
            # A parameter, not a buffer: the tracer turns buffers into one Constant node per use.
            weight = model.get_input_embeddings().weight.detach()
            # A zero-stride placeholder (onnx_stream: weights streamed in later) stays a view.
            table = weight.t() if 0 in weight.stride() else weight.t().contiguous()
            self.register_parameter(TIED_TABLE, nn.Parameter(table, requires_grad=False))

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        if self.tied:
            table = getattr(self, TIED_TABLE)
            columns = table.index_select(1, input_ids.reshape(-1))  # (hidden, batch * seq)
            embeds = columns.t().reshape(input_ids.shape[0], input_ids.shape[1], table.shape[0])
        else:
            embeds = self.model.get_input_embeddings()(input_ids)
        mask = causal_padding_mask(attention_mask, input_ids.shape[1], embeds.dtype)
        hidden = self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=True, **{cache_keyword(self.decoder): cache}
        ).last_hidden_state
        logits = hidden @ getattr(self, TIED_TABLE) if self.tied else self.model.get_output_embeddings()(hidden)
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (logits.float(), *present)


def cache_keyword(decoder: nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated until 5.40).
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def example_inputs(config, batch: int = 2, past: int = 3, seq: int = 4) -> tuple[torch.Tensor, ...]:
    """Trace inputs: sizes distinct from each other and from 0/1, so no axis is mistaken for another."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, text.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.long)
    position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    past_tensors = [torch.randn(batch, kv_heads, past, head_dim, generator=generator) for _ in range(2 * text.num_hidden_layers)]
    return (input_ids, attention_mask, position_ids, *past_tensors)


def export_decoder(model: nn.Module, out_dir: Path, opset: int = DEFAULT_OPSET, external_threshold_bytes: int = PROTOBUF_LIMIT_BYTES) -> Path:
    """Trace `model` (fp32, eval) into out_dir/model.onnx; weights go to model.onnx_data above the threshold."""
    import onnx

    reason = unsupported_reason(model.config)
    if reason:
        raise ValueError(reason)
    wrapper = DecoderWithCache(model).eval()
    inputs, outputs = io_names(wrapper.num_layers)
    previous_attention = model.config._attn_implementation
    model.set_attn_implementation("eager")  # traces to plain MatMul/Softmax, which every runtime has
    try:
        with tempfile.TemporaryDirectory(prefix=".trace-", dir=out_dir) as scratch, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on shape-derived constants; exporter.verify_onnx checks the graph
            traced = Path(scratch) / ONNX_FILE
            torch.onnx.export(
                wrapper,
                example_inputs(model.config),
                str(traced),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic_axes(wrapper.num_layers),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
            proto = onnx.load(str(traced))
    finally:
        model.set_attn_implementation(previous_attention)
    return save_onnx(proto, out_dir, external_threshold_bytes)


def save_onnx(proto, out_dir: Path, external_threshold_bytes: int = PROTOBUF_LIMIT_BYTES) -> Path:
    """Write `proto` as out_dir/model.onnx, with one external data file when its weights need it."""
    import onnx

    path = out_dir / ONNX_FILE
    weight_bytes = sum(initializer_bytes(tensor) for tensor in proto.graph.initializer)
    if weight_bytes > external_threshold_bytes:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=ONNX_DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return path


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


# ------------------------------------------------------------------------------ quantization












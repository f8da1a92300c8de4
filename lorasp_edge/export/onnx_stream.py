"""The decoder graph traced without weights in memory, its weights streamed in from the merged shards.

    model with placeholder weights (one scalar each, expanded: no memory)
        --torch.onnx.export(export_params=False)--> graph whose weights are named inputs
        --each weight input--> an initializer read from the merged safetensors, one tensor at a time
          (a weight whose one consumer is Transpose is stored transposed and the Transpose dropped)
        --> model.onnx (+ model.onnx_data when the weights exceed the external-data threshold)

The traced graph is the one onnx_graph.export_decoder traces (same wrapper, inputs, outputs and
tied table); only the weights' path differs. Each placeholder holds a distinct value, because the
TorchScript exporter merges initializers of equal value, which would merge equal-shaped weights.
Constant folding stays off (it would fold a weight's Transpose into a nameless tensor);
onnxruntime folds the remaining shape arithmetic when it loads the graph.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorasp_edge.export.onnx_graph import (
    DEFAULT_OPSET,
    ONNX_DATA_FILE,
    ONNX_FILE,
    PROTOBUF_LIMIT_BYTES,
    TIED_TABLE,
    DecoderWithCache,
    dynamic_axes,
    example_inputs,
    io_names,
    unsupported_reason,
)

ALIGNMENT = 4096  # external tensors page-aligned, so onnxruntime may map them in place
WRAPPED = "model."  # DecoderWithCache holds the causal LM as `model`
TABLE_CHUNK_COLUMNS = 256  # the tied table is written transposed in slices of this many hidden units


def placeholder_model(config) -> nn.Module:
    """The causal LM for `config` with every parameter a distinct scalar expanded to its shape."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    output = model.get_output_embeddings()
    if output is not None and getattr(config.get_text_config(decoder=True), "tie_word_embeddings", False):
        output.weight = model.get_input_embeddings().weight  # built apart on the meta device; one table
    placeholders: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in placeholders:  # tied parameters stay one object
                value = torch.full((), float(len(placeholders) + 1))
                placeholders[id(param)] = nn.Parameter(value.expand(param.shape), requires_grad=False)
            module._parameters[name] = placeholders[id(param)]
    return model.eval()


INLINE_BYTES = 1024  # onnx.save_model's default size_threshold


class ExternalData:
    """Initializers appended one by one to an external data file (or kept inline when `path` is None)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.handle = open(path, "wb") if path is not None else None  # noqa: SIM115 (closed by close())
        self.offset = 0

    def add(self, name: str, array: np.ndarray | None = None, chunks=None, shape=None, dtype=None):
        """A TensorProto named `name` holding `array`, or the concatenation of `chunks` (C order)."""
        from onnx import TensorProto, helper

        if array is not None:
            chunks, shape, dtype = [array], array.shape, array.dtype
        tensor = TensorProto()
        tensor.name = name
        tensor.dims.extend(int(d) for d in shape)
        tensor.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        # Small tensors stay inline, as onnx.save's size_threshold keeps them: onnxruntime's shape
        # inference reads a Reshape's shape initializer and cannot from external data.
        if self.handle is None or size < INLINE_BYTES:
            tensor.raw_data = b"".join(np.ascontiguousarray(chunk).tobytes() for chunk in chunks)
            return tensor
        pad = -self.offset % ALIGNMENT
        self.handle.write(b"\0" * pad)
        start = self.offset + pad
        length = 0
        for chunk in chunks:
            data = memoryview(np.ascontiguousarray(chunk)).cast("B")
            self.handle.write(data)
            length += len(data)
        self.offset = start + length
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def read_initializer(tensor, folder: Path) -> np.ndarray:
    """An initializer's values, from its raw bytes or with pread from its external file (nothing mapped)."""
    from onnx import helper, numpy_helper

    if tensor.data_location != tensor.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    array = np.empty(tuple(tensor.dims), dtype=dtype)
    view = memoryview(array).cast("B")
    offset = int(info.get("offset", 0))
    with open(folder / info["location"], "rb") as handle:
        done = 0
        while done < len(view):
            got = os.preadv(handle.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"{folder / info['location']}: truncated (tensor {tensor.name})")
            done += got
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), offset, len(view), os.POSIX_FADV_DONTNEED)
    return array


def export_decoder_streamed(config, weights, out_dir: Path, opset: int = DEFAULT_OPSET,
                            external_threshold_bytes: int = PROTOBUF_LIMIT_BYTES) -> Path:
    """Trace the decoder for `config` and fill its weights from `weights.read(key)` (fp32, by checkpoint key)."""
    import onnx

    reason = unsupported_reason(config)
    if reason:
        raise ValueError(reason)
    model = placeholder_model(config)
    model.set_attn_implementation("eager")  # traces to plain MatMul/Softmax, which every runtime has
    wrapper = DecoderWithCache(model).eval()
    inputs, outputs = io_names(wrapper.num_layers)
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=out_dir) as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape-derived constants; verification checks the graph
        traced = Path(scratch) / ONNX_FILE
        torch.onnx.export(
            wrapper, example_inputs(config), str(traced), input_names=inputs, output_names=outputs,
            dynamic_axes=dynamic_axes(wrapper.num_layers), opset_version=opset,
            do_constant_folding=False, export_params=False, dynamo=False,
        )
        proto = onnx.load(str(traced))
    graph = proto.graph
    weight_inputs = [item for item in graph.input if item.name not in set(inputs)]
    shapes = {item.name: [d.dim_value for d in item.type.tensor_type.shape.dim] for item in weight_inputs}
    total = sum(4 * int(np.prod(shape)) for shape in shapes.values())
    data = ExternalData(out_dir / ONNX_DATA_FILE if total > external_threshold_bytes else None)
    embedding_key = _embedding_key(model)
    available = set(weights.keys())
    try:
        for item in weight_inputs:
            graph.input.remove(item)
            consumers = [node for node in graph.node if item.name in node.input]
            if item.name == TIED_TABLE:
                graph.initializer.append(_tied_table(data, weights, embedding_key))
                continue
            key = item.name.removeprefix(WRAPPED)
            if key not in available and model.get_output_embeddings() is not None and key == _output_key(model):
                key = embedding_key  # tied lm_head without the table (not reached while DecoderWithCache shares it)
            tensor = weights.read(key)
            if list(tensor.shape) != shapes[item.name]:
                raise ValueError(f"weight {key} has shape {tuple(tensor.shape)}, the graph needs {tuple(shapes[item.name])}")
            if len(consumers) == 1 and consumers[0].op_type == "Transpose" and _swaps_two_axes(consumers[0], tensor.dim()):
                transpose = consumers[0]
                graph.initializer.append(data.add(transpose.output[0], tensor.t().contiguous().numpy()))
                graph.node.remove(transpose)
            else:
                graph.initializer.append(data.add(item.name, tensor.numpy()))
            del tensor
    finally:
        data.close()
    path = out_dir / ONNX_FILE
    onnx.save_model(proto, str(path))
    return path


def _swaps_two_axes(node, rank: int) -> bool:
    perm = [attribute.ints for attribute in node.attribute if attribute.name == "perm"]
    return rank == 2 and (not perm or list(perm[0]) == [1, 0])


def _embedding_key(model) -> str:
    embeddings = model.get_input_embeddings()
    return next(f"{name}.weight" for name, module in model.named_modules() if module is embeddings)


def _output_key(model) -> str:
    output = model.get_output_embeddings()
    return next(f"{name}.weight" for name, module in model.named_modules() if module is output)


def _tied_table(data: ExternalData, weights, embedding_key: str):
    """The (hidden, vocab) table from the (vocab, hidden) embeddings, transposed slice by slice."""
    table = weights.read(embedding_key)
    vocab, hidden = table.shape
    chunks = (table[:, start : start + TABLE_CHUNK_COLUMNS].t().contiguous().numpy() for start in range(0, hidden, TABLE_CHUNK_COLUMNS))
    return data.add(TIED_TABLE, chunks=chunks, shape=(hidden, vocab), dtype=np.float32)

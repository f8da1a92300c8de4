"""The exported decoder graph run by onnxruntime in slices of consecutive layers, one session open at a time.

An fp32 session holds every weight (4 bytes x parameters: 12.9 GB for Llama-3.2-3B), more than the
device a model of that size is exported on. The verification does not need the whole graph at once:
its nodes are split by the layer their name scopes them to (onnx_build names a layer's nodes
`/model/layers.N/...`), and each slice is written as its own small graph whose initializers point
into the same external data file. A forward then opens the slices in order:

    feeds --slice 0 (embedding, layers 0..a)--> hidden, rotary, mask --slice 1 (layers a..b)--> ... --> logits, present.*

Every node of the file runs exactly once per forward, so the slices compute what the whole graph
computes (onnxruntime may fuse differently at a slice's edge: tests/export/test_export_memory.py
holds the two within 1e-6 of the logit scale). The peak is the largest slice's weights, not the
graph's; the cost is that every forward reads the slices' weights again (from the page cache).

    nodes scoped to a layer            -> that layer's slice
    nodes computed from weights only   -> copied into every slice that reads them (the quantized
                                          table's row view, shape constants): never passed along
    other nodes (embedding, rotary,    -> the latest slice among their inputs' (graph inputs: 0),
    mask, final norm, logits)             so the logits land in the last slice
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorasp_edge.export.onnx_graph import initializer_bytes, io_names
from lorasp_edge.export.onnx_runtime import DecoderRuntime, open_session

LAYER_SCOPE = re.compile(r"/layers\.(\d+)/")


class SliceError(ValueError):
    """The graph cannot be cut at layer boundaries (the whole session is used instead)."""


@dataclass
class GraphSlice:
    path: Path
    inputs: list[str]  # graph inputs and tensors earlier slices produced
    outputs: list[str]  # graph outputs and tensors later slices read
    weight_bytes: int  # bytes of the initializers it loads


def layer_ranges(num_layers: int, count: int) -> list[tuple[int, int]]:
    """`count` runs of consecutive layers, as even as whole layers allow: [(first, end), ...]."""
    count = max(1, min(count, num_layers))
    bounds = [round(i * num_layers / count) for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(count)]


def _value_info(name: str, known: dict):
    if name not in known:
        raise SliceError(f"no type is known for '{name}', which crosses a slice boundary")
    return known[name]


def write_slices(path: Path, ranges: list[tuple[int, int]]) -> list[GraphSlice]:
    """Split the graph at `path` into one graph per range of layers, written beside it (hidden files
    `.slice-K.onnx` that share its external data). Raises SliceError when the nodes do not cut cleanly."""
    import onnx
    from onnx import AttributeProto, helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for node in graph.node for a in node.attribute):
        raise SliceError("the graph has control-flow subgraphs")
    slice_of_layer = {layer: k for k, (first, end) in enumerate(ranges) for layer in range(first, end)}
    last = len(ranges) - 1
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {value.name for value in graph.input}

    constant_producer: dict[str, int] = {}  # tensor computed from weights only -> index of its node
    produced_in: dict[str, int] = {}  # dynamic tensor -> slice
    nodes_of: list[list[int]] = [[] for _ in ranges]
    for index, node in enumerate(graph.node):
        dynamic = [name for name in node.input if name and name not in initializers and name not in constant_producer]
        scope = LAYER_SCOPE.search(node.name)
        if not dynamic:
            constant_producer.update((name, index) for name in node.output)
            continue
        earliest = max((produced_in.get(name, 0) for name in dynamic), default=0)
        if scope is not None:
            layer = int(scope.group(1))
            if layer not in slice_of_layer:
                raise SliceError(f"node {node.name} names layer {layer}, beyond the graph's {len(slice_of_layer)}")
            k = slice_of_layer[layer]
            if k < earliest:
                raise SliceError(f"node {node.name} reads a tensor a later slice computes")
        else:
            k = earliest
        if any(name not in produced_in and name not in graph_inputs for name in dynamic):
            raise SliceError(f"node {node.name} reads a tensor no earlier node computes")
        produced_in.update((name, k) for name in node.output if name)  # '' is an optional output left out
        nodes_of[k].append(index)
    graph_outputs = [value.name for value in graph.output]
    if any(produced_in.get(name) is None for name in graph_outputs):
        raise SliceError("a graph output is computed from weights only")
    if produced_in["logits"] != last:
        raise SliceError("the logits are not computed in the last slice")

    inferred = onnx.shape_inference.infer_shapes(model)
    known = {value.name: value for value in [*inferred.graph.value_info, *graph.input, *graph.output]}
    read_later = {}  # dynamic tensor -> last slice that reads it
    for k, indices in enumerate(nodes_of):
        for index in indices:
            for name in graph.node[index].input:
                if name and (name in produced_in or name in graph_inputs):
                    read_later[name] = max(read_later.get(name, k), k)

    slices = []
    for k, indices in enumerate(nodes_of):
        dynamic_nodes = [graph.node[i] for i in indices]
        needed, stack = set(), [name for node in dynamic_nodes for name in node.input if name in constant_producer]
        while stack:  # the weight-only nodes this slice reads, with theirs
            index = constant_producer[stack.pop()]
            if index not in needed:
                needed.add(index)
                stack += [name for name in graph.node[index].input if name in constant_producer]
        nodes = [graph.node[i] for i in sorted(needed | set(indices))]
        own = {name for node in dynamic_nodes for name in node.output if name}
        reads = []
        for node in nodes:
            reads += [name for name in node.input if name and name not in own and name not in constant_producer and name not in initializers]
        inputs = list(dict.fromkeys(reads))
        outputs = [name for name in own if name in graph_outputs or read_later.get(name, k) > k]
        outputs.sort(key=lambda name: (graph_outputs.index(name) if name in graph_outputs else -1, name))
        weights = sorted({name for node in nodes for name in node.input if name in initializers})
        sub = helper.make_graph(
            nodes, f"{graph.name}-slice{k}",
            [_value_info(name, known) for name in inputs], [_value_info(name, known) for name in outputs],
            initializer=[initializers[name] for name in weights],
        )
        sliced = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version, functions=model.functions)
        slice_path = path.parent / f".slice-{k}.onnx"
        # serialized by hand: onnx.save would try to write the external tensors' data, which is not loaded
        slice_path.write_bytes(sliced.SerializeToString())
        slices.append(GraphSlice(slice_path, inputs, outputs, sum(initializer_bytes(initializers[name]) for name in weights)))
    return slices


class SlicedDecoder(DecoderRuntime):
    """OnnxDecoder's interface over a graph split into layer slices; one session is open at a time.
    `close` (or leaving the `with` block) removes the slice files."""

    def __init__(self, path: str | Path, ranges: list[tuple[int, int]], prepack: bool = False):
        import onnx

        self.path, self.prepack = Path(path), prepack
        graph = onnx.load(str(self.path), load_external_data=False).graph
        past = [value for value in graph.input if value.name.startswith("past_key_values.")]
        self.num_layers = len(past) // 2
        dims = past[0].type.tensor_type.shape.dim
        self.kv_heads, self.head_dim = dims[1].dim_value, dims[3].dim_value
        self.input_names, self.output_names = io_names(self.num_layers)
        self.ranges = ranges
        self.slices = write_slices(self.path, ranges)
        self._last_reader = {}
        for k, part in enumerate(self.slices):
            for name in part.inputs:
                self._last_reader[name] = k

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]):
        feeds = [input_ids.astype(np.int64), attention_mask.astype(np.int64), position_ids.astype(np.int64), *past]
        values = dict(zip(self.input_names, feeds))
        results = {}
        for k, part in enumerate(self.slices):
            session = open_session(part.path, prepack=self.prepack)
            produced = session.run(part.outputs, {name: values[name] for name in part.inputs})
            del session  # its weights leave before the next slice's arrive
            for name, value in zip(part.outputs, produced):
                values[name] = value
                if name in self.output_names:
                    results[name] = value
            for name in [name for name in values if self._last_reader.get(name, -1) <= k and name not in results]:
                del values[name]  # nothing later reads it
        logits, *present = (results[name] for name in self.output_names)
        return logits, present

    def close(self) -> None:
        for part in self.slices:
            part.path.unlink(missing_ok=True)

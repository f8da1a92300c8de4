"""How much memory an export takes: measured afterwards (peak RSS), estimated beforehand (`--mem`,
and the choice of source, lorasp_edge.export.sources.choose).

The in-memory source holds the base, the adapted model and the merged fp32 copy: about four fp32
copies of the model (IN_MEMORY_FACTOR). The streamed source runs in phases whose resident sets do
not overlap, its own and each format's (the format's `memory_phases`):

    merge           one tensor in 16-bit + its fp32 copy + the merged result
    reference       one unit's fp32 weights (a decoder layer, or the vocabulary table) + activations
                    (every PyTorch forward runs before a runtime opens)
    onnx            the fp32 onnxruntime session: every fp32 weight (4 bytes x parameters) + a scoring
                    piece, or, when that exceeds the budget, the largest of N sessions over consecutive
                    layers opened one at a time (onnx_slices.py); the quantizer (one weight); the
                    quantized session
    genai           onnxruntime-genai's model over each graph, whole
    gguf            one tensor, its permuted copy and its converted bytes; llama.cpp's mapped file and logits

so the estimate is the runtime's fixed cost plus the largest phase. The fixed cost and the
session's factor over its weights are measured by tools/export_memory.py (docs/export.md,
"Export memory").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lorasp_edge import allocator

# Measured with tools/export_memory.py on Qwen2.5-0.5B/1.5B shapes (docs/export.md "Export memory").
RUNTIME_BYTES = 900 << 20  # resident set just before the fp32 session opened (1.5B run: 0.90 GB)
SESSION_FACTOR = 1.05  # onnxruntime CPU session (pre-packing off) over its initializers: 2.05 GB for 1.98 GB (0.5B, --session)
# onnxruntime-genai keeps onnxruntime's weight pre-packing on: its model over Qwen2.5-0.5B's fp32 graph
# (1.98 GB of weights in model.onnx_data) peaked 1.30x the weights above the resident set before it
# opened (tools/export_memory.py --genai-prepacked). The export's check opens the fp32 graph with
# pre-packing off (export/genai.py): 1.03x (--genai), under SESSION_FACTOR, the term used for it.
# Over a quantized graph (MatMulNBits packs its blocks): Qwen2.5-1.5B's int4 genai folder peaked 2.44
# GB over the resident set before it opened, 1.54x its 1.58 GB of files (--genai); the phase is this
# factor over quantized_graph_bytes plus a scoring piece (2.73 GB for that folder). Held out:
# SmolLM2-135M's int4 genai folder measured 0.32 GB, estimated 0.33.
GENAI_QUANTIZED_FACTOR = 1.55
# Perplexity window: one forward over it added 0.83 GB (0.5B, --session) and 1.14 GB (1.5B run) to
# the session, 2.7x and 3.7x its fp32 logits (window x vocab x 4 bytes); 4x is the term used. The
# PyTorch reference still runs whole windows; a session scores them in pieces of ONNX_PIECE_ROWS
# positions through its KV cache (verify.onnx_logit_pieces): scoring a 512-token window that way
# added 0.39 GB to a session over a two-layer graph of Qwen2.5-1.5B's widths and vocabulary (5.0x
# a piece's logits; one forward over the window added 1.05 GB; tools/export_memory.py --session).
ACTIVATION_WINDOW = 512
# Writing a graph inline (one protobuf, under the 2 GB limit) holds it whole while it is built and
# serialized: the high-water mark rose by 6.04x the file for SmolLM2-135M (0.54 GB) and 5.04x for
# Qwen2.5-0.5B's shape (1.98 GB; tools/export_memory.py --inline-graph); the larger is the term.
# Streamed sources write every graph's weights to model.onnx_data.
INLINE_WRITE_FACTOR = 6.0
PIECE_LOGITS_FACTOR = 5
IN_MEMORY_FACTOR = 4.0  # in-memory path: base, merged copy, graph and session (Qwen2.5-1.5B: 24.3 GB / 6.2 GB, measured with the earlier traced graph: an upper bound)


@dataclass
class ExportEstimate:
    peak_bytes: int
    phases: dict[str, int]  # phase -> bytes above the runtime's fixed cost
    session_slices: int = 1  # onnxruntime sessions the fp32 graph is verified in (onnx_slices.py)

    @property
    def largest_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")  # a decoder layer's checkpoint keys: model.layers.N.*


def _layer_of(key: str) -> int | None:
    match = LAYER_KEY.search(key)
    return int(match.group(1)) if match else None


def shapes_summary(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int, int]:
    """(float parameters, largest tensor's elements, largest unit's elements, vocabulary) from checkpoint shapes.

    A unit is a decoder layer (keys under `layers.N.`) or any other single tensor."""
    parameters, largest, vocab = 0, 0, 0
    units: dict[str, int] = {}
    for key, shape in shapes.items():
        count = math.prod(shape)
        parameters += count
        largest = max(largest, count)
        layer = _layer_of(key)
        unit = f"layer {layer}" if layer is not None else key
        units[unit] = units.get(unit, 0) + count
        if "embed" in key and len(shape) == 2:
            vocab = max(vocab, shape[0])
    return parameters, largest, max(units.values(), default=0), vocab


def quantized_graph_bytes(shapes: dict[str, tuple[int, ...]], quantize: str, keep_8bit: tuple[str, ...], block_size: int) -> int:
    """Weight bytes of the int8/int4 graph, from the checkpoint's shapes as onnx_build writes it: each
    decoder linear at its bits (quantize.linear_bits: int4 keeps `keep_8bit` at 8), the vocabulary
    table and lm_head at HEAD_BITS, vectors (norms, biases) in fp32."""
    from lorasp_edge.export.quantize import HEAD_BITS, linear_bits, quantized_bytes

    bits = {"int8": 8, "int4": 4}[quantize]
    total = 0
    for key, shape in shapes.items():
        if len(shape) != 2:
            total += 4 * math.prod(shape)
        elif _layer_of(key) is None:
            total += quantized_bytes(*shape, HEAD_BITS, block_size)
        else:  # model.layers.3.mlp.up_proj.weight -> up_proj
            total += quantized_bytes(*shape, linear_bits(key.rsplit(".", 2)[-2], bits, keep_8bit), block_size)
    return total


def slice_parameters(shapes: dict[str, tuple[int, ...]], count: int) -> list[int]:
    """Parameters each of `count` sessions over consecutive layers loads (onnx_slices.layer_ranges): the
    first also holds the embedding table, the last the final norm and the output matrix (the table
    again when it is tied: both ends read it)."""
    from lorasp_edge.export.onnx_slices import layer_ranges

    per_layer: dict[int, int] = {}
    first, last, table, tied = 0, 0, 0, not any("lm_head" in key for key in shapes)
    for key, shape in shapes.items():
        parameters = math.prod(shape)
        layer = _layer_of(key)
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + parameters
        elif "embed" in key:
            first += parameters
            table += parameters if tied and len(shape) == 2 else 0
        else:
            last += parameters
    ranges = layer_ranges(max(len(per_layer), 1), count)
    sizes = [sum(per_layer.get(layer, 0) for layer in range(a, b)) for a, b in ranges]
    sizes[0] += first
    sizes[-1] += last + (table if len(sizes) > 1 else 0)
    return sizes


def session_slices(shapes: dict[str, tuple[int, ...]], budget_bytes: int | None) -> int:
    """The fewest sessions over consecutive layers whose largest fits `budget_bytes` with the
    runtime's fixed cost and a scoring piece (one session when it fits whole or there is no budget;
    one per layer when nothing fits, and the estimate then says so)."""
    if budget_bytes is None:
        return 1
    layers = len({_layer_of(key) for key in shapes} - {None}) or 1
    piece = _piece_bytes(shapes_summary(shapes)[3])
    for count in range(1, layers + 1):
        if RUNTIME_BYTES + SESSION_FACTOR * 4 * max(slice_parameters(shapes, count)) + piece <= budget_bytes:
            return count
    return layers


def _piece_bytes(vocab: int) -> int:
    from lorasp_edge.export.verify import ONNX_PIECE_ROWS

    return PIECE_LOGITS_FACTOR * 4 * ONNX_PIECE_ROWS * vocab  # what scoring a window in pieces adds to a session


def estimate_streamed(shapes: dict[str, tuple[int, ...]], formats, settings, budget_bytes: int | None = None) -> ExportEstimate:
    """The streamed export's peak by phase: the merge and the layer-streamed reference, then each
    format's own phases (its `memory_phases`); under `budget_bytes` the fp32 graph is verified in as
    many layer slices as it takes to fit (`session_slices`)."""
    _, largest, unit, vocab = shapes_summary(shapes)
    activations = 4 * 4 * ACTIVATION_WINDOW * vocab  # one window's logits and the buffers around them
    # 16-bit read + fp32 copy + merged result
    phases = {"merge": 2 * largest + 2 * 4 * largest, "reference": 4 * unit + activations}
    slices = 1
    for item in formats:
        found, item_slices = item.memory_phases(shapes, settings, budget_bytes)
        phases.update(found)
        slices = item_slices or slices
    return ExportEstimate(RUNTIME_BYTES + max(phases.values()), phases, slices)


def onnx_phases(shapes: dict[str, tuple[int, ...]], quantize: str, budget_bytes: int | None, keep_8bit: tuple[str, ...],
                block_size: int) -> tuple[dict[str, int], int]:
    """The onnx format's phases over a streamed source, and the layer slices its fp32 session takes."""
    parameters, largest, _, vocab = shapes_summary(shapes)
    piece = _piece_bytes(vocab)
    slices = session_slices(shapes, budget_bytes)
    session = "fp32 ONNX session" if slices == 1 else f"fp32 ONNX session ({slices} layer slices)"
    phases = {session: int(SESSION_FACTOR * 4 * max(slice_parameters(shapes, slices))) + piece}
    if quantize != "none":  # the quantizer reads one fp32 weight and writes its blocks
        phases["quantize"] = 2 * 4 * largest
        phases[f"{quantize} ONNX session"] = int(SESSION_FACTOR * quantized_graph_bytes(shapes, quantize, keep_8bit, block_size)) + piece
    return phases, slices


def genai_phases(shapes: dict[str, tuple[int, ...]], quantize: str, keep_8bit: tuple[str, ...], block_size: int) -> dict[str, int]:
    """onnxruntime-genai opens each graph whole (no layer slices), one at a time, with a generator's
    cache; the fp32 graph with pre-packing off, a quantized one pre-packed."""
    parameters, _, _, vocab = shapes_summary(shapes)
    phases = {"onnxruntime-genai fp32 model": int(SESSION_FACTOR * 4 * parameters) + _piece_bytes(vocab)}
    if quantize != "none":
        quantized = quantized_graph_bytes(shapes, quantize, keep_8bit, block_size)
        phases[f"onnxruntime-genai {quantize} model"] = int(GENAI_QUANTIZED_FACTOR * quantized) + _piece_bytes(vocab)
    return phases


# llama.cpp's check reads the file into its own buffers (not mapped) and keeps logits for every position
# of its context: tools/llamacpp_memory.py on the Qwen2.5-1.5B f16 file (3.09 GB) measured 3.55 GB
# anonymous once open (1.15x the file) and 1.23 GB more after one 512-token forward (4x its logits).
LLAMACPP_FILE_FACTOR = 1.15
LLAMACPP_LOGITS_FACTOR = 4


def gguf_phases(shapes: dict[str, tuple[int, ...]], bytes_per_weight: float) -> dict[str, int]:
    """Writing holds one tensor in fp32, its row-permuted copy and its converted bytes; llama.cpp's check
    holds the file's weights and logits for every position of a window."""
    parameters, largest, _, vocab = shapes_summary(shapes)
    phases = {"GGUF write": int((4 + 4 + bytes_per_weight) * largest)}
    from lorasp_edge.export import llamacpp

    if llamacpp.available():
        logits = 4 * (ACTIVATION_WINDOW + 1) * vocab
        phases["llama.cpp (GGUF)"] = int(LLAMACPP_FILE_FACTOR * bytes_per_weight * parameters) + LLAMACPP_LOGITS_FACTOR * logits
    return phases


def estimate_in_memory(shapes: dict[str, tuple[int, ...]], formats=(), settings=None) -> ExportEstimate:
    """The in-memory source's peak: its fp32 copies, or a format's own phase over them (its
    `in_memory_phases`), whichever is larger."""
    parameters = shapes_summary(shapes)[0]
    phases = {"fp32 model copies": int(IN_MEMORY_FACTOR * 4 * parameters)}
    for item in formats:
        phases.update(item.in_memory_phases(shapes, settings))
    return ExportEstimate(RUNTIME_BYTES + max(phases.values()), phases)


def inline_graph_phases(shapes: dict[str, tuple[int, ...]], limit_bytes: int) -> dict[str, int]:
    """A graph whose weights stay under `limit_bytes` is written inline from the in-memory source: the
    merged model beside the graph built whole (INLINE_WRITE_FACTOR)."""
    weights = 4 * shapes_summary(shapes)[0]
    return {"ONNX graph written inline": int((1 + INLINE_WRITE_FACTOR) * weights)} if weights <= limit_bytes else {}


def peak_rss_bytes() -> int:
    """This process's peak resident set plus its largest finished child's (the kernel's high-water marks)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) * 1024  # Linux reports kilobytes


def check_budget(budget_bytes: int, estimate: ExportEstimate) -> None:
    """UserError (exit 2) naming the estimate when it exceeds the budget."""
    from lorasp_edge.errors import UserError

    if estimate.peak_bytes > budget_bytes:
        raise UserError(
            f"the export needs about {estimate.peak_bytes / 1e9:.2f} GB (largest phase: {estimate.largest_phase}), "
            f"over --mem {budget_bytes / 1e9:.2f} GB; nothing was written"
        )


def release_large_frees() -> None:
    """Map every large allocation on its own (lorasp_edge.allocator): a streamed export frees a
    layer's weights every step, and in glibc's heap each phase's holes would add to the next's peak."""
    allocator.map_large_allocations()


def trim_heap() -> None:
    """Called before an onnxruntime session opens, so the PyTorch side's freed small blocks do not stay resident."""
    allocator.trim_heap()

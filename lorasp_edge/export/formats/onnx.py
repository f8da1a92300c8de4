"""The `onnx` format: the KV-cache decoder graph for onnxruntime and optimum, and its weight-only
quantized copies (`--quantize`, `--block-size`), written by lorasp_edge.export.onnx_writer."""

from __future__ import annotations

from lorasp_edge.export.formats.entry import ExportFormat

QUANTIZATIONS = ("none", "int8", "int4")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT_BYTES_PER_PARAMETER = {"int8": 1.2, "int4": 0.8}  # int4 keeps v/up/down and the lm_head at 8 bits (files)


def flag_problems(settings) -> list[str]:
    found = []
    if settings.quantize not in QUANTIZATIONS:
        found.append(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, not '{settings.quantize}'")
    if settings.block_size < 16 or settings.block_size & (settings.block_size - 1):
        found.append(f"--block-size must be a power of two >= 16, not {settings.block_size}")
    elif settings.block_size != _defaults()[1] and settings.quantize == "none":
        found.append(f"--block-size {settings.block_size} is for --quantize int8 or int4: nothing is quantized without one")
    unknown = [name for name in keep_8bit(settings) if name not in LINEAR_NAMES]
    if unknown:
        found.append(f"--keep-8bit must name linear layers ({', '.join(LINEAR_NAMES)}) or be 'none', not '{settings.keep_8bit}'")
    elif settings.quantize != "int4" and set(keep_8bit(settings)) != set(_defaults()[0]):
        found.append(f"--keep-8bit is for --quantize int4, not --quantize {settings.quantize}: only an int4 graph keeps layers at 8 bits")
    if not 14 <= settings.opset <= 20:
        found.append(f"--opset must be between 14 and 20 (the range the graph builder is tested on), not {settings.opset}")
    return found


def _defaults() -> tuple[tuple[str, ...], int]:
    """The int4 mix and the block size the builder takes by default."""
    from lorasp_edge.export.quantize import DEFAULT_BLOCK_SIZE, INT4_KEEP_8BIT  # imported when checked: the registry stays light for --help

    return INT4_KEEP_8BIT, DEFAULT_BLOCK_SIZE


def keep_8bit(settings) -> tuple[str, ...]:
    """The linear layers an int4 graph keeps at 8 bits (`--keep-8bit`; 'none' keeps none)."""
    return tuple(part.strip() for part in settings.keep_8bit.split(",") if part.strip() and part.strip() != "none")


def disk_bytes(parameters: int, settings) -> int:
    quantized = parameters * QUANT_BYTES_PER_PARAMETER.get(settings.quantize, 0)
    return int(4 * parameters + quantized)


def memory_phases(shapes, settings, budget):
    from lorasp_edge.export.memory import onnx_phases

    return onnx_phases(shapes, settings.quantize, budget, keep_8bit(settings), settings.block_size)


def in_memory_phases(shapes, settings):
    from lorasp_edge.export.memory import inline_graph_phases

    return inline_graph_phases(shapes, settings.external_threshold_bytes)


FORMAT = ExportFormat(
    name="onnx",
    description="KV-cache decoder graph for onnxruntime and optimum (+ --quantize int8/int4)",
    writer="lorasp_edge.export.onnx_writer:write_onnx",
    disk_bytes=disk_bytes,
    streams=True,
    flags=("quantize", "block_size", "keep_8bit", "opset"),
    flag_problems=flag_problems,
    memory_phases=memory_phases,
    in_memory_phases=in_memory_phases,
    unsupported="lorasp_edge.export.onnx_graph:unsupported_reason",
    adapter_refusal="the decoder graph is written from the merged weights and has no LoRA inputs to apply an adapter through",
    entries=r"onnx(-int\d)?",
)

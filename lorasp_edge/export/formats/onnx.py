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
    unknown = [name for name in keep_8bit(settings) if name not in LINEAR_NAMES]
    if unknown:
        found.append(f"--keep-8bit must name linear layers ({', '.join(LINEAR_NAMES)}) or be 'none', not '{settings.keep_8bit}'")
    if not 14 <= settings.opset <= 20:
        found.append(f"--opset must be between 14 and 20 (the range the graph builder is tested on), not {settings.opset}")
    return found


def keep_8bit(settings) -> tuple[str, ...]:
    """The linear layers an int4 graph keeps at 8 bits (`--keep-8bit`; 'none' keeps none)."""
    return tuple(part.strip() for part in settings.keep_8bit.split(",") if part.strip() and part.strip() != "none")


def disk_bytes(parameters: int, settings) -> int:
    quantized = parameters * QUANT_BYTES_PER_PARAMETER.get(settings.quantize, 0)
    return int(4 * parameters + quantized)


def memory_phases(shapes, settings, budget):
    from lorasp_edge.export.memory import onnx_phases

    return onnx_phases(shapes, settings.quantize, budget)


FORMAT = ExportFormat(
    name="onnx",
    description="KV-cache decoder graph for onnxruntime and optimum (+ --quantize int8/int4)",
    writer="lorasp_edge.export.onnx_writer:write_onnx",
    disk_bytes=disk_bytes,
    streams=True,
    flags=("quantize", "block_size", "keep_8bit", "opset"),
    flag_problems=flag_problems,
    memory_phases=memory_phases,
    unsupported="lorasp_edge.export.onnx_graph:unsupported_reason",
    adapter_refusal="the decoder graph is written from the merged weights and has no LoRA inputs to apply an adapter through",
    entries=r"onnx(-int\d)?",
)

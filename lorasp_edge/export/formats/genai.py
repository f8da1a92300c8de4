"""The `genai` format: folders onnxruntime-genai loads, written by lorasp_edge.export.genai around the
onnx format's graphs (required: written first and hard-linked, so the graph is written, quantized and
verified once, from whichever source the export reads)."""

from __future__ import annotations

from lorasp_edge.export.formats.entry import ExportFormat


def disk_bytes(parameters: int, settings) -> int:
    return 0  # the onnx format's files, hard-linked (a copy only where the file system has no links)


def memory_phases(shapes, settings, budget):
    from lorasp_edge.export.formats.onnx import keep_8bit
    from lorasp_edge.export.memory import genai_phases

    return genai_phases(shapes, settings.quantize, keep_8bit(settings), settings.block_size), None


FORMAT = ExportFormat(
    name="genai",
    description="folder for onnxruntime-genai (+ --quantize int8/int4)",
    writer="lorasp_edge.export.genai:write_genai",
    disk_bytes=disk_bytes,
    streams=True,
    requires=("onnx",),
    memory_phases=memory_phases,
    unsupported="lorasp_edge.export.genai:unsupported_reason",
    adapter_refusal=(
        "onnxruntime-genai applies an .onnx_adapter by feeding its tensors to graph inputs of the same names, and the "
        "genai graph here is written from the merged weights, with the LoRA matrices folded into the base weights and no such inputs"
    ),
    entries=r"genai(-int\d)?",
)

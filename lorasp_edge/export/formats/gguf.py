"""The `gguf` format: one GGUF file for llama.cpp and an Ollama Modelfile (`--gguf-type`), written by
lorasp_edge.export.gguf from the merged weights by key (in memory or streamed from the merged shards);
with `--adapter-only`, the base as trained and a llama.cpp LoRA adapter GGUF (export/gguf_adapter.py)."""

from __future__ import annotations

from lorasp_edge.export.formats.entry import ExportFormat

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
GGUF_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8, "q5_1": 5, "q5_0": 5, "q4_1": 4, "q4_0": 4}
# Bytes per weight of each type: ggml's block sizes (gguf.GGML_QUANT_SIZES: 32 weights in 34, 24, 22, 20, 18 bytes).
BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32}


def flag_problems(settings) -> list[str]:
    if settings.gguf_type not in GGUF_TYPES:
        return [f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, not '{settings.gguf_type}'"]
    return []


def disk_bytes(parameters: int, settings) -> int:
    # 4/5-bit types keep the embedding table and the head at q8_0; counting every weight at 8 bits is the bound.
    return int(parameters * max(BYTES_PER_WEIGHT.get(settings.gguf_type, 4), 34 / 32 if GGUF_BITS.get(settings.gguf_type, 32) < 8 else 0))


def memory_phases(shapes, settings, budget):
    from lorasp_edge.export.memory import gguf_phases

    return gguf_phases(shapes, BYTES_PER_WEIGHT.get(settings.gguf_type, 4)), None


FORMAT = ExportFormat(
    name="gguf",
    description="one GGUF file for llama.cpp + Ollama Modelfile (--gguf-type)",
    writer="lorasp_edge.export.gguf:write_gguf",
    disk_bytes=disk_bytes,
    streams=True,
    flags=("gguf_type",),
    flag_problems=flag_problems,
    memory_phases=memory_phases,
    unsupported="lorasp_edge.export.gguf_file:unsupported_reason",
    adapter_writer="lorasp_edge.export.gguf_adapter:write_gguf_adapter",
)

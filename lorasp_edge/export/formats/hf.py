"""The `hf` format: the merged model as a Hugging Face folder (lorasp_edge.export.hf writes it; a
streamed source has written it already as its merge target, and the writer takes it over)."""

from __future__ import annotations

from lorasp_edge.export.formats.entry import ExportFormat


def disk_bytes(parameters: int, settings) -> int:
    return 4 * parameters  # fp32 safetensors


FORMAT = ExportFormat(
    name="hf",
    description="merged Hugging Face folder (safetensors)",
    writer="lorasp_edge.export.hf:write_hf",
    disk_bytes=disk_bytes,
    streams=True,
    adapter_refusal="the adapter folder itself is the unmerged Hugging Face form (PeftModel.from_pretrained loads it)",
)

"""Export formats by name: the seam a new format joins with one module and one line here.

A format's writer, `write(context: ExportContext) -> None`, writes its folder or file under
`context.folder`, verifies it against the merged model, records what it checked in
`context.manifest` and raises VerificationError on a mismatch (the export then writes nothing).
`unsupported(config)`, when given, names why a base model cannot take the format, before any work.
`adapter_writer`, when given, writes the format for `export --adapter-only`: the adapter unmerged,
for a runtime that applies it, verified against the unmerged PEFT model (`context.merged` is then
that model); a format without one says why in `adapter_refusal`.

Writers are named by import path and imported when used, so that `lorasp-edge --help` does not
import torch and onnxruntime to list the names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ExportFormat:
    writer: str  # "module:function"
    description: str
    unsupported: str | None = None  # "module:function" taking a transformers config
    adapter_writer: str | None = None  # "module:function" for --adapter-only
    adapter_refusal: str = "has no run-time adapter form"

    def write(self, context) -> None:
        _resolve(self.writer)(context)

    def write_adapter(self, context) -> None:
        _resolve(self.adapter_writer)(context)

    def unsupported_reason(self, config) -> str | None:
        return _resolve(self.unsupported)(config) if self.unsupported else None


FORMATS: dict[str, ExportFormat] = {
    "hf": ExportFormat(
        "lorasp_edge.export.hf:write_hf", "merged Hugging Face folder (safetensors)",
        adapter_refusal="the adapter folder itself is the unmerged Hugging Face form (PeftModel.from_pretrained loads it)",
    ),
    "onnx": ExportFormat(
        "lorasp_edge.export.onnx_writer:write_onnx",
        "KV-cache decoder graph for onnxruntime and optimum (+ --quantize int8/int4)",
        "lorasp_edge.export.onnx_graph:unsupported_reason",
        adapter_refusal="the decoder graph is traced from the merged model and has no LoRA inputs to apply an adapter through",
    ),
    "genai": ExportFormat(
        "lorasp_edge.export.genai:write_genai", "folder for onnxruntime-genai (+ --quantize int8/int4)", "lorasp_edge.export.genai:unsupported_reason",
        adapter_refusal=(
            "onnxruntime-genai applies an .onnx_adapter by feeding its tensors to graph inputs of the same names, and the "
            "genai graph here is traced from the merged model, with the LoRA matrices folded into the base weights and no such inputs"
        ),
    ),
    "gguf": ExportFormat(
        "lorasp_edge.export.gguf:write_gguf", "one GGUF file for llama.cpp + Ollama Modelfile (--gguf-type)", "lorasp_edge.export.gguf_file:unsupported_reason",
        adapter_writer="lorasp_edge.export.gguf_adapter:write_gguf_adapter",
    ),
}
# Names that stand for several formats, written in this order.
GROUPS = {"both": ("hf", "onnx")}


def expand(names: str) -> list[str]:
    """'both' -> ['hf', 'onnx']; 'hf,onnx' -> the same. Unknown names are kept for the caller to report."""
    found: list[str] = []
    for name in str(names).split(","):
        for item in GROUPS.get(name.strip(), (name.strip(),)):
            if item and item not in found:
                found.append(item)
    return found


def adapter_problems(names: list[str]) -> list[str]:
    """Why `--adapter-only` cannot write each of `names` (unknown names are reported elsewhere)."""
    refused = [name for name in names if name in FORMATS and FORMATS[name].adapter_writer is None]
    usable = ", ".join(name for name, item in FORMATS.items() if item.adapter_writer)
    return [f"--adapter-only --format {name}: {FORMATS[name].adapter_refusal} (adapter-only formats: {usable})" for name in refused]


def _resolve(path: str):
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)

"""What an export is asked to do: one typed record, every flag checked before any work.

Flags of one format (`--quantize`, `--gguf-type`, ...) are checked by that format
(lorasp_edge.export.formats); the rest here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lorasp_edge.errors import UserError
from lorasp_edge.export import formats as export_formats
from lorasp_edge.export import output
from lorasp_edge.export.formats.gguf import GGUF_TYPES
from lorasp_edge.export.onnx_graph import DEFAULT_OPSET, PROTOBUF_LIMIT_BYTES
from lorasp_edge.export.quantize import DEFAULT_BLOCK_SIZE, INT4_KEEP_8BIT

SOURCES = ("auto", "memory", "streamed")


@dataclass
class ExportSettings:
    adapter: Path = field(metadata={"help": "adapter folder written by `lorasp-edge train`"})
    out: Path = field(metadata={"help": "output folder: new, empty, or an earlier export (its formats not written again are kept)"})
    model: str | None = field(default=None, metadata={"help": "base model; default: the one lorasp.json names"})
    format: str = field(default="both", metadata={"help": "formats to write, comma-separated: " + ", ".join([*export_formats.FORMATS, *export_formats.GROUPS])})
    quantize: str = field(default="none", metadata={"help": "also write a weight-only quantized ONNX: none, int8, int4"})
    gguf_type: str = field(default="f16", metadata={"help": "--format gguf: tensor type, one of " + ", ".join(GGUF_TYPES)})
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, metadata={"help": "quantization block along the input dimension (power of 2, >= 16)"})
    keep_8bit: str = field(default=",".join(INT4_KEEP_8BIT), metadata={"help": "--quantize int4: linear layers kept at 8 bits, comma-separated, or none"})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset"})
    tolerance: float = field(default=1e-3, metadata={"help": "fp32 ONNX: max |logit difference| / max |logit|"})
    eval_text: Path | None = field(default=None, metadata={"help": "held-out text file for perplexity; default: the Python reference"})
    eval_tokens: int = field(default=1024, metadata={"help": "held-out tokens scored for perplexity"})
    external_threshold_bytes: int = field(default=PROTOBUF_LIMIT_BYTES, metadata={"help": "weights above this go to model.onnx_data"})
    min_agreement: float | None = field(default=None, metadata={"help": "lowest greedy agreement with the merged model a quantized or runtime export may show (default: 0.95 for 8/16-bit, 0.70 for 4-bit)"})
    mem: str | None = field(default=None, metadata={"help": "memory budget (e.g. 8GB): the source is chosen to fit it, and the export refused before any work when nothing does"})
    source: str = field(default="auto", metadata={"help": "where the merged weights come from: auto (in memory when the estimate fits the budget, else streamed), memory, streamed"})
    adapter_only: bool = field(default=False, metadata={"help": "write the adapter unmerged beside its base, for runtimes that apply it (--format gguf)"})
    overwrite: bool = field(default=False, metadata={"help": "replace everything in --out: a non-empty folder that is not an earlier export, or the formats of one not written now"})

    def problems(self) -> list[str]:
        found = []
        out_problem = output.folder_problem(Path(self.out), self.overwrite)
        if out_problem:
            found.append(out_problem)
        if within(Path(self.adapter), Path(self.out)):
            found.append(f"--out {self.out}: holds the adapter folder {self.adapter}; choose another --out")
        unknown = [name for name in self.formats if name not in export_formats.FORMATS]
        if unknown or not self.formats:
            known = ", ".join([*export_formats.FORMATS, *export_formats.GROUPS])
            found.append(f"--format must be one or more of {known} (comma-separated), not '{self.format}'")
        found.extend(export_formats.flag_problems(self, self.formats))
        if not self.tolerance > 0:
            found.append(f"--tolerance must be > 0, not {self.tolerance}")
        if self.eval_text is not None and not Path(self.eval_text).is_file():
            found.append(f"--eval-text {self.eval_text}: no such file")
        if self.eval_tokens < 32:
            found.append(f"--eval-tokens must be >= 32, not {self.eval_tokens}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            found.append(f"--min-agreement must be in [0, 1], not {self.min_agreement}")
        if self.source not in SOURCES:
            found.append(f"--source must be one of {', '.join(SOURCES)}, not '{self.source}'")
        if self.adapter_only:
            found.extend(export_formats.adapter_problems(self.formats))
        if self.mem is not None:
            from lorasp_edge.plan.units import parse_memory

            try:
                parse_memory(self.mem)
            except UserError as error:
                found.append(f"--mem: {error}")
        return found

    @property
    def formats(self) -> list[str]:
        return export_formats.expand(self.format)


def within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (so replacing `folder` would remove it)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def base_model_name(recorded: str, adapter_dir: Path) -> str:
    """The base lorasp.json names, as a name that loads from the current folder. Train records the
    base as given on its command line: a relative path (`./tiny`) is relative to where train ran,
    which an old adapter does not record. Tried: from here; then from the run folder's parent
    (`train --out run` writes run/adapter), where train usually ran. Aliases and hub ids pass as given."""
    from lorasp_edge.sources import BUNDLED_MODELS

    path = Path(recorded).expanduser()
    if path.exists() or recorded.lower() in BUNDLED_MODELS:
        return recorded
    where = adapter_dir / "lorasp.json"
    if path.is_absolute():
        raise UserError(f"{where}: names the base model {recorded}, which does not exist (moved?); pass --model with its folder")
    beside = adapter_dir.resolve().parent.parent / path
    if beside.exists():
        return str(beside)
    if recorded.startswith((".", "~")) or len(path.parts) > 2 or (os.sep != "/" and os.sep in recorded):
        raise UserError(
            f"{where}: names the base model as the relative path '{recorded}', found neither from {Path.cwd()} nor from "
            f"{adapter_dir.resolve().parent.parent}; pass --model with the base model's folder"
        )
    return recorded  # a hub id (org/name) or a catalog id

"""Export: base + LoRA-SP adapter -> merged model, then every requested format, each verified.

    adapter/ --read_adapter_info--> base name, base bits
    base (float, or bitsandbytes 4/8-bit as trained) + adapter --merged_model--> fp32 W0 + (alpha/r) B A
        merged vs adapted logits checked, then for each name in --format (export/formats.py):
        -> OUT/hf/          merged model: safetensors, config, tokenizer, generation config (hf.py)
        -> OUT/onnx/        KV-cache decoder graph, + OUT/onnx-int8|int4 with --quantize (onnx_writer.py)
        -> OUT/manifest.json  what was verified, measured differences, sizes

Every writer verifies what it wrote against the merged PyTorch model (verify.py) and raises
`VerificationError` (exit 4) on a mismatch. Everything is written to a temporary folder beside OUT
and swapped into place only when every format has passed, so a failure leaves nothing behind; the
formats of an earlier export in OUT that are not written again are kept (export/output.py).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorasp_edge.errors import UserError, VerificationError
from lorasp_edge.export import formats as export_formats
from lorasp_edge.export import output
from lorasp_edge.export.context import ExportContext
from lorasp_edge.export.manifest import (
    MERGE_TOLERANCE,
    ExportReport,
    estimated_bytes,
    manifest_source,
    new_manifest,
    write_export,
)
from lorasp_edge.export.gguf_file import GGUF_TYPES
from lorasp_edge.export.onnx_graph import DEFAULT_OPSET, PROTOBUF_LIMIT_BYTES
from lorasp_edge.export.onnx_writer import QUANT_BITS
from lorasp_edge.export.verify import compare, held_out_ids, held_out_text, reference_logits, verification_batch

QUANTIZATIONS = ("none", *QUANT_BITS)


@dataclass
class ExportSettings:
    adapter: Path = field(metadata={"help": "adapter folder written by `lorasp-edge train`"})
    out: Path = field(metadata={"help": "output folder: new, empty, or an earlier export (its formats not written again are kept)"})
    model: str | None = field(default=None, metadata={"help": "base model; default: the one lorasp.json names"})
    format: str = field(default="both", metadata={"help": "formats to write, comma-separated: " + ", ".join([*export_formats.FORMATS, *export_formats.GROUPS])})
    quantize: str = field(default="none", metadata={"help": "also write a weight-only quantized ONNX: none, int8, int4"})
    gguf_type: str = field(default="f16", metadata={"help": "--format gguf: tensor type, one of " + ", ".join(GGUF_TYPES)})
    block_size: int = field(default=32, metadata={"help": "quantization block along the input dimension (power of 2, >= 16)"})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset"})
    tolerance: float = field(default=1e-3, metadata={"help": "fp32 ONNX: max |logit difference| / max |logit|"})
    eval_text: Path | None = field(default=None, metadata={"help": "held-out text file for perplexity; default: the Python reference"})
    eval_tokens: int = field(default=1024, metadata={"help": "held-out tokens scored for perplexity"})
    external_threshold_bytes: int = field(default=PROTOBUF_LIMIT_BYTES, metadata={"help": "weights above this go to model.onnx_data"})
    min_agreement: float | None = field(default=None, metadata={"help": "lowest greedy agreement with the merged model a quantized or runtime export may show (default: 0.95 for 8/16-bit, 0.70 for 4-bit)"})
    mem: str | None = field(default=None, metadata={"help": "memory budget (e.g. 8GB): refuse before any work when the export's estimate exceeds it"})
    adapter_only: bool = field(default=False, metadata={"help": "write the adapter unmerged beside its base, for runtimes that apply it (--format gguf)"})
    overwrite: bool = field(default=False, metadata={"help": "replace everything in --out: a non-empty folder that is not an earlier export, or the formats of one not written now"})

    def problems(self) -> list[str]:
        found = []
        out_problem = output.folder_problem(Path(self.out), self.overwrite)
        if out_problem:
            found.append(out_problem)
        if _within(Path(self.adapter), Path(self.out)):
            found.append(f"--out {self.out}: holds the adapter folder {self.adapter}; choose another --out")
        unknown = [name for name in self.formats if name not in export_formats.FORMATS]
        if unknown or not self.formats:
            known = ", ".join([*export_formats.FORMATS, *export_formats.GROUPS])
            found.append(f"--format must be one or more of {known} (comma-separated), not '{self.format}'")
        if self.quantize not in QUANTIZATIONS:
            found.append(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, not '{self.quantize}'")
        elif self.quantize != "none" and not (self.wants_onnx or "genai" in self.formats):
            found.append("--quantize writes an ONNX model: use it with --format onnx, genai or both")
        if self.gguf_type not in GGUF_TYPES:
            found.append(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, not '{self.gguf_type}'")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            found.append(f"--block-size must be a power of two >= 16, not {self.block_size}")
        if not 14 <= self.opset <= 20:
            found.append(f"--opset must be between 14 and 20 (the TorchScript exporter's range), not {self.opset}")
        if not self.tolerance > 0:
            found.append(f"--tolerance must be > 0, not {self.tolerance}")
        if self.eval_text is not None and not Path(self.eval_text).is_file():
            found.append(f"--eval-text {self.eval_text}: no such file")
        if self.eval_tokens < 32:
            found.append(f"--eval-tokens must be >= 32, not {self.eval_tokens}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            found.append(f"--min-agreement must be in [0, 1], not {self.min_agreement}")
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

    @property
    def wants_onnx(self) -> bool:
        return "onnx" in self.formats

    @property
    def wants_hf(self) -> bool:
        return "hf" in self.formats


# ------------------------------------------------------------------------------------ helpers


def _within(path: Path, folder: Path) -> bool:
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


# ------------------------------------------------------------------------------------- export


def export(settings: ExportSettings, progress: Callable[[str], None] | None = None) -> ExportReport:
    """Merge, export, verify and write everything under `settings.out` (atomically)."""
    from lorasp_edge.export.merge import merged_model
    from lorasp_edge.models import load_model, load_tokenizer
    from lorasp_edge.sources import resolve_model
    from lorasp_edge.train.adapter import load_adapter, read_adapter_info

    say = progress or (lambda message: None)
    started = time.perf_counter()
    problems = settings.problems()
    if problems:
        raise UserError("; ".join(problems))
    adapter_dir, out = Path(settings.adapter), Path(settings.out)
    info = read_adapter_info(adapter_dir)
    if not (settings.model or info.get("base_model")):
        raise UserError(f"{adapter_dir / 'lorasp.json'}: names no base model; pass --model")
    model_name = settings.model or base_model_name(str(info["base_model"]), adapter_dir)
    if Path(model_name).expanduser().exists() and _within(Path(model_name).expanduser(), out):
        raise UserError(f"--out {out}: holds the base model folder {model_name}; choose another --out")
    base_bits = info.get("base_quant_bits")
    if base_bits not in (None, 4, 8):
        raise UserError(f"{adapter_dir / 'lorasp.json'}: base_quant_bits must be 4, 8 or null, not {base_bits!r}")
    _check_formats_support(settings, model_name, resolve_model)
    from lorasp_edge.export.streamed import check_export_budget, export_streamed, source_folder, streamable

    # A local safetensors base exports streamed: one layer in memory at a time (export/streamed.py).
    source = source_folder(model_name, base_bits) if streamable(settings) else None
    estimate = check_export_budget(settings, model_name, source, base_bits, say) if settings.mem is not None else None
    if source is not None:
        return export_streamed(settings, source, adapter_dir, out, info, model_name, base_bits, started, say, estimate)

    say(f"loading base '{model_name}'" + (f" ({base_bits}-bit, as trained)" if base_bits else ""))
    base = load_model(model_name, quant_bits=base_bits, compute_dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(model_name)
    say(f"loading adapter {adapter_dir} (unmerged)" if settings.adapter_only else f"merging adapter {adapter_dir} in fp32")
    adapted = load_adapter(base, adapter_dir)
    if settings.adapter_only:  # no merge: the runtime applies the adapter (export/adapter_export.py)
        from lorasp_edge.export.adapter_export import export_adapter_only

        return export_adapter_only(settings, adapted, tokenizer, model_name=model_name, base_bits=base_bits, info=info, started=started, say=say)
    merged = merged_model(adapted)
    merged.generation_config = copy.deepcopy(base.generation_config)
    parameter_count = sum(p.numel() for p in merged.parameters())

    ids = held_out_ids(tokenizer, held_out_text(settings.eval_text), settings.eval_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids, attention_mask = verification_batch(ids, pad_id)
    merge_check = compare([reference_logits(merged, input_ids, attention_mask)], [reference_logits(adapted, input_ids, attention_mask)], [attention_mask])
    del adapted, base
    merge_tolerance = MERGE_TOLERANCE[base_bits]
    say(f"  merged vs adapted: max |logit diff| {merge_check.max_abs_diff:.2e} ({merge_check.relative_diff:.2e} of the logit scale)")
    if merge_check.relative_diff > merge_tolerance:
        raise VerificationError(
            f"merged model differs from the adapted model: relative logit difference {merge_check.relative_diff:.2e} "
            f"> {merge_tolerance:.0e}"
        )

    def write(tmp: Path) -> dict:
        manifest = _write_formats(settings, tmp, merged, tokenizer, ids, input_ids, attention_mask, say)
        manifest.update({**manifest_source(model_name, base_bits, adapter_dir, info), "parameters": parameter_count})
        manifest["verification"]["merge"] = {**asdict(merge_check), "tolerance": merge_tolerance}
        return manifest

    return write_export(out, estimated_bytes(parameter_count, settings), write, started, settings.overwrite)


def _check_formats_support(settings: ExportSettings, model_name: str, resolve_model) -> None:
    """Refuse before any work when a requested format cannot take this base model."""
    from transformers import AutoConfig

    checks = [export_formats.FORMATS[name] for name in settings.formats if export_formats.FORMATS[name].unsupported]
    if not checks:
        return
    try:
        config = AutoConfig.from_pretrained(resolve_model(model_name))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the config of model '{model_name}': {str(error).splitlines()[0]}") from None
    for export_format in checks:
        reason = export_format.unsupported_reason(config)
        if reason:
            raise UserError(reason)


def _write_formats(settings: ExportSettings, tmp: Path, merged, tokenizer, ids, input_ids, attention_mask, say) -> dict:
    """Every requested format's files, into `tmp`; returns the manifest's measured part."""
    manifest = new_manifest()
    context = ExportContext(
        settings=settings,
        folder=tmp,
        merged=merged,
        tokenizer=tokenizer,
        ids=ids,
        input_ids=input_ids,
        attention_mask=attention_mask,
        reference=reference_logits(merged, input_ids, attention_mask),
        window=min(512, getattr(merged.config, "max_position_embeddings", 512) or 512),
        manifest=manifest,
        say=say,
    )
    for name in settings.formats:
        export_formats.FORMATS[name].write(context)
    return manifest

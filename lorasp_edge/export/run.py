"""Export, one way through: base + LoRA-SP adapter -> every requested format, each verified.

    settings (settings.py) --problems--> one line, exit 2, before any work
    adapter/ --lorasp.json--> base name, base bits;  base config --> each format's `unsupported`
    sources.choose: in-memory, streamed or adapter, by the memory estimate against --mem (or the
        memory available); --mem refuses before any work when the chosen source does not fit it
    in a temporary folder beside OUT (manifest.write_export):
        source = open_source(...)          the reference model, the weights, the merge check
        context = build_context(...)       the one context every writer is handed (context.py)
        for each format, after the formats it requires (formats/): write + verify, exit 4 on a mismatch
        formats written only because another required them are removed again
    -> OUT/<format>/ ..., OUT/manifest.json: swapped into place only when every format has passed,
       keeping the formats of an earlier export in OUT that are not written again (output.py)
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from lorasp_edge.errors import UserError
from lorasp_edge.export import formats as export_formats
from lorasp_edge.export import output
from lorasp_edge.export.manifest import ExportReport, disk_bytes, manifest_source, new_manifest, write_export
from lorasp_edge.export.settings import ExportSettings, base_model_name, within

__all__ = ["ExportSettings", "export"]


def export(settings: ExportSettings, progress: Callable[[str], None] | None = None) -> ExportReport:
    """Merge (or not, --adapter-only), write every requested format, verify each, and put it all
    under `settings.out` atomically."""
    from lorasp_edge.export.context import build_context, verification_inputs
    from lorasp_edge.export.sources import SourceRequest, choose, open_source
    from lorasp_edge.models import load_tokenizer
    from lorasp_edge.train.adapter_files import read_adapter_info

    say = progress or (lambda message: None)
    started = time.perf_counter()
    problems = settings.problems()
    if problems:
        raise UserError("; ".join(problems))
    adapter_dir, out = Path(settings.adapter), Path(settings.out)
    info = read_adapter_info(adapter_dir)
    model_name, base_bits = _base(settings, info, adapter_dir, out)
    config = _config(model_name)
    formats = export_formats.in_order(settings.formats)
    for item in formats:
        reason = item.unsupported_reason(config)
        if reason:
            raise UserError(reason)
    choice = choose(settings, formats, model_name, base_bits, config, say)
    tokenizer = load_tokenizer(model_name)
    inputs = verification_inputs(tokenizer, settings.eval_text, settings.eval_tokens)

    def write(tmp: Path) -> dict:
        manifest = new_manifest(**({"adapter_only": True} if settings.adapter_only else {}))
        request = SourceRequest(settings, model_name, base_bits, adapter_dir, info, tokenizer, inputs, tmp, say, choice.base_folder)
        source = open_source(choice.kind, request)
        try:
            manifest["verification"].update(source.checks)
            context = build_context(source.model, tokenizer, inputs, tmp, manifest, say, settings, weights=source.weights,
                                    streamed=source.streamed, merged_folder=source.merged_folder, is_merged=source.is_merged,
                                    reference_record=source.reference_record, session_slices=choice.estimate.session_slices)
            for item in formats:
                (item.write_adapter if settings.adapter_only else item.write)(context)
        finally:
            source.close()
        _remove_unasked(tmp, manifest, formats, settings.formats, source.merged_folder)
        manifest.update({**manifest_source(model_name, base_bits, adapter_dir, info, merged=source.is_merged), "parameters": source.parameters,
                         "source": source.kind, "streamed": source.streamed})
        return manifest

    return write_export(out, disk_bytes(formats, choice.parameters, settings), write, started, settings.overwrite)


def _base(settings: ExportSettings, info: dict, adapter_dir: Path, out: Path) -> tuple[str, int | None]:
    """The base model's name (as lorasp.json records it, or --model) and the bits it was trained at."""
    if not (settings.model or info.get("base_model")):
        raise UserError(f"{adapter_dir / 'lorasp.json'}: names no base model; pass --model")
    model_name = settings.model or base_model_name(str(info["base_model"]), adapter_dir)
    if Path(model_name).expanduser().exists() and within(Path(model_name).expanduser(), out):
        raise UserError(f"--out {out}: holds the base model folder {model_name}; choose another --out")
    base_bits = info.get("base_quant_bits")
    if base_bits not in (None, 4, 8):
        raise UserError(f"{adapter_dir / 'lorasp.json'}: base_quant_bits must be 4, 8 or null, not {base_bits!r}")
    return model_name, base_bits


def _config(model_name: str):
    from transformers import AutoConfig

    from lorasp_edge.sources import resolve_model

    try:
        return AutoConfig.from_pretrained(resolve_model(model_name))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the config of model '{model_name}': {str(error).splitlines()[0]}") from None


def _remove_unasked(tmp: Path, manifest: dict, formats, asked: list[str], merged_folder: Path | None) -> None:
    """Remove what was written only for another format (a required format's folders, a streamed
    source's merged folder when hf was not asked for) and the records of those folders."""
    import re

    removed = set()
    for item in formats:
        if item.name not in asked:
            removed |= {path.name for path in tmp.iterdir() if re.fullmatch(item.entry_pattern, path.name)}
    if merged_folder is not None and "hf" not in asked:
        removed.add(merged_folder.name)
    for name in removed:
        shutil.rmtree(tmp / name, ignore_errors=True)
    for section in output.RECORD_SECTIONS:
        for key in list(manifest[section]):
            if output.record_folder(section, key) in removed and not (key == "hf_reload" and merged_folder is not None):
                del manifest[section][key]

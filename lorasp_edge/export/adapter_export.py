"""`export --adapter-only`: the adapter left unmerged, for runtimes that apply it at run time.

    base (as trained: float, or bitsandbytes 4/8-bit) + adapter --PEFT, unmerged--> reference model
    for each name in --format with an adapter writer (export/formats.py):
        -> OUT/gguf/        base GGUF (the base as trained) + LoRA adapter GGUF (gguf_adapter.py)
    -> OUT/manifest.json    what was verified against the unmerged model, sizes, merge_base

Every writer verifies what it wrote against the unmerged PEFT model in PyTorch and raises
VerificationError (exit 4) on a mismatch. As in the merged export, everything goes to a temporary
folder beside OUT that is renamed into place only when every format has passed.
"""

from __future__ import annotations

from pathlib import Path

from lorasp_edge.export import formats as export_formats
from lorasp_edge.export.context import ExportContext
from lorasp_edge.export.manifest import manifest_source, new_manifest, write_export
from lorasp_edge.export.verify import (
    held_out_ids,
    held_out_text,
    reference_logits,
    verification_batch,
)


def export_adapter_only(settings, adapted, tokenizer, *, model_name: str, base_bits: int | None, info: dict, started: float, say):
    """Write and verify every `settings.formats` in its adapter form under `settings.out` (atomically)."""


    adapter_dir, out = Path(settings.adapter), Path(settings.out)
    parameter_count = sum(p.numel() for p in adapted.get_base_model().parameters())
    needed = int(parameter_count * 2 * 1.05) + (64 << 20)  # a 16-bit base file, the adapter, tokenizer slack
    ids = held_out_ids(tokenizer, held_out_text(settings.eval_text), settings.eval_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids, attention_mask = verification_batch(ids, pad_id)

    def write(tmp: Path) -> dict:
        manifest = new_manifest(adapter_only=True)
        context = ExportContext(
            settings=settings, folder=tmp, merged=adapted, tokenizer=tokenizer, ids=ids, input_ids=input_ids,
            attention_mask=attention_mask, reference=reference_logits(adapted, input_ids, attention_mask),
            window=min(512, getattr(adapted.get_base_model().config, "max_position_embeddings", 512) or 512), manifest=manifest, say=say,
        )
        for name in settings.formats:
            export_formats.FORMATS[name].write_adapter(context)
        manifest.update({**manifest_source(model_name, base_bits, adapter_dir, info, merged=False), "parameters": parameter_count})
        return manifest

    return write_export(out, needed, write, started, settings.overwrite)

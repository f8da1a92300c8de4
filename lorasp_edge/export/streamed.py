"""Export without the model in memory: the merge, the files and the verification, each layer-bounded.

    base shards + adapter --stream_merge--> OUT/hf shards (fp32, written tensor by tensor)
    reference: LayerStreamed over OUT/hf (one layer's fp32 weights at a time)
        merge check:  it against the base + LoRA applied unmerged (LayerStreamed with the adapter)
        hf check:     it against the merge computed in memory per tensor (the files' round trip)
    ONNX: written node by node, initializers streamed from OUT/hf (onnx_build.py),
          quantized one weight at a time; each graph checked by onnxruntime against the reference

Used for --format hf/onnx when the base is a local safetensors folder; the peak is one onnxruntime
session plus one layer (export/memory.py estimates it).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from lorasp_edge.errors import AdapterError, VerificationError
from lorasp_edge.export import formats as export_formats
from lorasp_edge.export.context import ExportContext
from lorasp_edge.export.hf import write_portable_config
from lorasp_edge.export.layered import FolderWeights, LayerStreamed
from lorasp_edge.export.manifest import MERGE_TOLERANCE, estimated_bytes, manifest_source, new_manifest, write_export
from lorasp_edge.export.stream import (
    BaseWeights,
    LoraDelta,
    MergedWeights,
    check_fingerprint,
    copy_side_files,
    stream_merge,
)
from lorasp_edge.export.verify import (
    compare,
    held_out_ids,
    held_out_text,
    reference_logits,
    verification_batch,
)

STREAMED_FORMATS = ("hf", "onnx")
MERGED_DIR = "hf"


def streamable(settings) -> bool:
    """Whether this export can take the streamed path: a merged hf/onnx export (the base must also
    be a local safetensors folder: `source_folder`)."""
    return not getattr(settings, "adapter_only", False) and all(name in STREAMED_FORMATS for name in settings.formats)


def check_masks(adapter_dir: Path, info: dict) -> None:
    """The stored masks against the sha256 lorasp.json records (they do not enter the merge)."""
    from safetensors.torch import load_file

    from lorasp_edge.train.adapter import LORASP_FILE, MASKS_FILE, masks_digest

    recorded = info.get("masks_sha256")
    path = adapter_dir / MASKS_FILE
    if recorded is None or not path.is_file():
        return
    try:
        packed = load_file(str(path))
    except Exception as error:  # safetensors raises several types for truncated or corrupt files
        raise AdapterError(f"{path}: corrupt or truncated safetensors file ({str(error).splitlines()[0]})") from None
    if masks_digest(packed) != recorded:
        raise AdapterError(f"{path}: the masks do not match the sha256 recorded in {LORASP_FILE} (altered or corrupt)")


def plain_config(source: Path):
    """The base's config as the merged fp32 model's: no quantization config, dtype float32."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    return config


def generation_config(source: Path, config):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except OSError:
        return GenerationConfig.from_model_config(config)


def merge_to_folder(source: Path, adapter_dir: Path, info: dict, bits: int | None, folder: Path, tokenizer, say):
    """OUT/hf written by the streamed merge; returns (base, delta, config, parameter count)."""
    base = BaseWeights(source, bits)
    delta = LoraDelta.read(adapter_dir)
    delta.check_shapes(base.shape, adapter_dir / "adapter_model.safetensors")
    config = plain_config(source)
    check_fingerprint(base, config, info, adapter_dir)
    check_masks(adapter_dir, info)
    say(f"merging adapter {adapter_dir} in fp32, tensor by tensor")
    result = stream_merge(base, delta, folder, say=say)
    config.save_pretrained(folder)
    generation_config(source, config).save_pretrained(folder)
    copy_side_files(source, folder)
    tokenizer.save_pretrained(folder)
    write_portable_config(folder)
    return base, delta, config, result.parameters


def write_streamed(settings, tmp: Path, source: Path, adapter_dir: Path, info: dict, bits: int | None, tokenizer, say,
                   session_slices: int = 1) -> dict:
    """Every requested format under `tmp`; returns the manifest's measured part (verification included).
    The fp32 ONNX graph is verified in `session_slices` onnxruntime sessions over consecutive layers."""
    from lorasp_edge.export.onnx_graph import files_bytes

    manifest = new_manifest()
    folder = tmp / MERGED_DIR
    base, delta, config, parameters = merge_to_folder(source, adapter_dir, info, bits, folder, tokenizer, say)
    manifest["parameters"] = parameters
    ids = held_out_ids(tokenizer, held_out_text(settings.eval_text), settings.eval_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids, attention_mask = verification_batch(ids, pad_id)

    say("verifying the merge, one layer at a time")
    merged = LayerStreamed(config, FolderWeights(folder))
    merged.generation_config = generation_config(folder, config)
    reference = reference_logits(merged, input_ids, attention_mask)
    adapted = reference_logits(LayerStreamed(config, base, delta), input_ids, attention_mask)
    in_memory = reference_logits(LayerStreamed(config, MergedWeights(base, delta)), input_ids, attention_mask)
    masks = [attention_mask]
    merge_check = compare([reference], [adapted], masks)
    tolerance = MERGE_TOLERANCE[bits]
    manifest["verification"]["merge"] = {
        **asdict(merge_check), "tolerance": tolerance,
        "reference": "merged weights read from OUT/hf layer by layer, against the base (dequantized as trained) with the LoRA path unmerged",
    }
    say(f"  merged vs adapted: max |logit diff| {merge_check.max_abs_diff:.2e} ({merge_check.relative_diff:.2e} of the logit scale)")
    if merge_check.relative_diff > tolerance:
        raise VerificationError(
            f"merged model differs from the adapted model: relative logit difference {merge_check.relative_diff:.2e} > {tolerance:.0e}"
        )
    hf_check = compare([in_memory], [reference], masks)
    manifest["verification"]["hf_reload"] = {**asdict(hf_check), "reference": "the merge computed in memory, tensor by tensor"}
    if hf_check.relative_diff > settings.tolerance:
        raise VerificationError(f"the saved HF folder reads back to different logits ({hf_check.relative_diff:.2e} of the logit scale)")
    context = ExportContext(
        settings=settings, folder=tmp, merged=merged, tokenizer=tokenizer, ids=ids, input_ids=input_ids, attention_mask=attention_mask,
        reference=reference, window=min(512, getattr(config, "max_position_embeddings", 512) or 512), manifest=manifest, say=say,
        session_slices=session_slices,
    )
    for name in settings.formats:
        if name != "hf":
            export_formats.FORMATS[name].write(context)
    base.close()
    merged.weights.close()
    if "hf" in settings.formats:
        manifest["files"]["hf"] = files_bytes(folder, "*")
    else:
        shutil.rmtree(folder)
    return manifest


def source_folder(model_name: str, bits: int | None) -> Path | None:
    """The base as a local safetensors folder the streamed merge reads, or None."""
    from lorasp_edge.sources import local_safetensors_folder, resolve_model
    from lorasp_edge.prequantize import prequantized_bits

    folder = local_safetensors_folder(resolve_model(model_name))
    if folder is None:
        return None
    stored = prequantized_bits(folder)
    if stored is not None and stored != bits:
        return None  # load_model names the mismatch
    config = json.loads((folder / "config.json").read_text())
    return None if config.get("model_type") == "gpt2" else folder  # Conv1D weights are stored transposed


def export_streamed(settings, source: Path, adapter_dir: Path, out: Path, info: dict, model_name: str, bits: int | None, started: float, say,
                    estimate=None):
    """The streamed export, written to a temporary folder beside `out` and renamed into place.
    `estimate`: the one `check_export_budget` made (--mem), else made here against the available memory."""
    from lorasp_edge.export.memory import estimate_streamed, release_large_frees
    from lorasp_edge.models import load_tokenizer

    release_large_frees()
    tokenizer = load_tokenizer(model_name)
    base_shapes = base_float_shapes(source, bits)
    if estimate is None:
        estimate = estimate_streamed(base_shapes, settings.wants_onnx, settings.quantize, export_budget(settings))

    def write(tmp: Path) -> dict:
        manifest = write_streamed(settings, tmp, source, adapter_dir, info, bits, tokenizer, say, estimate.session_slices)
        manifest.update({**manifest_source(model_name, bits, adapter_dir, info), "streamed": True})
        return manifest

    needed = estimated_bytes(sum(math.prod(shape) for shape in base_shapes.values()), settings)
    return write_export(out, needed, write, started, settings.overwrite)


def export_budget(settings) -> int:
    """The memory the export may use: --mem, or else what the system has available when it starts."""
    import psutil

    from lorasp_edge.plan.units import parse_memory

    return parse_memory(settings.mem) if settings.mem is not None else psutil.virtual_memory().available


def base_float_shapes(source: Path, bits: int | None) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of every weight as the merge writes it (fp32), from the headers only."""
    base = BaseWeights(source, bits)
    try:
        return {key: base.shape(key) for key in base.keys()}
    finally:
        base.close()


def check_export_budget(settings, model_name: str, source: Path | None, bits: int | None, say):
    """Refuse (exit 2) before any work when the export's estimated peak exceeds `settings.mem`;
    returns the estimate (the streamed export verifies in the layer slices it chose)."""
    from lorasp_edge.export.memory import (
        check_budget,
        estimate_in_memory,
        estimate_streamed,
    )
    from lorasp_edge.plan.units import parse_memory

    if source is not None:
        estimate = estimate_streamed(base_float_shapes(source, bits), settings.wants_onnx, settings.quantize, export_budget(settings))
    else:
        from transformers import AutoConfig

        from lorasp_edge.export.stream import meta_model
        from lorasp_edge.sources import resolve_model

        model = meta_model(AutoConfig.from_pretrained(resolve_model(model_name)))
        estimate = estimate_in_memory({name: tuple(p.shape) for name, p in model.named_parameters()})
    say(f"estimated peak memory: {estimate.peak_bytes / 1e9:.2f} GB (largest phase: {estimate.largest_phase})")
    check_budget(parse_memory(settings.mem), estimate)
    return estimate

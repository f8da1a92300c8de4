"""The streamed source: the merge, the files and the verification without the model in memory.

    base shards + adapter --stream_merge (shards.py)--> OUT/hf shards (fp32, written tensor by tensor)
    reference: LayerStreamed over OUT/hf (layered.py: one layer's fp32 weights at a time)
        merge check:  it against the base + LoRA applied unmerged (LayerStreamed with the adapter)
        hf check:     it against the merge computed in memory per tensor (the files' round trip)
    weights to write: OUT/hf read by key (weights.FolderWeights)

Every format then writes from OUT/hf, one tensor at a time: the ONNX graph written node by node
(onnx_build.py), GGUF converted tensor by tensor; OUT/hf itself is removed again when `hf` was not
asked for. Memory is bounded by one layer, one tensor or one onnxruntime session
(lorasp_edge.export.memory estimates the phases); time is about five times the in-memory source's,
since every forward reads its weights from disk.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from lorasp_edge.errors import AdapterError, VerificationError
from lorasp_edge.export.hf import write_portable_config
from lorasp_edge.export.sources.source import Source, SourceRequest, check_merge
from lorasp_edge.export.sources.layered import LayerStreamed
from lorasp_edge.export.sources.shards import (
    BaseWeights,
    LoraDelta,
    MergedWeights,
    check_fingerprint,
    copy_side_files,
    stream_merge,
)
from lorasp_edge.export.sources.weights import FolderWeights

MERGED_DIR = "hf"


def check_masks(adapter_dir: Path, info: dict) -> None:
    """The stored masks against the sha256 lorasp.json records (they do not enter the merge)."""
    from safetensors.torch import load_file

    from lorasp_edge.train.adapter_files import LORASP_FILE, MASKS_FILE, masks_digest

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


def open_source(request: SourceRequest) -> Source:
    from lorasp_edge.export.memory import release_large_frees
    from lorasp_edge.export.verify import compare, reference_logits

    release_large_frees()
    say, inputs, bits = request.say, request.inputs, request.base_bits
    folder = request.folder / MERGED_DIR
    base, delta, config, parameters = merge_to_folder(request.base_folder, request.adapter_dir, request.info, bits, folder, request.tokenizer, say)
    say("verifying the merge, one layer at a time")
    merged = LayerStreamed(config, FolderWeights(folder))
    merged.generation_config = generation_config(folder, config)
    batch = (inputs.input_ids, inputs.attention_mask)
    reference = reference_logits(merged, *batch)
    merge = check_merge(
        reference, reference_logits(LayerStreamed(config, base, delta), *batch), inputs.attention_mask, bits, say,
        reference="merged weights read from OUT/hf layer by layer, against the base (dequantized as trained) with the LoRA path unmerged",
    )
    in_memory = reference_logits(LayerStreamed(config, MergedWeights(base, delta)), *batch)
    hf_check = compare([in_memory], [reference], [inputs.attention_mask])
    if hf_check.relative_diff > request.settings.tolerance:
        raise VerificationError(f"the saved HF folder reads back to different logits ({hf_check.relative_diff:.2e} of the logit scale)")
    hf_reload = {**asdict(hf_check), "reference": "the merge computed in memory, tensor by tensor"}
    return Source("streamed", merged, parameters, weights=merged.weights, streamed=True, merged_folder=folder,
                  checks={"merge": merge, "hf_reload": hf_reload}, closers=[base.close, merged.weights.close])

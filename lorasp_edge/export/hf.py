"""The merged model as a Hugging Face folder that transformers 4.x and 5.x both read."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from lorasp_edge.errors import VerificationError
from lorasp_edge.export.context import ExportContext
from lorasp_edge.export.onnx_graph import files_bytes
from lorasp_edge.export.verify import compare, reference_logits


def write_portable_config(folder: Path) -> None:
    """Make config.json (and tokenizer_config.json) read the same in transformers 4.x and 5.x.

    transformers 5 writes RoPE settings only under `rope_parameters`; 4.x ignores that key and falls
    back to its default rope_theta (10000), so SmolLM2's 100000 would be lost. Writing the 4.x keys
    (`rope_theta`, and `rope_scaling` for a non-default RoPE) beside it serves both. transformers 5
    also names its tokenizer class `TokenizersBackend`, unknown to 4.x; `PreTrainedTokenizerFast`
    loads the same tokenizer.json in both, and `model_input_names` keeps 4.x from adding token_type_ids.
    """
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
            config["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
    config.pop("quantization_config", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_path = folder / "tokenizer_config.json"
    if tokenizer_path.is_file():
        tokenizer_config = json.loads(tokenizer_path.read_text())
        if tokenizer_config.get("tokenizer_class") == "TokenizersBackend" and (folder / "tokenizer.json").is_file():
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        # PreTrainedTokenizerFast in 4.x returns token_type_ids unless told the model's inputs, and
        # a causal LM's generate() rejects them: `model(**tokenizer(text))` must work in 4.x and 5.x.
        tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
        tokenizer_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def write_side_files(merged, tokenizer, folder: Path) -> None:
    """config, generation config and tokenizer beside model.onnx: optimum's folder layout."""
    merged.config.save_pretrained(folder)
    merged.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_portable_config(folder)


def reload_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def write_hf(context: ExportContext) -> None:
    """OUT/hf: the merged model, reloaded and checked against the merged model in memory. A source that
    has written the merged folder already (the streamed one: its merge target, checked as it read it
    back) hands it over in `context.merged_folder`."""
    hf_dir = context.folder / "hf"
    if context.merged_folder == hf_dir:
        context.manifest["files"]["hf"] = files_bytes(hf_dir, "*")
        return
    context.say("writing the merged Hugging Face model")
    context.merged.save_pretrained(hf_dir, safe_serialization=True)
    context.tokenizer.save_pretrained(hf_dir)
    write_portable_config(hf_dir)
    reloaded = reload_hf(hf_dir)
    check = compare([context.reference], [reference_logits(reloaded, context.input_ids, context.attention_mask)], [context.attention_mask])
    context.manifest["verification"]["hf_reload"] = asdict(check)
    if check.relative_diff > context.settings.tolerance:
        raise VerificationError(f"the saved HF folder reloads to different logits ({check.relative_diff:.2e} of the logit scale)")
    context.manifest["files"]["hf"] = files_bytes(hf_dir, "*")

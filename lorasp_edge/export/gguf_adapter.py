"""OUT/gguf for `export --adapter-only`: the LoRA-SP adapter as a llama.cpp LoRA GGUF, beside the
unmerged base it applies to, so that `llama-cli -m base-f16.gguf --lora adapter-f32.gguf` runs the
adapter as trained, without a merge.

    PEFT adapter A (r x d_in), B (d_out x r), scaling s --> <base tensor>.lora_a, .lora_b (f32)
                                                           adapter.lora.alpha = s * r
    base as trained (a 4/8-bit base dequantized) --write_gguf_file--> base-<type>.gguf (no delta)

The layout is the one llama.cpp's own converter writes and its loader checks (convert_lora_to_gguf.py
and src/llama-adapter.cpp, ggml-org/llama.cpp): general.type 'adapter', adapter.type 'lora', the
base's architecture name; lora_a has ggml shape [d_in, r] and lora_b [r, d_out], which gguf-py
writes from numpy arrays shaped (r, d_in) and (d_out, r), PEFT's own layout. llama.cpp scales the
product by alpha / r, r read from lora_b, so alpha = s * r reproduces PEFT's s (alpha/r, or
alpha/sqrt(r) under rsLoRA). Q and K rows are permuted for llama.cpp's RoPE as in the base file:
only B's rows, since the permutation acts on output rows. LoRA-SP's frozen entries are ordinary
values of A and B. The matrices stay f32: they are small, and the file then holds the trained values.

Verified like the merged GGUF (lorasp_edge.export.gguf.verify_gguf), with llama.cpp applying the
adapter at run time and the unmerged PEFT model in PyTorch as the reference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lorasp_edge.errors import UserError, VerificationError
from lorasp_edge.export import llamacpp
from lorasp_edge.export.context import ExportContext
from lorasp_edge.export.gguf import GGUF_DIR, eos_ids, verify_gguf
from lorasp_edge.export.gguf_file import architecture, permute_rows, write_gguf_file
from lorasp_edge.export.ollama import modelfile
from lorasp_edge.train.adapter import ADAPTER_NAME, lora_layers

ADAPTER_FILE = "adapter-f32.gguf"


def base_file_name(type_name: str) -> str:
    return f"base-{type_name}.gguf"


# ------------------------------------------------------------------------------ adapter file


def lora_tensors(peft_model) -> tuple[list[tuple[str, np.ndarray]], float]:
    """(GGUF tensor name, f32 array) for every LoRA A/B in llama.cpp's layout, and the alpha that
    makes llama.cpp's alpha / r equal PEFT's scaling."""
    import gguf

    config = peft_model.get_base_model().config
    arch, permute = architecture(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], config.num_hidden_layers)
    tensors, alphas = [], set()
    for name, layer in lora_layers(peft_model).items():
        if layer.fan_in_fan_out:
            raise UserError(f"--adapter-only --format gguf: '{name}' is a transposed (Conv1D) layer, which llama.cpp's LoRA does not take")
        gguf_name = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise UserError(f"--adapter-only --format gguf: no llama.cpp name for the adapted layer '{name}'")
        a = layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu().numpy()
        b = layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu().numpy()
        if permute and name.endswith("q_proj"):
            b = permute_rows(b, config.num_attention_heads)
        elif permute and name.endswith("k_proj"):
            b = permute_rows(b, config.num_key_value_heads or config.num_attention_heads)
        alphas.add(round(float(layer.scaling[ADAPTER_NAME]) * a.shape[0], 6))
        tensors += [(f"{gguf_name}.lora_a", np.ascontiguousarray(a)), (f"{gguf_name}.lora_b", np.ascontiguousarray(b))]
    if not tensors:
        raise UserError("--adapter-only --format gguf: the adapter has no LoRA layers")
    if len(alphas) != 1:
        # llama.cpp holds one alpha per file; PEFT's per-layer rank/alpha patterns would need several.
        raise UserError(f"--adapter-only --format gguf: the adapter's layers scale differently (alpha x rank: {sorted(alphas)}); llama.cpp takes one alpha per file")
    return tensors, alphas.pop()


def write_lora_gguf(peft_model, path: Path, name: str = "adapter") -> Path:
    """Write the adapter of `peft_model` as a llama.cpp LoRA adapter GGUF at `path`."""
    import gguf

    config = peft_model.get_base_model().config
    arch, _ = architecture(config)
    tensors, alpha = lora_tensors(peft_model)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor_name, data in tensors:
        writer.add_tensor(tensor_name, data)
    logger = logging.getLogger("gguf.gguf_writer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs the file list at INFO
    try:
        writer.write_header_to_file(Path(path))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    finally:
        logger.setLevel(level)
    return Path(path)


# ------------------------------------------------------------------------------------ writer


def write_gguf_adapter(context: ExportContext) -> None:
    """OUT/gguf: base-<type>.gguf (the base as trained, `context.weights`), adapter-f32.gguf and a
    Modelfile naming both, verified in llama.cpp against `context.model`, which here is the base with
    the adapter unmerged (`context.is_merged` False; the adapter source says which, for an LLM.int8 base)."""
    settings, adapted, tokenizer, say = context.settings, context.model, context.tokenizer, context.say
    type_name = settings.gguf_type
    folder = context.folder / GGUF_DIR
    folder.mkdir()
    base_name = base_file_name(type_name)
    model_name = Path(str(getattr(context.config, "_name_or_path", "") or "model")).name
    say(f"writing the base GGUF ({type_name}, unmerged), the LoRA adapter GGUF and an Ollama Modelfile")
    write_gguf_file(context.config, context.weights, tokenizer, folder / base_name, type_name, name=model_name)
    text, templated = modelfile(base_name, tokenizer, eos_ids(adapted, tokenizer), adapted.generation_config, adapter=ADAPTER_FILE)
    write_lora_gguf(adapted, folder / ADAPTER_FILE, name=f"{model_name}-lora")
    (folder / "Modelfile").write_text(text)
    context.manifest["files"]["gguf-base"] = (folder / base_name).stat().st_size
    context.manifest["files"]["gguf-adapter"] = (folder / ADAPTER_FILE).stat().st_size
    record = {
        "file": f"{GGUF_DIR}/{base_name}", "adapter_file": f"{GGUF_DIR}/{ADAPTER_FILE}", "type": type_name,
        **context.reference_record, "modelfile_template": templated,
    }
    context.manifest["verification"]["gguf"] = record
    if not llamacpp.available():
        record["runtime"] = None
        say(f"  llama-cpp-python is not installed: the GGUF files were written but not run ({llamacpp.INSTALL_HINT})")
        return
    if not llamacpp.is_adapter(folder / ADAPTER_FILE):
        raise VerificationError(f"{ADAPTER_FILE} does not read back as a LoRA adapter GGUF; nothing was written")
    verify_gguf(folder / base_name, type_name, context, record, lora=folder / ADAPTER_FILE)

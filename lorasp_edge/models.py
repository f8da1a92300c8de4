"""Loading base models and tokenizers (where a name points is sources.py)."""

from __future__ import annotations

import torch

from lorasp_edge.devices import default_device
from lorasp_edge.errors import UserError
from lorasp_edge.sources import BUNDLED_MODELS, local_safetensors_folder, resolve_model


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


def _load_failure(name: str, what: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    known = ", ".join(BUNDLED_MODELS)
    return (
        f"cannot load {what} '{name}': {first_line} "
        f"(use a local Hugging Face folder, a reachable hub id, or a bundled model: {known})"
    )

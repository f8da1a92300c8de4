"""The LoRA merge as a pure function over the adapted model: W0 + (alpha / r) B A, in fp32.

Frozen LoRA-SP entries are ordinary values here: the merge is LoRA's (Hu et al. 2021, arXiv
2106.09685, Sec. 4.1). A 4/8-bit base is dequantized first, so the merged weights are the base the
adapter was trained against plus its delta.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorasp_edge.train.adapter import ADAPTER_NAME, lora_layers


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """(alpha / r) B A in fp32, laid out as the base weight is stored: (d_out, d_in), or transposed for a
    Conv1D layer (fan_in_fan_out). The one delta formula every source merges with (Hu et al. 2021, Sec. 4.1;
    PEFT's LoraLayer.get_delta_weight)."""
    delta = (B.float() @ A.float()) * scaling
    return delta.T if fan_in_fan_out else delta


def dequantized_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base layer's weight in fp32 (bitsandbytes 4/8-bit weights dequantized), as stored."""
    from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type

    weight = base_layer.weight
    if get_bnb_param_type(weight):
        return dequantize_bnb_weight(weight, state=getattr(base_layer, "state", None)).float()
    return weight.detach().float()


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict with W0 + (alpha/r) B A in every adapted layer, all fp32.

    Computed in fp32 and finite-checked; quantized bases are dequantized first. Nothing in
    `peft_model` changes. Keys are the plain model's, so the result loads with strict=True.
    """
    base = peft_model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    for name, layer in lora_layers(peft_model).items():
        base_layer = layer.get_base_layer()
        weight = dequantized_weight(base_layer)
        A = layer.lora_A[ADAPTER_NAME].weight.detach().float()
        B = layer.lora_B[ADAPTER_NAME].weight.detach().float()
        merged_weight = weight + lora_delta(A, B, layer.scaling[ADAPTER_NAME], layer.fan_in_fan_out)
        # A NaN or Inf anywhere makes the sum non-finite; one reduction instead of a full bool mask.
        if not torch.isfinite(merged_weight.sum()):
            raise ValueError(f"merging {name} produced NaN or Inf")
        merged[f"{name}.weight"] = merged_weight
        if getattr(base_layer, "bias", None) is not None:
            merged[f"{name}.bias"] = base_layer.bias.detach().float()
        handled.add(name)
    for name, module in base.named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt") and not _under(name, handled):
            merged[f"{name}.weight"] = dequantized_weight(module)
            if module.bias is not None:
                merged[f"{name}.bias"] = module.bias.detach().float()
            handled.add(name)
    for key, tensor in base.state_dict().items():
        if not _under(key, handled):
            merged[key] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
    return {key: value.cpu().contiguous() for key, value in merged.items()}


def _under(key: str, module_names: set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in module_names for i in range(1, len(parts) + 1))


def merged_model(peft_model):
    """A new plain fp32 model of the base's class holding the merged weights (input untouched)."""
    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = type(base)(config).to(torch.float32)
    state = merged_state_dict(peft_model)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embed_tokens) may appear under one name only.
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [key for key in missing if key not in tied and not _is_tied_duplicate(plain, key)]
    if missing or unexpected:
        raise ValueError(f"merged weights do not fit the plain model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(base.generation_config)
    return plain.eval()


def _is_tied_duplicate(model: nn.Module, key: str) -> bool:
    output = model.get_output_embeddings()
    input_embeddings = model.get_input_embeddings()
    return output is not None and key.endswith("weight") and output.weight is input_embeddings.weight

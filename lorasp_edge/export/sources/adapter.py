"""The adapter source (`export --adapter-only`): the adapter left unmerged, for runtimes that apply it.

    base (as trained: float, or bitsandbytes 4/8-bit) + adapter --PEFT, unmerged--> reference model
    base as trained, 4/8-bit weights dequantized --unmerged_base--> plain fp32 model: the weights to write

An LLM.int8 base also quantizes activations in its forward, which no float file reproduces. As the
merge check does for the merged sources, the adapter over the dequantized base in fp32 (what a
float runtime computes) is checked against the int8 forward at MERGE_TOLERANCE[8], and then is the
reference. Formats with an adapter writer (lorasp_edge.export.formats) write the base beside the
adapter in the runtime's form (gguf_adapter.py) and check the runtime against the reference.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

import torch

from lorasp_edge.errors import VerificationError
from lorasp_edge.export.sources.merge import dequantized_weight
from lorasp_edge.export.sources.source import MERGE_TOLERANCE, Source, SourceRequest
from lorasp_edge.export.sources.weights import ModelWeights


def open_source(request: SourceRequest) -> Source:
    from peft.utils.integrations import get_bnb_param_type

    from lorasp_edge.export.verify import compare, reference_logits
    from lorasp_edge.models import load_model
    from lorasp_edge.train.adapter_files import load_adapter

    bits, say, inputs = request.base_bits, request.say, request.inputs
    say(f"loading base '{request.model_name}'" + (f" ({bits}-bit, as trained)" if bits else ""))
    base = load_model(request.model_name, quant_bits=bits, compute_dtype=torch.float32, device="cpu")
    say(f"loading adapter {request.adapter_dir} (unmerged)")
    adapted = load_adapter(base, request.adapter_dir)
    plain = unmerged_base(adapted)
    weights = ModelWeights(plain)  # taken before a reference wraps `plain`: the base's own keys
    parameters = sum(p.numel() for p in adapted.get_base_model().parameters())
    record = {"reference": "unmerged PEFT model (PyTorch), as trained"}
    if any(get_bnb_param_type(p) == "8bit" for p in adapted.get_base_model().parameters()):
        reference = load_adapter(plain, request.adapter_dir).eval()
        batch = (inputs.input_ids, inputs.attention_mask)
        check = compare([reference_logits(reference, *batch)], [reference_logits(adapted, *batch)], [inputs.attention_mask])
        say(f"  fp32 over the dequantized 8-bit base vs the int8 forward: {check.relative_diff:.2e} of the logit scale")
        if check.relative_diff > MERGE_TOLERANCE[8]:
            raise VerificationError(
                f"the adapter over the dequantized 8-bit base differs from the int8 forward by {check.relative_diff:.2e} of the logit "
                f"scale > {MERGE_TOLERANCE[8]:.0e}; nothing was written"
            )
        record = {"reference": "unmerged PEFT model over the dequantized 8-bit base in fp32 (PyTorch)",
                  "int8_forward": {**asdict(check), "tolerance": MERGE_TOLERANCE[8]}}
        adapted = reference
    return Source("adapter", adapted, parameters, weights=weights, is_merged=False, reference_record=record, closers=[weights.close])


def unmerged_base(peft_model):
    """A plain fp32 model of the base's class holding the base weights as trained, without the
    delta: bitsandbytes 4/8-bit weights dequantized, everything else as loaded."""
    from peft.utils.integrations import get_bnb_param_type

    base = peft_model.get_base_model()
    state: dict[str, torch.Tensor] = {}
    for full_name, module in base.named_modules():
        parts = full_name.split(".")
        if any(part.startswith("lora_") for part in parts) or "lorasp" in full_name:
            continue
        plain = ".".join(part for part in parts if part != "base_layer")
        prefix = f"{plain}." if plain else ""
        own = dict(module.named_parameters(recurse=False))
        weight = own.get("weight")
        if weight is not None and get_bnb_param_type(weight):
            state[f"{prefix}weight"] = dequantized_weight(module)
            own.pop("weight")
        for key, tensor in [*own.items(), *module.named_buffers(recurse=False)]:
            if key in module._non_persistent_buffers_set:
                continue
            state[f"{prefix}{key}"] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(base)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ValueError(f"the base weights do not fit the plain model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.generation_config = copy.deepcopy(base.generation_config)
    return model.eval()

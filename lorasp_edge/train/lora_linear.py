"""PEFT's LoRA Linear, with the adapter's product added inside one matmul.

PEFT's forward for an adapted nn.Linear (peft/tuners/lora/layer.py, `Linear.forward`):

    result = W0 x
    x      = x.to(A.dtype)                      a copy of the whole input (bf16 -> fp32 LoRA weights),
                                                which autocast then casts back to bf16 for the matmul
    result = result + B(A(dropout(x))) * s      a multiply and an add over the whole output

and the backward of each: four passes over the input and three over the output per adapted layer,
beside two skinny matmuls. Here the scale and the add ride on the matmul that needs them anyway:

    h      = A dropout(x)                       autocast casts A, never x (x is already in the compute dtype)
    result = addmm(W0 x, h, B^T, beta=1, alpha=s)

addmm's backward scales the rank-r side (grad B^T s, r columns), not the output, and passes the
output gradient through to W0 x unchanged. Same function, same dtypes: under bf16 autocast the
input's fp32 round trip was exact (every bf16 value is an fp32 value), so the losses and gradients
agree with PEFT's up to the summation order inside the matmul (tested). Measured in
docs/performance.md (tools/bench_train.py, PEFT's layer against this one).

Only float nn.Linear bases take this layer (`custom_modules`); bitsandbytes and GPT-2's Conv1D
keep PEFT's own. Anything this forward does not cover (adapters disabled or merged, several active
adapters, mixed-batch adapter names, LoRA variants such as DoRA, a dtype mismatch outside autocast)
goes through PEFT's forward unchanged.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn


class FusedLoraLinear(PeftLoraLinear):
    """peft.tuners.lora.layer.Linear whose forward adds s B A x inside one addmm (module docstring)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._fusable(x, kwargs):
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        result = self.base_layer(x, *args, **kwargs)
        h = self.lora_A[name](self.lora_dropout[name](x))
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B[name].weight.t(),
                          alpha=self.scaling[name])
        return out.view(result.shape)

    def _fusable(self, x: torch.Tensor, kwargs: dict) -> bool:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(self.active_adapters) != 1:
            return False
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant:
            return False
        # Outside autocast the input must already be in the LoRA weights' dtype (PEFT would cast it).
        return torch.is_autocast_enabled(x.device.type) or x.dtype == self.lora_A[name].weight.dtype


def quantized_layers(model: nn.Module) -> bool:
    """Whether `model` holds bitsandbytes 4/8-bit layers (subclasses of nn.Linear)."""
    return any(type(module).__module__.startswith("bitsandbytes") or hasattr(module, "quant_state") for module in model.modules())


def custom_modules(model: nn.Module) -> dict[type, type] | None:
    """The PEFT custom-module mapping for `model`: nn.Linear -> FusedLoraLinear on a float base;
    None where bitsandbytes layers are present, which keep PEFT's own."""
    return None if quantized_layers(model) else {nn.Linear: FusedLoraLinear}

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

The whole layer is one autograd function (`LoraLinearFunction`), so its backward also adds the
adapter's input gradient inside the base's matmul instead of a separate pass over the input:

    forward    h = x A^T;  out = x W0^T;  out += s h B^T           (addmm_ in place: no copy of out)
    backward   g_h = g (s B);  grad_B = g^T (s h);  grad_A = g_h^T x;
               grad_x = g_h A, then += g W0                         (addmm_ in place: no add pass)

Autograd's graph of the three separate ops instead copies W0 x into addmm's output, and sums the
base's and the adapter's input gradients in a third (tokens, d_in) tensor. It saves what autograd
saved: x (the tensor the base read, shared by the layers that read it) and h (tokens x r). Same
function, same dtypes: under bf16 autocast the input's fp32 round trip was exact (every bf16
value is an fp32 value), and the function casts A and B to the autocast dtype as autocast would,
so the losses and gradients agree with PEFT's up to the summation order inside the matmuls
(tested). Measured in docs/performance.md (tools/bench_train.py, PEFT's layer against this one).

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
        base, lora_a, lora_b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
        if self._one_function(name):
            weight, bias = base.weight, base.bias
            if torch.is_autocast_enabled(x.device.type):  # the casts autocast would make, once each
                dtype = torch.get_autocast_dtype(x.device.type)
                x, weight, lora_a, lora_b = x.to(dtype), weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
                bias = None if bias is None else bias.to(dtype)
                with torch.autocast(x.device.type, enabled=False):
                    return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, self.scaling[name])
            return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, self.scaling[name])
        result = base(x, *args, **kwargs)
        h = self.lora_A[name](self.lora_dropout[name](x))
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.t(), alpha=self.scaling[name])
        return out.view(result.shape)

    def _one_function(self, name: str) -> bool:
        """Whether LoraLinearFunction computes this layer: a plain frozen nn.Linear base (no hooks or
        subclass forward to honour), no dropout (A must read the base's input), bias-free A and B."""
        base = self.base_layer
        return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
                and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
                and isinstance(self.lora_dropout[name], nn.Identity)
                and self.lora_A[name].bias is None and self.lora_B[name].bias is None)

    def _fusable(self, x: torch.Tensor, kwargs: dict) -> bool:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(self.active_adapters) != 1:
            return False
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant:
            return False
        # Outside autocast the input must already be in the LoRA weights' dtype (PEFT would cast it).
        return torch.is_autocast_enabled(x.device.type) or x.dtype == self.lora_A[name].weight.dtype


class LoraLinearFunction(torch.autograd.Function):
    """x W^T + bias + s (x A^T) B^T over a frozen W and bias, its backward without the extra passes
    (module docstring). All tensors in one dtype; x may have any leading shape."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        rows = x.reshape(-1, x.shape[-1])
        h = rows @ lora_a.t()
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        out.addmm_(h, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scale = scale
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b, _ = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_a = grad_b = None
        if needs_b:
            grad_b = grad.t() @ (h * ctx.scale)
        if needs_x or needs_a:
            grad_h = grad @ (lora_b * ctx.scale)
            if needs_a:
                grad_a = grad_h.t() @ x.reshape(-1, x.shape[-1])
            if needs_x:
                grad_x = (grad_h @ lora_a).addmm_(grad, weight).view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None


def quantized_layers(model: nn.Module) -> bool:
    """Whether `model` holds bitsandbytes 4/8-bit layers (subclasses of nn.Linear)."""
    return any(type(module).__module__.startswith("bitsandbytes") or hasattr(module, "quant_state") for module in model.modules())


def custom_modules(model: nn.Module) -> dict[type, type] | None:
    """The PEFT custom-module mapping for `model`: nn.Linear -> FusedLoraLinear on a float base;
    None where bitsandbytes layers are present, which keep PEFT's own."""
    return None if quantized_layers(model) else {nn.Linear: FusedLoraLinear}

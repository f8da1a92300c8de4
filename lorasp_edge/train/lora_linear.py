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

Float nn.Linear bases take this layer, and bitsandbytes 4-bit ones its 4-bit twin
(`custom_modules`); 8-bit bases and GPT-2's Conv1D keep PEFT's own. Anything this forward does
not cover (adapters disabled or merged, several active adapters, mixed-batch adapter names, LoRA
variants such as DoRA, a dtype mismatch outside autocast) goes through PEFT's forward unchanged.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

try:
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit
except ImportError:  # bitsandbytes without 4-bit support
    PeftLoraLinear4bit = None


class _FusedForward:
    """What the fused forwards share: when they apply, and the autocast casts they make."""

    def _fusable(self, x: torch.Tensor, kwargs: dict) -> bool:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(self.active_adapters) != 1:
            return False
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant:
            return False
        # Outside autocast the input must already be in the LoRA weights' dtype (PEFT would cast it).
        return torch.is_autocast_enabled(x.device.type) or x.dtype == self.lora_A[name].weight.dtype

    def _plain_adapter(self, name: str) -> bool:
        """No dropout (A must read the base's input), bias-free A and B, a frozen base with no hooks."""
        base = self.base_layer
        return (isinstance(self.lora_dropout[name], nn.Identity) and self.lora_A[name].bias is None
                and self.lora_B[name].bias is None and not base._forward_hooks and not base._forward_pre_hooks
                and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad))

    def _one_function(self, x, weight, bias, name: str, dequantize=None) -> torch.Tensor:
        """LoraLinearFunction over this layer; under autocast with the casts autocast would make, once each."""
        lora_a, lora_b, scale = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        if not torch.is_autocast_enabled(x.device.type):
            return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scale, dequantize)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, lora_a, lora_b = x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        weight = None if weight is None else weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scale, dequantize)


class FusedLoraLinear(_FusedForward, PeftLoraLinear):
    """peft.tuners.lora.layer.Linear whose forward adds s B A x inside one addmm (module docstring)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._fusable(x, kwargs):
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        base = self.base_layer
        if type(base) is nn.Linear and self._plain_adapter(name):  # a subclass may have its own forward
            return self._one_function(x, base.weight, base.bias, name)
        result = base(x, *args, **kwargs)
        h = self.lora_A[name](self.lora_dropout[name](x))
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B[name].weight.t(),
                          alpha=self.scaling[name])
        return out.view(result.shape)


if PeftLoraLinear4bit is not None:

    class FusedLoraLinear4bit(_FusedForward, PeftLoraLinear4bit):
        """PEFT's LoRA layer over a bitsandbytes 4-bit base, run as LoraLinearFunction while training.

        bitsandbytes' own 4-bit matmul on CPU dequantizes the weight to the compute dtype and multiplies
        (forward), and dequantizes it again for the input gradient (backward); here the same two
        dequantizations feed LoraLinearFunction, so PEFT's clone of the base output, its scaled
        adapter output and their sum go, as on a float base. Outside training (no grad) and wherever
        bitsandbytes' forward does more (a weight packed for CPU inference, an input outside the
        compute dtype), PEFT's forward runs unchanged."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if not torch.is_grad_enabled() or not self._fusable(x, kwargs):
                return super().forward(x, *args, **kwargs)
            name = self.active_adapters[0]
            dtype = self._compute_dtype(x)
            if dtype is None or not self._plain_adapter(name):
                return super().forward(x, *args, **kwargs)
            import bitsandbytes.functional as bnb_functional

            weight = self.base_layer.weight
            state = weight.quant_state
            return self._one_function(x, None, self.base_layer.bias, name,
                                      dequantize=lambda: bnb_functional.dequantize_4bit(weight.data, state).to(dtype))

        def _compute_dtype(self, x: torch.Tensor) -> torch.dtype | None:
            """The dtype bitsandbytes computes this layer in, where it is x's own and the weight is in
            its training layout; None otherwise."""
            from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

            base = self.base_layer
            fix_4bit_weight_quant_state_from_module(base)
            state = getattr(base.weight, "quant_state", None)
            if state is None or getattr(state, "packing_format_for_cpu", False):
                return None
            autocast = torch.is_autocast_enabled(x.device.type)
            dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
            return dtype if x.dtype == dtype and base.compute_dtype in (None, dtype) else None
else:
    FusedLoraLinear4bit = None


class LoraLinearFunction(torch.autograd.Function):
    """x W^T + bias + s (x A^T) B^T over a frozen W and bias, its backward without the extra passes
    (module docstring). All tensors in one dtype; x may have any leading shape. `dequantize` is None
    for a float W; otherwise (weight None) it makes W, in forward and again in backward, never kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dequantize):
        rows = x.reshape(-1, x.shape[-1])
        h = rows @ lora_a.t()
        full = dequantize() if dequantize is not None else weight  # a 4-bit base: made again in backward
        out = rows @ full.t() if bias is None else torch.addmm(bias, rows, full.t())
        out.addmm_(h, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scale, ctx.dequantize = scale, dequantize
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b, _, _ = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_a = grad_b = None
        if needs_b:
            grad_b = grad.t() @ (h * ctx.scale)
        if needs_x or needs_a:
            grad_h = grad @ (lora_b * ctx.scale)
            if needs_a:
                grad_a = grad_h.t() @ x.reshape(-1, x.shape[-1])
            if needs_x:
                full = ctx.dequantize() if ctx.dequantize is not None else weight
                grad_x = (grad_h @ lora_a).addmm_(grad, full).view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def quantized_layers(model: nn.Module) -> bool:
    """Whether `model` holds bitsandbytes 4/8-bit layers (subclasses of nn.Linear)."""
    return any(type(module).__module__.startswith("bitsandbytes") or hasattr(module, "quant_state") for module in model.modules())


def custom_modules(model: nn.Module) -> dict[type, type] | None:
    """The PEFT custom-module mapping for `model`: nn.Linear -> FusedLoraLinear on a float base,
    bitsandbytes' Linear4bit -> FusedLoraLinear4bit on a 4-bit one; None on an 8-bit base (its
    int8 matmul keeps PEFT's layer; every bitsandbytes layer is an nn.Linear, so no float mapping)."""
    if not quantized_layers(model):
        return {nn.Linear: FusedLoraLinear}
    import bitsandbytes as bnb

    if FusedLoraLinear4bit is None or any(isinstance(module, bnb.nn.Linear8bitLt) for module in model.modules()):
        return None
    return {bnb.nn.Linear4bit: FusedLoraLinear4bit}

"""A PyTorch model whose weights stay on disk and are read one layer at a time on each forward.

The model is built with its parameters on the meta device (buffers such as RoPE frequencies are
real). A pre-forward hook on each unit (a decoder layer, the embeddings, the final norm, the
lm_head) reads that unit's weights in fp32 from a weight source; a post-forward hook puts them
back on the meta device. A forward therefore holds one layer's fp32 weights at a time (the
vocabulary table is the largest unit), and computes exactly what the whole model would: the same
transformers modules run on the same values. With a `LoraDelta`, each adapted linear layer adds
scaling * B (A x) to its output: PEFT's unmerged LoRA forward, the "adapted" side of the merge check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerStreamed:
    """`model` runs like the plain model; `weights.read(key)` gives fp32 tensors by checkpoint key."""

    def __init__(self, config, weights, lora=None):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        config = config.__class__.from_dict(config.to_dict())
        config.dtype = torch.float32
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model = model.eval()
        self.weights = weights
        self.available = set(weights.keys())
        embeddings = model.get_input_embeddings()
        self.embedding_key = next(f"{name}.weight" for name, module in model.named_modules() if module is embeddings)
        self._hooks = []
        self._memo: dict = {}
        for name, unit in self._units():
            params = self._unit_parameters(name, unit)
            self._hooks.append(unit.register_forward_pre_hook(self._loader(params)))
            self._hooks.append(unit.register_forward_hook(self._unloader(params)))
        if lora is not None:
            modules = dict(model.named_modules())
            for name, (A, B) in lora.matrices.items():
                self._hooks.append(modules[name].register_forward_hook(_lora_hook(A, B, lora.scaling)))

    def _units(self) -> list[tuple[str, nn.Module]]:
        layers = self.model.get_decoder().layers
        layer_ids = {id(layer) for layer in layers}
        units, inside = [], set()
        for name, module in self.model.named_modules():
            if id(module) in layer_ids:
                units.append((name, module))
                inside.update(id(child) for child in module.modules())
            elif id(module) not in inside and any(True for _ in module.parameters(recurse=False)):
                units.append((name, module))
        return units

    def _unit_parameters(self, prefix: str, unit: nn.Module) -> list[tuple[nn.Module, str, str, torch.Size]]:
        found = []
        for module_name, module in unit.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                key = ".".join(part for part in (prefix, module_name, param_name) if part)
                if key not in self.available:
                    if module is self.model.get_output_embeddings() and self.embedding_key in self.available:
                        key = self.embedding_key  # tied lm_head: the checkpoint stores the table once
                    else:
                        raise KeyError(f"weight {key} is not in the checkpoint")
                found.append((module, param_name, key, param.shape))
        return found

    def _loader(self, params):
        def load(module, args):
            for owner, name, key, shape in params:
                tensor = self.weights.read(key)
                if tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"weight {key} has shape {tuple(tensor.shape)}, the model needs {tuple(shape)}")
                owner._parameters[name] = nn.Parameter(tensor.float(), requires_grad=False)

        return load

    def _unloader(self, params):
        def unload(module, args, output):
            for owner, name, _, shape in params:
                owner._parameters[name] = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)

        return unload

    def __call__(self, *args, **kwargs):
        """The model's forward; a repeated small call (the same verification batch checked against
        several graphs) returns the stored output instead of reading every weight again."""
        key = _call_key(args, kwargs)
        if key is not None and key in self._memo:
            return self._memo[key]
        with torch.no_grad():
            output = self.model(*args, **kwargs)
        if key is not None and output.logits.numel() <= MEMO_MAX_ELEMENTS:
            self._memo[key] = output
        return output

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.model.generation_config = value

    def parameters(self):
        """The model's parameters as placeholders on the meta device (shapes and counts only)."""
        return self.model.parameters()


MEMO_MAX_ELEMENTS = 4 << 20  # outputs kept for repeated calls: the verification batch's logits, not a perplexity window's


def _call_key(args, kwargs):
    """A hashable key for a call without cache state, or None (a call with a KV cache is not repeated)."""
    if args or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        return None
    parts = []
    for name in sorted(kwargs):
        value = kwargs[name]
        parts.append((name, tuple(value.shape), value.numpy().tobytes()) if isinstance(value, torch.Tensor) else (name, repr(value)))
    return tuple(parts)


def _lora_hook(A: torch.Tensor, B: torch.Tensor, scaling: float):
    def add(module, args, output):
        return output + F.linear(F.linear(args[0].to(A.dtype), A), B) * scaling

    return add

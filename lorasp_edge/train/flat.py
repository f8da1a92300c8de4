"""LoRA-SP's trainable half as one flat parameter; the frozen half as a buffer.

LoRA-SP trains a fixed share of each LoRA matrix (A: r x d_in, B: d_out x r). Held as whole
matrices, every LoRA entry would carry a gradient and the optimizer would gather and scatter the
trainable ones each step. Here, for all adapted matrices of a model at once:

    full    (N,)  every LoRA entry, matrix after matrix, row-major      buffer; frozen entries live here
    index   (T,)  positions in `full` of the trainable entries          buffer (int64)
    values  (T,)  the trainable entries, in `index` order               the only nn.Parameter

    W = full.scatter(0, index, values)[offset_k : offset_k + n_k].view(shape_k)     for matrix k

The rebuild is one scatter per decoder forward, before the decoder layers run (a forward pre-hook,
so non-reentrant activation checkpointing replays the same tensors); its backward is one
`index_select` of W's gradient. So the optimizer, gradient clipping and the data-parallel
all-reduce see T values, not N: a stock fused torch AdamW steps them with no per-tensor loop,
no mask and no host sync, and a frozen entry is never written (it has no gradient and no state).

Each PEFT `lora_A` / `lora_B` Linear becomes a `LoRASPLinear` whose `weight` is a read-only view
of the rebuilt matrix; state_dict and load_state_dict still speak whole matrices under PEFT's keys,
so PEFT's save_pretrained writes the usual adapter file.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# Bumped after any optimizer's step: a fused AdamW updates `values` without bumping its version
# counter, so the version alone cannot tell a cached rebuild is stale.
_steps = itertools.count()
_step_generation = [next(_steps)]


def _after_any_step(optimizer, args, kwargs) -> None:
    _step_generation[0] = next(_steps)


register_optimizer_step_post_hook(_after_any_step)


class _Rebuild(torch.autograd.Function):
    """full with `values` written at `index`; the gradient of `values` is the rebuilt one's at `index`."""

    @staticmethod
    def forward(ctx, full: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return full.scatter(0, index, values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return None, grad.index_select(0, index), None


class LoRASPStore(nn.Module):
    """The LoRA matrices of one model as `full` + `index` + `values` (see the module docstring)."""

    def __init__(self, weights: list[torch.Tensor], trainable_masks: list[torch.Tensor], requires_grad: bool = True):
        super().__init__()
        dtypes = {weight.dtype for weight in weights}
        if len(dtypes) != 1:
            raise ValueError(f"LoRA matrices of one model must share a dtype, found {sorted(map(str, dtypes))}")
        self.shapes = [tuple(weight.shape) for weight in weights]
        self.sizes = [weight.numel() for weight in weights]
        self.offsets = [0, *itertools.accumulate(self.sizes)][:-1]
        full = torch.cat([weight.detach().reshape(-1) for weight in weights])
        self.register_buffer("full", full)
        self.register_buffer("index", self._positions(trainable_masks, full.device))
        self.values = nn.Parameter(full[self.index].clone(), requires_grad=requires_grad)
        self._cache: tuple | None = None
        self._cache_key = None

    def _positions(self, trainable_masks: list[torch.Tensor], device) -> torch.Tensor:
        parts, counts = [], []
        for offset, size, mask in zip(self.offsets, self.sizes, trainable_masks):
            if mask.numel() != size:
                raise ValueError(f"mask of {mask.numel()} entries for a matrix of {size}")
            positions = mask.reshape(-1).to(device).nonzero().squeeze(1) + offset
            parts.append(positions)
            counts.append(positions.numel())
        self.value_offsets = [0, *itertools.accumulate(counts)]
        return torch.cat(parts)

    def __getstate__(self):
        # The cached rebuild may carry an autograd graph, which neither deepcopy nor pickle takes.
        return {**self.__dict__, "_cache": None, "_cache_key": None}

    def pre_forward(self, module, args) -> None:
        """Forward pre-hook of the decoder: one fresh rebuild (and autograd graph) per training forward."""
        if torch.is_grad_enabled() and self.values.requires_grad:
            self.refresh()

    # -- reading

    def _key(self):
        grad = torch.is_grad_enabled() and self.values.requires_grad
        return (_step_generation[0], self.values._version, self.full._version, self.index._version, self.values.device, grad)

    def refresh(self) -> None:
        """Rebuild now (a new autograd graph when gradients are on). The decoder's forward pre-hook."""
        self._cache, self._cache_key = None, None
        self.matrices()

    def matrices(self) -> tuple[torch.Tensor, ...]:
        """Every matrix as a view of one rebuilt tensor, cached until the values change."""
        key = self._key()
        if self._cache is None or self._cache_key != key:
            if key[-1]:
                rebuilt = _Rebuild.apply(self.full, self.values, self.index)
            else:
                rebuilt = self.full.scatter(0, self.index, self.values.detach())
            parts = rebuilt.split(self.sizes)
            self._cache = tuple(part.view(shape) for part, shape in zip(parts, self.shapes))
            self._cache_key = key
        return self._cache

    def trainable_mask(self, slot: int) -> torch.Tensor:
        mask = torch.zeros(self.sizes[slot], dtype=torch.bool, device=self.index.device)
        mask[self.value_slice(slot) - self.offsets[slot]] = True
        return mask.view(self.shapes[slot])

    def value_slice(self, slot: int) -> torch.Tensor:
        """Positions in `full` of this matrix's trainable entries (a view of `index`)."""
        return self.index[self.value_offsets[slot] : self.value_offsets[slot + 1]]

    def value_range(self, slot: int) -> slice:
        """Where this matrix's trainable entries sit in `values` (and in its gradient)."""
        return slice(self.value_offsets[slot], self.value_offsets[slot + 1])

    # -- writing (all under no_grad, in place: the optimizer holds `values` itself)

    @torch.no_grad()
    def set_matrix(self, slot: int, weight: torch.Tensor) -> None:
        start, size = self.offsets[slot], self.sizes[slot]
        self.full[start : start + size].copy_(weight.reshape(-1))
        positions = self.value_slice(slot)
        self.values[self.value_range(slot)] = self.full[positions].to(self.values.dtype)
        self._cache = None

    @torch.no_grad()
    def set_masks(self, trainable_masks: list[torch.Tensor]) -> None:
        """New masks; every entry keeps its current value (trainable counts per matrix must not change)."""
        current = self.full.scatter(0, self.index, self.values.detach())
        index = self._positions(trainable_masks, self.full.device)
        if index.numel() != self.values.numel():
            raise ValueError(f"new masks train {index.numel()} entries, the optimizer holds {self.values.numel()}")
        self.full.copy_(current)
        self.index.copy_(index)
        self.values.copy_(current[index])
        self._cache = None


class LoRASPLinear(nn.Linear):
    """A PEFT lora_A / lora_B Linear whose weight is a matrix of a `LoRASPStore` (set by `adopt`)."""

    @classmethod
    def adopt(cls, linear: nn.Linear, store: LoRASPStore, slot: int) -> None:
        if linear.bias is not None:
            raise ValueError("LoRA-SP matrices carry no bias")
        del linear._parameters["weight"]
        linear.__class__ = cls
        # Not a submodule: the store is registered once, on the PeftModel.
        object.__setattr__(linear, "_lorasp_store", store)
        object.__setattr__(linear, "_lorasp_slot", slot)

    @property
    def weight(self) -> torch.Tensor:
        return self._lorasp_store.matrices()[self._lorasp_slot]

    @property
    def lorasp_trainable(self) -> torch.Tensor:
        """Bool mask of the trainable entries (True = trained)."""
        return self._lorasp_store.trainable_mask(self._lorasp_slot)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key]
            if tuple(weight.shape) != self._lorasp_store.shapes[self._lorasp_slot]:
                error_msgs.append(f"size mismatch for {key}: {tuple(weight.shape)} vs {self._lorasp_store.shapes[self._lorasp_slot]}")
            else:
                self._lorasp_store.set_matrix(self._lorasp_slot, weight)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lorasp_slot={self._lorasp_slot}"

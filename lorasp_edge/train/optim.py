"""The optimizer: torch's AdamW over LoRA-SP's one flat parameter of trainable entries.

LoRA-SP freezes a share of each LoRA matrix. The adapter (lorasp_edge.train.flat) keeps only the
trainable entries as a parameter, so the optimizer needs no masks: torch.optim.AdamW (Loshchilov &
Hutter 2019, Alg. 2) steps one flat tensor, with its fused kernel where the device has one (CPU and
CUDA in torch >= 2.4). Its decoupled weight decay (theta <- theta - lr * lambda * theta) therefore
moves trainable entries only, and m and v hold one fp32 value each per trainable entry: half of
LoRA's at ratio 0.5.
"""

from __future__ import annotations

import torch

from lorasp_edge.errors import UserError


def _fused_supported(params: list[torch.Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class LoRASPAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (fused where supported), plus `reset_state` for mask redraws and a clear
    refusal of optimizer state written by the per-matrix optimizer of earlier versions."""

    def __init__(self, params, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        params = list(params)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=_fused_supported(params) or None)

    def reset_state(self) -> None:
        """Drop m, v and the step count (after a mask redraw the entries mean other positions)."""
        self.state.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [len(group["params"]) for group in state_dict["param_groups"]]
        ours = [len(group["params"]) for group in self.param_groups]
        if saved != ours:
            raise UserError(
                f"the checkpoint's optimizer state covers {sum(saved)} tensors, this version steps {sum(ours)} "
                "(it was written by an earlier lorasp-edge that kept one state per LoRA matrix): it cannot resume; "
                "start the run again in a new folder (adapters written by that version still load)"
            )
        super().load_state_dict(state_dict)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every non-scalar state tensor an optimizer holds (m, v; not step counters)."""
    return sum(
        tensor.numel() * tensor.element_size()
        for state in optimizer.state.values()
        for tensor in state.values()
        if torch.is_tensor(tensor) and tensor.dim() > 0
    )

"""AdamW that keeps state for trainable entries only, and never touches a frozen entry.

torch's AdamW owns whole tensors: its m and v are as large as the tensor, and its decoupled weight
decay (Loshchilov & Hutter 2019, Alg. 2, line 12: theta <- theta - lr * lambda * theta) moves every
entry, masked gradient or not. LoRA-SP freezes half of each LoRA matrix, so here each tensor's
trainable entries are gathered into a flat vector, updated, and scattered back:

    g = grad[trainable]                         (n_trainable,)
    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
    w = weight[trainable] ;  w <- w (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    weight[trainable] = w                       frozen entries are never written

m and v hold n_trainable fp32 values: half of LoRA's at ratio 0.5. The mask itself is the model's
buffer (one byte an entry), not optimizer state. The update is torch.optim.AdamW's
(single-tensor path) restricted to the gathered entries; with nothing frozen the two agree.
"""

from __future__ import annotations

import math

import torch


class MaskedAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        trainable_masks: dict[torch.nn.Parameter, torch.Tensor],
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        params = list(trainable_masks)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        # The model's buffers themselves: a mask redraw updates them in place (adapter.redraw_masks).
        self.trainable_masks = trainable_masks

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                trainable = self.trainable_masks[param]
                state = self.state[param]
                if not state:
                    count = int(trainable.sum())
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros(count, dtype=torch.float32, device=param.device)
                    state["exp_avg_sq"] = torch.zeros(count, dtype=torch.float32, device=param.device)
                state["step"] += 1
                step = float(state["step"])
                grad = param.grad.masked_select(trainable).float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2_sqrt = math.sqrt(1 - beta2**step)
                weights = param.masked_select(trainable).float()
                weights.mul_(1 - lr * weight_decay)
                denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                weights.addcdiv_(exp_avg, denominator, value=-lr / bias_correction1)
                param.masked_scatter_(trainable, weights.to(param.dtype))
        return loss

    def reset_state(self) -> None:
        """Drop m, v and the step count (after a mask redraw the trainable entries differ)."""
        self.state.clear()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every non-scalar state tensor an optimizer holds (m, v; not step counters)."""
    return sum(
        tensor.numel() * tensor.element_size()
        for state in optimizer.state.values()
        for tensor in state.values()
        if torch.is_tensor(tensor) and tensor.dim() > 0
    )

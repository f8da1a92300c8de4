"""One optimizer step that cannot put a non-finite value into the weights.

    count        valid targets over micro-batches and ranks (the normalizer); 0 -> skip "no targets"
    micro-steps  forward (position ids mark packed examples) + backward per micro-batch
    check        loss and gradient norm finite on every rank (one all-reduce agrees), else skip:
                 gradients dropped, optimizer not stepped, so weights and Adam state stay as they were
    clip, step   global norm over the stepped tensors, then optimizer.step

float16 compute runs under torch.amp.GradScaler (fp16 gradients underflow without one): the loss is
scaled before backward, the gradients unscaled before the check. A non-finite gradient there is the
scaler's normal signal to halve its scale, reported as "fp16 overflow"; it counts as non-finite
only once the scale has fallen below 1, where no scaling is left to blame.
"""

from __future__ import annotations

import math

import torch

from lorasp_edge.train.distributed import World
from lorasp_edge.train.loss import ChunkedCausalLMLoss, valid_targets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Reasons a step is skipped; NONFINITE ones count toward the trainer's stop.
NO_TARGETS, NONFINITE_LOSS, NONFINITE_GRAD, FP16_OVERFLOW = "no targets", "non-finite loss", "non-finite gradient", "fp16 overflow"
NONFINITE = (NONFINITE_LOSS, NONFINITE_GRAD)


class PartialStepError(Exception):
    """The optimizer failed inside its step (e.g. out of memory): the weights may be partly updated."""


def _result(loss: float | None, grad_norm: float | None, tokens: int, skipped: str | None = None) -> dict:
    """loss: mean CE over the step's valid targets, all ranks (None when none or non-finite);
    skipped: None, or the reason the weights were left alone."""
    return {"loss": loss, "grad_norm": grad_norm, "tokens": tokens, "skipped": skipped}


def autocast(device: torch.device, compute_dtype: torch.dtype):
    enabled = compute_dtype != torch.float32
    return torch.autocast(device_type=device.type, dtype=compute_dtype, enabled=enabled)


def make_scaler(device: torch.device, compute_dtype: torch.dtype) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None


def _loss_module(model, plan):
    if isinstance(model, (ChunkedCausalLMLoss, torch.nn.parallel.DistributedDataParallel)):
        return model
    return ChunkedCausalLMLoss(model, chunk_tokens=getattr(plan, "loss_chunk_tokens", 256))


def train_step(model, optimizer, batch, plan=None, max_grad_norm: float = 1.0, world: World | None = None,
               compute_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None) -> dict:
    """One optimizer step over `batch` (one micro-batch dict, or a list of them).

    `model` is a ChunkedCausalLMLoss (or DDP around one), or a PeftModel that is wrapped here.
    Gradients are clipped over the tensors `optimizer` steps (max_grad_norm 0: not clipped). Autocast runs in `compute_dtype`,
    else the plan's, else fp32. Every rank returns the same result, skipped or not.
    """
    world = world or World.single()
    micro_batches = batch if isinstance(batch, list) else [batch]
    loss_module = _loss_module(model, plan)
    inner = loss_module.module if isinstance(loss_module, torch.nn.parallel.DistributedDataParallel) else loss_module
    device = next(inner.parameters()).device
    if compute_dtype is None:
        compute_dtype = DTYPES[plan.compute_dtype] if plan is not None else torch.float32
    tokens = sum(mb["input_ids"].numel() for mb in micro_batches) * world.size
    # The normalizer spans micro-batches and ranks, so the gradient equals one big batch's.
    # DDP averages gradients over ranks; scaling by world size turns that average into the sum.
    counts = torch.tensor([sum(valid_targets(mb["labels"]) for mb in micro_batches)], dtype=torch.float64)
    normalizer = float(world.all_reduce_sum(counts)) / world.size
    if normalizer == 0:  # the same sum on every rank, so every rank skips
        return _result(None, None, tokens, NO_TARGETS)
    total = torch.zeros((), dtype=torch.float64)
    for index, micro in enumerate(micro_batches):
        input_ids, labels = micro["input_ids"].to(device), micro["labels"].to(device)
        position_ids = micro["position_ids"].to(device) if "position_ids" in micro else None
        with world.no_sync_unless(loss_module, last=index == len(micro_batches) - 1), autocast(device, compute_dtype):
            loss, summed = loss_module(input_ids, labels, normalizer, position_ids=position_ids)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += summed.double().cpu()
    mean_loss = float(world.all_reduce_sum(total.reshape(1))) / (normalizer * world.size)
    if scaler is not None:
        scaler.unscale_(optimizer)
    parameters = [param for group in optimizer.param_groups for param in group["params"]]
    if max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm))
    else:  # 0: no clipping; the norm is still measured for the log and the non-finite check
        grad_norm = float(torch.nn.utils.get_total_norm([param.grad for param in parameters if param.grad is not None]))
    # check: DDP gives every rank the same gradients and the loss is all-reduced, but a sync point
    # costs little beside a step and makes the decision identical by construction.
    reason = NONFINITE_LOSS if not math.isfinite(mean_loss) else NONFINITE_GRAD if not math.isfinite(grad_norm) else None
    if world.any_true(reason is not None):
        reason = reason or NONFINITE_GRAD  # another rank saw it
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()  # halves the scale after the inf found by unscale_
            if reason == NONFINITE_GRAD and scaler.get_scale() >= 1.0:
                reason = FP16_OVERFLOW
        return _result(mean_loss if math.isfinite(mean_loss) else None, None, tokens, reason)
    try:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    except (torch.OutOfMemoryError, MemoryError) as error:
        raise PartialStepError(str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__) from error
    optimizer.zero_grad(set_to_none=True)
    return _result(mean_loss, grad_norm, tokens)


@torch.no_grad()
def evaluate(loss_module: ChunkedCausalLMLoss, batches: list[dict], compute_dtype: torch.dtype) -> float:
    """Mean CE over the valid targets of `batches` (eval mode, no dropout)."""
    device = next(loss_module.parameters()).device
    was_training = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    for batch in batches:
        position_ids = batch["position_ids"].to(device) if "position_ids" in batch else None
        with autocast(device, compute_dtype):
            _, summed = loss_module(batch["input_ids"].to(device), batch["labels"].to(device), 1.0, position_ids=position_ids)
        total += float(summed)
        count += valid_targets(batch["labels"])
    loss_module.train(was_training)
    return total / max(count, 1)

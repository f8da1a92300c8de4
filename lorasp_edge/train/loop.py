"""The LoRA-SP training loop: streamed data, plan-sized model, exact resume, memory guard.

One optimizer step:

    schedule     lr for this step (linear warmup, then cosine to min_lr_ratio * lr)
    micro-steps  grad_accum micro-batches, each loss = summed CE / valid targets in the whole step
    clip         global norm over trainable entries (frozen entries' gradients are zero)
    step         MaskedAdamW: trainable entries only
    log          loss, lr, grad norm, tokens/s, peak memory -> metrics.jsonl and the progress bar
    eval         every eval_every steps when eval data is given
    save         checkpoint every save_every steps, on SIGINT/SIGTERM, over budget, and at the end

Rank-aware from the start: under torchrun each rank reads its own packed blocks, gradients are
averaged by DDP, rank 0 alone writes files and prints.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lorasp_edge.errors import OverBudgetError, UserError
from lorasp_edge.models import load_model
from lorasp_edge.train import checkpoint as ckpt
from lorasp_edge.train.adapter import (
    LoRASPConfig,
    apply_lorasp,
    lora_matrices,
    redraw_masks,
    save_adapter,
    trainable_masks,
)
from lorasp_edge.train.distributed import World
from lorasp_edge.train.guard import MemoryGuard
from lorasp_edge.train.loss import ChunkedCausalLMLoss, valid_targets
from lorasp_edge.train.optim import MaskedAdamW
from lorasp_edge.train.settings import DEFAULT_LR, TrainSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}




# ------------------------------------------------------------------------------ the parts


def build_model(plan, model_name: str, device: torch.device | str | None = None, seed: int = 0, redraw_every: int = 0):
    """The base model as the plan says (bits, compute dtype, checkpointing) with LoRA-SP applied."""
    compute_dtype = DTYPES[plan.compute_dtype]
    quant_bits = plan.quant_bits if plan.quant_bits in (4, 8) else None
    model = load_model(model_name, quant_bits=quant_bits, compute_dtype=compute_dtype, device=device)
    model.config.use_cache = False
    if plan.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs and with DDP, recomputes each decoder layer.
        # transformers 5 renamed the switch (the old name warns); 4.x has only the old one.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    layers = list(plan.layers) if plan.layers is not None and len(plan.layers) < n_layers else None
    config = LoRASPConfig(
        rank=plan.rank,
        alpha=plan.alpha,
        dropout=plan.dropout,
        ratio=plan.ratio,
        seed=seed,
        target_modules=list(plan.target_modules),
        layers=layers,
        redraw_every=redraw_every,
    )
    peft_model = apply_lorasp(model, config)
    # from_pretrained returns an eval-mode model, and transformers checkpoints layers only in
    # training mode: without this, a plan's gradient checkpointing would silently not happen.
    peft_model.train()
    return peft_model


def build_optimizer(model, lr: float = DEFAULT_LR, weight_decay: float = 0.0) -> MaskedAdamW:
    return MaskedAdamW(trainable_masks(model), lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device, compute_dtype: torch.dtype):
    enabled = compute_dtype != torch.float32
    return torch.autocast(device_type=device.type, dtype=compute_dtype, enabled=enabled)


def train_step(model, optimizer, batch, plan=None, max_grad_norm: float = 1.0, world: World | None = None,
               compute_dtype: torch.dtype | None = None) -> dict:
    """One optimizer step over `batch` (one micro-batch dict, or a list of them).

    `model` is a ChunkedCausalLMLoss (or DDP around one), or a PeftModel that is wrapped here.
    Gradients are clipped over the tensors `optimizer` steps. Autocast runs in `compute_dtype`,
    else the plan's, else fp32. Returns loss (mean CE over the step's valid targets, all ranks),
    grad_norm and tokens.
    """
    world = world or World.single()
    micro_batches = batch if isinstance(batch, list) else [batch]
    loss_module = model if isinstance(model, (ChunkedCausalLMLoss, torch.nn.parallel.DistributedDataParallel)) else ChunkedCausalLMLoss(
        model, chunk_tokens=getattr(plan, "loss_chunk_tokens", 256)
    )
    inner = loss_module.module if isinstance(loss_module, torch.nn.parallel.DistributedDataParallel) else loss_module
    device = next(inner.parameters()).device
    if compute_dtype is None:
        compute_dtype = DTYPES[plan.compute_dtype] if plan is not None else torch.float32
    # The normalizer spans micro-batches and ranks, so the gradient equals one big batch's.
    # DDP averages gradients over ranks; scaling by world size turns that average into the sum.
    counts = torch.tensor([sum(valid_targets(mb["labels"]) for mb in micro_batches)], dtype=torch.float64)
    normalizer = float(world.all_reduce_sum(counts)) / world.size
    total = torch.zeros((), dtype=torch.float64)
    for index, micro in enumerate(micro_batches):
        input_ids, labels = micro["input_ids"].to(device), micro["labels"].to(device)
        with world.no_sync_unless(loss_module, last=index == len(micro_batches) - 1), autocast(device, compute_dtype):
            loss, summed = loss_module(input_ids, labels, normalizer)
        loss.backward()
        total += summed.double().cpu()
    parameters = [param for group in optimizer.param_groups for param in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = float(world.all_reduce_sum(total.reshape(1))) / (normalizer * world.size)
    tokens = sum(mb["input_ids"].numel() for mb in micro_batches) * world.size
    return {"loss": mean_loss, "grad_norm": float(grad_norm), "tokens": tokens}


@torch.no_grad()
def evaluate(loss_module: ChunkedCausalLMLoss, batches: list[dict], compute_dtype: torch.dtype) -> float:
    """Mean CE over the valid targets of `batches` (eval mode, no dropout)."""
    device = next(loss_module.parameters()).device
    was_training = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast(device, compute_dtype):
            _, summed = loss_module(batch["input_ids"].to(device), batch["labels"].to(device), 1.0)
        total += float(summed)
        count += valid_targets(batch["labels"])
    loss_module.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------ the loop


class Trainer:
    """Runs the loop over given parts; `lorasp_edge.train.job.run_training` assembles them from files."""

    def __init__(
        self,
        model,
        optimizer: MaskedAdamW,
        scheduler,
        stream,
        plan,
        settings: TrainSettings,
        out_dir: str | Path,
        total_steps: int,
        world: World | None = None,
        eval_batches: list[dict] | None = None,
        guard: MemoryGuard | None = None,
        progress: bool = True,
    ):
        self.model = model  # PeftModel
        self.optimizer, self.scheduler, self.stream = optimizer, scheduler, stream
        self.plan, self.settings, self.total_steps = plan, settings, total_steps
        self.out_dir = Path(out_dir)
        self.world = world or World.single()
        self.eval_batches = eval_batches or []
        self.guard = guard
        self.progress = progress and self.world.is_main
        self.loss_module = self.world.wrap(ChunkedCausalLMLoss(model, chunk_tokens=plan.loss_chunk_tokens))
        self.compute_dtype = DTYPES[plan.compute_dtype]
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self._stop_signal: int | None = None

    # -- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / ckpt.CHECKPOINT_FILE

    def save_checkpoint(self) -> None:
        data_states = self.world.gather_objects(self.stream.state_dict())
        rng_states = self.world.gather_objects(ckpt.rng_state())
        if not self.world.is_main:
            return
        lora = {f"{name}.lora_{part}": linear.weight.detach().cpu().clone() for name, part, linear in lora_matrices(self.model)}
        ckpt.save_checkpoint(
            self.checkpoint_path,
            {
                "step": self.step,
                "tokens": self.tokens,
                "elapsed": self.elapsed,
                "world_size": self.world.size,
                "lora": lora,
                "draw": getattr(self.model, "lorasp_draw", 0),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "data": data_states,
                "rng": rng_states,
                "plan": self.plan.to_dict(),
                "settings": asdict(self.settings),
                "total_steps": self.total_steps,
            },
        )

    def load_checkpoint(self, record: dict) -> None:
        if record["world_size"] != self.world.size:
            raise UserError(
                f"{self.checkpoint_path}: written by {record['world_size']} rank(s), resumed with {self.world.size}: "
                "resume with the same world size (the data positions are per rank)"
            )
        draw = int(record["draw"])
        if draw:
            redraw_masks(self.model, draw)
        with torch.no_grad():
            for name, part, linear in lora_matrices(self.model):
                linear.weight.copy_(record["lora"][f"{name}.lora_{part}"])
        self.optimizer.load_state_dict(record["optimizer"])
        self.scheduler.load_state_dict(record["scheduler"])
        self.stream.load_state_dict(record["data"][self.world.rank])
        ckpt.set_rng_state(record["rng"][self.world.rank])
        self.step, self.tokens, self.elapsed = record["step"], record["tokens"], record["elapsed"]
        if self.world.is_main:
            _truncate_metrics(self.out_dir / "metrics.jsonl", self.step)

    # -- signals

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _install_signal_handlers(self):
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread
                pass
        return previous

    # -- the loop

    def run(self) -> dict:
        previous_handlers = self._install_signal_handlers()
        try:
            return self._run()
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)

    def _run(self) -> dict:
        from tqdm import tqdm

        settings, plan = self.settings, self.plan
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        metrics = open(self.out_dir / "metrics.jsonl", "a") if self.world.is_main else None
        stopped, last_eval = None, None
        try:
            while self.step < self.total_steps:
                # micro-steps: this rank's grad_accum micro-batches (the stream may end)
                micro_batches = [self.stream.next_batch(plan.micro_batch) for _ in range(plan.grad_accum)]
                if self.world.any_true(any(mb is None for mb in micro_batches)):
                    stopped = "data exhausted"
                    break
                started = time.perf_counter()
                result = train_step(self.loss_module, self.optimizer, micro_batches, plan, settings.max_grad_norm, self.world)
                # schedule: the lr of the next step
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                self.step += 1
                step_seconds = time.perf_counter() - started
                self.elapsed += step_seconds
                self.tokens += result["tokens"]
                if settings.redraw_every and self.step % settings.redraw_every == 0 and self.step < self.total_steps:
                    redraw_masks(self.model, self.step // settings.redraw_every)
                    self.optimizer.reset_state()
                # log
                record = {
                    "step": self.step,
                    "loss": result["loss"],
                    "lr": lr,
                    "grad_norm": result["grad_norm"],
                    "tokens": self.tokens,
                    "tokens_per_s": result["tokens"] / step_seconds,
                    "peak_rss_bytes": self.guard.peak_bytes() if self.guard else None,
                    "elapsed_s": round(self.elapsed, 3),
                }
                # eval
                if self.eval_batches and settings.eval_every and self.step % settings.eval_every == 0:
                    record["eval_loss"] = last_eval = evaluate(self.loss_module_inner, self.eval_batches, self.compute_dtype)
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.set_postfix(
                    loss=f"{result['loss']:.4f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    peak=_gigabytes(record["peak_rss_bytes"]),
                    refresh=False,
                )
                bar.update(1)
                # save
                over_budget = self.guard is not None and self.world.any_true(self.guard.over_budget())
                signalled = self.world.any_true(self._stop_signal is not None)
                periodic = settings.save_every and self.step % settings.save_every == 0
                if over_budget or signalled or periodic:
                    self.save_checkpoint()
                if over_budget:
                    raise OverBudgetError(self.guard.report(self.step))
                if signalled:
                    stopped = signal.Signals(self._stop_signal).name if self._stop_signal else "signal"
                    break
        finally:
            bar.close()
            if metrics:
                metrics.close()
        if stopped == "data exhausted" and self.step == 0:
            raise UserError("the data ended before the first optimizer step (fewer blocks than one step needs)")
        self.save_checkpoint()
        if self.eval_batches:
            last_eval = evaluate(self.loss_module_inner, self.eval_batches, self.compute_dtype)
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens,
            "train_seconds": round(self.elapsed, 2),
            "tokens_per_s": round(self.tokens / self.elapsed, 1) if self.elapsed else None,
            "peak_rss_bytes": self.guard.peak_bytes() if self.guard else None,
            "eval_loss": last_eval,
            "stopped": stopped,
        }

    @property
    def loss_module_inner(self) -> ChunkedCausalLMLoss:
        module = self.loss_module
        return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module

    def save_final_adapter(self, info: dict) -> Path:
        path = self.out_dir / "adapter"
        if self.world.is_main:
            save_adapter(self.model, path, info)
        self.world.barrier()
        return path


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (they will be recomputed)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _gigabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}GB"

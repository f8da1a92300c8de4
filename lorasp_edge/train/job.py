"""A training job: from files and flags to a finished adapter.

    plan      --plan file, or the checkpoint's plan on --resume, or planned here from --mem
    parts     tokenizer, base + LoRA-SP (build_model), MaskedAdamW, warmup+cosine, data stream
    resume    checkpoint -> weights, optimizer, scheduler, data position, RNG
    loop      Trainer.run under the memory guard
    outputs   adapter/, plan.json, metrics.jsonl, loss.png, summary.json

`run_training` is what `lorasp-edge train` calls; tests call it (or Trainer) directly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasp_edge.devices import default_device
from lorasp_edge.errors import UserError
from lorasp_edge.files import write_text_atomic
from lorasp_edge.models import load_tokenizer
from lorasp_edge.plan.planfile import Plan
from lorasp_edge.plan.search import plan_training
from lorasp_edge.train import checkpoint as ckpt
from lorasp_edge.train.data import PackedStream, estimate_blocks, eval_batches
from lorasp_edge.train.distributed import World
from lorasp_edge.train.guard import MemoryGuard
from lorasp_edge.train.loop import (
    Trainer,
    build_model,
    build_optimizer,
    build_scheduler,
)
from lorasp_edge.train.report import plot_losses
from lorasp_edge.train.settings import TrainSettings


@dataclass
class TrainRequest:
    data: Path
    out: Path
    model: str | None = None
    plan: Path | None = field(default=None, metadata={"help": "plan file; default: plan here from mem"})
    mem_bytes: int | None = field(default=None, metadata={"help": "budget when planning here; default: free memory"})
    seq_len: int | None = None
    batch: int | None = None
    eval_data: Path | None = None
    resume: bool = False
    device: str | None = None
    settings: TrainSettings = field(default_factory=TrainSettings)


def run_training(request: TrainRequest, progress: bool = True) -> dict:
    _check_request(request)
    device = torch.device(request.device) if request.device else default_device()
    world = World.from_env(device)
    try:
        return _run(request, world, progress)
    except torch.distributed.DistError as error:
        # A rank died or hung: every wait is bounded by the process group's timeout.
        raise UserError(f"rank {world.rank} of {world.size}: lost contact with another rank ({str(error).strip().splitlines()[0][:200]})") from None
    finally:
        world.close()


def _check_request(request: TrainRequest) -> None:
    problems = request.settings.problems()
    for name, path in (("--data", request.data), ("--eval-data", request.eval_data), ("--plan", request.plan)):
        if path is not None and not Path(path).is_file():
            problems.append(f"{name} {path}: no such file")
    checkpoint_path = Path(request.out) / ckpt.CHECKPOINT_FILE
    if request.resume and not checkpoint_path.is_file():
        problems.append(f"--resume: {checkpoint_path} does not exist (nothing to resume)")
    if not request.resume and checkpoint_path.is_file():
        problems.append(f"--out {request.out} already holds a run: pass --resume to continue it, or choose another --out")
    if problems:
        raise UserError("; ".join(problems))


def _resolve_plan(request: TrainRequest, world: World, record: dict | None) -> tuple[Plan, TrainSettings]:
    if record is not None:
        # A resumed run continues under exactly the plan and settings it started with.
        return Plan.from_dict(record["plan"]), TrainSettings(**record["settings"])
    if request.plan is not None:
        plan = Plan.from_json(request.plan)
    else:
        budget = request.mem_bytes or _free_memory_bytes(world)
        plan = plan_training(
            model=request.model or "smollm2-135m",
            budget_bytes=budget,
            seq_len=request.seq_len,
            batch=request.batch,
            world_size=world.size,
        )
    if plan.world_size != world.size:
        raise UserError(f"the plan is for {plan.world_size} rank(s) but {world.size} are running: plan with --world-size {world.size}")
    return plan, request.settings


def _free_memory_bytes(world: World) -> int:
    import psutil

    if world.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(world.device)
        return int(free)
    # Per rank: the ranks on this machine share its memory.
    return int(psutil.virtual_memory().available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _run(request: TrainRequest, world: World, progress: bool) -> dict:
    out = Path(request.out)
    checkpoint_path = out / ckpt.CHECKPOINT_FILE
    record = ckpt.load_checkpoint(checkpoint_path) if request.resume else None
    plan, settings = _resolve_plan(request, world, record)
    model_name = request.model or plan.model["name"]
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale_temps(out)
        _write_json(out / "plan.json", plan.to_dict())

    tokenizer = load_tokenizer(model_name)
    # Malformed or too-short data is reported before the (slow) model load, not after it.
    probe = PackedStream(request.data, tokenizer, plan.seq_len, skip_bad_lines=settings.skip_bad_lines, rank=world.rank, world_size=world.size)
    probe.next_batch(plan.micro_batch)
    probe.close()
    torch.manual_seed(settings.seed)
    model = build_model(plan, model_name, device=world.device, seed=settings.seed, redraw_every=settings.redraw_every)
    optimizer = build_optimizer(model, lr=settings.lr, weight_decay=settings.weight_decay)
    blocks_per_step = plan.micro_batch * plan.grad_accum * world.size
    if settings.steps is not None:
        total_steps, epochs = settings.steps, None
    else:
        epochs = settings.epochs or 1.0
        total_steps = max(1, math.ceil(estimate_blocks(request.data, tokenizer, plan.seq_len) * epochs / blocks_per_step))
        epochs = math.ceil(epochs)
    warmup = settings.warmup_steps if settings.warmup_steps is not None else min(100, max(1, total_steps // 20))
    scheduler = build_scheduler(optimizer, total_steps, warmup, settings.min_lr_ratio)
    stream = PackedStream(
        request.data, tokenizer, plan.seq_len, skip_bad_lines=settings.skip_bad_lines, rank=world.rank, world_size=world.size, epochs=epochs
    )
    held_out = None
    if request.eval_data is not None:
        held_out = eval_batches(request.eval_data, tokenizer, plan.seq_len, plan.micro_batch, max_blocks=settings.eval_blocks)
    guard = MemoryGuard(plan.budget_bytes, plan.memory.get("total_bytes"), device=world.device)
    trainer = Trainer(
        model, optimizer, scheduler, stream, plan, settings, out, total_steps, world=world, eval_batches=held_out, guard=guard, progress=progress
    )
    if record is not None:
        trainer.load_checkpoint(record)
        total_steps = record["total_steps"]
        trainer.total_steps = total_steps

    with guard:
        summary = trainer.run()
    summary["bad_lines"] = getattr(stream, "bad_lines", 0)
    if summary["stopped"] in ("SIGINT", "SIGTERM"):
        return {**summary, "out": str(out)}

    adapter_path = trainer.save_final_adapter(
        {
            "base_model": model_name,
            "base_quant_bits": plan.quant_bits if plan.quant_bits in (4, 8) else None,
            "compute_dtype": plan.compute_dtype,
            "plan": plan.to_dict(),
            "steps": trainer.step,
        }
    )
    summary.update(
        {
            "out": str(out),
            "adapter": str(adapter_path),
            "model": model_name,
            "final_loss": _last_loss(out / "metrics.jsonl"),
            "planned_total_bytes": plan.memory.get("total_bytes"),
            "budget_bytes": plan.budget_bytes,
            "compute_dtype": plan.compute_dtype,
            "quant_bits": plan.quant_bits,
        }
    )
    if world.is_main:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        _write_json(out / "summary.json", summary)
    return summary


def _last_loss(metrics_path: Path) -> float | None:
    last = None
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                last = json.loads(line)["loss"]
    return last


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")

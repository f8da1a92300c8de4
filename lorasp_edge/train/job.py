"""A training job: from files and flags to a finished adapter.

    plan      --plan file, or the checkpoint's plan on --resume, or planned here from --mem
    checks    data: malformed lines, too short, no target at this seq_len (before the model loads)
    parts     tokenizer, base + LoRA-SP (build_model), AdamW, warmup+cosine, shuffled data stream
    resume    checkpoint -> weights, optimizer, scheduler, data position, RNG; changed flags are
              applied with a note or refused (resume.py); another base model (fingerprint) refused
    loop      Trainer.run under the memory guard
    outputs   adapter/, plan.json, metrics.jsonl, loss.png, summary.json

`run_training` is what `lorasp-edge train` calls; tests call it (or Trainer) directly.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasp_edge import allocator
from lorasp_edge.devices import default_device
from lorasp_edge.errors import DataError, UserError
from lorasp_edge.files import os_error_message, output_folder_problem, write_marker, write_text_atomic
from lorasp_edge.models import check_tokenizer_fits, load_tokenizer
from lorasp_edge.plan.catalog import canonical_model_name
from lorasp_edge.plan.planfile import Plan
from lorasp_edge.plan.search import plan_training
from lorasp_edge.train import checkpoint as ckpt
from lorasp_edge.train import resume as contract
from lorasp_edge.train.adapter_files import base_fingerprint
from lorasp_edge.train.data import (
    PackedStream,
    check_targets,
    estimate_blocks,
    eval_batches,
)
from lorasp_edge.train.distributed import World
from lorasp_edge.train.guard import MemoryGuard
from lorasp_edge.train.preflight import plan_problems
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
    prefer: str = "speed"
    eval_data: Path | None = None
    resume: bool = False
    overwrite: bool = field(default=False, metadata={"help": "write into a non-empty folder lorasp-edge did not write, or start over a run in it"})
    device: str | None = None
    settings: TrainSettings = field(default_factory=TrainSettings)
    given: frozenset[str] | None = field(default=None, metadata={"help": "settings fields set by the user (None: all)"})


def run_training(request: TrainRequest, progress: bool = True, note=None) -> dict:
    """Train as `request` says; `note(line)` is told each change a --resume applies (also in the summary)."""
    _check_request(request)
    device = torch.device(request.device) if request.device else default_device()
    world = World.from_env(device)
    try:
        return _train(request, world, progress, note or (lambda line: None))
    except OSError as error:  # a full disk, a read-only or unwritable folder, a file in the way
        raise UserError(os_error_message(error, doing="")) from None
    except torch.distributed.DistError as error:
        # A rank died or hung: every wait is bounded by the process group's timeout.
        raise UserError(f"rank {world.rank} of {world.size}: lost contact with another rank ({str(error).strip().splitlines()[0][:200]})") from None
    finally:
        world.close()


def _check_request(request: TrainRequest) -> None:
    """Every problem with the flags and files, at once, before anything loads or is written."""
    problems = request.settings.problems()
    for name, path in (("--data", request.data), ("--eval-data", request.eval_data), ("--plan", request.plan)):
        if path is not None and Path(path).is_dir():
            problems.append(f"{name} {path}: is a folder, not a file")
        elif path is not None and not Path(path).is_file():
            problems.append(f"{name} {path}: no such file")
    out = Path(request.out)
    checkpoint_path = out / ckpt.CHECKPOINT_FILE
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out}: is a file, not a folder: choose a folder path")
    elif request.resume:
        if request.overwrite:
            problems.append("--overwrite starts over and --resume continues: pass one of them")
        if not checkpoint_path.is_file():
            problems.append(f"--resume: {checkpoint_path} does not exist (nothing to resume)")
    elif checkpoint_path.is_file() and not request.overwrite:
        problems.append(f"--out {out} already holds a run: pass --resume to continue it, --overwrite to start over, or choose another --out")
    elif problem := output_folder_problem(out, "train", overwrite=request.overwrite, legacy=_only_run_files):
        problems.append(problem)
    if request.plan is not None and Path(request.plan).is_file() and not request.resume:
        # The plan against the model it will train, with the flags' problems in the same line.
        try:
            plan = Plan.from_json(request.plan)
            model_name = canonical_model_name(request.model or plan.model["name"])
            problems += [f"{request.plan}: {problem}" for problem in plan_problems(plan, model_name, request.model is not None)]
        except UserError as error:
            problems.append(str(error))
    if problems:
        raise UserError("; ".join(problems))


# What a run writes into --out; a folder holding only these was written by a run (before folders were marked).
RUN_FILES = frozenset({"adapter", "plan.json", "metrics.jsonl", "summary.json", "loss.png", ckpt.CHECKPOINT_FILE})


def _only_run_files(out: Path) -> bool:
    names = {entry.name for entry in out.iterdir() if not entry.name.startswith(".")}
    return "plan.json" in names and names <= RUN_FILES  # a run writes plan.json first


def resume_command(request: TrainRequest, extra: tuple[str, ...] = ()) -> str:
    """The command that continues the run in request.out, from any working directory."""
    parts = ["lorasp-edge", "train", "--data", str(Path(request.data).resolve()), "--out", str(Path(request.out).resolve())]
    if request.model is not None:
        parts += ["--model", canonical_model_name(request.model)]
    return shlex.join([*parts, "--resume", *extra])


def _resolve_plan(request: TrainRequest, world: World, record: ckpt.Checkpoint | None) -> tuple[Plan, TrainSettings, list[str]]:
    if record is not None:
        saved = TrainSettings.from_record(record.settings)
        plan, plan_notes = contract.resume_plan(Plan.from_dict(record.plan), request)
        settings, notes = contract.resume_settings(saved, request.settings, request.given)
        return plan, settings, plan_notes + notes
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
            prefer=request.prefer,
        )
    if plan.world_size != world.size:
        raise UserError(f"the plan is for {plan.world_size} rank(s) but {world.size} are running: plan with --world-size {world.size}")
    return plan, request.settings, []


def _free_memory_bytes(world: World) -> int:
    import psutil

    if world.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(world.device)
        return int(free)
    # Per rank: the ranks on this machine share its memory.
    return int(psutil.virtual_memory().available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _train(request: TrainRequest, world: World, progress: bool, note) -> dict:
    out = Path(request.out)
    checkpoint_path = out / ckpt.CHECKPOINT_FILE
    record = ckpt.load_checkpoint(checkpoint_path) if request.resume else None
    if record is not None:
        contract.check_data(record, request.data, world.rank)
    plan, settings, notes = _resolve_plan(request, world, record)
    # A --plan was checked against the model in _check_request; one planned here is the model's, and
    # a resumed run's base is checked by fingerprint once it is loaded.
    model_name = canonical_model_name(request.model or plan.model["name"])
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "train")
        ckpt.clean_stale_temps(out)
        if record is None:  # a new run: nothing of an earlier one in this folder carries on
            for name in (ckpt.CHECKPOINT_FILE, "metrics.jsonl", "summary.json", "loss.png"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "adapter", ignore_errors=True)
        _write_json(out / "plan.json", plan.to_dict())

    tokenizer = load_tokenizer(model_name)
    check_tokenizer_fits(model_name, tokenizer)
    # Malformed, too-short or target-less data is reported before the (slow) model load, not after it.
    check_targets(request.data, tokenizer, plan.seq_len, skip_bad_lines=settings.skip_bad_lines)
    probe = PackedStream(request.data, tokenizer, plan.seq_len, skip_bad_lines=settings.skip_bad_lines, rank=world.rank, world_size=world.size)
    probe.next_batch(plan.micro_batch)
    probe.close()
    torch.manual_seed(settings.seed)
    model = build_model(plan, model_name, device=world.device, seed=settings.seed, redraw_every=settings.redraw_every, compile_layers=settings.compile)
    if plan.host_allocator == allocator.MMAP and not allocator.mapped():
        notes.append("this C library cannot map large allocations on their own (no mallopt): the plan counts no heap holes, "
                     "so its memory may be low here; the memory guard still stops the run at the budget")
    fingerprint = base_fingerprint(model.get_base_model())
    if record is not None and (base_note := contract.check_base(record, fingerprint, model_name)):
        notes.append(base_note)
    optimizer = build_optimizer(model, lr=settings.lr, weight_decay=settings.weight_decay)
    blocks_per_step = plan.micro_batch * plan.grad_accum * world.size
    if settings.steps is not None:
        total_steps, epochs = settings.steps, None
    else:
        epochs = settings.epochs or 1.0
        total_steps = max(1, math.ceil(estimate_blocks(request.data, tokenizer, plan.seq_len) * epochs / blocks_per_step))
        epochs = math.ceil(epochs)
    saved_settings = TrainSettings.from_record(record.settings) if record is not None else None
    if record is not None:
        if not contract.schedule_changed(saved_settings, settings, request.given):
            total_steps = record.total_steps
        elif total_steps < record.step:
            raise UserError(f"cannot resume with {total_steps} steps in all: the run is already at step {record.step}")
        elif total_steps != record.total_steps:
            notes.append(f"steps {record.total_steps} -> {total_steps}: warmup + cosine now end at step {total_steps}")
    warmup = settings.warmup_steps if settings.warmup_steps is not None else min(100, max(1, total_steps // 20))
    scheduler = build_scheduler(optimizer, total_steps, warmup, settings.min_lr_ratio)
    stream = PackedStream(
        request.data, tokenizer, plan.seq_len, skip_bad_lines=settings.skip_bad_lines, rank=world.rank, world_size=world.size,
        epochs=epochs, shuffle_buffer=settings.shuffle_buffer, seed=settings.seed,
    )
    held_out = None
    if request.eval_data is not None:
        held_out = eval_batches(request.eval_data, tokenizer, plan.seq_len, plan.micro_batch, max_blocks=settings.eval_blocks)
    guard = MemoryGuard(plan.budget_bytes, plan.memory.get("total_bytes"), device=world.device)
    trainer = Trainer(
        model, optimizer, scheduler, stream, plan, settings, out, total_steps, world=world, eval_batches=held_out, guard=guard,
        progress=progress, base_fingerprint=fingerprint,
    )
    if record is not None:
        trainer.load_checkpoint(record)
        if notes:
            _apply_changed_settings(optimizer, scheduler, settings, trainer.step)
            if world.is_main:
                for line in notes:
                    note(line)

    try:
        with guard:
            summary = trainer.run()
    except UserError as error:
        if not (world.is_main and checkpoint_path.is_file()):
            raise
        # Every stop with a checkpoint says how to go on from it.
        extra = ("--skip-bad-lines",) if isinstance(error, DataError) and not settings.skip_bad_lines else ()
        raise type(error)(f"{error}; continue with: {resume_command(request, extra)}") from None
    summary["bad_lines"] = getattr(stream, "bad_lines", 0)
    summary["resume_notes"] = notes
    summary.update({"planned_total_bytes": plan.memory.get("total_bytes"), "budget_bytes": plan.budget_bytes, "model": model_name})
    if summary["stopped"] in ("SIGINT", "SIGTERM"):
        return {**summary, "out": str(out), "resume_command": resume_command(request)}

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
            "final_loss": _last_loss(out / "metrics.jsonl"),
            "compute_dtype": plan.compute_dtype,
            "quant_bits": plan.quant_bits,
        }
    )
    if world.is_main:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        _write_json(out / "summary.json", summary)
    return summary


def _apply_changed_settings(optimizer, scheduler, settings: TrainSettings, step: int) -> None:
    """After a resume that changed settings: the optimizer's groups carry the saved lr and weight
    decay, so set them from the (possibly new) lr, schedule and decay, at the current step."""
    scheduler.base_lrs = [settings.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = settings.lr
        group["lr"] = settings.lr * factor(step)
        group["weight_decay"] = settings.weight_decay


def _last_loss(metrics_path: Path) -> float | None:
    """The last logged loss of a step that was not skipped."""
    from lorasp_edge.train.report import read_metrics

    losses = [record["loss"] for record in read_metrics(metrics_path) if record.get("loss") is not None and not record.get("skipped")]
    return losses[-1] if losses else None


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")

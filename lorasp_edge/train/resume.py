"""The resume contract: what `--resume` does with flags that differ from the run's checkpoint.

Every flag given on resume is compared with the value the run was started (or last resumed) with:

    applied with a note    --lr --weight-decay --warmup-steps --max-grad-norm --save-every --eval-every
                           --eval-blocks --skip-bad-lines --max-nonfinite-steps; a --plan that keeps
                           the adapter's shape and seq_len (micro-batch, accumulation, bits, dtype,
                           checkpointing may change: how an out-of-memory stop is resumed)
    --steps/--epochs       a larger total stretches warmup + cosine to end at the new last step,
                           from the current step on; a total below the current step is refused
    refused, one line      --seed --redraw-every --shuffle-buffer (they drew the masks and the data
                           order); --data another file; --mem/--seq-len/--batch that disagree with
                           the plan; a plan with another adapter shape; another base model by
                           fingerprint (checked in job.py once the model is loaded)

A flag not given keeps the run's value. Library callers that pass `given=None` give every field.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from lorasp_edge.errors import UserError
from lorasp_edge.plan.planfile import Plan
from lorasp_edge.train.settings import TrainSettings

FIXED = {
    "seed": "drew the masks and the data order",
    "redraw_every": "sets the mask schedule",
    "shuffle_buffer": "set the data order the position is in",
}
# Plan fields that shape the adapter or the data position; the rest may change on resume.
PLAN_FIXED = ("rank", "alpha", "ratio", "init", "dropout", "target_modules", "layers", "seq_len", "world_size")
SCHEDULE = ("steps", "epochs")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_settings(old: TrainSettings, new: TrainSettings, given: set[str] | None) -> tuple[TrainSettings, list[str]]:
    """The settings to continue with, and one note per applied change; UserError for a refused one."""
    given = {f.name for f in fields(TrainSettings)} if given is None else set(given)
    changes, notes, refused = {}, [], []
    for name in sorted(given - set(SCHEDULE)):
        value, was = getattr(new, name), getattr(old, name)
        if value == was:
            continue
        if name in FIXED:
            refused.append(f"{flag(name)} {value}: the run was started with {was}, which {FIXED[name]}")
        else:
            changes[name] = value
            notes.append(f"{flag(name)} {was} -> {value}")
    if refused:
        raise UserError("cannot resume with " + "; ".join(refused) + " (drop the flag, or start a new --out)")
    for name in SCHEDULE:
        if name in given:
            changes[name] = getattr(new, name)
    if "epochs" in given and "steps" not in given:
        changes["steps"] = None  # --steps outranks --epochs: the run's step count gives way to the epochs asked for
    return replace(old, **changes), notes


def schedule_changed(old: TrainSettings, settings: TrainSettings, given: set[str] | None) -> bool:
    given = {f.name for f in fields(TrainSettings)} if given is None else set(given)
    return any(name in given and getattr(old, name) != getattr(settings, name) for name in SCHEDULE)


def resume_plan(saved: Plan, request) -> tuple[Plan, list[str]]:
    """The checkpoint's plan, or the --plan given (when it keeps the adapter shape), with notes."""
    problems = []
    if request.mem_bytes is not None and request.mem_bytes != saved.budget_bytes:
        problems.append(f"--mem plans a new run (this one has a budget of {saved.budget_bytes / 1e9:.2f} GB): pass a --plan instead")
    if request.seq_len is not None and request.seq_len != saved.seq_len:
        problems.append(f"--seq-len {request.seq_len}: the run's blocks are {saved.seq_len} tokens (the data position is in them)")
    batch = saved.micro_batch * saved.grad_accum * saved.world_size
    if request.batch is not None and request.batch != batch:
        problems.append(f"--batch {request.batch}: the run's plan has {batch}; pass a --plan to change it")
    plan, notes = saved, []
    if request.plan is not None:
        plan = Plan.from_json(request.plan)
        old, new = saved.to_dict(), plan.to_dict()
        for name in PLAN_FIXED:
            if old.get(name) != new.get(name):
                problems.append(f"--plan {request.plan}: {name} is {new.get(name)}, the run's adapter and data were made with {old.get(name)}")
        if not problems:
            changed = [name for name in new if name not in ("memory", "quality") and old.get(name) != new.get(name)]
            notes += [f"plan {name} {old.get(name)} -> {new.get(name)}" for name in changed]
    if problems:
        raise UserError("cannot resume: " + "; ".join(problems))
    return plan, notes


def check_data(record, data: Path, rank: int) -> None:
    saved = Path(record.data[rank]["path"])
    if saved.resolve() != Path(data).resolve():
        raise UserError(f"cannot resume: --data {data} is not the run's data file {saved} (its position is in that file)")


def check_base(record, fingerprint: str, model_name: str) -> str | None:
    """Refuse another base model; a note when the same base comes by another name."""
    saved = record.base_fingerprint
    if saved is None:
        return "the checkpoint records no base-model fingerprint (written by an earlier version): not checked"
    if saved != fingerprint:
        name = record.plan["model"].get("name")
        raise UserError(f"cannot resume: --model {model_name} is not the base model the run was trained on ({name}; fingerprint {saved}, this one {fingerprint})")
    return None

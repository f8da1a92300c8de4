"""Training checkpoints: one explicit record (`Checkpoint`), taken from the trainer, written
atomically, read back and restored into the trainer, all in this module.

A checkpoint holds everything `--resume` needs to continue exactly as if the run had never
stopped: the LoRA tensors and mask draw, optimizer and scheduler state, the step and token counts,
every data-parallel rank's data position (file offset and packing buffer), RNG states, the plan
and the run settings.

Writes go to a temp file in the same folder, are fsync'ed, then renamed over the old checkpoint
(`os.replace` is atomic on POSIX and Windows), and the folder entry is fsync'ed. A kill at any
moment leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from lorasp_edge.errors import UserError
from lorasp_edge.files import apply_umask, fsync_dir, os_error_message

FORMAT = "lorasp-edge-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Checkpoint:
    step: int  # optimizer steps done
    tokens: int
    elapsed: float  # seconds of training so far
    world_size: int
    lora: dict  # "<module>.lora_A|B" -> every entry, frozen and trainable
    draw: int  # mask draws so far (--redraw-every)
    optimizer: dict
    scheduler: dict
    scaler: dict | None  # float16's GradScaler
    data: list  # each rank's data position (PackedStream.state_dict)
    rng: list  # each rank's RNG states
    plan: dict
    settings: dict  # TrainSettings as run
    total_steps: int
    skipped: dict = field(default_factory=dict)  # reason -> steps skipped
    nonfinite_run: int = 0  # non-finite steps in a row when it was written
    base_fingerprint: str | None = None  # None: written before the fingerprint was recorded


def capture(trainer, data_states: list, rng_states: list) -> Checkpoint:
    """The trainer's state after `trainer.step` as a record (every rank's data position and RNG given)."""
    from lorasp_edge.errors import NonFiniteError
    from lorasp_edge.train.adapter import held_matrices

    lora = {key: weight.cpu().clone() for key, weight in held_matrices(trainer.model).items()}  # the adapter file's form
    bad = [key for key, tensor in lora.items() if not torch.isfinite(tensor).all()]
    if bad:  # the step check keeps this from happening; a checkpoint must never carry it on
        raise NonFiniteError(f"{bad[0]} holds non-finite values at step {trainer.step}: not written over the last checkpoint ({trainer.checkpoint_path})")
    return Checkpoint(
        step=trainer.step, tokens=trainer.tokens, elapsed=trainer.elapsed, world_size=trainer.world.size, lora=lora,
        draw=getattr(trainer.model, "lorasp_draw", 0), optimizer=trainer.optimizer.state_dict(), scheduler=trainer.scheduler.state_dict(),
        scaler=trainer.scaler.state_dict() if trainer.scaler is not None else None, data=data_states, rng=rng_states,
        plan=trainer.plan.to_dict(), settings=_as_dict(trainer.settings), total_steps=trainer.total_steps, skipped=dict(trainer.skipped),
        nonfinite_run=trainer.nonfinite_run, base_fingerprint=trainer.base_fingerprint,
    )


def restore(trainer, checkpoint: Checkpoint) -> None:
    """Put the record's state back into a trainer built from the same plan (this rank's data and RNG)."""
    from lorasp_edge.train.adapter import redraw_masks, set_lora_matrices

    if checkpoint.world_size != trainer.world.size:
        raise UserError(
            f"{trainer.checkpoint_path}: written by {checkpoint.world_size} rank(s), resumed with {trainer.world.size}: "
            "resume with the same world size (the data positions are per rank)"
        )
    if int(checkpoint.draw):
        redraw_masks(trainer.model, int(checkpoint.draw))
    set_lora_matrices(trainer.model, checkpoint.lora)
    trainer.optimizer.load_state_dict(checkpoint.optimizer)
    trainer.scheduler.load_state_dict(checkpoint.scheduler)
    if trainer.scaler is not None and checkpoint.scaler:
        trainer.scaler.load_state_dict(checkpoint.scaler)
    trainer.stream.load_state_dict(checkpoint.data[trainer.world.rank])
    set_rng_state(checkpoint.rng[trainer.world.rank])
    trainer.step, trainer.tokens, trainer.elapsed = checkpoint.step, checkpoint.tokens, checkpoint.elapsed
    trainer.skipped.update(checkpoint.skipped)
    trainer.nonfinite_run = checkpoint.nonfinite_run


def _as_dict(settings) -> dict:
    from dataclasses import asdict

    return asdict(settings)


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` atomically; a full disk or a folder that cannot be written is one line
    (UserError) and the previous checkpoint, if any, stays as it was."""
    path = Path(path)
    record = {"format": FORMAT, **{item.name: getattr(checkpoint, item.name) for item in fields(Checkpoint)}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise UserError(os_error_message(error, path, "writing the checkpoint")) from None
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(record, file)
            file.flush()
            os.fsync(file.fileno())
        apply_umask(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            kept = "the previous checkpoint is kept as it was" if path.is_file() else "no checkpoint was written"
            raise UserError(f"{os_error_message(error, path, 'writing the checkpoint')} ({kept})") from None
        raise
    fsync_dir(path.parent)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for torn or foreign files
        raise UserError(f"{path}: unreadable checkpoint ({str(error).splitlines()[0][:200]})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{path}: not a lorasp-edge checkpoint")
    names = {item.name for item in fields(Checkpoint)}
    try:
        return Checkpoint(**{key: value for key, value in record.items() if key in names})
    except TypeError as error:  # a field missing: written by something else under our format tag
        raise UserError(f"{path}: incomplete checkpoint ({error})") from None


def rng_state() -> dict:
    import random

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def clean_stale_temps(folder: str | Path) -> None:
    """Remove temp files a killed write left behind (the checkpoint itself is intact)."""
    for stale in Path(folder).glob(f".{CHECKPOINT_FILE}.*.tmp"):
        stale.unlink(missing_ok=True)

"""Training checkpoints: one explicit record, written atomically.

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
from pathlib import Path

import torch

from lorasp_edge.errors import UserError
from lorasp_edge.files import apply_umask, fsync_dir, os_error_message

FORMAT = "lorasp-edge-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(path: str | Path, record: dict) -> None:
    """Write `record` atomically; a full disk or a folder that cannot be written is one line
    (UserError) and the previous checkpoint, if any, stays as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise UserError(os_error_message(error, path, "writing the checkpoint")) from None
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({"format": FORMAT, **record}, file)
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


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for torn or foreign files
        raise UserError(f"{path}: unreadable checkpoint ({str(error).splitlines()[0][:200]})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{path}: not a lorasp-edge checkpoint")
    return record


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

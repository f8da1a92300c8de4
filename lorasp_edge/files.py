"""Writing without half-written results: temp path, fsync, rename.

`os.replace` is atomic on POSIX and Windows: a reader (or a process killed mid-write) sees the old
file or the new one, never a mix. The folder entry is fsync'ed too, so the rename survives a
power cut on filesystems that need it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: str | Path) -> None:
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_dir(new: Path, target: Path) -> None:
    """Swap folder `new` into `target`; an old `target` is removed only after the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
    fsync_dir(target.parent)

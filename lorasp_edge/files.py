"""Writing without half-written results or touching what is not ours.

Atomic writes: temp path, fsync, rename. `os.replace` is atomic on POSIX and Windows: a reader (or
a process killed mid-write) sees the old file or the new one, never a mix. The folder entry is
fsync'ed too, so the rename survives a power cut on filesystems that need it.

Ownership: a folder lorasp-edge writes as a whole (a training run, an export) carries a marker file
naming what wrote it. `output_folder_problem` refuses a non-empty folder without that marker, so a
user's folder is never written over by mistake.

Modes: `tempfile` creates files 0600 and folders 0700 (private by design); results are made
readable as the user's umask says, as `open` and `mkdir` would have made them, so another user's
service (an Ollama daemon, say) can read an exported model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

OWNER_MARKER = ".lorasp-edge"


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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give `path` (and, for a folder, everything under it) the modes `open`/`mkdir` would have
    given under the current umask: files 0666 & ~umask, folders 0777 & ~umask."""
    path = Path(path)
    mask = _umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in files:
                os.chmod(os.path.join(root, name), file_mode)
            for name in dirs:
                os.chmod(os.path.join(root, name), dir_mode)
        os.chmod(path, dir_mode)
    elif path.exists():
        os.chmod(path, file_mode)


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new empty folder in `parent` (unique name starting with `prefix`), with umask modes."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    apply_umask(folder)
    return folder


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` into `path` through a temp file of its own beside it (two writers of one path never
    share a temp file), renamed over `path`, with the modes `open` would have given it."""
    path = Path(path)
    descriptor, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        apply_umask(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


def write_marker(folder: str | Path, kind: str) -> None:
    """Mark `folder` as written by lorasp-edge `kind` ("train", "export")."""
    write_text_atomic(Path(folder) / OWNER_MARKER, json.dumps({"written_by": f"lorasp-edge {kind}"}) + "\n")


def marker_kind(folder: str | Path) -> str | None:
    """The kind a folder's marker names, or None when it has none (or an unreadable one)."""
    try:
        written_by = json.loads((Path(folder) / OWNER_MARKER).read_text()).get("written_by", "")
    except (OSError, ValueError, AttributeError):
        return None
    return written_by.removeprefix("lorasp-edge ") or None


def output_folder_problem(out: str | Path, kind: str, flag: str = "--out", overwrite: bool = False, legacy=None) -> str | None:
    """Why `out` cannot be written as a lorasp-edge `kind` folder, or None when it can: it does not
    exist, is empty, or carries this kind's marker (or `legacy(out)` says an older lorasp-edge wrote
    it); `overwrite` accepts any folder. A path that is a file is never accepted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return f"{flag} {out}: is a file, not a folder: choose a folder path"
    if not out.is_dir() or overwrite or not any(out.iterdir()):
        return None
    if marker_kind(out) == kind or (legacy is not None and legacy(out)):
        return None
    other = marker_kind(out)
    what = f"a lorasp-edge {other} folder" if other else "not empty and was not written by lorasp-edge " + kind
    return f"{flag} {out}: {what}; choose another {flag} or pass --overwrite to replace its contents"


def os_error_message(error: OSError, path: str | Path | None = None, doing: str = "writing") -> str:
    """One sentence for an OS error: what happened, to which path, and what to do."""
    where = Path(path) if path is not None else (Path(error.filename) if error.filename else None)
    at = f" {where}" if where is not None else ""
    if not doing:  # the path leads the sentence
        doing, at = (str(where), "") if where is not None else ("", "")
    advice = {
        errno.ENOSPC: "no space left on the device: free some space, then run again",
        errno.EDQUOT: "disk quota exceeded: free some space, then run again",
        errno.EROFS: "the file system is read-only: choose a writable folder",
        errno.EACCES: "permission denied: choose a folder you can write, or change its permissions",
        errno.EPERM: "operation not permitted: choose a folder you can write",
        errno.EEXIST: "a file is in the way: choose another path",
        errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
        errno.EISDIR: "is a folder where a file was expected: choose another path",
        errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    }.get(error.errno, error.strerror or str(error))
    return f"{doing}{at}: {advice}" if doing else advice

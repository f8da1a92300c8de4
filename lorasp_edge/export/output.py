"""The export folder on disk: whose it is, what a killed export left, and the swap that keeps formats.

    OUT/.lorasp-edge         marker: written by lorasp-edge export (files.write_marker)
    OUT/manifest.json        the records of every format folder in OUT; `formats` says which export wrote each
    OUT/hf/, OUT/onnx/, ...  one entry per format written

An export writes its formats into .OUT-XXXXXXXX beside OUT (mkdtemp's name), which holds a pid file
while the export runs. When every check has passed, each entry of OUT that this export does not
write again is hard-linked into it (no second copy of the weights; a runtime reading a kept file is
not disturbed), the merged manifest is written, and the folder is swapped in whole by replace_dir:
a kill at any moment leaves the earlier export or the new one, complete, with a manifest that
describes the folders beside it.

A kill -9 leaves .OUT-XXXXXXXX (its pid no longer running) and, if it fell between replace_dir's two
renames, .OUT.old; the next export into OUT removes the first and restores or removes the second. A
lock on OUT's parent folder, held while a temporary folder is made and while one is swapped in,
keeps two exports into the same OUT from taking each other's folders for stale ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from lorasp_edge.export.formats import FORMATS
from lorasp_edge.files import (
    OWNER_MARKER,
    apply_umask,
    make_temp_dir,
    marker_kind,
    os_error_message,
    output_folder_problem,
    replace_dir,
    write_marker,
    write_text_atomic,
)

KIND = "export"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "lorasp-edge-export/1"  # every manifest's tag: how an export from before the marker is known
PID_FILE = ".lorasp-edge.pid"  # "pid host" of the export writing a temporary folder
# A temporary folder without a pid file was left by a lorasp-edge from before pid files; one of those
# may still be writing it, so it is taken for stale only once it is this old.
STALE_WITHOUT_PID_S = 3600
# What a temporary export folder of any version holds: format folders (each format names its own), the
# manifest, trace scratch.
_EXPORT_ENTRY = re.compile("(" + "|".join(item.entry_pattern for item in FORMATS.values()) + r"|manifest\.json|\.lorasp-edge.*|\..*\.tmp)")
# Manifest records not of one folder but of the whole export: the merge check, the reference perplexity.
_EXPORT_WIDE = {"verification": {"merge"}, "perplexity": {"tokens", "window", "source", "pytorch"}}
RECORD_SECTIONS = ("files", "verification", "perplexity")


# ------------------------------------------------------------------------------- ownership


def is_legacy_export(folder: Path) -> bool:
    """Whether `folder` is an export written before the marker existed (its manifest says so)."""
    return read_manifest(folder).get("format") == MANIFEST_FORMAT


def is_export(folder: Path) -> bool:
    return marker_kind(folder) == KIND or is_legacy_export(folder)


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def folder_problem(out: Path, overwrite: bool = False) -> str | None:
    """Why `--out` cannot take an export, or None: a path through a file, a file, or a non-empty
    folder no lorasp-edge export wrote (unless `overwrite`)."""
    out = Path(out)
    existing = next((parent for parent in out.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"--out {out}: {existing} is a file, not a folder: choose another --out"
    return output_folder_problem(out, KIND, overwrite=overwrite, legacy=is_legacy_export)


def entries(folder: Path) -> list[str]:
    """The entries of an export folder that are its content (not its manifest, marker or pid file)."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if entry.name not in (MANIFEST_FILE, OWNER_MARKER, PID_FILE))


def record_folder(section: str, key: str) -> str | None:
    """The OUT entry a manifest record describes, or None for a record of the whole export. Records
    are keyed by their folder's name, but for these: the fp32 parameter count (onnx), hf's reload
    check, the two GGUF files of an adapter-only export and the GGUF perplexities."""
    if key in _EXPORT_WIDE.get(section, ()):
        return None
    if section == "files":
        return {"fp32_parameters": "onnx", "gguf-base": "gguf", "gguf-adapter": "gguf"}.get(key, key)
    if section == "verification":
        return "hf" if key == "hf_reload" else key
    return "gguf" if key.startswith("gguf-") else key


# -------------------------------------------------------------------- temporary folders


def start(out: Path) -> Path:
    """A new temporary export folder beside `out`, with the marker and this process's pid file;
    folders earlier exports into `out` left behind are removed first. Call it inside
    `signals_held()`, assigning the result there: a Ctrl-C or SIGTERM between the folder's making
    and the assignment would leave a folder the caller cannot remove."""
    with _locked(out.parent):
        remove_stale(out)
        tmp = make_temp_dir(out.parent, f".{out.name}-")
        try:
            (tmp / PID_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
            write_marker(tmp, KIND)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return tmp


def remove_stale(out: Path) -> list[str]:
    """Remove the temporary folders of exports into `out` that are no longer running, and resolve a
    .OUT.old a kill left between replace_dir's renames (restored when OUT is missing, else removed).
    Returns the names removed or restored."""
    pattern = re.compile(re.escape(f".{out.name}-") + r"[a-z0-9_]{8}")  # tempfile.mkdtemp's names
    done, running = [], False
    for entry in sorted(out.parent.iterdir()):
        if not pattern.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        if _stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            done.append(entry.name)
        else:
            running = True
    old = out.parent / f".{out.name}.old"
    if not running and old.is_dir() and not old.is_symlink() and is_export(old):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, out)
        done.append(old.name)
    return done


def _stale(folder: Path) -> bool:
    """Whether a temporary export folder's export has ended (it cannot be in use)."""
    try:
        pid, host = (folder / PID_FILE).read_text().split()
    except FileNotFoundError:  # an older lorasp-edge's: only if it holds nothing but an export's entries
        ours = all(_EXPORT_ENTRY.fullmatch(entry.name) for entry in folder.iterdir())
        return ours and time.time() - folder.stat().st_mtime > STALE_WITHOUT_PID_S
    except (OSError, ValueError):
        return False
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's (a shared file system): its pid cannot be checked here
    import psutil

    return int(pid) != os.getpid() and not psutil.pid_exists(int(pid))


# ------------------------------------------------------------------------------- the swap


def finish(tmp: Path, out: Path, manifest: dict, overwrite: bool = False) -> dict:
    """Swap the checked export in `tmp` into `out`, keeping the entries of an earlier export (or any
    entry of ours) that it does not write again, unless `overwrite`. `manifest` is merged with the
    earlier one and written. Returns {"replaced", "kept", "removed"}: entry names."""
    written = entries(tmp)
    apply_umask(tmp)  # tempfile made it private (0700); kept entries keep their own modes
    stamp = {
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": manifest.get("base_model"),
        "adapter_sha256": (manifest.get("adapter") or {}).get("sha256"),
        "merge_base": manifest.get("merge_base"),
    }
    manifest["formats"] = {name: dict(stamp) for name in written}
    with _locked(out.parent), signals_held():
        before = entries(out)
        ours = out.is_dir() and is_export(out)
        kept = [name for name in before if name not in written] if ours and not overwrite else []
        if kept:
            _keep_records(manifest, read_manifest(out), kept)
            for name in kept:
                _link_entry(out / name, tmp / name)
        write_text_atomic(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out)
        (out / PID_FILE).unlink(missing_ok=True)
    return {
        "replaced": [name for name in written if name in before],
        "kept": kept,
        "removed": [name for name in before if name not in written and name not in kept],
    }


def _keep_records(manifest: dict, old: dict, kept: list[str]) -> None:
    """Add the earlier manifest's records of the `kept` entries to `manifest` (and its whole-export
    records where this export has none). An export without `formats` (before entries were kept) wrote
    every entry at once: its top-level source is each entry's."""
    legacy_stamp = {"exported_at": None, "base_model": old.get("base_model"),
                    "adapter_sha256": (old.get("adapter") or {}).get("sha256"), "merge_base": old.get("merge_base")}
    old_formats = old.get("formats") if isinstance(old.get("formats"), dict) else None
    for section in RECORD_SECTIONS:
        records = old.get(section) if isinstance(old.get(section), dict) else {}
        for key, value in records.items():
            folder = record_folder(section, key)
            if (folder in kept or folder is None) and key not in manifest[section]:
                manifest[section][key] = value
            if folder in kept and old_formats is None:
                manifest["formats"].setdefault(folder, dict(legacy_stamp))
    for name in kept:
        if old_formats is not None and name in old_formats:
            manifest["formats"][name] = old_formats[name]


def _link_entry(source: Path, target: Path) -> None:
    """`source` at `target` without a second copy: hard links (a copy where the file system has none)."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, target)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextmanager
def _locked(folder: Path):
    """An exclusive lock on `folder` (flock on POSIX; none elsewhere), for the short steps that
    create or swap an export's temporary folder."""
    if os.name != "posix":
        yield
        return
    import fcntl

    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


@contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block is done, then arrive: they cannot stop the swap between
    two renames, nor come between a temporary folder's making and its caller knowing it. (Python
    handlers, not a signal mask: a mask holds a signal for one thread only, and the kernel hands a
    process's signal to any thread that does not block it, such as a thread of torch's pools.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can be set in the main thread only; elsewhere the caller handles its signals
        return
    arrived: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda number, frame: arrived.append(number)) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)


def error_line(error: OSError, out: Path, tmp: Path | None) -> str:
    """An OS error while exporting as one sentence, naming `out` rather than the temporary folder."""
    where = Path(error.filename) if error.filename else out
    if tmp is not None and (where == tmp or tmp in where.parents):
        where = out
    return os_error_message(error, where, "writing the export to") + " (nothing was left half-written)"

"""What every export writes around its formats: the manifest, the disk check and the way out.

    new_manifest / manifest_source   the manifest's fixed part: format tag, versions, base, adapter
    write_export                     disk check, temporary folder, peak memory, the swap (output.py)
    disk_bytes                       the disk the requested formats take, each format's own estimate

Every export (from any source) ends here, so the manifest and the atomic write exist once.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasp_edge.errors import UserError
from lorasp_edge.export import output


def merge_base(base_bits: int | None, merged: bool = True) -> str:
    """The manifest's statement of which base weights the exported files hold."""
    base = f"the dequantized {base_bits}-bit base the adapter was trained against" if base_bits else "the base as trained (unquantized)"
    return f"{base} plus the adapter's delta (alpha/r) B A, merged in fp32" if merged else f"{base}, unmerged; the adapter is applied by the runtime"



def new_manifest(**fields) -> dict:
    """An export manifest before any format is written: format tag, library versions, empty records."""
    import onnxruntime
    import transformers

    return {
        "format": output.MANIFEST_FORMAT,
        **fields,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__},
        "files": {},
        "verification": {},
        "perplexity": {},
    }



def manifest_source(model_name: str, base_bits: int | None, adapter_dir: Path, info: dict, merged: bool = True) -> dict:
    """The manifest's record of what was exported: the base, the merge base and the adapter."""
    return {
        "base_model": model_name,
        "base_quant_bits": base_bits,
        "merge_base": merge_base(base_bits, merged),
        "adapter": {
            "path": str(adapter_dir.resolve()),
            "sha256": adapter_hash(adapter_dir),
            "trained_on": info.get("base_model"),
            **{key: info.get(key) for key in ("rank", "alpha", "ratio", "seed", "target_modules", "compute_dtype", "steps")},
        },
        "plan": info.get("plan"),
    }



def write_export(out: Path, needed_bytes: int, write: Callable[[Path], dict], started: float, overwrite: bool = False) -> "ExportReport":
    """Every export's way out: refuse when the disk lacks `needed_bytes`, let `write(tmp)` fill a
    temporary folder beside `out` and return the manifest, add the peak memory and the seconds, then
    swap the folder into place, keeping the formats of an earlier export there that it does not
    write again (all of them go with `overwrite`). On any error nothing is left behind, and an OS
    error is one line naming the path."""
    from lorasp_edge.export.memory import peak_rss_bytes

    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        problem = output.folder_problem(out, overwrite)  # again: --out may have changed while the model loaded
        if problem:
            raise UserError(problem)
        free = free_bytes(out.parent)
        if free < needed_bytes:
            raise UserError(f"no room on disk for the export in {out.parent}: needs about {needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free")
        with output.signals_held():
            tmp = output.start(out)
        manifest = write(tmp)
        manifest["peak_rss_bytes"] = peak_rss_bytes()
        manifest["seconds"] = round(time.perf_counter() - started, 1)
        changes = output.finish(tmp, out, manifest, overwrite)
    except OSError as error:
        raise UserError(output.error_line(error, out, tmp)) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(out=out, manifest=manifest, seconds=manifest["seconds"], **changes)



@dataclass
class ExportReport:
    out: Path
    manifest: dict
    seconds: float
    replaced: list[str] = field(default_factory=list)  # entries of an earlier export in OUT written again
    kept: list[str] = field(default_factory=list)  # entries of an earlier export not written again, kept
    removed: list[str] = field(default_factory=list)  # what --overwrite removed from OUT

    @property
    def verification(self) -> dict:
        return self.manifest["verification"]



def adapter_hash(adapter_dir: Path) -> str:
    """sha256 over the adapter's files (name and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(adapter_dir).iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()



def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free



def disk_bytes(formats, parameters: int, settings) -> int:
    """The disk the export's files take: each format's own estimate (formats/), plus slack for the
    tokenizer, the configs and a trace's scratch file."""
    return int(sum(item.disk_bytes(parameters, settings) for item in formats) * 1.05) + (64 << 20)

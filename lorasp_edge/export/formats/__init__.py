"""Export formats by name: the seam a new format joins with one module and one line here.

Each format is one module in this folder holding an `ExportFormat`, its facts:

    writer          "module:function": write(context) writes its folder under `context.folder`, verifies
                    it against the reference model, records what it checked in `context.manifest` and
                    raises VerificationError on a mismatch (the export then writes nothing)
    flags           the ExportSettings fields it owns; `flag_problems(settings)` checks their values
    disk_bytes      (parameters, settings) -> bytes its files take, for the disk check before any work
    memory_phases   (shapes, settings, budget) -> the resident sets of its phases over a streamed
                    source (lorasp_edge.export.memory), and the fp32 graph's layer slices when it has one
    in_memory_phases  (shapes, settings) -> its phases over the in-memory source that can exceed the
                    source's own fp32 copies (a graph written inline)
    streams         whether it writes from a streamed source (weights read by key, context.weights)
    requires        formats whose files it reads: written first, removed again when not asked for
    unsupported     "module:function" taking a transformers config: why a model cannot take it
    adapter_writer  "module:function" for `export --adapter-only` (the adapter unmerged, for a runtime
                    that applies it); a format without one says why in `adapter_refusal`
    entries         a regex of the names it writes in the export folder

Writers are named by import path and imported when used, so that `lorasp-edge --help` does not
import torch and onnxruntime to list the names.
"""

from __future__ import annotations

from lorasp_edge.export.formats.entry import ExportFormat


def _registry() -> dict[str, ExportFormat]:
    from lorasp_edge.export.formats import genai, gguf, hf, onnx

    return {item.FORMAT.name: item.FORMAT for item in (hf, onnx, genai, gguf)}


FORMATS: dict[str, ExportFormat] = _registry()
# Names that stand for several formats, written in this order.
GROUPS = {"both": ("hf", "onnx")}


def expand(names: str) -> list[str]:
    """'both' -> ['hf', 'onnx']; 'hf,onnx' -> the same. Unknown names are kept for the caller to report."""
    found: list[str] = []
    for name in str(names).split(","):
        for item in GROUPS.get(name.strip(), (name.strip(),)):
            if item and item not in found:
                found.append(item)
    return found


def in_order(names: list[str]) -> list[ExportFormat]:
    """The formats to write for `names`, each after the formats it requires (added when not asked for)."""
    ordered: list[ExportFormat] = []

    def add(name: str) -> None:
        if any(item.name == name for item in ordered):
            return
        for required in FORMATS[name].requires:
            add(required)
        ordered.append(FORMATS[name])

    for name in names:
        add(name)
    return ordered


def flag_problems(settings, names: list[str]) -> list[str]:
    """Every format's own checks of its flags' values, then each flag changed from its default with no
    requested format to take it (a format takes the flags of the formats it requires)."""
    from dataclasses import fields

    found = [problem for item in FORMATS.values() for problem in item.flag_problems(settings)]
    defaults = {field.name: field.default for field in fields(settings)}
    wanted = in_order([name for name in names if name in FORMATS])
    for flag in dict.fromkeys(flag for item in FORMATS.values() for flag in item.flags):
        option = "--" + flag.replace("_", "-")
        if any(problem.startswith(option + " ") for problem in found):
            continue  # its value is wrong already: one problem a flag
        owners = [item.name for item in FORMATS.values() if flag in item.flags or any(flag in FORMATS[r].flags for r in item.requires)]
        if getattr(settings, flag) != defaults.get(flag) and not any(item.name in owners for item in wanted):
            found.append(f"{option} is for --format {', '.join(owners)}: use it with one of them")
    return found


def adapter_problems(names: list[str]) -> list[str]:
    """Why `--adapter-only` cannot write each of `names` (unknown names are reported elsewhere)."""
    refused = [name for name in names if name in FORMATS and FORMATS[name].adapter_writer is None]
    usable = ", ".join(name for name, item in FORMATS.items() if item.adapter_writer)
    return [f"--adapter-only --format {name}: {FORMATS[name].adapter_refusal} (adapter-only formats: {usable})" for name in refused]

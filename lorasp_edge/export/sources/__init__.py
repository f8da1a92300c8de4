"""Where an export's weights come from: three interchangeable sources, chosen by the memory estimate.

    in-memory   the base loaded as trained (float, or bitsandbytes 4/8-bit), PEFT's adapter merged in
                fp32 into a plain model (merge.py): fast; about four fp32 copies of the model in RAM
    streamed    the base's safetensors shards merged tensor by tensor into fp32 shards (shards.py), the
                reference model reading them one layer at a time (layered.py): memory bounded by a
                layer, a session or a tensor; slower (every forward reads its weights from disk)
    adapter     the base as trained with the adapter unmerged (export --adapter-only): the reference
                for formats a runtime applies the adapter in

A source hands the formats a reference model (what every written file is checked against), a
key -> tensor view of the weights to write (weights.py), and the checks it made itself (the merge
check, `source.check_merge`, for both merged sources). `choose` picks in-memory when its estimate fits
the budget (--mem, or the memory available) and streamed when it does not and every format streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorasp_edge.errors import UserError
from lorasp_edge.export.sources.source import Source, SourceRequest


def open_source(kind: str, request: SourceRequest) -> Source:
    from lorasp_edge.export.sources import adapter, in_memory, streamed

    return {"in-memory": in_memory.open_source, "streamed": streamed.open_source, "adapter": adapter.open_source}[kind](request)


# ------------------------------------------------------------------------------ the choice


@dataclass
class Choice:
    kind: str
    estimate: object  # lorasp_edge.export.memory.ExportEstimate
    base_folder: Path | None  # the streamed source's base folder
    parameters: int  # the merged model's, for the disk check


def pick(forced: str, in_memory_bytes: int, streamed_bytes: int | None, budget_bytes: int) -> str:
    """'in-memory' or 'streamed': forced by --source, else in memory when its estimate fits the budget
    (fast), else streamed where the export can stream (None: it cannot), else in memory (the budget
    check then refuses it)."""
    if forced == "memory":
        return "in-memory"
    if forced == "streamed" or (streamed_bytes is not None and in_memory_bytes > budget_bytes):
        return "streamed"
    return "in-memory"


def choose(settings, formats, model_name: str, base_bits: int | None, config, say) -> Choice:
    """The source for this export and its memory estimate; with --mem, refuses (exit 2) before any
    work when the chosen source's estimate exceeds it."""
    import psutil

    from lorasp_edge.export import memory
    from lorasp_edge.export.sources.shards import base_float_shapes, meta_shapes
    from lorasp_edge.plan.units import parse_memory

    shapes = meta_shapes(config)
    parameters = sum(_count(shape) for shape in shapes.values())
    budget = parse_memory(settings.mem) if settings.mem is not None else psutil.virtual_memory().available
    if settings.adapter_only:
        return _checked(settings, Choice("adapter", memory.estimate_in_memory(shapes), None, parameters), say)
    folder, why_not = stream_folder(model_name, base_bits, formats)
    if settings.source == "streamed" and folder is None:
        raise UserError(f"--source streamed: {why_not}")
    in_memory = memory.estimate_in_memory(shapes, formats, settings)
    streamed = memory.estimate_streamed(base_float_shapes(folder, base_bits), formats, settings, budget) if folder is not None else None
    kind = pick(settings.source, in_memory.peak_bytes, streamed.peak_bytes if streamed else None, budget)
    estimate = streamed if kind == "streamed" else in_memory
    say(f"source: {kind} (estimated peak {estimate.peak_bytes / 1e9:.2f} GB against "
        f"{'--mem' if settings.mem is not None else 'the available memory'} {budget / 1e9:.2f} GB)")
    return _checked(settings, Choice(kind, estimate, folder if kind == "streamed" else None, parameters), say)


def _checked(settings, choice: Choice, say) -> Choice:
    from lorasp_edge.export.memory import check_budget
    from lorasp_edge.plan.units import parse_memory

    if settings.mem is not None:
        say(f"estimated peak memory: {choice.estimate.peak_bytes / 1e9:.2f} GB (largest phase: {choice.estimate.largest_phase})")
        check_budget(parse_memory(settings.mem), choice.estimate)
    return choice


def stream_folder(model_name: str, bits: int | None, formats) -> tuple[Path | None, str]:
    """The base as a local safetensors folder the streamed source reads, or None and why not."""
    import json

    from lorasp_edge.families import family_of
    from lorasp_edge.prequantize import prequantized_bits
    from lorasp_edge.sources import local_safetensors_folder, resolve_model

    cannot = [item.name for item in formats if not item.streams]
    if cannot:
        return None, f"--format {', '.join(cannot)} cannot be written from a streamed source"
    folder = local_safetensors_folder(resolve_model(model_name))
    if folder is None:
        return None, f"the base model '{model_name}' is not a local folder of safetensors shards"
    stored = prequantized_bits(folder)
    if stored is not None and stored != bits:
        return None, f"the base folder holds {stored}-bit weights, the adapter was trained on {bits or 16}-bit ones"  # load_model names it
    entry = family_of(json.loads((folder / "config.json").read_text()))
    if entry is None or entry.conv1d:
        return None, "this model family's linear weights are not streamed (transposed Conv1D layers, or a family not described)"
    return folder, ""


def _count(shape) -> int:
    import math

    return math.prod(shape)

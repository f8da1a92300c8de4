"""What the export knows of one format (see lorasp_edge.export.formats for each field)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


def no_problems(settings) -> list[str]:
    return []


def no_phases(shapes, settings, budget) -> tuple[dict[str, int], int | None]:
    return {}, None


def no_in_memory_phases(shapes, settings) -> dict[str, int]:
    return {}


@dataclass(frozen=True)
class ExportFormat:
    name: str
    description: str
    writer: str  # "module:function"
    disk_bytes: Callable[[int, object], int]
    streams: bool = False
    requires: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    flag_problems: Callable[[object], list[str]] = no_problems
    memory_phases: Callable = no_phases
    in_memory_phases: Callable = no_in_memory_phases
    unsupported: str | None = None  # "module:function" taking a transformers config
    adapter_writer: str | None = None  # "module:function" for --adapter-only
    adapter_refusal: str = "has no run-time adapter form"
    entries: str = ""  # regex of the export folder's names it writes (default: its name)

    def write(self, context) -> None:
        _resolve(self.writer)(context)

    def write_adapter(self, context) -> None:
        _resolve(self.adapter_writer)(context)

    def unsupported_reason(self, config) -> str | None:
        return _resolve(self.unsupported)(config) if self.unsupported else None

    @property
    def entry_pattern(self) -> str:
        return self.entries or self.name


def _resolve(path: str):
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)

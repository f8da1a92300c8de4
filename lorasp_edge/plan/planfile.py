"""The plan file: what the trainer runs, written by the planner, read by the trainer and exporter."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lorasp_edge.errors import UserError
from lorasp_edge.plan import memory

DEFAULT_HEADROOM = 0.10


@dataclass
class Plan:
    """What the trainer runs. Memory figures are per data-parallel rank."""

    model: dict = field(metadata={"help": "name (as given, or catalog id), params (total count), hf_id, model_type"})
    budget_bytes: int
    quant_bits: int = field(metadata={"help": "16: float base in compute_dtype; 8: LLM.int8; 4: NF4 + double quant"})
    compute_dtype: str
    rank: int
    target_modules: list[str]
    layers: list[int] = field(metadata={"help": "decoder layers with adapters (the last n)"})
    seq_len: int
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    memory: dict = field(metadata={"help": "peak bytes by component, with total_bytes"})
    alpha: float | None = None
    # The paper's share (arXiv 2403.08822). docs/results.md: at rank 16 it scored 0.9 points above LoRA
    # at rank 8 (the same trainable count) with the same optimizer state.
    ratio: float = 0.5
    dropout: float = 0.0
    headroom: float = DEFAULT_HEADROOM
    device_kind: str = "cpu"
    profile: str | None = None
    world_size: int = 1
    loss_chunk_tokens: int = 1024
    host_allocator: str = field(default="heap", metadata={"help": "heap: the C library's default; mmap: every allocation of 1 MiB or more mapped on its own (lorasp_edge.allocator)"})
    quality: dict = field(default_factory=dict, metadata={"help": "the proxy the search maximized"})
    # A plan file without the field was planned for LoRA's zero start (what its memory figures count).
    init: str = field(default="zeros", metadata={"help": "B's start: zeros (LoRA's) or offset (lorasp_edge.train.adapter.LoRASPConfig.init)"})

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = 2.0 * self.rank

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The plan as JSON text; written atomically to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as error:
            raise UserError(f"{path}: cannot read plan ({error.strerror or error})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: not a JSON plan file ({error})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data, source: str = "plan") -> "Plan":
        """Validate every field at once; the error names the source and each bad field."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object")
        problems = _plan_problems(data)
        if problems:
            raise UserError(f"{source}: " + "; ".join(problems))
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def _plan_problems(data: dict) -> list[str]:
    def is_int(value, low=1):
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    def is_number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    checks = {
        "model": (lambda v: isinstance(v, dict) and isinstance(v.get("name"), str) and is_int(v.get("params")), "an object with name (string) and params (positive integer)"),
        "budget_bytes": (is_int, "a positive integer"),
        "quant_bits": (lambda v: v in (4, 8, 16) and not isinstance(v, bool), "4, 8 or 16"),
        "compute_dtype": (lambda v: v in memory.DTYPE_BYTES, "bfloat16, float16 or float32"),
        "rank": (is_int, "a positive integer"),
        "target_modules": (lambda v: isinstance(v, list) and v and all(isinstance(x, str) and x for x in v), "a non-empty list of module names"),
        "layers": (lambda v: isinstance(v, list) and v and all(is_int(x, 0) for x in v), "a non-empty list of layer indices"),
        "seq_len": (lambda v: is_int(v, 2), "an integer >= 2"),
        "micro_batch": (is_int, "a positive integer"),
        "grad_accum": (is_int, "a positive integer"),
        "gradient_checkpointing": (lambda v: isinstance(v, bool), "true or false"),
        "memory": (lambda v: isinstance(v, dict) and is_int(v.get("total_bytes")) and all(is_int(x, 0) for x in v.values()), "an object of byte counts with total_bytes"),
    }
    optional = {
        "alpha": (lambda v: v is None or (is_number(v) and v > 0), "a positive number"),
        "ratio": (lambda v: is_number(v) and 0 <= v < 1, "a share in [0, 1)"),
        "dropout": (lambda v: is_number(v) and 0 <= v < 1, "a share in [0, 1)"),
        "headroom": (lambda v: is_number(v) and 0 <= v < 1, "a share in [0, 1)"),
        "device_kind": (lambda v: v in ("cpu", "cuda", "mps"), "cpu, cuda or mps"),
        "profile": (lambda v: v is None or isinstance(v, str), "a profile name or null"),
        "world_size": (is_int, "a positive integer"),
        "loss_chunk_tokens": (is_int, "a positive integer"),
        "quality": (lambda v: isinstance(v, dict), "an object"),
        "host_allocator": (lambda v: v in ("heap", "mmap"), "heap or mmap"),
        "init": (lambda v: v in memory.INITS, " or ".join(memory.INITS)),
    }
    problems = []
    for name, (check, expected) in checks.items():
        if name not in data:
            problems.append(f"field '{name}' is missing")
        elif not check(data[name]):
            problems.append(f"field '{name}' must be {expected}, not {json.dumps(data[name])[:60]}")
    for name, (check, expected) in optional.items():
        if name in data and not check(data[name]):
            problems.append(f"field '{name}' must be {expected}, not {json.dumps(data[name])[:60]}")
    return problems

"""The memory-budget planner: the best LoRA-SP setting that fits a device, and how close it runs.

    budget x (1 - headroom)  >=  lorasp_edge.memory.estimate(architecture, setting)

Search space: frozen-base bits (16, 8, 4, as the device allows), target modules (all linear,
attention, q and v), how many of the last decoder layers get adapters, rank (4..64); then
gradient checkpointing, micro-batch (with gradient accumulation keeping the requested effective
batch) and loss chunk size. Compute dtype: bf16 where the device computes it natively, else fp32.

Quality proxy, compared in this order (larger is better):
  1. coverage: the share of the decoder's linear weights that carry an adapter. QLoRA found
     adapting every linear layer is what matches full fine-tuning, more than rank or base
     precision (Dettmers et al. 2023, arXiv 2305.14314, Sec. 4 and Fig. 2).
  2. base precision: 16 > 8 > 4 bits (NF4 comes close to 16-bit but not above it; ibid., Table 3).
  3. rank (Hu et al. 2021, arXiv 2106.09685, Table 6: small ranks already do well; more never hurt).
Among settings of equal quality the fastest wins: no checkpointing (it recomputes the forward,
about +33% compute; Chen et al. 2016), then the largest micro-batch, then the largest loss chunk.
The feasible set only grows with the budget, so more memory never gives a lower-quality plan.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lorasp_edge import memory
from lorasp_edge.catalog import Architecture, ModelInfo, resolve
from lorasp_edge.errors import UserError
from lorasp_edge.profiles import Profile, load_profile

DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH = 8
DEFAULT_HEADROOM = 0.10
# LoRA-SP's peak learning rate: twice the common LoRA default of 2e-4. With half of each matrix
# frozen, a step moves half as many entries. docs/results.md (SmolLM2-135M, 50 steps, 3 seeds, rank 16):
# with LoRA at 2e-4, LoRA-SP at 2e-4 had held-out loss 0.595 against LoRA's 0.455 (exact match 12.9
# points lower), at 4e-4 0.463 (2.0 points lower); with LoRA at 1e-3, LoRA-SP at 1e-3 had 0.344
# against 0.301 (3.5 points lower), at 2e-3 0.299 (2.0 points lower).
DEFAULT_LR = 4e-4
RANKS = (64, 32, 16, 8, 4)
LAYER_SHARES = (1.0, 0.75, 0.5, 0.25, 0.125)
LOSS_CHUNKS = (1024, 512, 256, 128)
BITS_ORDER = (16, 8, 4)

_UNITS = {"": None, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'8GB', '8G', '7.5 GB', '8192MB' (decimal: GB = 10^9) or '8GiB', '512MiB' (binary: GiB = 2^30) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match:
        raise UserError(f"memory '{text}' is not a size like 8GB, 7.5 GB, 8GiB or 512MiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise UserError(f"memory '{text}': unknown unit '{match.group(2)}' (use B, KB, MB, GB, TB = powers of 1000, or KiB, MiB, GiB, TiB = powers of 1024)")
    if _UNITS[unit] is None:
        raise UserError(f"memory '{text}' needs a unit, e.g. {text}GB or {text}GiB")
    value = int(number * _UNITS[unit])
    if value <= 0:
        raise UserError(f"memory '{text}' must be positive")
    return value


# ------------------------------------------------------------------------------------ the plan


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
    quality: dict = field(default_factory=dict, metadata={"help": "the proxy the search maximized"})

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


class NoFitError(UserError):
    """Nothing in the search space fits; carries the smallest budget that would and its setting."""

    def __init__(self, message: str, needed_bytes: int, setting: memory.Setting):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.setting = setting


# ----------------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class Device:
    kind: str
    bf16: bool
    quant_bits: tuple[int, ...]
    unified_memory: bool = False


def local_device() -> Device:
    """This machine's best device, as the trainer would pick it (lorasp_edge.models)."""
    from lorasp_edge.models import bf16_supported, default_device

    device = default_device()
    bits = (16, 8, 4) if device.type in ("cpu", "cuda") else (16, 4)
    return Device(device.type, bf16_supported(device), bits)


def target_choices(arch: Architecture) -> list[tuple[str, ...]]:
    """All linear layers; attention only; q and v (the original LoRA setting, Hu et al. 2021 Sec. 7.1)."""
    names = arch.module_names()
    if arch.model_type == "gpt2":
        return [tuple(names), ("c_attn", "c_proj"), ("c_attn",)]
    if arch.model_type == "phi3":
        return [tuple(names), ("qkv_proj", "o_proj"), ("qkv_proj",)]
    return [tuple(names), ("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj")]


def layer_choices(num_layers: int) -> list[int]:
    return sorted({max(1, round(share * num_layers)) for share in LAYER_SHARES} | {1}, reverse=True)


def coverage(arch: Architecture, targets: tuple[str, ...], adapted_layers: int) -> float:
    """Share of the decoder's linear weights that carry an adapter."""
    linears = arch.linears()
    adapted = sum(linear.weight_params for linear in linears if linear.name in targets)
    return adapted / sum(linear.weight_params for linear in linears) * adapted_layers / arch.num_layers


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan_training(
    model: str | None = None,
    budget_bytes: int | None = None,
    profile: str | Profile | None = None,
    seq_len: int | None = None,
    batch: int | None = None,
    world_size: int = 1,
    headroom: float = DEFAULT_HEADROOM,
    device: Device | None = None,
) -> Plan:
    """The highest-quality setting that fits `budget_bytes` (or the profile's budget) with headroom.

    Raises UserError for bad input and NoFitError (exit code 2) when nothing fits.
    """
    info = resolve(model)
    arch = info.architecture
    if isinstance(profile, str):
        profile = load_profile(profile)
    if profile is not None:
        device = Device(profile.device_kind, profile.bf16, profile.quant_bits, profile.unified_memory)
        budget_bytes = budget_bytes if budget_bytes is not None else profile.budget_bytes
    device = device or local_device()
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    batch = DEFAULT_BATCH if batch is None else batch
    _check_request(arch, budget_bytes, seq_len, batch, world_size, headroom)
    if batch % world_size:
        raise UserError(f"--batch {batch} must be a multiple of the world size {world_size}")

    usable = int(budget_bytes * (1 - headroom))
    compute_dtype = "bfloat16" if device.bf16 else "float32"
    per_rank_batch = batch // world_size

    def setting(bits, targets, layers, rank, checkpointing, micro_batch, chunk):
        return memory.Setting(bits, compute_dtype, rank, targets, layers, checkpointing, micro_batch, seq_len, chunk, world_size=world_size)

    def total(s: memory.Setting) -> int:
        return memory.estimate(arch, s, device.kind, device.unified_memory)["total_bytes"]

    bits_allowed = [b for b in BITS_ORDER if b in device.quant_bits]
    candidates = []
    for targets in target_choices(arch):
        for layers in layer_choices(arch.num_layers):
            for bits in bits_allowed:
                for rank in RANKS:
                    key = (round(coverage(arch, targets, layers), 6), -BITS_ORDER.index(bits), rank)
                    candidates.append((key, bits, targets, layers, rank))
    candidates.sort(key=lambda c: c[0], reverse=True)

    speed_options = [(ckpt, mb, chunk) for ckpt in (False, True) for mb in _divisors_descending(per_rank_batch) for chunk in LOSS_CHUNKS]
    smallest = min(speed_options, key=lambda o: (not o[0], o[1], o[2]))  # checkpointing, micro-batch 1, smallest chunk
    for key, bits, targets, layers, rank in candidates:
        if total(setting(bits, targets, layers, rank, *smallest)) > usable:
            continue
        for option in speed_options:
            chosen = setting(bits, targets, layers, rank, *option)
            if total(chosen) <= usable:
                return _make_plan(info, arch, chosen, budget_bytes, headroom, device, profile, per_rank_batch, key)

    cheapest = min((setting(bits, targets, layers, rank, *smallest) for _, bits, targets, layers, rank in candidates), key=total)
    needed = math.ceil(total(cheapest) / (1 - headroom))
    while int(needed * (1 - headroom)) < total(cheapest):  # float rounding
        needed += 1
    where = f" (a {profile.name} gives {budget_bytes / 1e9:.2f} GB)" if profile is not None else ""
    device_note = f"; a device with {needed / (1 - profile.reserved) / 2**30:.1f} GiB would do" if profile is not None else ""
    raise NoFitError(
        f"nothing fits in {budget_bytes / 1e9:.2f} GB{where} with {headroom:.0%} headroom: the smallest setting "
        f"({describe_setting(cheapest, arch)}) needs {math.ceil(needed / 1e7) / 100:.2f} GB: use --mem {math.ceil(needed / 1e7) / 100:.2f}GB or more, "
        f"or a shorter --seq-len{device_note}",
        needed,
        cheapest,
    )


def _check_request(arch: Architecture, budget_bytes, seq_len, batch, world_size, headroom) -> None:
    problems = []
    if budget_bytes is None:
        problems.append("give a memory budget with --mem (e.g. 8GB) or a device with --profile")
    elif not isinstance(budget_bytes, int) or budget_bytes <= 0:
        problems.append(f"the memory budget must be positive, not {budget_bytes}")
    if not isinstance(seq_len, int) or seq_len < 2:
        problems.append(f"--seq-len must be an integer >= 2, not {seq_len}")
    elif arch.max_positions and seq_len > arch.max_positions:
        problems.append(f"--seq-len {seq_len} is longer than the model's context of {arch.max_positions} tokens")
    if not isinstance(batch, int) or batch < 1:
        problems.append(f"--batch must be a positive integer, not {batch}")
    if not isinstance(world_size, int) or world_size < 1:
        problems.append(f"--world-size must be a positive integer, not {world_size}")
    if not 0 <= headroom < 1:
        problems.append(f"--headroom must be in [0, 1), not {headroom}")
    if problems:
        raise UserError("; ".join(problems))


def plan_for_setting(model: str | None, setting: memory.Setting, device: Device, budget_bytes: int | None = None, grad_accum: int = 1) -> Plan:
    """The plan file for one given setting, without searching (validation and tests use it)."""
    info = resolve(model)
    arch = info.architecture
    key = (round(coverage(arch, setting.target_modules, setting.adapted_layers), 6), -BITS_ORDER.index(setting.quant_bits), setting.rank)
    budget = budget_bytes if budget_bytes is not None else memory.estimate(arch, setting, device.kind, device.unified_memory)["total_bytes"]
    return _make_plan(info, arch, setting, budget, DEFAULT_HEADROOM, device, None, setting.micro_batch * grad_accum, key)


def _make_plan(info: ModelInfo, arch, s: memory.Setting, budget_bytes, headroom, device, profile, per_rank_batch, key) -> Plan:
    parts = memory.estimate(arch, s, device.kind, device.unified_memory)
    return Plan(
        model={
            "name": info.name,
            "params": arch.parameters()["total"],
            "hf_id": info.hf_id,
            "model_type": arch.model_type,
            "num_layers": arch.num_layers,
        },
        budget_bytes=int(budget_bytes),
        headroom=headroom,
        device_kind=device.kind,
        profile=profile.name if profile is not None else None,
        quant_bits=s.quant_bits,
        compute_dtype=s.compute_dtype,
        rank=s.rank,
        alpha=2.0 * s.rank,
        ratio=s.ratio,
        dropout=0.0,
        target_modules=list(s.target_modules),
        layers=list(range(arch.num_layers - s.adapted_layers, arch.num_layers)),
        seq_len=s.seq_len,
        micro_batch=s.micro_batch,
        grad_accum=per_rank_batch // s.micro_batch,
        world_size=s.world_size,
        gradient_checkpointing=s.gradient_checkpointing,
        loss_chunk_tokens=s.loss_chunk_tokens,
        memory=parts,
        quality={"coverage": key[0], "quant_bits": s.quant_bits, "rank": s.rank},
    )


# ---------------------------------------------------------------------------------- reporting


def describe_setting(s: memory.Setting, arch: Architecture) -> str:
    layers = "all layers" if s.adapted_layers == arch.num_layers else f"the last {s.adapted_layers} of {arch.num_layers} layers"
    return (
        f"{s.quant_bits}-bit base, rank {s.rank}, {','.join(s.target_modules)} on {layers}, "
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, micro-batch {s.micro_batch}, seq {s.seq_len}"
    )


COMPONENT_LABELS = {
    "runtime": "runtime (process, CUDA context)",
    "weights_linear": "frozen linear weights",
    "weights_float": "embeddings, lm_head, norms",
    "checkpoint_pages": "mapped checkpoint pages",
    "lora_weights": "LoRA weights (fp32)",
    "lora_grads": "LoRA gradients (fp32)",
    "lora_masks": "LoRA-SP masks",
    "optimizer_state": "AdamW m, v (trainable half)",
    "ddp_buckets": "DDP gradient buckets",
    "activations": "activations",
    "transient": "loss chunk or layer backward",
    "allocator_slack": "allocator slack",
}


def format_plan(plan: Plan) -> str:
    """The plan as a readable table (setting, memory by component, headroom)."""
    model = plan.model
    n_layers = model.get("num_layers") or len(plan.layers)
    layers = f"all {n_layers}" if len(plan.layers) == n_layers else f"{plan.layers[0]}-{plan.layers[-1]} (last {len(plan.layers)} of {n_layers})"
    base = {16: f"{plan.compute_dtype} (not quantized)", 8: "8-bit LLM.int8", 4: "4-bit NF4, double quant"}[plan.quant_bits]
    lines = [
        f"model        {model['name']} ({model['params'] / 1e6:,.1f}M parameters)",
        f"device       {plan.device_kind}" + (f", profile {plan.profile}" if plan.profile else ""),
        f"budget       {plan.budget_bytes / 1e9:.2f} GB, headroom {plan.headroom:.0%}",
        "",
        "setting",
        f"  base         {base}, compute {plan.compute_dtype}",
        f"  LoRA-SP      rank {plan.rank}, alpha {plan.alpha:g}, ratio {plan.ratio:g} frozen, dropout {plan.dropout:g}",
        f"  targets      {', '.join(plan.target_modules)}",
        f"  layers       {layers}",
        f"  batch        {plan.micro_batch} micro x {plan.grad_accum} accum x {plan.world_size} rank(s) = {plan.effective_batch} x {plan.seq_len} tokens",
        f"  checkpoint   {'on' if plan.gradient_checkpointing else 'off'}",
        f"  loss chunk   {plan.loss_chunk_tokens} tokens",
        f"  quality      coverage {plan.quality.get('coverage', 0):.0%} of linear weights, {plan.quant_bits}-bit base, rank {plan.rank}",
        "",
        f"{'memory (per rank)':34s}{'bytes':>16s}{'% budget':>10s}",
    ]
    for key, value in plan.memory.items():
        if key == "total_bytes":
            continue
        lines.append(f"  {COMPONENT_LABELS.get(key, key):32s}{value:>16,d}{value / plan.budget_bytes:>10.1%}")
    total = plan.memory["total_bytes"]
    lines.append(f"  {'total (predicted peak)':32s}{total:>16,d}{total / plan.budget_bytes:>10.1%}")
    spare = plan.budget_bytes - total
    lines.append(f"  {'headroom left':32s}{spare:>16,d}{spare / plan.budget_bytes:>10.1%}")
    return "\n".join(lines)

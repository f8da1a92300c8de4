"""The memory-budget planner: the best LoRA-SP setting that fits a device, and how close it runs.

    budget x (1 - headroom)  >=  lorasp_edge.plan.memory.estimate(architecture, setting)

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

import math
from dataclasses import dataclass

from lorasp_edge.errors import UserError
from lorasp_edge.plan import memory
from lorasp_edge.plan.catalog import Architecture, ModelInfo, model_info
from lorasp_edge.plan.planfile import DEFAULT_HEADROOM, Plan
from lorasp_edge.plan.profiles import Profile, load_profile

DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH = 8
RANKS = (64, 32, 16, 8, 4)
LAYER_SHARES = (1.0, 0.75, 0.5, 0.25, 0.125)
LOSS_CHUNKS = (1024, 512, 256, 128)
BITS_ORDER = (16, 8, 4)





# ------------------------------------------------------------------------------------ the plan






class NoFitError(UserError):
    """Nothing in the search space fits; carries the smallest budget that would and its setting."""

    def __init__(self, message: str, needed_bytes: int, setting: memory.Candidate):
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
    from lorasp_edge.devices import bf16_supported, default_device

    device = default_device()
    bits = (16, 8, 4) if device.type in ("cpu", "cuda") else (16, 4)
    return Device(device.type, bf16_supported(device), bits)


def target_choices(arch: Architecture) -> list[tuple[str, ...]]:
    """The family's choices: all linear layers; attention only; its original LoRA targets (q and v,
    Hu et al. 2021 Sec. 7.1)."""
    return [tuple(arch.module_names()) if targets is None else targets for targets in arch.family.targets]


def layer_choices(num_layers: int) -> list[int]:
    return sorted({max(1, round(share * num_layers)) for share in LAYER_SHARES} | {1}, reverse=True)


def coverage(arch: Architecture, targets: tuple[str, ...], adapted_layers: int) -> float:
    """Share of the decoder's linear weights that carry an adapter."""
    linears = arch.linears()
    adapted = sum(linear.weight_params for linear in linears if linear.name in targets)
    return adapted / sum(linear.weight_params for linear in linears) * adapted_layers / arch.num_layers


def loss_chunks(micro_batch: int, seq_len: int) -> list[int]:
    """Loss chunk sizes to try, largest first. The first is the whole micro-batch's targets: the
    trainer then takes the plain full-logits path (no chunking, no lm_head recompute)."""
    whole = micro_batch * (seq_len - 1)
    return [whole] + [chunk for chunk in LOSS_CHUNKS if chunk < whole]


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
    info = model_info(model)
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
        return memory.Candidate(bits, compute_dtype, rank, targets, layers, checkpointing, micro_batch, seq_len, chunk, world_size=world_size,
                              grad_accum=per_rank_batch // micro_batch)

    def total(s: memory.Candidate) -> int:
        return memory.estimate(arch, s, device.kind, device.unified_memory)["total_bytes"]

    bits_allowed = [b for b in BITS_ORDER if b in device.quant_bits]
    from lorasp_edge.prequantize import prequantized_bits

    stored_bits = prequantized_bits(info.path) if info.path else None
    if stored_bits is not None:  # a pre-quantized folder (lorasp-edge quantize) trains at its own bits
        if stored_bits not in bits_allowed:
            raise UserError(f"model '{model}' is pre-quantized to {stored_bits}-bit, which this device does not run")
        bits_allowed = [stored_bits]
    candidates = []
    for targets in target_choices(arch):
        for layers in layer_choices(arch.num_layers):
            for bits in bits_allowed:
                for rank in RANKS:
                    key = (round(coverage(arch, targets, layers), 6), -BITS_ORDER.index(bits), rank)
                    candidates.append((key, bits, targets, layers, rank))
    candidates.sort(key=lambda c: c[0], reverse=True)

    speed_options = [(ckpt, mb, chunk) for ckpt in (False, True) for mb in _divisors_descending(per_rank_batch) for chunk in loss_chunks(mb, seq_len)]
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


def plan_for_setting(model: str | None, setting: memory.Candidate, device: Device, budget_bytes: int | None = None, grad_accum: int = 1) -> Plan:
    """The plan file for one given setting, without searching (validation and tests use it)."""
    info = model_info(model)
    arch = info.architecture
    key = (round(coverage(arch, setting.target_modules, setting.adapted_layers), 6), -BITS_ORDER.index(setting.quant_bits), setting.rank)
    budget = budget_bytes if budget_bytes is not None else memory.estimate(arch, setting, device.kind, device.unified_memory)["total_bytes"]
    return _make_plan(info, arch, setting, budget, DEFAULT_HEADROOM, device, None, setting.micro_batch * grad_accum, key)


def _make_plan(info: ModelInfo, arch, s: memory.Candidate, budget_bytes, headroom, device, profile, per_rank_batch, key) -> Plan:
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


def describe_setting(s: memory.Candidate, arch: Architecture) -> str:
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

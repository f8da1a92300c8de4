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
  2. base precision: a 16-bit base above a quantized one; 8- and 4-bit are one tier. LoRA over an
     Int8, FP4 or NF4 + double-quantized base matches 16-bit LoRA on GLUE and
     Super-NaturalInstructions (ibid., Table 3), so at equal coverage 8 bits buy no measured
     quality, while NF4's smaller base leaves room for a higher rank or more headroom.
  3. rank (Hu et al. 2021, arXiv 2106.09685, Table 6: small ranks already do well; more never hurt),
     at most 16 unless `prefer="quality"` (SPEED_MAX_RANK: where the measured quality stops rising).
Among settings of equal quality (an 8- and a 4-bit base tie) the fastest wins: no checkpointing (it
recomputes the forward, about +33% compute; Chen et al. 2016), then the largest micro-batch, then
the largest loss chunk; then an 8-bit base before a 4-bit one (QUANTIZED_ORDER).
`prefer="memory"` takes the best coverage and rank that fit, at the smallest peak instead.
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
# At equal quality (8- and 4-bit at one coverage and rank) and equal speed option, 8-bit comes
# first: bitsandbytes' CPU path runs it at least as fast. tools/bench_base_bits.py, fp32, on a shared 2-core machine with
# other jobs running: one decoder layer's frozen linears at Llama-3.1-8B's shapes, forward + input
# gradient on 512 tokens, 90.7 s at 8 bits against 126.2 s at 4 (x1.39, median of 2); a whole
# SmolLM2-135M training step, 1 x 128 tokens, rank 16 on every linear, 2.93 s against 3.01 s.
QUANTIZED_ORDER = (8, 4)


# What the plan spends spare memory on (`plan --prefer`):
#   speed    (default) rank at most SPEED_MAX_RANK; the rest goes to throughput (no checkpointing,
#            larger micro-batches, one lm_head pass).
#   quality  rank up to 64 before throughput.
#   memory   the smallest peak among the best-coverage settings at rank <= SPEED_MAX_RANK (lowest
#            bits, checkpointing, micro-batch 1): the most room left for the rest of the device.
PREFERENCES = ("speed", "quality", "memory")
# Rank 16 is where the quality evidence stops: on SmolLM2-135M (tools/bench_quality.py,
# docs/results.md, 50 steps, 3 seeds) LoRA-SP at rank 32 reached 62.1 +- 4.4% exact match and held-out
# loss 0.315, rank 16 at twice the lr (the trainer's default lr) 62.0 +- 3.0% and 0.299: rank 32
# bought nothing at twice the optimizer state. Rank 64 was not measured better anywhere. From the
# offset start (fp32 grid, docs/results.md): chat, rank 32 69.3 +- 3.6% / loss 0.113 against rank 16's
# 68.9 +- 5.4% / 0.096 (3 seeds); plain text, rank 32 5.1% lower perplexity (one seed), rank 16 within
# 0.7% of PEFT LoRA r16. Rank 16 meets the targets on both; quality takes the higher ranks.
SPEED_MAX_RANK = 16


# LoRA-SP's start (lorasp_edge.train.adapter.LoRASPConfig.init) for new plans: the offset start,
# on the evidence of tools/bench_quality.py on both the chat task and plain text (docs/results.md,
# "The offset start against the zero start"). `plan --lora-init zeros` gives LoRA's B = 0.
DEFAULT_INIT = "offset"


def quality_key(coverage_share: float, bits: int, rank: int) -> tuple:
    """What the search maximizes (module docstring): coverage, a 16-bit base over a quantized one, rank."""
    return (round(coverage_share, 6), bits == 16, rank)





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
    prefer: str = "speed",
    init: str | None = None,
) -> Plan:
    """The highest-quality setting that fits `budget_bytes` (or the profile's budget) with headroom,
    spending spare memory as `prefer` says (PREFERENCES); `init` is LoRA-SP's start (default DEFAULT_INIT).

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
    if prefer not in PREFERENCES:
        raise UserError(f"--prefer must be one of {', '.join(PREFERENCES)}, not {prefer!r}")
    init = DEFAULT_INIT if init is None else init
    if init not in memory.INITS:
        raise UserError(f"--lora-init must be one of {', '.join(memory.INITS)}, not {init!r}")
    if batch % world_size:
        raise UserError(f"--batch {batch} must be a multiple of the world size {world_size}")

    usable = int(budget_bytes * (1 - headroom))
    compute_dtype = "bfloat16" if device.bf16 else "float32"
    per_rank_batch = batch // world_size

    host_allocator = memory.host_allocator_for(arch, device.kind)

    def setting(bits, targets, layers, rank, checkpointing, micro_batch, chunk):
        return memory.Candidate(bits, compute_dtype, rank, targets, layers, checkpointing, micro_batch, seq_len, chunk, world_size=world_size,
                              grad_accum=per_rank_batch // micro_batch, host_allocator=host_allocator, init=init)

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
                for rank in RANKS if prefer == "quality" else [r for r in RANKS if r <= SPEED_MAX_RANK]:
                    key = quality_key(coverage(arch, targets, layers), bits, rank)
                    candidates.append((key, bits, targets, layers, rank))
    # Best quality first; within one quality, 8-bit before 4-bit.
    candidates.sort(key=lambda c: (c[0], -QUANTIZED_ORDER.index(c[1]) if c[1] in QUANTIZED_ORDER else 0), reverse=True)

    speed_options = [(ckpt, mb, chunk) for ckpt in (False, True) for mb in _divisors_descending(per_rank_batch) for chunk in loss_chunks(mb, seq_len)]
    smallest = min(speed_options, key=lambda o: (not o[0], o[1], o[2]))  # checkpointing, micro-batch 1, smallest chunk
    if prefer == "memory":
        # The best coverage and rank that fit at all, then whichever bits and option need least.
        for key, bits, targets, layers, rank in candidates:
            if total(setting(bits, targets, layers, rank, *smallest)) <= usable:
                chosen = min((setting(b, targets, layers, rank, *option) for b in bits_allowed for option in speed_options), key=total)
                key = quality_key(coverage(arch, targets, layers), chosen.quant_bits, rank)
                return _make_plan(info, arch, chosen, budget_bytes, headroom, device, profile, per_rank_batch, key, prefer)
    # The best quality that fits; among the settings of that quality (8- and 4-bit bases tie), the one
    # whose fastest fitting option comes first in speed_options; on a tie, candidates' order.
    best = None
    for key, bits, targets, layers, rank in candidates:
        if best is not None and key != best[0]:
            break
        if total(setting(bits, targets, layers, rank, *smallest)) > usable:
            continue
        speed = next(i for i, option in enumerate(speed_options) if total(setting(bits, targets, layers, rank, *option)) <= usable)
        if best is None or speed < best[1]:
            best = (key, speed, setting(bits, targets, layers, rank, *speed_options[speed]))
    if best is not None:
        return _make_plan(info, arch, best[2], budget_bytes, headroom, device, profile, per_rank_batch, best[0], prefer)

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
    key = quality_key(coverage(arch, setting.target_modules, setting.adapted_layers), setting.quant_bits, setting.rank)
    budget = budget_bytes if budget_bytes is not None else memory.estimate(arch, setting, device.kind, device.unified_memory)["total_bytes"]
    return _make_plan(info, arch, setting, budget, DEFAULT_HEADROOM, device, None, setting.micro_batch * grad_accum, key)


def _make_plan(info: ModelInfo, arch, s: memory.Candidate, budget_bytes, headroom, device, profile, per_rank_batch, key, prefer="speed") -> Plan:
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
        host_allocator=s.host_allocator,
        init=s.init,
        memory=parts,
        quality={"coverage": key[0], "quant_bits": s.quant_bits, "rank": s.rank, "prefer": prefer},
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
    "lora_index": "LoRA-SP trainable index",
    "optimizer_state": "AdamW m, v (trainable half)",
    "ddp_buckets": "DDP gradient buckets",
    "activations": "activations",
    "transient": "loss chunk or layer backward",
    "allocator_slack": "allocator slack",
    "loading": "loading, above the step",
}


def throughput_class(plan: Plan) -> str:
    """What the plan's step spends beyond one forward and one backward, as a class."""
    costs = []
    if plan.gradient_checkpointing:
        costs.append("checkpointing recomputes the forward (about +33% compute; Chen et al. 2016)")
    if plan.loss_chunk_tokens < plan.micro_batch * (plan.seq_len - 1):
        costs.append("the loss recomputes lm_head in chunks")
    if plan.quant_bits in (4, 8):
        costs.append(f"every matmul dequantizes the {plan.quant_bits}-bit base")
    if plan.micro_batch == 1 and plan.grad_accum > 1:
        costs.append("micro-batch 1 (small matmuls)")
    if plan.host_allocator == "mmap":
        costs.append("large allocations are mapped anew each time")
    if not costs:
        return "full: one forward and one backward per micro-batch, nothing recomputed"
    return ("reduced: " if len(costs) == 1 else "low: ") + "; ".join(costs)


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
        "  start        " + _start_line(plan),
        f"  targets      {', '.join(plan.target_modules)}",
        f"  layers       {layers}",
        f"  batch        {plan.micro_batch} micro x {plan.grad_accum} accum x {plan.world_size} rank(s) = {plan.effective_batch} x {plan.seq_len} tokens",
        f"  checkpoint   {'on' if plan.gradient_checkpointing else 'off'}",
        f"  loss chunk   {plan.loss_chunk_tokens} tokens",
        "  allocator    " + ("mmap: every allocation of 1 MiB or more mapped on its own (no heap holes)" if plan.host_allocator == "mmap" else "heap (the C library's default)"),
        f"  quality      coverage {plan.quality.get('coverage', 0):.0%} of linear weights, {plan.quant_bits}-bit base, rank {plan.rank}"
        + (f" (--prefer {plan.quality['prefer']})" if plan.quality.get("prefer") else ""),
        f"  throughput   {throughput_class(plan)}",
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


def _start_line(plan) -> str:
    if plan.init != "offset":
        return "zeros: B = 0 (LoRA's)"
    held = memory.held_rank(plan.rank, plan.init)
    if memory.folds_offset(plan.init, plan.quant_bits, plan.compute_dtype):
        return f"offset: B random (its frozen half too), B0 A0 folded into the float32 base; trains at rank {plan.rank}, saved as a rank-{held} LoRA"
    return f"offset: B random (its frozen half too), B0 A0 subtracted; held as a rank-{held} LoRA"

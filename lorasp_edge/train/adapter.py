"""The LoRA-SP adapter: PEFT's LoRA with a fixed share of each LoRA matrix frozen.

For every adapted linear layer with frozen base weight W0 (d_out x d_in):

    y = W0 x + (alpha / r) * B (A x)          A: r x d_in (Kaiming-uniform), B: d_out x r (zeros)
    trainable(A) = ~M_A,  trainable(B) = ~M_B  (masks: lorasp_edge.train.masks)

With the offset start (`LoRASPConfig.init = "offset"`) B starts random too and the layer computes
W0 x + (alpha / r) (B A - B0 A0). The adapter file holds it as PEFT's rank-2r [B, -B0] [A; A0]. In
memory that form runs every LoRA matmul at rank 2r; on a float32 base the constant -B0 A0 is folded
into the frozen weight instead (W0 - s B0 A0, exact to float32 rounding) and the model trains a
rank-r LoRA, converted to the rank-2r form whenever it is written (`held_matrices`). A 16-bit or
4/8-bit base keeps the rank-2r form: folding would round the base weights.

PEFT does the injection (float, bitsandbytes 8-bit and 4-bit bases, GPT-2's Conv1D), the forward
and the on-disk format. LoRA-SP then moves every LoRA matrix into one `LoRASPStore`
(lorasp_edge.train.flat): the frozen entries in a buffer, the trainable entries in ONE flat
nn.Parameter, rebuilt into the matrices once per forward. The optimizer is a stock torch AdamW over
that parameter (lorasp_edge.train.optim), so state, gradients and the all-reduce cover the trainable
half only, and a frozen entry, having no gradient, keeps its value bit for bit.

The adapter folder (save, read, load): lorasp_edge.train.adapter_files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorasp_edge.errors import AdapterError
from lorasp_edge.plan.memory import INITS, held_rank
from lorasp_edge.train import masks as masklib
from lorasp_edge.train.flat import LoRASPLinear, LoRASPStore
from lorasp_edge.train.lora_linear import custom_modules, quantized_layers

ADAPTER_NAME = "default"
STORE_NAME = "lorasp_store"  # on the PeftModel; has no "lora_" in it, so PEFT never saves it


@dataclass
class LoRASPConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    ratio: float = field(default=0.5, metadata={"help": "share of each LoRA matrix frozen (paper: 0.5)"})
    seed: int = 0
    target_modules: list[str] | str = "all-linear"
    layers: list[int] | None = field(default=None, metadata={"help": "decoder layers adapted; None = all"})
    redraw_every: int = field(default=0, metadata={"help": "redraw masks every K optimizer steps; 0 = fixed"})
    init: str = field(default="zeros", metadata={"help": "B's start: zeros (LoRA's), or offset (random, B0 A0 subtracted)"})

    @property
    def peft_rank(self) -> int:
        """The rank PEFT holds: an offset adapter carries [B, -B0] [A; A0], twice the trained rank."""
        return held_rank(self.rank, self.init)

    @property
    def peft_alpha(self) -> float:
        """PEFT scales by lora_alpha / r: alpha scaled with the held rank keeps alpha / rank."""
        return self.alpha * self.peft_rank / self.rank

    def problems(self) -> list[str]:
        found = []
        if self.rank < 1:
            found.append(f"rank must be >= 1, not {self.rank}")
        if not 0.0 <= self.ratio < 1.0:
            found.append(f"ratio must be in [0, 1), not {self.ratio}")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"dropout must be in [0, 1), not {self.dropout}")
        if self.redraw_every < 0:
            found.append(f"redraw_every must be >= 0, not {self.redraw_every}")
        if self.init not in INITS:
            found.append(f"init must be one of {', '.join(INITS)}, not {self.init!r}")
        return found


# ------------------------------------------------------------------------------- injection


def apply_lorasp(model: nn.Module, config: LoRASPConfig, fold: bool | None = None):
    """Wrap `model` (a transformers causal LM, float or bitsandbytes 4/8-bit) in a LoRA-SP PeftModel.

    Every base parameter is frozen; LoRA A/B are trainable tensors whose frozen entries the masks
    name. LoRA init draws from a generator seeded by `config.seed`, so the caller's RNG is untouched.
    `fold` (offset start only): fold B0 A0 into the base weights (`_fold_offset`); None = wherever
    the base is float32, False = the rank-2r form on any base.
    """
    from peft import LoraConfig, get_peft_model

    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    foldable = config.init == "offset" and float32_base(model)
    if fold and not foldable:
        raise ValueError("fold=True needs the offset start on a float32 base")
    fold = foldable if fold is None else fold
    lora_config = LoraConfig(
        r=config.rank if fold else config.peft_rank,
        lora_alpha=config.alpha if fold else config.peft_alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        layers_to_transform=list(config.layers) if config.layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=_uses_conv1d(model),
    )
    fused = custom_modules(model)
    if fused:  # PEFT's documented custom-module seam: its own layer class, with one forward changed
        lora_config._register_custom_module(fused)
    disable_bnb_cpu_repack(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora_config)
    peft_model.lorasp_config = config
    if fold:
        _fold_offset(peft_model, config)
    elif config.init == "offset":
        _offset_init(peft_model, config)
    masks = {(name, part): ~_model_draw(peft_model, name, part, linear.weight.shape, 0) for name, part, linear in lora_matrices(peft_model)}
    build_store(peft_model, masks, requires_grad=True)
    return peft_model


def float32_base(model: nn.Module) -> bool:
    """Every weight matrix a plain float32 tensor (no bitsandbytes base, no 16-bit weights): the
    offset start's B0 A0 can then be folded into the base weights without rounding them."""
    if quantized_layers(model):
        return False
    return all(p.dtype == torch.float32 for p in model.parameters() if p.dim() == 2 and p.is_floating_point())


def folded(peft_model) -> bool:
    """Whether this model holds the offset folded into its base weights (rank-r LoRA in memory)."""
    return bool(_offsets(peft_model))


def _offsets(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A folded model's (A0, B0) by layer (`_fold_offset`); empty otherwise."""
    return getattr(peft_model, "lorasp_offset", None) or {}


def _uses_conv1d(model: nn.Module) -> bool:
    """Whether the family stores linear weights transposed (PEFT's fan_in_fan_out)."""
    from lorasp_edge.families import family_of

    entry = family_of(model.config)
    return entry is not None and entry.conv1d


def disable_bnb_cpu_repack(model: nn.Module) -> None:
    """bitsandbytes 0.50 on AVX512-BF16 CPUs repacks a Linear4bit weight on any eval-mode no-grad
    forward, after which backward silently returns no input gradient (LoRA grads of earlier layers
    become None while the loss still falls). Turning the fast path off keeps gradients flowing."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_layers(peft_model) -> dict[str, nn.Module]:
    """Adapted layers by their qualified name in the base model (e.g. 'model.layers.0.self_attn.q_proj')."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def lora_matrices(peft_model) -> list[tuple[str, str, nn.Linear]]:
    """(qualified layer name, "A"|"B", the Linear holding that matrix) for every adapted layer."""
    found = []
    for name, layer in lora_layers(peft_model).items():
        found.append((name, "A", layer.lora_A[ADAPTER_NAME]))
        found.append((name, "B", layer.lora_B[ADAPTER_NAME]))
    return found


def held_mask(config: LoRASPConfig, name: str, part: str, shape, draw: int) -> torch.Tensor:
    """The frozen mask of one held matrix. With the offset init the held A is [A; A0] and the held B
    [B, -B0]: the random mask covers A and B, the offset rows of A and columns of B are all frozen."""
    if config.init != "offset":
        return masklib.draw_frozen_mask(shape, config.ratio, config.seed, name, part, draw)
    rows, cols = shape
    if part == "A":
        live = masklib.draw_frozen_mask((rows // 2, cols), config.ratio, config.seed, name, part, draw)
        return torch.cat([live, torch.ones_like(live)], dim=0)
    live = masklib.draw_frozen_mask((rows, cols // 2), config.ratio, config.seed, name, part, draw)
    return torch.cat([live, torch.ones_like(live)], dim=1)


def _model_draw(peft_model, name: str, part: str, shape, draw: int) -> torch.Tensor:
    """The frozen mask of one matrix as `peft_model` holds it: a folded model holds only the live
    part, whose mask is the live part of the held form's (`held_mask`'s rows / columns 0..r)."""
    if folded(peft_model):
        config = peft_model.lorasp_config
        return masklib.draw_frozen_mask(shape, config.ratio, config.seed, name, part, draw)
    return held_mask(peft_model.lorasp_config, name, part, shape, draw)


def _offset_start(config: LoRASPConfig, name: str, d_out: int, d_in: int) -> torch.Tensor:
    """B0 of one layer: uniform with A0's bound 1 / sqrt(d_in), from its own generator (the mask
    seeds' scheme, part "B0"), so it depends on the run seed and the layer name only."""
    bound = 1.0 / d_in**0.5
    generator = torch.Generator(device="cpu").manual_seed(masklib.mask_seed(config.seed, name, "B0"))
    return (torch.rand((d_out, config.rank), generator=generator, dtype=torch.float32) * 2 - 1) * bound


@torch.no_grad()
def _offset_init(peft_model, config: LoRASPConfig) -> None:
    """B starts random, so the frozen half of B carries information too; the product B0 A0 of the
    starting values is subtracted, so the model starts exactly as the base.

    PEFT's held A (2r x d_in) and B (d_out x 2r) become [A0; A0] and [B0, -B0]: y = W0 x + s (B A - B0 A0),
    and B A - B0 A0 is zero at the start. A0 is PEFT's Kaiming-uniform draw; B0 is drawn from the
    same distribution as A0's entries (`_offset_start`), so an A step and a B step move the product
    by comparable amounts under Adam.
    """
    for name, layer in lora_layers(peft_model).items():
        lora_a, lora_b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        rank = config.rank
        lora_a[rank:].copy_(lora_a[:rank])
        start = _offset_start(config, name, lora_b.shape[0], lora_a.shape[1]).to(lora_b)
        lora_b[:, :rank].copy_(start)
        lora_b[:, rank:].copy_(-start)


@torch.no_grad()
def _fold_offset(peft_model, config: LoRASPConfig) -> None:
    """The offset start on a float32 base, with -s B0 A0 folded into the frozen weight: PEFT holds a
    rank-r LoRA (A = A0, B = B0 at the start) and W0 becomes W0 - s B0 A0, so the layer computes
    W0 x + s (B A - B0 A0) as `_offset_init`'s rank-2r form does, at rank r. A0 and B0 are kept
    (`lorasp_offset`) for the rank-2r form the adapter file and checkpoints hold."""
    offsets = {}
    for name, layer in lora_layers(peft_model).items():
        lora_a, lora_b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        start = _offset_start(config, name, lora_b.shape[0], lora_a.shape[1]).to(lora_b)
        lora_b.copy_(start)
        offsets[name] = (lora_a.detach().clone(), start)
        _shift_base(layer, lora_a, start, -1.0)
    peft_model.lorasp_offset = offsets


def _shift_base(layer, a0: torch.Tensor, b0: torch.Tensor, sign: float) -> None:
    """W0 += sign * s * B0 A0 on the layer's base weight (transposed for GPT-2's Conv1D)."""
    delta = (b0 @ a0) * (sign * layer.scaling[ADAPTER_NAME])
    weight = layer.get_base_layer().weight
    weight.add_(delta.T if getattr(layer, "fan_in_fan_out", False) else delta)


def build_store(peft_model, trainable: dict[tuple[str, str], torch.Tensor], requires_grad: bool) -> None:
    """Move every LoRA matrix into one LoRASPStore (trainable: bool mask per (layer, part))."""
    matrices = lora_matrices(peft_model)
    weights = [linear.weight.detach() for _, _, linear in matrices]
    store = LoRASPStore(weights, [trainable[(name, part)] for name, part, _ in matrices], requires_grad=requires_grad)
    for slot, (_, _, linear) in enumerate(matrices):
        LoRASPLinear.adopt(linear, store, slot)
    setattr(peft_model, STORE_NAME, store)
    # Rebuild before the decoder layers run, outside any checkpointed layer.
    peft_model.get_base_model().base_model.register_forward_pre_hook(store.pre_forward)


def lorasp_store(peft_model) -> LoRASPStore:
    return getattr(peft_model, STORE_NAME)


def trainable_parameters(peft_model) -> list[nn.Parameter]:
    """What the optimizer steps: the one flat parameter holding every trainable LoRA-SP entry."""
    return [lorasp_store(peft_model).values]


def redraw_masks(peft_model, draw: int) -> None:
    """Redraw every mask (the every-K-steps schedule). Every entry keeps its current value; the
    optimizer must drop its state (`LoRASPAdamW.reset_state`): its entries now mean other positions."""
    masks = [~_model_draw(peft_model, name, part, linear.weight.shape, draw) for name, part, linear in lora_matrices(peft_model)]
    lorasp_store(peft_model).set_masks(masks)
    peft_model.lorasp_draw = draw


def held_matrices(peft_model) -> dict[str, torch.Tensor]:
    """Every LoRA matrix as the adapter file and checkpoints hold it (keys '<layer>.lora_A' /
    '<layer>.lora_B'): a folded model's [A; A0] and [B, -B0], anything else's as it is."""
    offsets = _offsets(peft_model)
    held = {}
    for name, part, linear in lora_matrices(peft_model):
        weight = linear.weight.detach()
        if name in offsets:
            a0, b0 = offsets[name]
            weight = torch.cat([weight, a0], dim=0) if part == "A" else torch.cat([weight, -b0], dim=1)
        held[f"{name}.lora_{part}"] = weight
    return held


def held_frozen_masks(peft_model) -> dict[str, torch.Tensor]:
    """The frozen masks of `held_matrices`: a folded model's offset rows of A and columns of B are frozen whole."""
    offsets = _offsets(peft_model)
    masks = {}
    for name, part, linear in lora_matrices(peft_model):
        frozen = ~linear.lorasp_trainable
        if name in offsets:
            whole = torch.ones_like(frozen)
            frozen = torch.cat([frozen, whole], dim=0) if part == "A" else torch.cat([frozen, whole], dim=1)
        masks[f"{name}.lora_{part}"] = frozen
    return masks


@torch.no_grad()
def set_lora_matrices(peft_model, matrices: dict[str, torch.Tensor]) -> None:
    """Write whole A/B matrices in the held form (`held_matrices`; keys '<layer>.lora_A' /
    '<layer>.lora_B', as checkpoints hold them). A folded model takes the live part, and an offset
    that differs from its own is folded in again in its place."""
    store = lorasp_store(peft_model)
    offsets = _offsets(peft_model)
    layers = lora_layers(peft_model) if offsets else {}
    for slot, (name, part, linear) in enumerate(lora_matrices(peft_model)):
        weight = matrices[f"{name}.lora_{part}"]
        if name in offsets:
            rank = linear.weight.shape[0] if part == "A" else linear.weight.shape[1]
            weight, offset = (weight[:rank], weight[rank:]) if part == "A" else (weight[:, :rank], -weight[:, rank:])
            a0, b0 = offsets[name]
            if not torch.equal(offset, a0 if part == "A" else b0):
                _shift_base(layers[name], a0, b0, 1.0)
                a0, b0 = (offset.to(a0), b0) if part == "A" else (a0, offset.to(b0))
                _shift_base(layers[name], a0, b0, -1.0)
                offsets[name] = (a0, b0)
        if tuple(weight.shape) != store.shapes[slot]:
            raise AdapterError(f"{name}.lora_{part}: a {tuple(weight.shape)} matrix for a {store.shapes[slot]} slot (another rank or start?)")
        store.set_matrix(slot, weight)


def count_parameters(peft_model) -> dict[str, int]:
    """lora: all LoRA entries; trainable: those LoRA-SP trains; frozen_lora: the rest; base: base model."""
    store = lorasp_store(peft_model)
    offsets = _offsets(peft_model)
    folded_entries = sum(a0.numel() + b0.numel() for a0, b0 in offsets.values())
    lora, trainable = sum(store.sizes) + folded_entries, store.values.numel()
    base = sum(_numel(p) for p in peft_model.parameters() if p is not store.values)
    return {"lora": lora, "trainable": trainable, "frozen_lora": lora - trainable, "base": base}


def _numel(parameter: nn.Parameter) -> int:
    # A bitsandbytes Params4bit stores two 4-bit values a byte: count what it stands for.
    shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else parameter.numel()

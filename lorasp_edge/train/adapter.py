"""The LoRA-SP adapter: PEFT's LoRA with a fixed share of each LoRA matrix frozen.

For every adapted linear layer with frozen base weight W0 (d_out x d_in):

    y = W0 x + (alpha / r) * B (A x)          A: r x d_in (Kaiming-uniform), B: d_out x r (zeros)
    trainable(A) = ~M_A,  trainable(B) = ~M_B  (masks: lorasp_edge.train.masks)

With the offset start (`LoRASPConfig.init = "offset"`, `_offset_init`) B starts random too and the
layer computes W0 x + (alpha / r) (B A - B0 A0), held as PEFT's rank-2r [B, -B0] [A; A0].

PEFT does the injection (float, bitsandbytes 8-bit and 4-bit bases, GPT-2's Conv1D), the forward
and the on-disk format. LoRA-SP then moves every LoRA matrix into one `LoRASPStore`
(lorasp_edge.train.flat): the frozen entries in a buffer, the trainable entries in ONE flat
nn.Parameter, rebuilt into the matrices once per forward. The optimizer is a stock torch AdamW over
that parameter (lorasp_edge.train.optim), so state, gradients and the all-reduce cover the trainable
half only, and a frozen entry, having no gradient, keeps its value bit for bit.

Adapter folder: PEFT's `adapter_config.json` + `adapter_model.safetensors` with the whole A/B
matrices (so `PeftModel.from_pretrained(base, dir)` works without lorasp-edge), plus `lorasp.json`
(ratio, seed, schedule, base, plan summary, the masks' sha256) and `lorasp_masks.safetensors`
(bit-packed frozen masks). On load the stored masks are the truth: the hash guards their
integrity; a disagreement with today's mask generator is only a warning, since torch does not
promise the same random stream across releases.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorasp_edge.errors import AdapterError
from lorasp_edge.files import apply_umask, fsync_file, replace_dir
from lorasp_edge.plan.memory import INITS, held_rank
from lorasp_edge.train import masks as masklib
from lorasp_edge.train.flat import LoRASPLinear, LoRASPStore

ADAPTER_NAME = "default"
LORASP_FILE = "lorasp.json"
MASKS_FILE = "lorasp_masks.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "lorasp-edge/1"
STORE_NAME = "lorasp_store"  # on the PeftModel; has no "lora_" in it, so PEFT never saves it


class MaskGeneratorWarning(UserWarning):
    """The stored masks differ from what this version's generator draws for the recorded seed."""


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


def apply_lorasp(model: nn.Module, config: LoRASPConfig):
    """Wrap `model` (a transformers causal LM, float or bitsandbytes 4/8-bit) in a LoRA-SP PeftModel.

    Every base parameter is frozen; LoRA A/B are trainable tensors whose frozen entries the masks
    name. LoRA init draws from a generator seeded by `config.seed`, so the caller's RNG is untouched.
    """
    from peft import LoraConfig, get_peft_model

    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    lora_config = LoraConfig(
        r=config.peft_rank,
        lora_alpha=config.peft_alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        layers_to_transform=list(config.layers) if config.layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=_uses_conv1d(model),
    )
    disable_bnb_cpu_repack(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora_config)
    if config.init == "offset":
        _offset_init(peft_model, config)
    masks = {(name, part): ~_draw(config, name, part, linear.weight.shape, 0) for name, part, linear in lora_matrices(peft_model)}
    _build_store(peft_model, masks, requires_grad=True)
    peft_model.lorasp_config = config
    return peft_model


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


def _draw(config: LoRASPConfig, name: str, part: str, shape, draw: int) -> torch.Tensor:
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


@torch.no_grad()
def _offset_init(peft_model, config: LoRASPConfig) -> None:
    """B starts random, so the frozen half of B carries information too; the product B0 A0 of the
    starting values is subtracted, so the model starts exactly as the base.

    PEFT's held A (2r x d_in) and B (d_out x 2r) become [A0; A0] and [B0, -B0]: y = W0 x + s (B A - B0 A0),
    and B A - B0 A0 is zero at the start. A0 is PEFT's Kaiming-uniform draw; B0 is drawn from the same
    distribution as A0's entries (uniform, bound 1 / sqrt(d_in)), so an A step and a B step move
    the product by comparable amounts under Adam. Each B0 has its own generator (the mask seeds'
    scheme, part "B0"), so it depends on the run seed and the layer name only.
    """
    for name, layer in lora_layers(peft_model).items():
        lora_a, lora_b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        rank = config.rank
        lora_a[rank:].copy_(lora_a[:rank])
        bound = 1.0 / lora_a.shape[1] ** 0.5
        generator = torch.Generator(device="cpu").manual_seed(masklib.mask_seed(config.seed, name, "B0"))
        start = (torch.rand((lora_b.shape[0], rank), generator=generator, dtype=torch.float32) * 2 - 1) * bound
        lora_b[:, :rank].copy_(start)
        lora_b[:, rank:].copy_(-start)


def _build_store(peft_model, trainable: dict[tuple[str, str], torch.Tensor], requires_grad: bool) -> None:
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
    config = peft_model.lorasp_config
    masks = [~_draw(config, name, part, linear.weight.shape, draw) for name, part, linear in lora_matrices(peft_model)]
    lorasp_store(peft_model).set_masks(masks)
    peft_model.lorasp_draw = draw


def set_lora_matrices(peft_model, matrices: dict[str, torch.Tensor]) -> None:
    """Write whole A/B matrices (keys '<layer>.lora_A' / '<layer>.lora_B', as checkpoints hold them)."""
    store = lorasp_store(peft_model)
    for slot, (name, part, _) in enumerate(lora_matrices(peft_model)):
        store.set_matrix(slot, matrices[f"{name}.lora_{part}"])


def count_parameters(peft_model) -> dict[str, int]:
    """lora: all LoRA entries; trainable: those LoRA-SP trains; frozen_lora: the rest; base: base model."""
    store = lorasp_store(peft_model)
    lora, trainable = sum(store.sizes), store.values.numel()
    base = sum(_numel(p) for p in peft_model.parameters() if p is not store.values)
    return {"lora": lora, "trainable": trainable, "frozen_lora": lora - trainable, "base": base}


def _numel(parameter: nn.Parameter) -> int:
    # A bitsandbytes Params4bit stores two 4-bit values a byte: count what it stands for.
    shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else parameter.numel()


# ------------------------------------------------------------------------------- save / load


def save_adapter(peft_model, out_dir: str | Path, info: dict | None = None) -> Path:
    """Write the adapter folder atomically: a temp folder beside `out_dir`, renamed at the end."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config: LoRASPConfig = peft_model.lorasp_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        packed = {f"{name}.lora_{part}": masklib.pack(~linear.lorasp_trainable) for name, part, linear in lora_matrices(peft_model)}
        save_file(packed, str(tmp / MASKS_FILE), metadata={"format": FORMAT})
        record = {
            "format": FORMAT,
            **asdict(config),
            "masks_sha256": masks_digest(packed),
            "base_fingerprint": base_fingerprint(peft_model.get_base_model()),
            "draw": getattr(peft_model, "lorasp_draw", 0),
            "schedule": "redraw every %d steps" % config.redraw_every if config.redraw_every else "fixed",
            **(info or {}),
        }
        (tmp / LORASP_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for path in tmp.iterdir():
            fsync_file(path)
        apply_umask(tmp)  # mkdtemp makes it 0700: the adapter is read by other users' services too
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def masks_digest(packed: dict[str, torch.Tensor]) -> str:
    """sha256 over the packed masks, by key: independent of how the safetensors file lays them out."""
    digest = hashlib.sha256()
    for key in sorted(packed):
        digest.update(key.encode() + b"\0" + packed[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def base_fingerprint(model: nn.Module) -> str:
    """A short hash that tells base models apart even when their shapes agree: the model type and
    shape fields plus a corner of the input embeddings (which stay float in 4/8-bit bases), rounded
    to bf16 so a float32 and a bfloat16 load of the same weights agree."""
    config = model.config
    fields = [getattr(config, key, None) for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")]
    corner = model.get_input_embeddings().weight.detach()[:64, :16].to("cpu", torch.bfloat16).contiguous()
    digest = hashlib.sha256(json.dumps(fields).encode() + corner.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def read_adapter_info(adapter_dir: str | Path) -> dict:
    """The validated contents of `lorasp.json`, with PEFT's config under 'peft_config'."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: no such adapter folder")
    for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, LORASP_FILE, MASKS_FILE):
        if not (adapter_dir / name).is_file():
            raise AdapterError(f"{adapter_dir / name}: missing (not a lorasp-edge adapter folder?)")
    info = _read_json(adapter_dir / LORASP_FILE)
    peft_config = _read_json(adapter_dir / PEFT_CONFIG_FILE)
    for key, kind in (("rank", int), ("alpha", (int, float)), ("ratio", (int, float)), ("seed", int)):
        if not isinstance(info.get(key), kind):
            raise AdapterError(f"{adapter_dir / LORASP_FILE}: field '{key}' is missing or not a number")
    if info.get("base_quant_bits") not in (None, 4, 8):
        raise AdapterError(f"{adapter_dir / LORASP_FILE}: base_quant_bits must be 4, 8 or null, not {info.get('base_quant_bits')!r}")
    init = info.get("init", "zeros")
    if init not in INITS:
        raise AdapterError(f"{adapter_dir / LORASP_FILE}: field 'init' must be one of {', '.join(INITS)}, not {init!r}")
    if peft_config.get("r") != held_rank(info["rank"], init):
        raise AdapterError(
            f"{adapter_dir / PEFT_CONFIG_FILE}: rank r={peft_config.get('r')} disagrees with lorasp.json rank={info['rank']}"
            + (" (an offset adapter holds twice its rank)" if init == "offset" else "")
        )
    info["peft_config"] = peft_config
    return info


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path}: unreadable ({error})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises several types for truncated or corrupt files
        raise AdapterError(f"{path}: corrupt or truncated safetensors file ({str(error).splitlines()[0]})") from None


def load_adapter(base_model: nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """Attach a saved LoRA-SP adapter to `base_model`, after checking every tensor against it."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    info = read_adapter_info(adapter_dir)
    weights = _read_safetensors(adapter_dir / PEFT_WEIGHTS_FILE)
    packed_masks = _read_safetensors(adapter_dir / MASKS_FILE)
    _check_against_base(base_model, weights, info, adapter_dir / PEFT_WEIGHTS_FILE)
    expected = info.get("base_fingerprint")
    if expected is not None and expected != base_fingerprint(base_model):
        raise AdapterError(
            f"{adapter_dir / LORASP_FILE}: the adapter was trained on another base model "
            f"(base '{info.get('base_model', '?')}', fingerprint {expected}; this base: {base_fingerprint(base_model)})"
        )

    masks_path = adapter_dir / MASKS_FILE
    recorded = info.get("masks_sha256")
    if recorded is not None and recorded != masks_digest(packed_masks):
        raise AdapterError(f"{masks_path}: the masks do not match the sha256 recorded in {LORASP_FILE} (altered or corrupt)")

    disable_bnb_cpu_repack(base_model)
    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable)
    config = LoRASPConfig(**{key: info[key] for key in LoRASPConfig.__dataclass_fields__ if key in info})
    peft_model.lorasp_config = config
    peft_model.lorasp_draw = int(info.get("draw", 0))
    masks, differing = {}, []
    for name, part, linear in lora_matrices(peft_model):
        key = f"{name}.lora_{part}"
        if key not in packed_masks:
            raise AdapterError(f"{masks_path}: no mask for {key}")
        shape = linear.weight.shape
        if packed_masks[key].numel() != (shape.numel() + 7) // 8:
            raise AdapterError(f"{masks_path}: mask {key} has {packed_masks[key].numel()} bytes, a {tuple(shape)} matrix needs {(shape.numel() + 7) // 8}")
        frozen = masklib.unpack(packed_masks[key], shape)
        if recorded is None and int(frozen.sum()) != masklib.frozen_count(shape.numel(), config.ratio):
            # Adapters written before the hash: the frozen count is the integrity check left.
            raise AdapterError(f"{masks_path}: mask {key} freezes {int(frozen.sum())} entries, ratio {config.ratio} means {masklib.frozen_count(shape.numel(), config.ratio)}")
        if not torch.equal(frozen, _draw(config, name, part, shape, peft_model.lorasp_draw)):
            differing.append(key)
        masks[(name, part)] = ~frozen
    if differing:
        warnings.warn(
            f"{masks_path}: {len(differing)} stored mask(s) differ from what this version draws for seed {config.seed} "
            f"(first: {differing[0]}); the stored masks are used",
            MaskGeneratorWarning,
            stacklevel=2,
        )
    _build_store(peft_model, masks, requires_grad=trainable)
    return peft_model


def _check_against_base(base_model: nn.Module, weights: dict[str, torch.Tensor], info: dict, path: Path) -> None:
    """Every adapter tensor must name a layer of this base with matching shapes."""
    modules = dict(base_model.named_modules())
    rank = info["peft_config"]["r"]
    fan_in_fan_out = bool(info["peft_config"].get("fan_in_fan_out", False))
    for key, tensor in weights.items():
        prefix = "base_model.model."
        if not key.startswith(prefix) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise AdapterError(f"{path}: unexpected tensor '{key}' (not a LoRA A/B weight)")
        name, part = key[len(prefix) :].rsplit(".lora_", 1)
        layer = modules.get(name)
        if layer is None:
            raise AdapterError(f"{path}: '{name}' does not exist in the base model (adapter trained on another model?)")
        d_in, d_out = _linear_shape(layer, fan_in_fan_out)
        expected = (rank, d_in) if part.startswith("A") else (d_out, rank)
        if tuple(tensor.shape) != expected:
            raise AdapterError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but this base model needs {expected} "
                "(adapter trained on another model?)"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{path}: {key} holds NaN or Inf values")


def _linear_shape(layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    weight = getattr(layer, "weight", None)
    if weight is None or weight.dim() != 2:
        raise AdapterError(f"adapter targets '{type(layer).__name__}', which is not a linear layer")
    return (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])

"""The adapter folder: what `lorasp-edge train` writes and every exporter reads.

    adapter_config.json + adapter_model.safetensors   PEFT's layout and key names, the whole A/B
                                                      matrices in the held form (adapter.held_matrices),
                                                      so PeftModel.from_pretrained(base, dir) works
                                                      without lorasp-edge
    lorasp.json                                       ratio, seed, start, schedule, base, plan summary,
                                                      the masks' sha256, the base's fingerprint
    lorasp_masks.safetensors                          bit-packed frozen masks

Written atomically (a temp folder renamed into place). On load the stored masks are the truth: the
hash guards their integrity; a disagreement with today's mask generator is only a warning, since
torch does not promise the same random stream across releases.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lorasp_edge.errors import AdapterError
from lorasp_edge.files import apply_umask, fsync_file, replace_dir
from lorasp_edge.plan.memory import INITS, held_rank
from lorasp_edge.train import masks as masklib
from lorasp_edge.train.adapter import (
    LoRASPConfig,
    build_store,
    disable_bnb_cpu_repack,
    folded,
    held_frozen_masks,
    held_mask,
    held_matrices,
    lora_matrices,
)

LORASP_FILE = "lorasp.json"
MASKS_FILE = "lorasp_masks.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "lorasp-edge/1"


class MaskGeneratorWarning(UserWarning):
    """The stored masks differ from what this version's generator draws for the recorded seed."""


def save_adapter(peft_model, out_dir: str | Path, info: dict | None = None) -> Path:
    """Write the adapter folder atomically: a temp folder beside `out_dir`, renamed at the end."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config: LoRASPConfig = peft_model.lorasp_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        if folded(peft_model):
            _write_held_form(peft_model, tmp)
        packed = {key: masklib.pack(frozen) for key, frozen in held_frozen_masks(peft_model).items()}
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


def _write_held_form(peft_model, folder: Path) -> None:
    """A folded model's adapter in the rank-2r form PEFT and the exporters read: [A; A0], [B, -B0],
    r and lora_alpha doubled (alpha / r unchanged)."""
    from safetensors.torch import save_file

    config: LoRASPConfig = peft_model.lorasp_config
    tensors = {f"base_model.model.{key}.weight": weight.contiguous() for key, weight in held_matrices(peft_model).items()}
    save_file(tensors, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    peft_config.update(r=config.peft_rank, lora_alpha=config.peft_alpha)
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")


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
        if not torch.equal(frozen, held_mask(config, name, part, shape, peft_model.lorasp_draw)):
            differing.append(key)
        masks[(name, part)] = ~frozen
    if differing:
        warnings.warn(
            f"{masks_path}: {len(differing)} stored mask(s) differ from what this version draws for seed {config.seed} "
            f"(first: {differing[0]}); the stored masks are used",
            MaskGeneratorWarning,
            stacklevel=2,
        )
    build_store(peft_model, masks, requires_grad=trainable)
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

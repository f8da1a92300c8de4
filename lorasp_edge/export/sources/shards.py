"""The merge tensor by tensor, from the base's safetensors shards: memory bounded by one weight.

    base shards (16-bit, or a bitsandbytes 4/8-bit folder) --read one tensor--> fp32 W0 as trained
        (+ (alpha / r) B A where the adapter adapts it) --> fp32 merged shard, written as it fills

A 4/8-bit base is dequantized per tensor exactly as the adapter saw it in training: a pre-quantized
folder's own codes, or a 16-bit checkpoint quantized per tensor with the function that builds the
cached 4/8-bit copy (lorasp_edge.prequantize.quantize_weight), then dequantized. Nothing builds a
model object with weights: shapes and names come from a model built on the meta device.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from lorasp_edge.errors import AdapterError, UserError
from lorasp_edge.export.sources.merge import lora_delta
from lorasp_edge.prequantize import (
    SafetensorsReader,
    quantized_modules,
    weight_files,
)

SHARD_BYTES = 2_000_000_000  # merged fp32 shard size: transformers reads any count of shards
ADAPTER_PREFIX = "base_model.model."
# Keys bitsandbytes saves beside a quantized weight (`<module>.weight.<suffix>`, `<module>.SCB`).
QUANT_AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                      ".quant_state.bitsandbytes__fp4", ".SCB", ".weight_format")


DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64",
                     torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class Checkpoint:
    """Every tensor of a safetensors folder by key, read one at a time with pread (nothing mapped)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.readers = [SafetensorsReader(path) for path in weight_files(self.folder)]
        self.where = {key: reader for reader in self.readers for key in reader.entries}

    def keys(self) -> list[str]:
        return [key for reader in self.readers for key in reader.entries]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key].entries[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        """One tensor. Unlike a single pass over the file, the page cache keeps its pages: the
        verification reads each weight several times."""
        return self.where[key].read(key, keep_cached=True)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def _is_aux(key: str) -> bool:
    return key.endswith(QUANT_AUX_SUFFIXES)


class BaseWeights:
    """The base's float weights in fp32, each as the adapter was trained against (see module doc)."""

    def __init__(self, folder: Path, bits: int | None):
        self.checkpoint = Checkpoint(folder)
        self.bits = bits
        keys = self.checkpoint.where
        stored = {key[: -len(".weight.absmax")] for key in keys if key.endswith(".weight.absmax")}
        stored |= {key[: -len(".SCB")] for key in keys if key.endswith(".SCB")}
        self.stored_quantized = stored  # modules whose codes are in the folder
        # A 16-bit checkpoint trained at 4/8 bits: the modules transformers' integration quantizes.
        self.to_quantize = quantized_modules(self.checkpoint.folder) if bits and not stored else set()

    def keys(self) -> list[str]:
        return [key for key in self.checkpoint.keys() if not _is_aux(key)]

    def shape(self, key: str) -> tuple[int, ...]:
        module = key.rsplit(".", 1)[0]
        if module in self.stored_quantized and key.endswith(".weight"):
            state = self._quant_state(module)
            return tuple(state.shape) if hasattr(state, "shape") else self.checkpoint.shape(key)
        return self.checkpoint.shape(key)

    def read(self, key: str) -> torch.Tensor:
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in self.stored_quantized:
            return self._dequantize_stored(module)
        tensor = self.checkpoint.read(key)
        if key.endswith(".weight") and module in self.to_quantize:
            from lorasp_edge.prequantize import quantize_weight

            return _dequantize(quantize_weight(tensor, self.bits, torch.float32), self.bits)
        return tensor.float() if tensor.is_floating_point() else tensor

    def _quant_state(self, module: str):
        import bitsandbytes.functional as F

        prefix = f"{module}.weight."
        parts = {key[len(prefix) :]: self.checkpoint.read(key) for key in self.checkpoint.where if key.startswith(prefix)}
        return F.QuantState.from_dict(parts, device=torch.device("cpu")) if parts else SimpleNamespace()

    def _dequantize_stored(self, module: str) -> torch.Tensor:
        codes = self.checkpoint.read(f"{module}.weight")
        if f"{module}.SCB" in self.checkpoint.where:
            return _dequantize({"weight": codes, "SCB": self.checkpoint.read(f"{module}.SCB")}, 8)
        prefix = f"{module}.weight."
        parts = {"weight": codes}
        parts.update({"weight." + key[len(prefix) :]: self.checkpoint.read(key) for key in self.checkpoint.where if key.startswith(prefix)})
        return _dequantize(parts, 4)

    def close(self) -> None:
        self.checkpoint.close()


def _dequantize(entries: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """fp32 weight from bitsandbytes' saved entries (suffixes after the module name), as PEFT's merge does."""
    import bitsandbytes.functional as F

    if bits == 8:
        return F.int8_vectorwise_dequant(entries["weight"], entries["SCB"]).float()
    state = F.QuantState.from_dict({key[len("weight.") :]: value for key, value in entries.items() if key != "weight"}, device=torch.device("cpu"))
    return F.dequantize_4bit(entries["weight"], state).float()


@dataclass
class LoraDelta:
    """The adapter's A and B per module, and its scaling: delta(module) = scaling * B @ A (fp32)."""

    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    fan_in_fan_out: bool

    @classmethod
    def read(cls, adapter_dir: Path) -> LoraDelta:
        from safetensors.torch import load_file

        from lorasp_edge.train.adapter_files import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE

        config = json.loads((adapter_dir / PEFT_CONFIG_FILE).read_text())
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise UserError(f"{adapter_dir / PEFT_CONFIG_FILE}: per-module rank or alpha patterns are not supported by the streamed merge")
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        path = adapter_dir / PEFT_WEIGHTS_FILE
        try:
            weights = load_file(str(path))
        except Exception as error:  # safetensors raises several types for truncated or corrupt files
            raise AdapterError(f"{path}: corrupt or truncated safetensors file ({str(error).splitlines()[0]})") from None
        matrices: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            if not key.startswith(ADAPTER_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise AdapterError(f"{path}: unexpected tensor '{key}' (not a LoRA A/B weight)")
            name, part = key[len(ADAPTER_PREFIX) :].rsplit(".lora_", 1)
            matrices.setdefault(name, {})[part[0]] = tensor.float()
        pairs = {name: (parts["A"], parts["B"]) for name, parts in matrices.items() if set(parts) == {"A", "B"}}
        if len(pairs) != len(matrices):
            raise AdapterError(f"{path}: a LoRA layer has A without B or B without A")
        return cls(pairs, scaling, bool(config.get("fan_in_fan_out", False)))

    def check_shapes(self, shape_of, path: Path) -> None:
        """Every adapted module must exist in the base with the shapes A and B need (AdapterError if not)."""
        for name, (A, B) in self.matrices.items():
            try:
                shape = shape_of(f"{name}.weight")
            except KeyError:
                raise AdapterError(f"{path}: '{name}' does not exist in the base model (adapter trained on another model?)") from None
            d_out, d_in = (shape[1], shape[0]) if self.fan_in_fan_out else (shape[0], shape[1])
            if tuple(A.shape) != (A.shape[0], d_in) or tuple(B.shape) != (d_out, A.shape[0]):
                raise AdapterError(
                    f"{path}: {name} has LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} but this base model's weight has shape {tuple(shape)} "
                    "(adapter trained on another model?)"
                )

    def delta(self, name: str) -> torch.Tensor | None:
        if name not in self.matrices:
            return None
        A, B = self.matrices[name]
        return lora_delta(A, B, self.scaling, self.fan_in_fan_out)


@dataclass
class MergeResult:
    keys: list[str]
    parameters: int
    bytes: int


def check_fingerprint(base: BaseWeights, config, info: dict, adapter_dir: Path) -> None:
    """The adapter's recorded base fingerprint against this base (lorasp_edge.train.adapter_files.base_fingerprint)."""
    from lorasp_edge.train.adapter_files import LORASP_FILE, base_fingerprint

    expected = info.get("base_fingerprint")
    key = embedding_key(config)
    if expected is None or key is None or key not in base.checkpoint.where:
        return
    weight = base.checkpoint.read(key)
    found = base_fingerprint(SimpleNamespace(config=config, get_input_embeddings=lambda: SimpleNamespace(weight=weight)))
    if found != expected:
        raise AdapterError(
            f"{adapter_dir / LORASP_FILE}: the adapter was trained on another base model "
            f"(base '{info.get('base_model', '?')}', fingerprint {expected}; this base: {found})"
        )


def meta_model(config):
    """The model class for `config`, built on the meta device: names and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model `config` builds (a tied table once), from the meta device."""
    return {name: tuple(parameter.shape) for name, parameter in meta_model(config).named_parameters()}


def base_float_shapes(source: Path, bits: int | None) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of every weight as the merge writes it (fp32), from the headers only."""
    base = BaseWeights(source, bits)
    try:
        return {key: base.shape(key) for key in base.keys()}
    finally:
        base.close()


def embedding_key(config) -> str | None:
    model = meta_model(config)
    embeddings = model.get_input_embeddings()
    return next((f"{name}.weight" for name, module in model.named_modules() if module is embeddings), None)


def plan_shards(entries: list[tuple[str, tuple[int, ...], str]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """Consecutive tensors grouped into shards of at most `shard_bytes` (one tensor may exceed it alone)."""
    shards: list[list] = [[]]
    size = 0
    for key, shape, dtype in entries:
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape, dtype))
        size += nbytes
    return shards


class StreamingSafetensors:
    """safetensors files written tensor by tensor: the header (offsets from the shapes) goes first,
    then each tensor's bytes as it is produced, so no shard is ever held in memory."""

    def __init__(self, folder: Path, entries: list[tuple[str, tuple[int, ...], str]], shard_bytes: int = SHARD_BYTES):
        self.folder = folder
        shards = plan_shards(entries, shard_bytes)
        names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.expected = [(key, shape, dtype, name) for name, shard in zip(names, shards) for key, shape, dtype in shard]
        self.next, self.handle, self.total_bytes = 0, None, 0
        self.headers = {}
        for name, shard in zip(names, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for key, shape, dtype in shard:
                nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
                header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned, as safetensors writes it
            self.headers[name] = raw
            self.total_bytes += offset
        if len(shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": {key: name for key, _, _, name in self.expected}}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected_key, shape, dtype, name = self.expected[self.next]
        if key != expected_key or tuple(tensor.shape) != shape or SAFETENSORS_NAMES[tensor.dtype] != dtype:
            raise ValueError(f"tensor {key} {tuple(tensor.shape)} out of the planned order (expected {expected_key} {shape})")
        if self.handle is None or self.handle.name != str(self.folder / name):
            self._open(name)
        data = tensor.contiguous().view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
        self.handle.write(memoryview(data.numpy()))
        self.next += 1
        if self.next == len(self.expected):
            self.handle.close()

    def _open(self, name: str) -> None:
        if self.handle is not None:
            self.handle.close()
        self.handle = open(self.folder / name, "wb")  # noqa: SIM115 (kept open across writes)
        header = self.headers[name]
        self.handle.write(len(header).to_bytes(8, "little") + header)


def stream_merge(base: BaseWeights, delta: LoraDelta, out_dir: Path, shard_bytes: int = SHARD_BYTES, say=None) -> MergeResult:
    """Write W0 + delta for every float tensor of `base` into fp32 safetensors shards in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = base.keys()
    present = set(keys)
    missing = [name for name in delta.matrices if f"{name}.weight" not in present]
    if missing:
        raise AdapterError(f"adapter layer '{missing[0]}' does not exist in the base model (adapter trained on another model?)")
    entries = [(key, base.shape(key), _stored_dtype(base, key)) for key in keys]
    writer = StreamingSafetensors(out_dir, entries, shard_bytes)
    parameters = 0
    for index, key in enumerate(keys):
        tensor = base.read(key)
        if tensor.is_floating_point():
            tensor = tensor.float()
            change = delta.delta(key[: -len(".weight")]) if key.endswith(".weight") else None
            if change is not None:
                tensor = tensor + change
            # A NaN or Inf anywhere makes the sum non-finite; one reduction instead of a full bool mask.
            if not torch.isfinite(tensor.sum()):
                raise ValueError(f"merging {key} produced NaN or Inf")
            parameters += tensor.numel()
        writer.write(key, tensor)
        del tensor
        if say and index % 100 == 99:
            say(f"  merged {index + 1}/{len(keys)} tensors")
    return MergeResult(keys, parameters, writer.total_bytes)


def _stored_dtype(base: BaseWeights, key: str) -> str:
    stored = base.checkpoint.where[key].entries[key]["dtype"]
    module = key.rsplit(".", 1)[0]
    quantized = key.endswith(".weight") and (module in base.stored_quantized or module in base.to_quantize)
    return "F32" if quantized or stored in ("F16", "BF16", "F32", "F64") else stored


def copy_side_files(source: Path, folder: Path) -> None:
    """Tokenizer and generation config files of the base folder, unchanged."""
    for item in Path(source).iterdir():
        if item.is_file() and item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "generation_config")):
            shutil.copy2(item, folder / item.name)


class MergedWeights:
    """W0 + delta computed per tensor on each read: the merge without writing it (reference source)."""

    def __init__(self, base: BaseWeights, delta: LoraDelta):
        self.base, self.delta = base, delta

    def keys(self) -> list[str]:
        return self.base.keys()

    def read(self, key: str) -> torch.Tensor:
        tensor = self.base.read(key)
        change = self.delta.delta(key[: -len(".weight")]) if key.endswith(".weight") and tensor.is_floating_point() else None
        return tensor.float() + change if change is not None else tensor

"""Quantize once, load small: a 4/8-bit bitsandbytes checkpoint written tensor by tensor.

Loading a 16-bit checkpoint with `load_in_4bit` reads every linear weight in full, quantizes it in
memory and keeps the 16-bit file mapped while it loads; for an 8B model that is 16 GB of mapped
pages on the way to a 4.5 GB model. This module writes, once, the checkpoint that
`save_pretrained` of a bitsandbytes-quantized model writes (same keys, same tensors, a
`quantization_config` in config.json), so transformers, PEFT and this runtime load it directly,
holding only the quantized bytes.

It reads one tensor at a time with plain reads (no mmap, so no file pages stay resident), and
writes output shards of at most `max_shard_bytes` as they fill: the peak is one output shard plus
one weight in the compute dtype. The weights are quantized exactly as transformers' on-the-fly
path does (cast to the compute dtype, then bitsandbytes' Params4bit / Int8Params quantization),
so the logits of the two loads agree (tests/test_prequantize.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorasp_edge import allocator
from lorasp_edge.errors import UserError

FORMAT_VERSION = 1  # part of the cache key: bump when the written checkpoint changes
DEFAULT_SHARD_BYTES = 1_000_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bnb_config(bits: int, compute_dtype: torch.dtype):
    """The bitsandbytes setting this runtime trains on: NF4 with double quantization, or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"--bits must be 4 or 8, not {bits}")


def prequantized_bits(folder: str | Path) -> int | None:
    """4 or 8 when `folder` holds a bitsandbytes-quantized checkpoint, else None."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    try:
        quant = json.loads(config_path.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    if quant.get("quant_method") != "bitsandbytes":
        return None
    return 4 if quant.get("load_in_4bit") else 8 if quant.get("load_in_8bit") else None


# ------------------------------------------------------------------------------ reading


class SafetensorsReader:
    """One safetensors file read tensor by tensor with pread: nothing stays mapped or cached in the process."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = open(path, "rb")  # noqa: SIM115 (held across reads; close() closes it)
        (length,) = struct.unpack("<Q", self._handle.read(8))
        header = json.loads(self._handle.read(length))
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._data_start = 8 + length

    def nbytes(self, name: str) -> int:
        start, end = self.entries[name]["data_offsets"]
        return end - start

    def read(self, name: str, keep_cached: bool = False) -> torch.Tensor:
        """One tensor, read with pread into fresh memory. The page cache is told to drop what was read
        unless `keep_cached` (a reader that reads each weight several times keeps it)."""
        entry = self.entries[name]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise UserError(f"{self.path.name}: tensor {name} has dtype {entry['dtype']}, which this reader does not handle")
        start, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=dtype)
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        done = 0
        while done < end - start:
            got = os.preadv(self._handle.fileno(), [view[done:]], self._data_start + start + done)
            if got <= 0:
                raise UserError(f"{self.path}: truncated file (tensor {name})")
            done += got
        if not keep_cached and hasattr(os, "posix_fadvise"):  # the page cache need not keep what was read once
            os.posix_fadvise(self._handle.fileno(), self._data_start + start, end - start, os.POSIX_FADV_DONTNEED)
        return tensor

    def close(self) -> None:
        self._handle.close()


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"model '{folder}': no model.safetensors or model.safetensors.index.json (quantize reads safetensors checkpoints)")


# ---------------------------------------------------------------------------- quantizing


def quantized_modules(folder: Path) -> set[str]:
    """Names of the linear modules transformers' bitsandbytes integration quantizes for this config.

    The model is built on the meta device and asked, with transformers' own rule (lm_head, tied
    and fp32-kept modules are skipped), so the keys match what from_pretrained expects."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import should_convert_module
    from transformers.quantizers.base import HfQuantizer

    from lorasp_edge.families import family_of

    hf_config = AutoConfig.from_pretrained(folder)
    entry = family_of(hf_config)
    if entry is not None and entry.conv1d:
        raise UserError(f"quantize: {hf_config.model_type} models (Conv1D layers) are not supported; quantize on the fly instead")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    names = set()
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and should_convert_module(name, skip):
            names.add(name)
    return names


def quantize_weight(weight: torch.Tensor, bits: int, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state-dict entries (suffixes after the module name) bitsandbytes saves for one linear weight."""
    import bitsandbytes.functional as F

    # The on-the-fly path first loads the weight in the compute dtype, then quantizes that copy.
    w = weight.to(compute_dtype).contiguous()
    if bits == 4:
        # Params4bit defaults: blocksize 64, uint8 storage; the statistics are double-quantized.
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
        out = {"weight": packed}
        out.update({f"weight.{key}": value for key, value in state.as_dict(packed=True).items()})
        return out
    # Int8Params._quantize: fp16, then per-row absmax int8 (Linear8bitLt saves weight_format 0 = row).
    codes, scales, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    return {"weight": codes, "SCB": scales, "weight_format": torch.tensor(0, dtype=torch.uint8)}


@dataclass
class QuantizeReport:
    out: Path
    bits: int
    seconds: float
    input_bytes: int
    output_bytes: int
    quantized_tensors: int
    peak_rss_bytes: int


class _ShardWriter:
    """Output shards written as they fill; temp names until the count is known."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in self.pending.items()}, str(self.folder / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.folder / self.files[0][0], self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (name, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(self.folder / name, self.folder / final)
            weight_map.update({key: final for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def quantize_checkpoint(
    source: str | Path,
    out: str | Path,
    bits: int,
    compute_dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> QuantizeReport:
    """Write a bitsandbytes 4/8-bit checkpoint of the Hugging Face folder `source` into `out`.

    `progress(done_bytes, total_bytes)` is called after each tensor. `out` appears whole or not at all.
    """
    import psutil

    from lorasp_edge.files import apply_umask, fsync_dir, make_temp_dir, replace_dir

    started = time.perf_counter()
    source, out = Path(source), Path(out)
    if bits not in (4, 8):
        raise UserError(f"--bits must be 4 or 8, not {bits}")
    if prequantized_bits(source) is not None:
        raise UserError(f"model '{source}' is already quantized ({prequantized_bits(source)}-bit)")
    config = json.loads((source / "config.json").read_text())
    files = weight_files(source)
    targets = quantized_modules(source)
    process = psutil.Process()
    peak = process.memory_info().rss

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}-")
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        readers = [SafetensorsReader(path) for path in files]
        total = sum(reader.nbytes(name) for reader in readers for name in reader.entries)
        done = quantized = 0
        found = set()
        for reader in readers:
            for name in reader.entries:
                tensor = reader.read(name)
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if module in targets:
                    writer.add({f"{module}.{key}": value for key, value in quantize_weight(tensor, bits, compute_dtype).items()})
                    found.add(module)
                    quantized += 1
                else:
                    writer.add({name: tensor})
                del tensor
                # Each weight's short-lived copies (compute dtype, codes) are freed while its small quantized
                # outputs stay; glibc keeps the freed pages beneath live blocks resident, and without a trim
                # here the resident set grew by twice the checkpoint's size (Qwen2.5-0.5B shape: +2.0 GB for 0.99 GB).
                allocator.trim_heap()
                done += reader.nbytes(name)
                peak = max(peak, process.memory_info().rss)
                if progress is not None:
                    progress(done, total)
            reader.close()
        missing = sorted(targets - found)
        if missing:
            raise UserError(f"model '{source}': the checkpoint has no weight for {len(missing)} linear layer(s), e.g. {missing[0]}.weight")
        writer.finish()
        peak = max(peak, process.memory_info().rss)
        config["quantization_config"] = bnb_config(bits, compute_dtype).to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for item in source.iterdir():
            if item.is_file() and item.suffix not in WEIGHT_SUFFIXES and item.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy2(item, tmp / item.name)
        for item in tmp.iterdir():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        apply_umask(tmp)  # the modes open/mkdir give (copy2 copied the source's; mkdtemp made the folder 0700)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return QuantizeReport(out, bits, time.perf_counter() - started, total, writer.total_bytes, quantized, peak)


# ------------------------------------------------------------------------------- the cache


def fingerprint(source: Path, bits: int, compute_dtype: torch.dtype) -> str:
    """What the quantized copy depends on: the config, each weight file's name, size and mtime, the setting."""
    digest = hashlib.sha256(f"v{FORMAT_VERSION} {bits} {compute_dtype} {source.resolve()}\n".encode())
    digest.update((source / "config.json").read_bytes())
    for path in weight_files(source):
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cached_quantized(source: str | Path, bits: int, compute_dtype: torch.dtype, progress: bool = True) -> Path:
    """The pre-quantized copy of `source` in the cache, written on first use (one tensor at a time)."""
    from lorasp_edge.sources import cache_root

    source = Path(source)
    key = fingerprint(source, bits, compute_dtype)
    target = cache_root() / "quantized" / f"{source.resolve().name}-{bits}bit-{str(compute_dtype).removeprefix('torch.')}-{key}"
    if prequantized_bits(target) == bits:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Data-parallel ranks on one machine load together: one writes, the others wait for it.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        if os.name == "posix":
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        if prequantized_bits(target) == bits:
            return target
        bar = _progress_bar(f"quantizing {source.name} to {bits}-bit (once; cached)") if progress else None
        try:
            quantize_checkpoint(source, target, bits, compute_dtype, progress=bar.update_to if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    return target


def _progress_bar(description: str):
    from tqdm.auto import tqdm

    class _Bar(tqdm):
        def update_to(self, done: int, total: int) -> None:
            self.total = total
            self.update(done - self.n)

    return _Bar(desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def quantize_model(name: str, out: str | Path, bits: int, compute_dtype: torch.dtype | None = None, progress: bool = True) -> QuantizeReport:
    """`lorasp-edge quantize`: the model named as the trainer names it, written pre-quantized into `out`."""
    from lorasp_edge.devices import bf16_supported, default_device
    from lorasp_edge.sources import local_safetensors_folder, resolve_model

    from lorasp_edge.files import os_error_message

    out = Path(out)
    existing = next((path for path in (out, *out.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--out {out}: {'is' if existing == out else f'{existing} is'} a file, not a folder; choose a new folder path for --out")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: already exists and is not an empty folder; choose another --out")
    source = resolve_model(name)
    local = local_safetensors_folder(source)
    if local is None:
        raise UserError(f"model '{name}': not a local folder with safetensors weights, nor in the local hub cache")
    if compute_dtype is None:
        # The planner computes in bf16 where the device does so natively; the weights are quantized from that dtype.
        compute_dtype = torch.bfloat16 if bf16_supported(default_device()) else torch.float32
    bar = _progress_bar(f"quantizing to {bits}-bit") if progress else None
    try:
        return quantize_checkpoint(local, out, bits, compute_dtype, progress=bar.update_to if bar is not None else None)
    except OSError as error:  # the temporary folder is removed already (quantize_checkpoint's finally)
        if error.filename and Path(local).resolve() in Path(error.filename).resolve().parents:
            raise UserError(os_error_message(error, error.filename, "reading")) from None
        raise UserError(os_error_message(error, out, "writing the quantized model to") + " (nothing was left half-written)") from None
    finally:
        if bar is not None:
            bar.close()

"""Export: base + LoRA-SP adapter -> merged Hugging Face model + verified ONNX decoder(s).

    adapter/ --read_adapter_info--> base name, base bits
    base (float, or bitsandbytes 4/8-bit as trained) + adapter --merged_model--> fp32 W0 + (alpha/r) B A
        -> OUT/hf/          merged model: safetensors, config, tokenizer, generation config
        -> OUT/onnx/        model.onnx: one KV-cache decoder graph (lorasp_edge.onnx_export)
        -> OUT/onnx-int8/   or onnx-int4/: MatMulNBits weight-only quantization (optional)
        -> OUT/manifest.json  what was verified, measured differences, sizes

Verification runs on every export, on text from the held-out sample: the unmerged adapted model
against the merged one, the reloaded HF folder against the merged model, and onnxruntime against
the merged PyTorch model on a batch of two (one left-padded) for a prefill and 3 decode steps.
The fp32 graph must match within `tolerance` x the logit scale (max |logit|); a quantized graph
must keep its held-out perplexity within a ratio of the fp32 graph's. A failure raises
`VerificationError` (exit 4) and leaves nothing behind: everything is written to a temporary
folder beside OUT and renamed into place only at the end.

The default held-out sample is the Python language reference shipped with every Python
(`pydoc_data.topics`): English prose that no adapter here was trained on; `eval_text` replaces it.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorasp_edge.errors import UserError, VerificationError
from lorasp_edge.files import replace_dir
from lorasp_edge.onnx_export import (
    DEFAULT_OPSET,
    ONNX_FILE,
    PROTOBUF_LIMIT_BYTES,
    export_decoder,
    files_bytes,
    quantize_decoder,
    unsupported_reason,
)

FORMATS = ("onnx", "hf", "both")
QUANTIZATIONS = ("none", "int8", "int4")
QUANT_BITS = {"int8": 8, "int4": 4}
# Largest allowed held-out perplexity of a quantized graph over the fp32 graph's.
PERPLEXITY_RATIO_LIMIT = {"int8": 1.05, "int4": 1.30}
# An adapter trained on an LLM.int8 base saw int8-quantized activations, which the fp32 merge
# cannot reproduce; a 4-bit (NF4) base's forward dequantizes the same weights the merge uses.
MERGE_TOLERANCE = {None: 1e-3, 4: 1e-3, 8: 5e-2}
DECODE_STEPS = 3
MANIFEST_FILE = "manifest.json"


@dataclass
class ExportSettings:
    adapter: Path = field(metadata={"help": "adapter folder written by `lorasp-edge train`"})
    out: Path = field(metadata={"help": "output folder (replaced only if it holds an earlier export)"})
    model: str | None = field(default=None, metadata={"help": "base model; default: the one lorasp.json names"})
    format: str = field(default="both", metadata={"help": "onnx, hf or both"})
    quantize: str = field(default="none", metadata={"help": "also write a weight-only quantized ONNX: none, int8, int4"})
    block_size: int = field(default=32, metadata={"help": "quantization block along the input dimension (power of 2, >= 16)"})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset"})
    tolerance: float = field(default=1e-3, metadata={"help": "fp32 ONNX: max |logit difference| / max |logit|"})
    eval_text: Path | None = field(default=None, metadata={"help": "held-out text file for perplexity; default: the Python reference"})
    eval_tokens: int = field(default=1024, metadata={"help": "held-out tokens scored for perplexity"})
    external_threshold_bytes: int = field(default=PROTOBUF_LIMIT_BYTES, metadata={"help": "weights above this go to model.onnx_data"})

    def problems(self) -> list[str]:
        found = []
        if self.format not in FORMATS:
            found.append(f"--format must be one of {', '.join(FORMATS)}, not '{self.format}'")
        if self.quantize not in QUANTIZATIONS:
            found.append(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, not '{self.quantize}'")
        elif self.quantize != "none" and self.format == "hf":
            found.append("--quantize writes an ONNX model: use it with --format onnx or both")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            found.append(f"--block-size must be a power of two >= 16, not {self.block_size}")
        if not 14 <= self.opset <= 20:
            found.append(f"--opset must be between 14 and 20 (the TorchScript exporter's range), not {self.opset}")
        if not self.tolerance > 0:
            found.append(f"--tolerance must be > 0, not {self.tolerance}")
        if self.eval_text is not None and not Path(self.eval_text).is_file():
            found.append(f"--eval-text {self.eval_text}: no such file")
        if self.eval_tokens < 32:
            found.append(f"--eval-tokens must be >= 32, not {self.eval_tokens}")
        return found

    @property
    def wants_onnx(self) -> bool:
        return self.format in ("onnx", "both")

    @property
    def wants_hf(self) -> bool:
        return self.format in ("hf", "both")


@dataclass
class Comparison:
    """One model against the merged PyTorch model on the verification batch."""

    max_abs_diff: float
    relative_diff: float  # max_abs_diff / max |reference logit|
    greedy_agreement: float  # share of compared positions with the same argmax
    positions: int


@dataclass
class ExportReport:
    out: Path
    manifest: dict
    seconds: float

    @property
    def verification(self) -> dict:
        return self.manifest["verification"]


# ------------------------------------------------------------------------------------ helpers


def adapter_hash(adapter_dir: Path) -> str:
    """sha256 over the adapter's files (name and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(adapter_dir).iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def held_out_text(path: Path | None) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def held_out_ids(tokenizer, text: str, count: int) -> list[int]:
    # Tokenize a prefix only: a few characters per token is plenty, the whole reference is 0.5 MB.
    ids = tokenizer(text[: count * 16], add_special_tokens=False)["input_ids"][:count]
    if len(ids) < 32:
        raise UserError(f"the held-out text gives only {len(ids)} tokens; at least 32 are needed")
    return list(ids)


def write_portable_config(folder: Path) -> None:
    """Make config.json (and tokenizer_config.json) read the same in transformers 4.x and 5.x.

    transformers 5 writes RoPE settings only under `rope_parameters`; 4.x ignores that key and falls
    back to its default rope_theta (10000), so SmolLM2's 100000 would be lost. Writing the 4.x keys
    (`rope_theta`, and `rope_scaling` for a non-default RoPE) beside it serves both. transformers 5
    also names its tokenizer class `TokenizersBackend`, unknown to 4.x; `PreTrainedTokenizerFast`
    loads the same tokenizer.json in both.
    """
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
            config["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
    config.pop("quantization_config", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_path = folder / "tokenizer_config.json"
    if tokenizer_path.is_file():
        tokenizer_config = json.loads(tokenizer_path.read_text())
        if tokenizer_config.get("tokenizer_class") == "TokenizersBackend" and (folder / "tokenizer.json").is_file():
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _estimated_bytes(parameter_count: int, settings: ExportSettings) -> int:
    fp32 = 4 * parameter_count
    total = (fp32 if settings.wants_hf else 0) + (fp32 if settings.wants_onnx else 0)
    if settings.quantize != "none":
        total += parameter_count * (1.2 if settings.quantize == "int8" else 0.8)
    return int(total * 1.05) + (64 << 20)  # tokenizer, configs, a trace scratch file's slack


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise UserError(f"--out {out}: folder exists and is not an earlier export; choose another or empty it")


# ------------------------------------------------------------------------------- verification


def verification_batch(ids: list[int], pad_id: int, length: int = 12, padding: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of held-out text; the second is left-padded, so padding and positions are exercised."""
    first = ids[:length]
    second = [pad_id] * padding + ids[length : 2 * length - padding]
    input_ids = torch.tensor([first, second])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :padding] = 0
    return input_ids, attention_mask


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def reference_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Full-recompute logits of a PyTorch model (no cache), fp32."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask), use_cache=False)
    return output.logits.float()


def compare(reference: list[torch.Tensor], candidate: list[np.ndarray | torch.Tensor], masks: list[torch.Tensor]) -> Comparison:
    """Logit differences and argmax agreement over the positions each mask marks as real."""
    max_abs, scale, agree, count = 0.0, 0.0, 0, 0
    for ref, got, mask in zip(reference, candidate, masks):
        got = torch.as_tensor(got, dtype=torch.float32)
        keep = mask.bool()
        ref, got = ref[keep], got[keep]
        max_abs = max(max_abs, float((ref - got).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        count += int(keep.sum())
    return Comparison(max_abs, max_abs / scale if scale else max_abs, agree / count, count)


def verify_onnx(decoder, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int = DECODE_STEPS) -> Comparison:
    """onnxruntime with its KV cache against PyTorch full recompute: prefill, then `steps` decode steps.

    Both sides are fed the same tokens (PyTorch's greedy choice), so one early argmax flip does not
    make every later step incomparable.
    """
    references, candidates, masks = [], [], []
    reference = reference_logits(model, input_ids, attention_mask)
    logits, past = decoder(input_ids.numpy(), attention_mask.numpy(), _positions(attention_mask).numpy(), decoder.empty_cache(len(input_ids)))
    references.append(reference)
    candidates.append(logits)
    masks.append(attention_mask)
    for _ in range(steps):
        next_ids = reference[:, -1].argmax(-1, keepdim=True)
        position = _positions(attention_mask)[:, -1:] + 1
        input_ids = torch.cat([input_ids, next_ids], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=1)
        reference = reference_logits(model, input_ids, attention_mask)
        logits, past = decoder(next_ids.numpy(), attention_mask.numpy(), position.numpy(), past)
        references.append(reference[:, -1:])
        candidates.append(logits)
        masks.append(torch.ones_like(next_ids))
    return compare(references, candidates, masks)


def perplexity(logits_of: Callable[[list[int]], np.ndarray], ids: list[int], window: int) -> float:
    """exp(mean next-token NLL) over consecutive windows of `window` + 1 tokens."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        logits = torch.as_tensor(logits_of(chunk[:-1]), dtype=torch.float64)
        targets = torch.tensor(chunk[1:])
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    return float(np.exp(total / count))


def onnx_logits_fn(decoder) -> Callable[[list[int]], np.ndarray]:
    def logits_of(ids: list[int]) -> np.ndarray:
        x = np.asarray([ids], dtype=np.int64)
        return decoder(x, np.ones_like(x), np.arange(len(ids))[None], decoder.empty_cache(1))[0][0]

    return logits_of


def torch_logits_fn(model) -> Callable[[list[int]], np.ndarray]:
    def logits_of(ids: list[int]) -> np.ndarray:
        x = torch.tensor([ids])
        return reference_logits(model, x, torch.ones_like(x))[0].numpy()

    return logits_of


# ------------------------------------------------------------------------------------- export


def export(settings: ExportSettings, progress: Callable[[str], None] | None = None) -> ExportReport:
    """Merge, export, verify and write everything under `settings.out` (atomically)."""
    from lorasp_edge.adapter import load_adapter, merged_model, read_adapter_info
    from lorasp_edge.models import load_model, load_tokenizer, resolve_model

    say = progress or (lambda message: None)
    started = time.perf_counter()
    problems = settings.problems()
    if problems:
        raise UserError("; ".join(problems))
    adapter_dir, out = Path(settings.adapter), Path(settings.out)
    info = read_adapter_info(adapter_dir)
    model_name = settings.model or info.get("base_model")
    if not model_name:
        raise UserError(f"{adapter_dir / 'lorasp.json'}: names no base model; pass --model")
    base_bits = info.get("base_quant_bits")
    if base_bits not in (None, 4, 8):
        raise UserError(f"{adapter_dir / 'lorasp.json'}: base_quant_bits must be 4, 8 or null, not {base_bits!r}")
    _check_out(out)
    if settings.wants_onnx:
        from transformers import AutoConfig

        try:
            reason = unsupported_reason(AutoConfig.from_pretrained(resolve_model(model_name)))
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read the config of model '{model_name}': {str(error).splitlines()[0]}") from None
        if reason:
            raise UserError(reason)

    say(f"loading base '{model_name}'" + (f" ({base_bits}-bit, as trained)" if base_bits else ""))
    base = load_model(model_name, quant_bits=base_bits, compute_dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(model_name)
    say(f"merging adapter {adapter_dir} in fp32")
    adapted = load_adapter(base, adapter_dir)
    merged = merged_model(adapted)
    merged.generation_config = copy.deepcopy(base.generation_config)
    parameter_count = sum(p.numel() for p in merged.parameters())

    ids = held_out_ids(tokenizer, held_out_text(settings.eval_text), settings.eval_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids, attention_mask = verification_batch(ids, pad_id)
    merge_check = compare([reference_logits(merged, input_ids, attention_mask)], [reference_logits(adapted, input_ids, attention_mask)], [attention_mask])
    del adapted, base
    merge_tolerance = MERGE_TOLERANCE[base_bits]
    say(f"  merged vs adapted: max |logit diff| {merge_check.max_abs_diff:.2e} ({merge_check.relative_diff:.2e} of the logit scale)")
    if merge_check.relative_diff > merge_tolerance:
        raise VerificationError(
            f"merged model differs from the adapted model: relative logit difference {merge_check.relative_diff:.2e} "
            f"> {merge_tolerance:.0e}"
        )

    needed = _estimated_bytes(parameter_count, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = _free_bytes(out.parent)
    if free < needed:
        raise UserError(f"no room on disk for the export in {out.parent}: needs about {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free")

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        manifest = _write_all(settings, tmp, merged, tokenizer, ids, input_ids, attention_mask, say)
        manifest.update(
            {
                "base_model": model_name,
                "base_quant_bits": base_bits,
                "adapter": {
                    "path": str(adapter_dir.resolve()),
                    "sha256": adapter_hash(adapter_dir),
                    "trained_on": info.get("base_model"),
                    **{key: info.get(key) for key in ("rank", "alpha", "ratio", "seed", "target_modules", "compute_dtype", "steps")},
                },
                "plan": info.get("plan"),
                "parameters": parameter_count,
            }
        )
        manifest["verification"]["merge"] = {**asdict(merge_check), "tolerance": merge_tolerance}
        manifest["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise UserError(f"no room on disk while writing the export to {out.parent} (nothing was left behind)") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(out=out, manifest=manifest, seconds=manifest["seconds"])


def _write_all(settings: ExportSettings, tmp: Path, merged, tokenizer, ids, input_ids, attention_mask, say) -> dict:
    """Everything the export writes, into `tmp`; returns the manifest's measured part."""
    import onnxruntime
    import transformers

    from lorasp_edge.generate import OnnxDecoder

    manifest: dict = {
        "format": "lorasp-edge-export/1",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__},
        "files": {},
        "verification": {},
        "perplexity": {},
    }
    verification, sizes = manifest["verification"], manifest["files"]
    window = min(512, getattr(merged.config, "max_position_embeddings", 512) or 512)
    reference = reference_logits(merged, input_ids, attention_mask)

    if settings.wants_hf:
        say("writing the merged Hugging Face model")
        hf_dir = tmp / "hf"
        merged.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        write_portable_config(hf_dir)
        reloaded = _reload_hf(hf_dir)
        check = compare([reference], [reference_logits(reloaded, input_ids, attention_mask)], [attention_mask])
        verification["hf_reload"] = asdict(check)
        if check.relative_diff > settings.tolerance:
            raise VerificationError(f"the saved HF folder reloads to different logits ({check.relative_diff:.2e} of the logit scale)")
        del reloaded
        sizes["hf"] = files_bytes(hf_dir, "*")

    if not settings.wants_onnx:
        return manifest

    say(f"exporting the ONNX decoder (opset {settings.opset})")
    onnx_dir = tmp / "onnx"
    onnx_dir.mkdir()
    export_decoder(merged, onnx_dir, settings.opset, settings.external_threshold_bytes)
    _write_side_files(merged, tokenizer, onnx_dir)
    sizes["onnx"] = files_bytes(onnx_dir)
    sizes["fp32_parameters"] = 4 * sum(p.numel() for p in merged.parameters())

    say("verifying onnxruntime against PyTorch: prefill + 3 decode steps")
    fp32 = OnnxDecoder(onnx_dir / ONNX_FILE)
    check = verify_onnx(fp32, merged, input_ids, attention_mask)
    verification["onnx"] = {**asdict(check), "tolerance": settings.tolerance, "decode_steps": DECODE_STEPS}
    say(f"  fp32: max |logit diff| {check.max_abs_diff:.2e} ({check.relative_diff:.2e} of the logit scale), greedy agreement {check.greedy_agreement:.1%}")
    if check.relative_diff > settings.tolerance:
        raise VerificationError(
            f"ONNX logits differ from PyTorch by {check.relative_diff:.2e} of the logit scale (max |diff| {check.max_abs_diff:.2e}) "
            f"> tolerance {settings.tolerance:.0e}; nothing was written"
        )
    say(f"scoring perplexity on {len(ids)} held-out tokens")
    manifest["perplexity"] = {
        "tokens": len(ids),
        "window": window,
        "source": str(settings.eval_text) if settings.eval_text else "pydoc_data.topics (Python language reference)",
        "pytorch": perplexity(torch_logits_fn(merged), ids, window),
        "onnx": perplexity(onnx_logits_fn(fp32), ids, window),
    }

    if settings.quantize != "none":
        bits = QUANT_BITS[settings.quantize]
        say(f"quantizing to {settings.quantize} (MatMulNBits, block {settings.block_size})")
        quant_dir = tmp / f"onnx-{settings.quantize}"
        quant_dir.mkdir()
        quantize_decoder(onnx_dir / ONNX_FILE, quant_dir, bits, settings.block_size, external_threshold_bytes=settings.external_threshold_bytes)
        _write_side_files(merged, tokenizer, quant_dir)
        sizes[f"onnx-{settings.quantize}"] = files_bytes(quant_dir)
        quantized = OnnxDecoder(quant_dir / ONNX_FILE)
        check = verify_onnx(quantized, merged, input_ids, attention_mask)
        quantized_perplexity = perplexity(onnx_logits_fn(quantized), ids, window)
        ratio = quantized_perplexity / manifest["perplexity"]["onnx"]
        limit = PERPLEXITY_RATIO_LIMIT[settings.quantize]
        manifest["perplexity"][f"onnx-{settings.quantize}"] = quantized_perplexity
        verification[f"onnx-{settings.quantize}"] = {
            **asdict(check), "perplexity_ratio": ratio, "perplexity_ratio_limit": limit, "block_size": settings.block_size,
        }
        say(f"  {settings.quantize}: greedy agreement {check.greedy_agreement:.1%}, perplexity x{ratio:.3f} of fp32 ONNX, "
            f"{sizes[f'onnx-{settings.quantize}'] / 1e6:.1f} MB")
        if ratio > limit:
            raise VerificationError(
                f"{settings.quantize} ONNX perplexity is {ratio:.3f}x the fp32 graph's (limit {limit}); nothing was written"
            )
    return manifest


def _write_side_files(merged, tokenizer, folder: Path) -> None:
    """config, generation config and tokenizer beside model.onnx: optimum's folder layout."""
    merged.config.save_pretrained(folder)
    merged.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_portable_config(folder)


def _reload_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

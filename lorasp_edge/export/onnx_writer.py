"""OUT/onnx (and OUT/onnx-int8 or onnx-int4): the KV-cache decoder graph, verified by onnxruntime.

The fp32 graph must match the merged PyTorch model within `tolerance` x the logit scale over a
prefill and 3 decode steps; a quantized graph must keep its held-out perplexity within a ratio of
the fp32 graph's (PERPLEXITY_RATIO_LIMIT).
"""

from __future__ import annotations

from dataclasses import asdict

from lorasp_edge.errors import VerificationError
from lorasp_edge.export.context import ExportContext
from lorasp_edge.export.hf import write_side_files
from lorasp_edge.export.onnx_graph import ONNX_FILE, export_decoder, files_bytes
from lorasp_edge.export.onnx_runtime import OnnxDecoder
from lorasp_edge.export.quantize import quantize_decoder
from lorasp_edge.export.verify import DECODE_STEPS, onnx_logits_fn, perplexity, torch_logits_fn, verify_onnx

QUANT_BITS = {"int8": 8, "int4": 4}
# Largest allowed held-out perplexity of a quantized graph over the fp32 graph's.
PERPLEXITY_RATIO_LIMIT = {"int8": 1.05, "int4": 1.30}


def write_onnx(context: ExportContext) -> None:
    settings, merged, manifest, say = context.settings, context.merged, context.manifest, context.say
    verification, sizes = manifest["verification"], manifest["files"]
    say(f"exporting the ONNX decoder (opset {settings.opset})")
    onnx_dir = context.folder / "onnx"
    onnx_dir.mkdir()
    export_decoder(merged, onnx_dir, settings.opset, settings.external_threshold_bytes)
    write_side_files(merged, context.tokenizer, onnx_dir)
    sizes["onnx"] = files_bytes(onnx_dir)
    sizes["fp32_parameters"] = 4 * sum(p.numel() for p in merged.parameters())

    say("verifying onnxruntime against PyTorch: prefill + 3 decode steps")
    fp32 = OnnxDecoder(onnx_dir / ONNX_FILE)
    check = verify_onnx(fp32, merged, context.input_ids, context.attention_mask)
    verification["onnx"] = {**asdict(check), "tolerance": settings.tolerance, "decode_steps": DECODE_STEPS}
    say(f"  fp32: max |logit diff| {check.max_abs_diff:.2e} ({check.relative_diff:.2e} of the logit scale), greedy agreement {check.greedy_agreement:.1%}")
    if check.relative_diff > settings.tolerance:
        raise VerificationError(
            f"ONNX logits differ from PyTorch by {check.relative_diff:.2e} of the logit scale (max |diff| {check.max_abs_diff:.2e}) "
            f"> tolerance {settings.tolerance:.0e}; nothing was written"
        )
    say(f"scoring perplexity on {len(context.ids)} held-out tokens")
    manifest["perplexity"].update(
        {
            "tokens": len(context.ids),
            "window": context.window,
            "source": str(settings.eval_text) if settings.eval_text else "pydoc_data.topics (Python language reference)",
            "pytorch": perplexity(torch_logits_fn(merged), context.ids, context.window),
            "onnx": perplexity(onnx_logits_fn(fp32), context.ids, context.window),
        }
    )
    if settings.quantize != "none":
        _write_quantized(context, onnx_dir)


def _write_quantized(context: ExportContext, onnx_dir) -> None:
    settings, manifest, say = context.settings, context.manifest, context.say
    bits = QUANT_BITS[settings.quantize]
    say(f"quantizing to {settings.quantize} (MatMulNBits, block {settings.block_size})")
    name = f"onnx-{settings.quantize}"
    quant_dir = context.folder / name
    quant_dir.mkdir()
    quantize_decoder(onnx_dir / ONNX_FILE, quant_dir, bits, settings.block_size, external_threshold_bytes=settings.external_threshold_bytes)
    write_side_files(context.merged, context.tokenizer, quant_dir)
    manifest["files"][name] = files_bytes(quant_dir)
    quantized = OnnxDecoder(quant_dir / ONNX_FILE)
    check = verify_onnx(quantized, context.merged, context.input_ids, context.attention_mask)
    quantized_perplexity = perplexity(onnx_logits_fn(quantized), context.ids, context.window)
    ratio = quantized_perplexity / manifest["perplexity"]["onnx"]
    limit = PERPLEXITY_RATIO_LIMIT[settings.quantize]
    manifest["perplexity"][name] = quantized_perplexity
    manifest["verification"][name] = {
        **asdict(check), "perplexity_ratio": ratio, "perplexity_ratio_limit": limit, "block_size": settings.block_size,
    }
    say(f"  {settings.quantize}: greedy agreement {check.greedy_agreement:.1%}, perplexity x{ratio:.3f} of fp32 ONNX, "
        f"{manifest['files'][name] / 1e6:.1f} MB")
    if ratio > limit:
        raise VerificationError(f"{settings.quantize} ONNX perplexity is {ratio:.3f}x the fp32 graph's (limit {limit}); nothing was written")

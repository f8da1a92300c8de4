"""OUT/onnx (and OUT/onnx-int8 or onnx-int4): the KV-cache decoder graph, verified by onnxruntime.

Each graph is written from the merged weights (onnx_build.py) by checkpoint key, as the source hands
them over (`context.weights`): the model in memory, or its safetensors shards read one tensor at a
time when the export is streamed.

The fp32 graph must match the merged PyTorch model within `tolerance` x the logit scale over a
prefill and 3 decode steps; a quantized graph must keep its held-out perplexity within a ratio of
the fp32 graph's (PERPLEXITY_RATIO_LIMIT) and pick the merged model's argmax at a share of the
held-out positions (export/agreement.py's limits, or --min-agreement).
"""

from __future__ import annotations

from dataclasses import asdict

from lorasp_edge.errors import VerificationError
from lorasp_edge.export import agreement
from lorasp_edge.export.context import ExportContext
from lorasp_edge.export.formats.onnx import keep_8bit
from lorasp_edge.export.hf import write_side_files
from lorasp_edge.export.memory import trim_heap
from lorasp_edge.export.onnx_build import Quantization, build_decoder
from lorasp_edge.export.onnx_graph import ONNX_FILE, files_bytes
from lorasp_edge.export.onnx_runtime import OnnxDecoder
from lorasp_edge.export.onnx_slices import SlicedDecoder, SliceError, layer_ranges
from lorasp_edge.export.verify import (
    DECODE_STEPS,
    in_place_difference,
    onnx_logit_pieces,
    perplexity,
    reference_steps,
    torch_logits_fn,
    verify_onnx,
)

QUANT_BITS = {"int8": 8, "int4": 4}
# Largest allowed held-out perplexity of a quantized graph over the fp32 graph's.
PERPLEXITY_RATIO_LIMIT = {"int8": 1.05, "int4": 1.30}
# The cache updated in place against the growing cache of the same graph: the same arithmetic on the
# same values, so only reordering separates them (verify.in_place_difference).
IN_PLACE_TOLERANCE = 1e-5


def external_threshold(context: ExportContext) -> int:
    """Weights above this go to model.onnx_data. A graph written inline is built whole in memory, about
    INLINE_WRITE_FACTOR times its weights (export/memory.py), so a streamed source, which exists to keep
    the model out of memory, writes every graph's weights to the data file as they are read."""
    return 0 if context.streamed else context.settings.external_threshold_bytes


def write_onnx(context: ExportContext) -> None:
    settings, merged, manifest, say = context.settings, context.merged, context.manifest, context.say
    verification, sizes = manifest["verification"], manifest["files"]
    say(f"writing the ONNX decoder (opset {settings.opset})")
    onnx_dir = context.folder / "onnx"
    onnx_dir.mkdir()
    build_decoder(merged.config, context.weights, onnx_dir, opset=settings.opset, external_threshold_bytes=external_threshold(context))
    write_side_files(merged, context.tokenizer, onnx_dir)
    sizes["onnx"] = files_bytes(onnx_dir)
    sizes["fp32_parameters"] = 4 * sum(p.numel() for p in merged.parameters())

    say(f"scoring PyTorch perplexity on {len(context.ids)} held-out tokens")
    # Before the session opens: the PyTorch side's transient memory and the session's do not add up.
    reference_picks: list = []  # PyTorch's argmax at every held-out position: the quantized graphs' agreement
    pytorch_perplexity = perplexity(agreement.argmax_recorder(torch_logits_fn(merged), reference_picks), context.ids, context.window)
    references = reference_steps(merged, context.input_ids, context.attention_mask)
    say("verifying onnxruntime against PyTorch: prefill + 3 decode steps")
    trim_heap()
    with fp32_decoder(context, onnx_dir / ONNX_FILE) as fp32:  # one onnxruntime session at a time: this is the largest
        check = verify_onnx(fp32, merged, context.input_ids, context.attention_mask, references=references)
        verification["onnx"] = {**asdict(check), "tolerance": settings.tolerance, "decode_steps": DECODE_STEPS,
                                "session_layers": [list(layers) for layers in fp32.ranges],
                                "in_place_relative_diff": check_in_place(fp32, references, "ONNX")}
        say(f"  fp32: max |logit diff| {check.max_abs_diff:.2e} ({check.relative_diff:.2e} of the logit scale), greedy agreement {check.greedy_agreement:.1%}")
        if check.relative_diff > settings.tolerance:
            raise VerificationError(
                f"ONNX logits differ from PyTorch by {check.relative_diff:.2e} of the logit scale (max |diff| {check.max_abs_diff:.2e}) "
                f"> tolerance {settings.tolerance:.0e}; nothing was written"
            )
        say(f"scoring onnxruntime perplexity on {len(context.ids)} held-out tokens")
        manifest["perplexity"].update(
            {
                "tokens": len(context.ids),
                "window": context.window,
                "source": str(settings.eval_text) if settings.eval_text else "pydoc_data.topics (Python language reference)",
                "pytorch": pytorch_perplexity,
                "onnx": perplexity(onnx_logit_pieces(fp32), context.ids, context.window),
            }
        )
    if settings.quantize != "none":
        _write_quantized(context, references, reference_picks)


def check_in_place(decoder, references: list, label: str) -> float | None:
    """The cache `generate` and onnxruntime-genai run (updated in place) against the one just verified."""
    difference = in_place_difference(decoder, references)
    if difference is not None and difference > IN_PLACE_TOLERANCE:
        raise VerificationError(f"{label} logits with the cache updated in place differ from the growing cache's by {difference:.2e} "
                                f"of the logit scale (> {IN_PLACE_TOLERANCE:.0e}); nothing was written")
    return difference


def fp32_decoder(context: ExportContext, path):
    """The fp32 graph under onnxruntime: one session, or `context.session_slices` sessions over
    consecutive layers opened one at a time when one would not fit the export's memory (onnx_slices.py)."""
    if context.session_slices > 1:
        num_layers = context.merged.config.get_text_config(decoder=True).num_hidden_layers
        ranges = layer_ranges(num_layers, context.session_slices)
        try:
            decoder = SlicedDecoder(path, ranges)
        except SliceError as error:
            context.say(f"  cannot cut the graph at layer boundaries ({error}); verifying it in one session")
        else:
            context.say(f"  in {len(ranges)} sessions of layers " + ", ".join(f"{a}-{b - 1}" for a, b in ranges) + ", one open at a time")
            return decoder
    return OnnxDecoder(path, prepack=False)


def _write_quantized(context: ExportContext, references: list, reference_picks: list) -> None:
    settings, manifest, say = context.settings, context.manifest, context.say
    bits = QUANT_BITS[settings.quantize]
    say(f"writing the {settings.quantize} decoder (MatMulNBits, block {settings.block_size})")
    name = f"onnx-{settings.quantize}"
    quant_dir = context.folder / name
    quant_dir.mkdir()
    kept = keep_8bit(settings) if bits == 4 else ()
    build_decoder(context.merged.config, context.weights, quant_dir, Quantization(bits, settings.block_size, keep_8bit=kept),
                  settings.opset, external_threshold(context))
    write_side_files(context.merged, context.tokenizer, quant_dir)
    manifest["files"][name] = files_bytes(quant_dir)
    trim_heap()
    quantized = OnnxDecoder(quant_dir / ONNX_FILE, prepack=False)
    check = verify_onnx(quantized, context.merged, context.input_ids, context.attention_mask, references=references)
    in_place = check_in_place(quantized, references, f"{settings.quantize} ONNX")
    picks: list = []
    quantized_perplexity = perplexity(agreement.argmax_recorder(onnx_logit_pieces(quantized), picks), context.ids, context.window)
    agreed = agreement.held_out_agreement(picks, reference_picks, agreement.limit_for_bits(bits, settings))
    ratio = quantized_perplexity / manifest["perplexity"]["onnx"]
    limit = PERPLEXITY_RATIO_LIMIT[settings.quantize]
    manifest["perplexity"][name] = quantized_perplexity
    manifest["verification"][name] = {
        **asdict(check), "perplexity_ratio": ratio, "perplexity_ratio_limit": limit, "block_size": settings.block_size,
        "kept_8bit": list(kept),
        "session_layers": [list(layers) for layers in quantized.ranges], "in_place_relative_diff": in_place,
        "agreement": {**asdict(agreed), "compared": "argmax at every held-out position, teacher-forced on the text, against the merged PyTorch model"},
    }
    say(f"  {settings.quantize}: greedy agreement {agreed.agreement:.1%} over {agreed.positions} held-out positions (limit {agreed.limit:.0%}), "
        f"perplexity x{ratio:.3f} of fp32 ONNX, {manifest['files'][name] / 1e6:.1f} MB")
    if not agreed.passed:
        raise VerificationError(
            f"{settings.quantize} ONNX picks the merged model's greedy token at {agreed.agreement:.1%} of {agreed.positions} held-out positions "
            f"(limit {agreed.limit:.0%}, --min-agreement); nothing was written"
        )
    if ratio > limit:
        raise VerificationError(f"{settings.quantize} ONNX perplexity is {ratio:.3f}x the fp32 graph's (limit {limit}); nothing was written")

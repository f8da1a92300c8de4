"""OUT/genai (and OUT/genai-int8 or genai-int4): folders onnxruntime-genai loads with
`onnxruntime_genai.Model(folder)`, verified by onnxruntime-genai itself.

    the exporter's decoder graph (OUT/onnx, OUT/onnx-int4: linked when that format was written,
    else made here by the same functions) + genai_config.json + tokenizer files

genai_config.json names the graph's inputs and outputs (optimum's names: input_ids,
attention_mask, position_ids, past_key_values.%d.key/value -> logits, present.%d.key/value), the
KV-cache layout (heads, head size, layers; `past_present_share_buffer`: onnxruntime-genai allocates one
buffer per layer for the whole context and binds it as both past and present, which the graph's
GroupQueryAttention updates in place), the context length, token ids and search defaults from the
generation config. Nothing is read from a model builder, so RoPE (in the graph) cannot fall back to
a default base the way the builder's does with transformers-5 configs.

Checks against the merged fp32 PyTorch model on held-out text:
- fp32 graph: onnxruntime-genai's own greedy search, after a 16-token prefill, gives PyTorch's
  greedy tokens for GREEDY_TOKENS new tokens;
- every graph: greedy agreement over 128 teacher-forced tokens (lorasp_edge.export.agreement).
A failure raises VerificationError (exit 4; the export writes nothing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lorasp_edge.errors import UserError, VerificationError
from lorasp_edge.export import agreement
from lorasp_edge.export.context import ExportContext
from lorasp_edge.export.hf import write_side_files
from lorasp_edge.export.onnx_graph import ONNX_DATA_FILE, ONNX_FILE, files_bytes

GENAI_CONFIG = "genai_config.json"
GREEDY_TOKENS = 32
INSTALL_HINT = "pip install onnxruntime-genai (needs onnxruntime >= 1.31)"


def available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def unsupported_reason(config) -> str | None:
    """Checked before any work: the graph must support the model, and the runtime must be there to verify it."""
    from lorasp_edge.export.onnx_graph import unsupported_reason as graph_reason

    if not available():
        return f"--format genai needs onnxruntime-genai to verify what it writes: {INSTALL_HINT}"
    return graph_reason(config)


def genai_config(config, generation_config, context_length: int | None = None) -> dict:
    """genai_config.json for the exporter's decoder graph."""
    heads = config.num_attention_heads
    eos = getattr(generation_config, "eos_token_id", None)
    eos = eos if eos is not None else config.eos_token_id
    pad = getattr(generation_config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    bos = getattr(generation_config, "bos_token_id", None)
    context_length = context_length or config.max_position_embeddings
    sampling = bool(getattr(generation_config, "do_sample", False))
    written = {
        "model": {
            "bos_token_id": bos if bos is not None else config.bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": ONNX_FILE,
                "head_size": getattr(config, "head_dim", None) or config.hidden_size // heads,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads or heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": sampling,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": float(getattr(generation_config, "repetition_penalty", None) or 1.0),
            "temperature": float(getattr(generation_config, "temperature", None) or 1.0) if sampling else 1.0,
            "top_k": int(getattr(generation_config, "top_k", None) or 50) if sampling else 1,
            "top_p": float(getattr(generation_config, "top_p", None) or 1.0) if sampling else 1.0,
        },
    }
    # onnxruntime-genai refuses a null id: a model without a BOS (Qwen3) or pad token leaves the key out.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if written["model"][key] is None:
            del written["model"][key]
    return written


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same temporary export folder: no second copy of the weights
    except OSError:
        shutil.copy2(source, target)


def _place_graph(context: ExportContext, folder: Path, variant: str) -> None:
    """The graph of `variant` ('' for fp32, 'int8', 'int4') into `folder`, linked from OUT/onnx*: the
    onnx format (which genai requires, export/formats) wrote and verified it; genai runs the same file."""
    source = context.folder / (f"onnx-{variant}" if variant else "onnx")
    for name in (ONNX_FILE, ONNX_DATA_FILE):
        if (source / name).is_file():
            _link_or_copy(source / name, folder / name)


def write_genai(context: ExportContext) -> None:
    if not available():
        raise UserError(f"--format genai needs onnxruntime-genai to verify what it writes: {INSTALL_HINT}")
    settings = context.settings
    variants = [""] + ([settings.quantize] if settings.quantize != "none" else [])
    for variant in variants:
        name = f"genai-{variant}" if variant else "genai"
        folder = context.folder / name
        folder.mkdir(exist_ok=True)
        context.say(f"writing the onnxruntime-genai folder {name}/")
        _place_graph(context, folder, variant)
        write_side_files(context.merged, context.tokenizer, folder)
        (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(context.merged.config, context.merged.generation_config), indent=2) + "\n")
        context.manifest["files"][name] = files_bytes(folder)
        context.manifest["verification"][name] = verify_genai(folder, context, bits={"": 32, "int8": 8, "int4": 4}[variant])


class GenaiModel:
    """onnxruntime-genai over a folder: teacher-forced logits, its own greedy search."""

    def __init__(self, folder: str | Path, threads: int | None = None, max_length: int = 2048, prepack: bool = True):
        """`prepack=False` opens the graph with onnxruntime's weight pre-packing off: fp32 MatMul then
        reads its weights from the mapped model.onnx_data instead of a packed copy of each (far less
        resident, lorasp_edge/export/memory.py), at the same tokens."""
        if not available():
            raise UserError(f"{folder}: running a genai folder needs onnxruntime-genai: {INSTALL_HINT}")
        import onnxruntime_genai as og

        self.og = og
        self.generator = None
        self.max_length = max_length  # prompt + new tokens, for `prefill`
        # onnxruntime-genai passes session_options keys it does not know to onnxruntime's AddConfigEntry
        options: dict = {}
        if threads:
            options["intra_op_num_threads"] = threads
        if not prepack:
            options["session.disable_prepacking"] = "1"
        try:
            config = og.Config(str(folder))
            if options:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self.model = og.Model(config)
        except RuntimeError as error:  # onnxruntime-genai's load errors (missing file, bad config)
            raise UserError(f"{folder}: onnxruntime-genai cannot load it ({str(error).splitlines()[0]})") from None

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def logits(self, ids: list[int]) -> np.ndarray:
        generator = self._generator(len(ids) + 1)
        generator.append_tokens(list(ids))
        return np.asarray(generator.get_output("logits"), dtype=np.float32)[0]

    # the stepper interface of lorasp_edge.generate: prefill once, then one token a step
    def prefill(self, token_ids: list[int], max_length: int | None = None) -> np.ndarray:
        self.generator = self._generator(max_length or self.max_length)
        self.generator.append_tokens(list(token_ids))
        return np.asarray(self.generator.get_logits(), dtype=np.float32).reshape(-1)

    def step(self, token_id: int) -> np.ndarray:
        self.generator.append_tokens([token_id])
        return np.asarray(self.generator.get_logits(), dtype=np.float32).reshape(-1)

    def greedy(self, prompt: list[int], count: int) -> list[int]:
        """onnxruntime-genai's own greedy search: up to `count` tokens; it stops after an EOS, as it
        does for its users."""
        generator = self._generator(len(prompt) + count)
        generator.append_tokens(list(prompt))
        tokens = []
        while len(tokens) < count and not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens


def _eos_ids(context: ExportContext) -> set[int]:
    from lorasp_edge.export.gguf import eos_ids

    return eos_ids(context.merged, context.tokenizer)


def verify_genai(folder: Path, context: ExportContext, bits: int) -> dict:
    import onnxruntime_genai as og

    prompt = context.ids[: agreement.PROMPT_TOKENS]
    # The fp32 graph, the largest model an export opens, is checked with pre-packing off (a layout copy
    # of every MatMul weight: the same products, summed in another order). A quantized graph keeps it
    # on: MatMulNBits packs its blocks for the integer kernels users run.
    runtime = GenaiModel(folder, prepack=bits != 32)
    continuation = context.reference_continuation()
    record: dict = {"runtime": f"onnxruntime-genai {og.__version__}", "pre_packing": bits != 32}
    if bits == 32:
        greedy = runtime.greedy(prompt, GREEDY_TOKENS)
        # Equal up to GREEDY_TOKENS tokens, or up to an EOS where the runtime stopped.
        same = greedy == continuation[: len(greedy)] and (len(greedy) == GREEDY_TOKENS or greedy[-1] in _eos_ids(context))
        record.update({"greedy_tokens": len(greedy), "greedy_equal": same})
        context.say(f"  onnxruntime-genai greedy, prefill {len(prompt)} + {len(greedy)} tokens: {'equal to' if same else 'differs from'} PyTorch")
        if not same:
            raise VerificationError(
                f"onnxruntime-genai's greedy tokens differ from PyTorch's within {GREEDY_TOKENS} tokens ({folder.name}); nothing was written"
            )
    agreed = agreement.measure(runtime.logits, prompt, continuation, agreement.limit_for_bits(bits, context.settings))
    record["agreement"] = asdict(agreed)
    context.say(f"  {folder.name}: greedy agreement {agreed.agreement:.1%} over {agreed.positions} tokens (limit {agreed.limit:.0%})")
    if not agreed.passed:
        raise VerificationError(
            f"onnxruntime-genai ({folder.name}) picks PyTorch's greedy token at {agreed.agreement:.1%} of {agreed.positions} positions "
            f"(limit {agreed.limit:.0%}); nothing was written"
        )
    return record

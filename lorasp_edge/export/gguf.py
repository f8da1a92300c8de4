"""OUT/gguf: the merged model as one GGUF file (lorasp_edge.export.gguf_file) and an Ollama
Modelfile, verified by llama.cpp itself when llama-cpp-python is installed.

Checks, on held-out text, against the merged fp32 PyTorch model:
- tokenizer: llama.cpp tokenizes the held-out text to the same ids as the Hugging Face tokenizer;
- 16-bit and f32 files: logits over a 16-token prompt and 16 greedy tokens within GGUF_TOLERANCE
  x the logit scale, and llama.cpp's own free-running greedy tokens equal PyTorch's for 16 tokens;
- every type: greedy agreement over 128 teacher-forced tokens (lorasp_edge.export.agreement) at
  least its limit, and held-out perplexity within PERPLEXITY_RATIO_LIMIT x PyTorch's.
A failed check raises VerificationError (exit 4; the export writes nothing). Without the runtime
the file is written, the manifest says it was not run, and `tools/verify_gguf.py` runs it later.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from lorasp_edge.errors import VerificationError
from lorasp_edge.export import agreement, llamacpp
from lorasp_edge.export.context import ExportContext
from lorasp_edge.export.formats.gguf import GGUF_BITS
from lorasp_edge.export.gguf_file import write_gguf_file
from lorasp_edge.export.ollama import modelfile
from lorasp_edge.export.verify import (
    compare,
    perplexity,
    reference_logits,
    torch_logits_fn,
)

GGUF_DIR = "gguf"
# Max |logit difference| / max |logit| against fp32 PyTorch. f16 rounds each weight to 11
# significant bits; SmolLM2-135M's f16 file measured 2.4e-3 (tools/verify_gguf.py, docs/export.md).
GGUF_TOLERANCE = {"f32": 1e-3, "f16": 1e-2, "bf16": 3e-2}
# Largest allowed held-out perplexity over the merged PyTorch model's, by bits per weight.
PERPLEXITY_RATIO_LIMIT = {32: 1.01, 16: 1.02, 8: 1.05, 5: 1.20, 4: 1.30}
GREEDY_TOKENS = 16


def gguf_file_name(type_name: str) -> str:
    return f"model-{type_name}.gguf"


def eos_ids(model, tokenizer) -> set[int]:
    value = getattr(model.generation_config, "eos_token_id", None)
    ids = set(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def write_gguf(context: ExportContext) -> None:
    """OUT/gguf from the merged weights by key (`context.weights`: the model in memory, or the merged
    shards a streamed source wrote), then checked in llama.cpp against the reference model."""
    settings, tokenizer, say = context.settings, context.tokenizer, context.say
    type_name = settings.gguf_type
    folder = context.folder / GGUF_DIR
    folder.mkdir()
    name = gguf_file_name(type_name)
    say(f"writing GGUF ({type_name}) and an Ollama Modelfile")
    model_name = Path(str(getattr(context.config, "_name_or_path", "") or "model")).name
    write_gguf_file(context.config, context.weights, tokenizer, folder / name, type_name, name=model_name)
    text, templated = modelfile(name, tokenizer, eos_ids(context.model, tokenizer), context.model.generation_config)
    (folder / "Modelfile").write_text(text)
    context.manifest["files"]["gguf"] = (folder / name).stat().st_size
    record = {"file": f"{GGUF_DIR}/{name}", "type": type_name, "modelfile_template": templated}
    context.manifest["verification"]["gguf"] = record
    if not llamacpp.available():
        record["runtime"] = None
        say(f"  llama-cpp-python is not installed: the GGUF was written but not run ({llamacpp.INSTALL_HINT})")
        return
    verify_gguf(folder / name, type_name, context, record)


def verify_gguf(path: Path, type_name: str, context: ExportContext, record: dict | None = None, lora: Path | None = None) -> dict:
    """Run the GGUF in llama.cpp against the reference model (`context.merged`), filling `record` as
    each check runs (so a caller keeps the measured part after a failure); raises VerificationError
    on a failed check. With `lora`, llama.cpp applies that adapter GGUF at run time (unmerged)."""
    import llama_cpp

    merged, tokenizer, say, ids = context.model, context.tokenizer, context.say, context.ids
    bits = GGUF_BITS[type_name]
    prompt = ids[: agreement.PROMPT_TOKENS]
    length = max(context.window + 1, len(prompt) + agreement.CONTINUATION_TOKENS)
    record = {} if record is None else record
    label = f"{type_name}+lora" if lora is not None else type_name
    # Every PyTorch forward first, then llama.cpp: the two resident sets do not add up (a streamed
    # reference reads its weights from disk layer by layer; the runtime maps the whole file).
    say(f"scoring the PyTorch reference for the GGUF check ({label})")
    continuation = context.reference_continuation()
    sequence = prompt + continuation[:GREEDY_TOKENS]
    x = torch.tensor([sequence])
    reference = reference_logits(merged, x, torch.ones_like(x))[0]
    scores = context.manifest["perplexity"]
    if "pytorch" not in scores:
        scores.update({"tokens": len(ids), "window": context.window, "pytorch": perplexity(torch_logits_fn(merged), ids, context.window)})
    # Not mapped: the check's peak then holds the weights once (tools/llamacpp_memory.py: opening the
    # Qwen2.5-1.5B f16 file took 5.58 GB mapped, 3.57 GB read, on a CPU where llama.cpp copies them).
    runtime = llamacpp.LlamaCppModel(path, context=length, lora=lora, use_mmap=False)
    record["runtime"] = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
    say(f"verifying the GGUF in llama.cpp: tokenizer, logits, greedy tokens, perplexity ({label})")

    text = tokenizer.decode(ids)
    same_tokens = runtime.tokenize(text) == list(tokenizer(text, add_special_tokens=False)["input_ids"])
    record["tokenizer_matches"] = same_tokens
    if not same_tokens:
        raise VerificationError(f"llama.cpp tokenizes the held-out text differently from the Hugging Face tokenizer ({path.name}); nothing was written")

    check = compare([reference], [runtime.logits(sequence)], [torch.ones(len(sequence))])
    greedy = runtime.greedy(prompt, GREEDY_TOKENS)
    record.update({"logits": asdict(check), "greedy_tokens": GREEDY_TOKENS, "greedy_equal": greedy == continuation[:GREEDY_TOKENS]})
    if type_name in GGUF_TOLERANCE:
        limit = GGUF_TOLERANCE[type_name]
        record["tolerance"] = limit
        say(f"  {label}: max |logit diff| {check.max_abs_diff:.2e} ({check.relative_diff:.2e} of the logit scale), "
            f"greedy {GREEDY_TOKENS} tokens {'equal' if record['greedy_equal'] else 'differ'}")
        if check.relative_diff > limit:
            raise VerificationError(
                f"llama.cpp's {label} logits differ from PyTorch by {check.relative_diff:.2e} of the logit scale "
                f"> tolerance {limit:.0e}; nothing was written"
            )
        if not record["greedy_equal"]:
            raise VerificationError(f"llama.cpp's greedy tokens differ from PyTorch's within {GREEDY_TOKENS} tokens ({label}); nothing was written")

    agreed = agreement.measure(runtime.logits, prompt, continuation, agreement.limit_for_bits(bits, context.settings))
    record["agreement"] = asdict(agreed)
    value = perplexity(runtime.logits, ids, context.window)
    scores[f"gguf-{label}"] = value
    ratio, limit = value / scores["pytorch"], PERPLEXITY_RATIO_LIMIT[bits]
    record.update({"perplexity_ratio": ratio, "perplexity_ratio_limit": limit})
    say(f"  {label}: greedy agreement {agreed.agreement:.1%} over {agreed.positions} tokens (limit {agreed.limit:.0%}), "
        f"perplexity {value:.3f} (x{ratio:.3f} of PyTorch, limit {limit})")
    if not agreed.passed:
        raise VerificationError(
            f"llama.cpp's {label} picks PyTorch's greedy token at {agreed.agreement:.1%} of {agreed.positions} positions "
            f"(limit {agreed.limit:.0%}); nothing was written"
        )
    if ratio > limit:
        raise VerificationError(f"llama.cpp's {label} perplexity is {ratio:.3f}x PyTorch's (limit {limit}); nothing was written")
    return record


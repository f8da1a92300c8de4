"""Every export format side by side on one model: generation speed, file size, held-out
perplexity and greedy agreement with PyTorch.

    python tools/bench_formats.py [--model smollm2-135m] [--threads 2] [--new-tokens 128] [--rounds 2]

Formats: ONNX fp32/int8/int4 (onnxruntime), onnxruntime-genai fp32/int4 (the same graphs), GGUF
f16/q8_0/q4_0 (llama.cpp through llama-cpp-python); a runtime that is not installed is skipped.
Speed: batch 1, greedy, `--new-tokens` tokens after a chat prompt (EOS does not stop it), prefill
included, the best of `--rounds` runs, each runtime limited to `--threads` threads; token choice
is lorasp-edge's own loop over each runtime's logits, as in `lorasp-edge generate`. Perplexity:
the first `--eval-tokens` tokens of the Python language reference, windows of 512. Agreement: the
share of 128 teacher-forced positions where the format's argmax is PyTorch fp32's greedy token
(lorasp_edge.export.agreement). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PROMPT = "Explain in a few sentences why the sky is blue."


def speed(stepper, prompt_ids: list[int], new_tokens: int, rounds: int) -> float:
    from lorasp_edge.generate import generate_ids

    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        count = sum(1 for _ in generate_ids(stepper, prompt_ids, new_tokens))
        best = max(best, count / (time.perf_counter() - started))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--formats", default="onnx,onnx-int8,onnx-int4,genai,genai-int4,gguf-f16,gguf-q8_0,gguf-q4_0")
    args = parser.parse_args()

    import torch

    from lorasp_edge.export import agreement, genai, llamacpp
    from lorasp_edge.export.gguf_file import write_gguf_file
    from lorasp_edge.export.hf import write_side_files
    from lorasp_edge.export.onnx_graph import ONNX_FILE, export_decoder, files_bytes
    from lorasp_edge.export.onnx_runtime import OnnxDecoder
    from lorasp_edge.export.quantize import quantize_decoder
    from lorasp_edge.export.verify import onnx_logits_fn, perplexity, torch_logits_fn
    from lorasp_edge.generate import OnnxStepper, encode_prompt

    torch.set_num_threads(args.threads)
    from lorasp_edge.models import load_model, load_tokenizer

    model = load_model(args.model, device="cpu", compute_dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    wanted = args.formats.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as scratch:
        root = Path(scratch)
        context = agreement.model_context(model, tokenizer, root, eval_tokens=args.eval_tokens)
        ids, window = context.ids, context.window
        prompt = ids[: agreement.PROMPT_TOKENS]
        continuation = agreement.greedy_continuation(model, prompt)
        prompt_ids = encode_prompt(tokenizer, PROMPT, chat=bool(getattr(tokenizer, "chat_template", None)))
        rows = [("PyTorch fp32 (reference)", "-", 4 * sum(p.numel() for p in model.parameters()), perplexity(torch_logits_fn(model), ids, window), 1.0)]

        onnx_dirs = {"onnx": root / "onnx"}
        onnx_dirs["onnx"].mkdir()
        export_decoder(model, onnx_dirs["onnx"])
        write_side_files(model, tokenizer, onnx_dirs["onnx"])
        for bits in ("int8", "int4"):
            if f"onnx-{bits}" in wanted or f"genai-{bits}" in wanted:
                onnx_dirs[f"onnx-{bits}"] = root / f"onnx-{bits}"
                onnx_dirs[f"onnx-{bits}"].mkdir()
                quantize_decoder(onnx_dirs["onnx"] / ONNX_FILE, onnx_dirs[f"onnx-{bits}"], {"int8": 8, "int4": 4}[bits])
                write_side_files(model, tokenizer, onnx_dirs[f"onnx-{bits}"])
        for name in [n for n in wanted if n.startswith("onnx")]:
            decoder = OnnxDecoder(onnx_dirs[name] / ONNX_FILE, threads=args.threads)
            rows.append((f"ONNX {name[5:] or 'fp32'} (onnxruntime)", speed(OnnxStepper(decoder), prompt_ids, args.new_tokens, args.rounds),
                         files_bytes(onnx_dirs[name]), perplexity(onnx_logits_fn(decoder), ids, window),
                         agreement.measure(onnx_logits_fn(decoder), prompt, continuation, 0).agreement))
        if genai.available():
            for name in [n for n in wanted if n.startswith("genai")]:
                folder = root / name
                folder.mkdir()
                source = onnx_dirs["onnx" + name[5:]]
                for item in source.iterdir():
                    os.link(item, folder / item.name)
                (folder / genai.GENAI_CONFIG).write_text(json.dumps(genai.genai_config(model.config, model.generation_config)))
                runtime = genai.GenaiModel(folder, threads=args.threads, max_length=len(prompt_ids) + args.new_tokens)
                probe = genai.GenaiModel(folder, threads=args.threads, max_length=window + 2)
                rows.append((f"genai {name[6:] or 'fp32'} (onnxruntime-genai)", speed(runtime, prompt_ids, args.new_tokens, args.rounds),
                             files_bytes(folder), perplexity(probe.logits, ids, window),
                             agreement.measure(probe.logits, prompt, continuation, 0).agreement))
        if llamacpp.available():
            for name in [n for n in wanted if n.startswith("gguf")]:
                type_name = name[5:]
                path = write_gguf_file(model, tokenizer, root / f"{name}.gguf", type_name)
                runtime = llamacpp.LlamaCppModel(path, context=max(window + 1, len(prompt) + len(continuation)), threads=args.threads)
                rows.append((f"GGUF {type_name} (llama.cpp)", speed(runtime, prompt_ids, args.new_tokens, args.rounds), path.stat().st_size,
                             perplexity(runtime.logits, ids, window), agreement.measure(runtime.logits, prompt, continuation, 0).agreement))

    print(f"# {args.model}: {args.new_tokens} new tokens, batch 1, {args.threads} threads, best of {args.rounds}; "
          f"perplexity on {len(ids)} held-out tokens; agreement over {len(continuation)} tokens")
    print("| format | tokens/s | size MB | perplexity | greedy agreement |")
    print("|---|---|---|---|---|")
    for name, rate, size, value, agreed in rows:
        rate = rate if isinstance(rate, str) else f"{rate:.1f}"
        print(f"| {name} | {rate} | {size / 1e6:.1f} | {value:.3f} | {agreed:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark the exporter on the bundled SmolLM2-135M: generation speed, file sizes, perplexity.

    python tools/bench_export.py [--adapter DIR] [--new-tokens 128] [--json out.json]

1. A small LoRA-SP adapter (2 optimizer steps, rank 8, all linear layers), unless --adapter names one.
2. `lorasp_edge.export.run.export` twice, with --quantize int8 and int4: merged HF model, fp32 ONNX and
   each quantized ONNX, verified; their manifests give file sizes and held-out perplexities.
3. Tokens/s of greedy generation of exactly --new-tokens tokens (EOS ignored) from one prompt, batch 1,
   CPU: onnxruntime through `lorasp_edge.generate` (what `lorasp-edge generate` runs) for fp32, int8 and
   int4, against PyTorch eager `generate` on the merged model. Best of --repeats runs after a warm-up.

Targets (the export issue): fp32 ONNX >= 1.5x PyTorch tokens/s; int8 perplexity within 2% of fp32;
int4 within 15%.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Write a short story about a robot who learns to paint."


def small_adapter(out_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from lorasp_edge.models import load_model

    from lorasp_edge.sources import resolve_model
    from lorasp_edge.train.adapter import LoRASPConfig, apply_lorasp, trainable_parameters
    from lorasp_edge.train.adapter_files import save_adapter
    from lorasp_edge.train.optim import LoRASPAdamW

    model = load_model("smollm2-135m", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    peft_model = apply_lorasp(model, LoRASPConfig(rank=8, alpha=16, seed=0))
    batch = tokenizer(["A robot learned to paint by watching the sunset over the harbour every evening."], return_tensors="pt").input_ids
    optimizer = LoRASPAdamW(trainable_parameters(peft_model), lr=1e-3)
    peft_model.train()
    for _ in range(2):
        peft_model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_adapter(peft_model.eval(), out_dir, {"base_model": "smollm2-135m", "base_quant_bits": None, "compute_dtype": "float32"})


def best_of(repeats: int, run) -> float:
    run()  # warm-up: session init, allocator, first-call kernels
    return min(_timed(run) for _ in range(repeats))


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def onnx_speed(folder: Path, prompt_ids: list[int], new_tokens: int, repeats: int) -> float:
    from lorasp_edge.export.onnx_runtime import OnnxDecoder
    from lorasp_edge.generate import OnnxStepper, generate_ids

    decoder = OnnxDecoder(folder / "model.onnx")
    seconds = best_of(repeats, lambda: list(generate_ids(OnnxStepper(decoder), prompt_ids, new_tokens)))
    return new_tokens / seconds


def pytorch_speed(hf_dir: Path, prompt_ids: list[int], new_tokens: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])

    def run():
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return new_tokens / best_of(repeats, run)


def main() -> int:
    from transformers import AutoTokenizer

    from lorasp_edge.export.run import ExportSettings, export

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="adapter trained on smollm2-135m (default: a 2-step one made here)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, help="folder for the adapter and exports (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-export-"))
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    adapter = args.adapter or small_adapter(work / "adapter")
    manifests = {}
    for quantize in ("int8", "int4"):
        say(f"== export --quantize {quantize}")
        report = export(ExportSettings(adapter=adapter, out=work / f"export-{quantize}", quantize=quantize), progress=say)
        manifests[quantize] = report.manifest
    exports = {name: work / f"export-{name}" for name in manifests}

    tokenizer = AutoTokenizer.from_pretrained(exports["int8"] / "onnx")
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    say(f"== generation speed, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    speed = {
        "pytorch": pytorch_speed(exports["int8"] / "hf", prompt_ids, args.new_tokens, args.repeats),
        "onnx": onnx_speed(exports["int8"] / "onnx", prompt_ids, args.new_tokens, args.repeats),
        "onnx-int8": onnx_speed(exports["int8"] / "onnx-int8", prompt_ids, args.new_tokens, args.repeats),
        "onnx-int4": onnx_speed(exports["int4"] / "onnx-int4", prompt_ids, args.new_tokens, args.repeats),
    }
    perplexity = {**manifests["int8"]["perplexity"], "onnx-int4": manifests["int4"]["perplexity"]["onnx-int4"]}
    sizes = {**manifests["int8"]["files"], "onnx-int4": manifests["int4"]["files"]["onnx-int4"]}
    rows = [("pytorch", "hf"), ("onnx", "onnx"), ("onnx-int8", "onnx-int8"), ("onnx-int4", "onnx-int4")]
    print(f"{'model':<11} {'tokens/s':>9} {'x pytorch':>9} {'size MB':>9} {'perplexity':>10} {'x fp32':>7}")
    for name, size_key in rows:
        ratio = perplexity[name] / perplexity["onnx"]
        print(f"{name:<11} {speed[name]:9.1f} {speed[name] / speed['pytorch']:9.2f} {sizes[size_key] / 1e6:9.1f} {perplexity[name]:10.2f} {ratio:7.3f}")
    targets = {
        "fp32 onnx >= 1.5x pytorch tokens/s": speed["onnx"] >= 1.5 * speed["pytorch"],
        "int8 perplexity within 2% of fp32": perplexity["onnx-int8"] <= 1.02 * perplexity["onnx"],
        "int4 perplexity within 15% of fp32": perplexity["onnx-int4"] <= 1.15 * perplexity["onnx"],
    }
    for target, met in targets.items():
        print(f"{'met ' if met else 'MISSED'} {target}")
    if args.json:
        args.json.write_text(json.dumps({"new_tokens": args.new_tokens, "tokens_per_s": speed, "bytes": sizes,
                                         "perplexity": perplexity, "targets": targets}, indent=2) + "\n")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Write a model as GGUF in several types and check each in llama.cpp against PyTorch.

    python tools/verify_gguf.py [--model smollm2-135m] [--types f16,q8_0,q4_0] [--install]
    python tools/verify_gguf.py --adapter DIR [--types f16]      # an --adapter-only export's files

For each type: the checks `lorasp-edge export --format gguf` runs (lorasp_edge.export.gguf:
tokenizer, f16 logits within tolerance, 16 greedy tokens, greedy agreement over 128 teacher-forced
tokens, held-out perplexity against PyTorch's), printed as one table row. `--model` takes what
`lorasp-edge export --model` takes, including a merged export's hf/ folder. With `--adapter`, each
row is the unmerged base (as trained, a 4/8-bit base dequantized) in that type plus the adapter as
a llama.cpp LoRA GGUF applied at run time, checked against the unmerged PEFT model, as
`lorasp-edge export --adapter-only --format gguf` does. llama-cpp-python has
no binary wheel on PyPI; `--install` runs `pip install llama-cpp-python==LLAMA_CPP_VERSION`, which
builds llama.cpp from source (about 20 minutes on 2 busy cores here).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--adapter", type=Path, help="a LoRA-SP adapter folder: check base GGUF + LoRA adapter GGUF")
    parser.add_argument("--install", action="store_true", help="pip install (build) llama-cpp-python first when it is missing")
    args = parser.parse_args()

    from lorasp_edge.export import llamacpp

    if not llamacpp.available():
        if not args.install:
            print(f"llama-cpp-python is not installed: {llamacpp.INSTALL_HINT}, or pass --install", file=sys.stderr)
            return 2
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True)
        print(f"built and installed llama-cpp-python in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    import llama_cpp
    import torch

    from lorasp_edge.errors import VerificationError
    from lorasp_edge.export.context import model_context
    from lorasp_edge.export.gguf import verify_gguf
    from lorasp_edge.export.gguf_file import write_gguf_file
    from lorasp_edge.export.sources.weights import ModelWeights
    from lorasp_edge.models import load_model, load_tokenizer

    lora = None
    if args.adapter is not None:
        from lorasp_edge.export import gguf_adapter
        from lorasp_edge.export.sources.adapter import unmerged_base
        from lorasp_edge.train.adapter_files import load_adapter, read_adapter_info

        info = read_adapter_info(args.adapter)
        args.model = info.get("base_model") or args.model
        base = load_model(args.model, quant_bits=info.get("base_quant_bits"), device="cpu", compute_dtype=torch.float32)
        model = load_adapter(base, args.adapter).eval()  # the reference: unmerged, as trained
    else:
        model = load_model(args.model, device="cpu", compute_dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    print(f"# {args.model}{f' + adapter {args.adapter} (unmerged)' if args.adapter else ''}, llama-cpp-python {llama_cpp.__version__}, "
          f"{args.eval_tokens} held-out tokens (Python language reference)")
    print("| type | size MB | max logit diff / scale | 16 greedy tokens equal | agreement (128) | perplexity | x PyTorch | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="verify-gguf-") as folder:
        context = model_context(model, tokenizer, Path(folder), eval_tokens=args.eval_tokens)
        if args.adapter is not None:
            plain = unmerged_base(model)
            lora = gguf_adapter.write_lora_gguf(model, Path(folder) / gguf_adapter.ADAPTER_FILE)
            print(f"adapter file: {lora.stat().st_size / 1e6:.2f} MB (f32 A and B)")
        label = "+lora" if lora is not None else ""
        for type_name in args.types.split(","):
            written = plain if lora else model
            path = write_gguf_file(written.config, ModelWeights(written), tokenizer, Path(folder) / f"model-{type_name}.gguf", type_name)
            record, verdict = {}, "pass"
            try:
                verify_gguf(path, type_name, context, record, lora=lora)
            except VerificationError as error:
                verdict = f"FAIL: {error}"
                failed += 1
            logits = record.get("logits", {})
            agreed = record.get("agreement", {})
            print(
                f"| {type_name}{label} | {path.stat().st_size / 1e6:.1f} | {logits.get('relative_diff', float('nan')):.2e} | "
                f"{record.get('greedy_equal', '-')} | {agreed.get('agreement', float('nan')):.1%} | "
                f"{context.manifest['perplexity'].get(f'gguf-{type_name}{label}', float('nan')):.3f} | "
                f"{record.get('perplexity_ratio', float('nan')):.3f} | {verdict} |",
                flush=True,
            )
            path.unlink()
    print(f"\nPyTorch fp32 perplexity{' (unmerged PEFT model)' if lora else ''}: {context.manifest['perplexity']['pytorch']:.3f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

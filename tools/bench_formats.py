"""Every export format side by side on one model: generation speed, time to first token, file
size, held-out perplexity and greedy agreement with PyTorch.

    python tools/bench_formats.py [--model smollm2-135m] [--threads 2] [--new-tokens 128] [--repeats 5]
                                  [--ttft-tokens 512] [--formats onnx,onnx-int4,...] [--write-docs docs/export.md]
                                  [--block-size 32] [--accuracy-level 4] [--keep-8bit v_proj,up_proj,down_proj]

Formats: ONNX fp32/int8/int4 (onnxruntime through `lorasp-edge generate`'s loop), onnxruntime-genai
fp32/int8/int4 (the same graph files), GGUF f16/q8_0/q4_0 (llama.cpp through llama-cpp-python); a
runtime that is not installed is skipped. The ONNX graphs are written by the exporter's own builder
(`onnx_build.build_decoder`); `--block-size`, `--accuracy-level`, `--keep-8bit` (`none`: every
linear layer at 4 bits) and `--head-bits` change the quantized ones, to measure the choices the exporter makes.
`onnx-numpy`, `onnx-int8-numpy` and `onnx-int4-numpy` (not in the default list) run the same graphs
with a growing KV cache passed through numpy every step instead of `generate`'s cache updated in
place in onnxruntime (`BoundDecoder`), so the two are compared in one run; their greedy ids must
be the bound stepper's (else the tool exits 1).

Speed: batch 1, greedy, `--new-tokens` tokens after a chat prompt (EOS does not stop it), prefill
included, the median of `--repeats` runs after one warm-up run, each runtime limited to
`--threads` threads; token choice is lorasp-edge's own loop over each runtime's logits, as in
`lorasp-edge generate`. Read-bound ceiling: the machine's memory read bandwidth (`read_bandwidth`,
`--threads` threads) over the file's bytes, what a decode could reach if reading each weight once a
token were all it did; a format's speed against its own ceiling shows how much of a gap to another
format is the bytes each reads. Time to first token: the median of `--repeats` prefills of the first
`--ttft-tokens` held-out tokens (after one warm-up) up to the argmax of the last position's logits.
Perplexity: the first `--eval-tokens` tokens of the Python language reference, windows of 512.
Agreement: the share of 128 teacher-forced positions where the format's argmax is PyTorch fp32's
greedy token (lorasp_edge.export.agreement). Prints a Markdown table, the ONNX int8/int4 speed
over llama.cpp's at the same bits (f16, q8_0, q4_0), `generate` over onnxruntime-genai on the same
file and the bound ONNX stepper's over the numpy one, from the same run;
`--write-docs FILE` also puts them into FILE between the lines MARK_START and MARK_END.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "Explain in a few sentences why the sky is blue."
MARK_START = "<!-- bench_formats: start -->"
MARK_END = "<!-- bench_formats: end -->"
# (row, reference row) pairs whose speed ratio the targets name: ONNX against llama.cpp at the same
# bits, and `generate` against onnxruntime-genai on the same file
RATIOS = (("onnx", "gguf-f16"), ("onnx-int8", "gguf-q8_0"), ("onnx-int4", "gguf-q4_0"),
          ("onnx", "genai"), ("onnx-int8", "genai-int8"), ("onnx-int4", "genai-int4"))
NUMPY = "-numpy"  # suffix of the rows run by NumpyStepper


class NumpyStepper:
    """An ONNX stepper without I/O binding: every step feeds the whole cache in as numpy arrays and
    gets the grown cache back as new ones."""

    def __init__(self, decoder):
        self.decoder = decoder

    def prefill(self, token_ids: list[int]):
        ids = np.asarray([token_ids], dtype=np.int64)
        self.length = len(token_ids)
        logits, self.past = self.decoder(ids, np.ones_like(ids), np.arange(self.length)[None], self.decoder.empty_cache(1))
        return logits[0, -1]

    def step(self, token_id: int):
        self.length += 1
        logits, self.past = self.decoder(np.asarray([[token_id]]), np.ones((1, self.length), np.int64), np.asarray([[self.length - 1]]), self.past)
        return logits[0, -1]


def speed(stepper, prompt_ids: list[int], new_tokens: int, repeats: int) -> tuple[float, list[int]]:
    """Median tokens/s of `repeats` greedy generations of `new_tokens` (after one warm-up run), and the ids."""
    from lorasp_edge.generate import generate_ids

    rates = []
    for run in range(repeats + 1):
        started = time.perf_counter()
        ids = list(generate_ids(stepper, prompt_ids, new_tokens))
        if run:
            rates.append(len(ids) / (time.perf_counter() - started))
    return statistics.median(rates), ids


def first_token_seconds(stepper, prompt_ids: list[int], repeats: int) -> float:
    """Median seconds of `repeats` prefills of `prompt_ids` up to the first token (after one warm-up)."""
    times = []
    for run in range(repeats + 1):
        started = time.perf_counter()
        int(np.argmax(stepper.prefill(prompt_ids)))
        if run:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def read_bandwidth(threads: int, gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second this machine reads from memory with `threads` threads: the median of `repeats`
    sums over a float32 array much larger than any cache (torch's reduction, vectorized and threaded)."""
    import torch

    torch.set_num_threads(threads)
    values = torch.ones(int(gigabytes * 1e9) // 4)
    values.sum()  # pages touched, threads started
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        values.sum()
        times.append(time.perf_counter() - start)
    return values.numel() * 4 / statistics.median(times)


def table(rows: list[tuple], header: str, ttft_tokens: int, bandwidth: float | None = None) -> str:
    """The Markdown table, then the speed ratios the targets name and those of the bound ONNX
    stepper over the numpy one (rows keyed by format name)."""
    ceiling = bandwidth is not None
    lines = [header, "", f"| format | tokens/s | first token, {ttft_tokens}-token prompt (ms) | size MB | perplexity | greedy agreement |"
             + (" read-bound ceiling, tokens/s |" if ceiling else ""), "| --- | --- | --- | --- | --- | --- |" + (" --- |" if ceiling else "")]
    for key, name, rate, seconds, size, value, agreed in rows:
        rate = rate if isinstance(rate, str) else f"{rate:.1f}"
        seconds = seconds if isinstance(seconds, str) else f"{1000 * seconds:.0f}"
        bound = f" {bandwidth / size:.1f} |" if ceiling and key != "pytorch" else (" - |" if ceiling else "")
        lines.append(f"| {name} | {rate} | {seconds} | {size / 1e6:.1f} | {value:.3f} | {agreed:.1%} |{bound}")
    rates = {key: rate for key, _name, rate, *_ in rows if not isinstance(rate, str)}
    ratios = [f"{ours} / {theirs}: {rates[ours] / rates[theirs]:.2f}x" for ours, theirs in RATIOS if ours in rates and theirs in rates]
    if ratios:
        lines += ["", "Speed ratios in this run: " + "; ".join(ratios) + " (targets: >= 1.0x)."]
    bound = [f"{key}: {rates[key] / rates[key + NUMPY]:.2f}x" for key in rates if key + NUMPY in rates]
    if bound:
        lines += ["", "ONNX tokens/s, I/O-bound stepper over the numpy one: " + "; ".join(bound) + "."]
    if ceiling:
        lines += ["", f"Memory read bandwidth in this run: {bandwidth / 1e9:.1f} GB/s ({read_bandwidth.__name__}); the ceiling is "
                  "that over the file's bytes, the rate of a decode that reads every weight once a token and does nothing else."]
    return "\n".join(lines) + "\n"


def write_into(path: Path, text: str) -> None:
    """Replace what lies between MARK_START and MARK_END in `path` (both lines must be there)."""
    from lorasp_edge.files import write_text_atomic

    document = path.read_text()
    start, end = document.find(MARK_START), document.find(MARK_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: needs the lines {MARK_START} and {MARK_END} around the table")
    write_text_atomic(path, document[: start + len(MARK_START)] + "\n" + text + document[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per format (the median is reported)")
    parser.add_argument("--write-docs", type=Path, help="also write the table into this file between the markers")
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--ttft-tokens", type=int, default=512, help="prompt length for the time to first token")
    parser.add_argument("--formats", default="onnx,onnx-int8,onnx-int4,genai,genai-int8,genai-int4,gguf-f16,gguf-q8_0,gguf-q4_0")
    parser.add_argument("--block-size", type=int, default=32, help="MatMulNBits block size of the int8/int4 graphs")
    parser.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level of the int8/int4 graphs")
    parser.add_argument("--llama-extra-buffers", choices=("on", "off"), default="on",
                        help="llama.cpp's repacked weight buffers (AVX512/AMX kernels); 'off' where they crash")
    parser.add_argument("--keep-8bit", help="linear layers an int4 graph keeps at 8 bits, comma-separated or 'none' "
                        "(default: the exporter's mix)")
    parser.add_argument("--head-bits", type=int, choices=(4, 8), default=8,
                        help="bits of the lm_head and the vocabulary table in the int8/int4 graphs (default: 8, the exporter's)")
    args = parser.parse_args()

    import torch

    from lorasp_edge.export import agreement, genai, llamacpp
    from lorasp_edge.export.context import model_context
    from lorasp_edge.export.gguf_file import write_gguf_file
    from lorasp_edge.export.sources.weights import ModelWeights
    from lorasp_edge.export.hf import write_side_files
    from lorasp_edge.export.onnx_build import Quantization, build_decoder
    from lorasp_edge.export.onnx_graph import ONNX_FILE, files_bytes
    from lorasp_edge.export.onnx_runtime import OnnxDecoder
    from lorasp_edge.export.quantize import INT4_KEEP_8BIT
    from lorasp_edge.export.verify import onnx_logits_fn, perplexity, torch_logits_fn
    from lorasp_edge.generate import OnnxStepper, encode_prompt

    torch.set_num_threads(args.threads)
    from lorasp_edge.models import load_model, load_tokenizer

    model = load_model(args.model, device="cpu", compute_dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    wanted = args.formats.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as scratch:
        root = Path(scratch)
        context = model_context(model, tokenizer, root, eval_tokens=args.eval_tokens)
        ids, window = context.ids, context.window
        prompt, continuation = ids[: agreement.PROMPT_TOKENS], context.reference_continuation()
        prompt_ids = encode_prompt(tokenizer, PROMPT, chat=bool(getattr(tokenizer, "chat_template", None)))
        long_ids = ids[: args.ttft_tokens]
        if len(long_ids) < args.ttft_tokens:
            raise SystemExit(f"--ttft-tokens {args.ttft_tokens}: the held-out text gives {len(long_ids)} tokens (raise --eval-tokens)")
        rows = [("pytorch", "PyTorch fp32 (reference)", "-", "-", 4 * sum(p.numel() for p in model.parameters()),
                 perplexity(torch_logits_fn(model), ids, window), 1.0)]
        greedy_ids = {}  # ONNX row -> its greedy ids in the speed runs

        keep = INT4_KEEP_8BIT if args.keep_8bit is None else tuple(part for part in args.keep_8bit.split(",") if part != "none")
        capacity = max(len(prompt_ids) + args.new_tokens, len(long_ids))  # the KV cache `generate` would allocate
        onnx_dirs = {}
        weights = ModelWeights(model)
        for variant, bits in (("onnx", None), ("onnx-int8", 8), ("onnx-int4", 4)):
            if {variant, variant + NUMPY, "genai" + variant[4:]} & set(wanted):
                onnx_dirs[variant] = root / variant
                quantization = Quantization(bits, args.block_size, args.accuracy_level, keep, args.head_bits) if bits else None
                build_decoder(model.config, weights, onnx_dirs[variant], quantization)
                write_side_files(model, tokenizer, onnx_dirs[variant])
        quality = {}  # graph folder -> (perplexity, agreement): the same numbers for either stepper
        for name in [n for n in wanted if n.startswith("onnx")]:
            graph = name.removesuffix(NUMPY)
            decoder = OnnxDecoder(onnx_dirs[graph] / ONNX_FILE, threads=args.threads)
            stepper = NumpyStepper(decoder) if name.endswith(NUMPY) else OnnxStepper(decoder, capacity)
            rate, greedy_ids[name] = speed(stepper, prompt_ids, args.new_tokens, args.repeats)
            if graph in quality:
                scores = quality[graph]
            else:
                scores = quality[graph] = (perplexity(onnx_logits_fn(decoder), ids, window),
                                           agreement.measure(onnx_logits_fn(decoder), prompt, continuation, 0).agreement)
            label = f"ONNX {graph[5:] or 'fp32'} (onnxruntime{', numpy cache' if name.endswith(NUMPY) else ''})"
            rows.append((name, label, rate, first_token_seconds(stepper, long_ids, args.repeats), files_bytes(onnx_dirs[graph]), *scores))
            del decoder, stepper
        mismatched = [name for name in greedy_ids if name.endswith(NUMPY) and name[: -len(NUMPY)] in greedy_ids
                      and greedy_ids[name] != greedy_ids[name[: -len(NUMPY)]]]
        if genai.available():
            for name in [n for n in wanted if n.startswith("genai")]:
                folder = root / name
                folder.mkdir()
                source = onnx_dirs["onnx" + name[5:]]
                for item in source.iterdir():
                    os.link(item, folder / item.name)
                (folder / genai.GENAI_CONFIG).write_text(json.dumps(genai.genai_config(model.config, model.generation_config)))
                runtime = genai.GenaiModel(folder, threads=args.threads, max_length=max(len(prompt_ids) + args.new_tokens, len(long_ids) + 1))
                probe = genai.GenaiModel(folder, threads=args.threads, max_length=window + 2)
                rows.append((name, f"genai {name[6:] or 'fp32'} (onnxruntime-genai)", speed(runtime, prompt_ids, args.new_tokens, args.repeats)[0],
                             first_token_seconds(runtime, long_ids, args.repeats), files_bytes(folder), perplexity(probe.logits, ids, window),
                             agreement.measure(probe.logits, prompt, continuation, 0).agreement))
        if llamacpp.available():
            for name in [n for n in wanted if n.startswith("gguf")]:
                type_name = name[5:]
                path = write_gguf_file(model.config, ModelWeights(model), tokenizer, root / f"{name}.gguf", type_name)
                runtime = llamacpp.LlamaCppModel(path, context=max(window + 1, len(prompt) + len(continuation), len(long_ids)), threads=args.threads,
                                                 extra_buffers=args.llama_extra_buffers == "on")
                rows.append((name, f"GGUF {type_name} (llama.cpp)", speed(runtime, prompt_ids, args.new_tokens, args.repeats)[0],
                             first_token_seconds(runtime, long_ids, args.repeats), path.stat().st_size,
                             perplexity(runtime.logits, ids, window), agreement.measure(runtime.logits, prompt, continuation, 0).agreement))

    load = os.getloadavg()[0]
    header = (f"{args.model}: {args.new_tokens} new tokens, batch 1, {args.threads} threads, median of {args.repeats} runs; "
              f"perplexity on {len(ids)} held-out tokens; agreement over {len(continuation)} tokens; "
              f"load average {load:.1f} on {os.cpu_count()} CPUs when it ended.")
    if any(name.startswith("gguf") for name in wanted) and args.llama_extra_buffers == "off":
        header += " llama.cpp without its repacked weight buffers (--llama-extra-buffers off)."
    if {"onnx-int8", "onnx-int4"} & set(wanted):
        header += (f" ONNX int8/int4: MatMulNBits block {args.block_size}, accuracy level {args.accuracy_level}; "
                   f"int4 keeps {', '.join(keep) or 'no linear layer'} at 8 bits; the lm_head at {args.head_bits} bits.")
    text = table(rows, header, args.ttft_tokens, read_bandwidth(args.threads))
    print(text, end="")
    if mismatched:
        print(f"greedy ids of the numpy stepper differ from the bound one's: {', '.join(mismatched)}")
        return 1
    if args.write_docs is not None:
        write_into(args.write_docs, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

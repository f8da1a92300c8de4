"""The `lorasp-edge` command: parse, call one library function per subcommand, print.

    lorasp-edge plan      what fits in a memory budget        -> plan.json
    lorasp-edge train     LoRA-SP fine-tuning within a plan   -> adapter + checkpoints
    lorasp-edge export    merge + verified ONNX               -> merged HF model + model.onnx
    lorasp-edge generate  run an exported model with onnxruntime
    lorasp-edge quantize  write a 4/8-bit base once               -> a folder train/export load small

Errors in the user's input print one line and exit non-zero (2: bad input, 3: over the memory
budget, 4: export verification failed, 5: training stopped on non-finite steps); they never print a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lorasp_edge.errors import UserError
from lorasp_edge.export.formats import FORMATS
from lorasp_edge.plan.memory import INITS
from lorasp_edge.plan.search import DEFAULT_INIT, PREFERENCES

PREFER_HELP = (
    "what spare memory goes to: speed (default: rank at most 16, where the quality evidence stops, then no "
    "checkpointing and larger micro-batches), quality (rank up to 64 first), memory (the smallest peak at the best "
    "coverage: lowest bits, checkpointing, micro-batch 1)"
)

LORA_INIT_HELP = (
    f"LoRA-SP's start (default {DEFAULT_INIT}): offset gives B random values, so the frozen half of B carries "
    "information too, and subtracts their product B0 A0 so the model starts as the base (the adapter holds "
    "twice the rank, as many entries trained; docs/results.md); zeros is LoRA's B = 0"
)


class _Parser(argparse.ArgumentParser):
    """argparse, with a one-line error instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------- plan


def _add_plan(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="choose a fine-tuning setting that fits a memory budget",
        description=(
            "Choose the LoRA-SP setting (base bits, rank, target modules, adapted layers, checkpointing, micro-batch) "
            "with the best quality proxy whose predicted peak memory fits the budget with headroom, print it with its "
            "memory by component and write the plan file the trainer reads. Exit code 2 when nothing fits, with the "
            "smallest budget that would. Measured against real steps (tools/validate_planner.py, CPU, held-out points): "
            "median |error| 7.6%, worst 16.8%, none under-predicting by more than 5.7% (models up to 200M parameters); "
            "catalog models at size (tools/big_model_run.py): median 3.2%, worst 8.8%, none under by more than 2.8%. "
            "Not measured on CUDA. Every point is in docs/planner.md."
        ),
    )
    parser.add_argument("--mem", help="memory budget: 8GB, 8G, 7.5 GB, 8192MB (GB = 10^9 bytes) or 8GiB, 512MiB (GiB = 2^30); overrides --profile's")
    parser.add_argument("--model", help="catalog id (see docs/planner.md, e.g. qwen2.5-0.5b) or a local folder with config.json (default: smollm2-135m)")
    parser.add_argument("--profile", help="device profile name or YAML file: sets the budget, device kind, bf16 and quantization support")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 512)")
    parser.add_argument("--batch", type=int, help="effective batch in sequences per optimizer step, over all ranks (default 8)")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks; memory is planned per rank (default 1)")
    parser.add_argument("--headroom", type=float, default=0.10, help="share of the budget kept free (default 0.10)")
    parser.add_argument("--prefer", choices=PREFERENCES, default="speed", help=PREFER_HELP)
    parser.add_argument("--lora-init", choices=INITS, default=None, help=LORA_INIT_HELP)
    parser.add_argument("--out", type=Path, default=Path("plan.json"), help="plan file to write (default plan.json)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    parser.add_argument("--list-profiles", action="store_true", help="list the bundled device profiles and exit")
    parser.set_defaults(run=_run_plan)


def _run_plan(args) -> int:
    from lorasp_edge.plan.profiles import format_profiles, list_profiles
    from lorasp_edge.plan.search import format_plan, plan_training

    if args.list_profiles:
        print(format_profiles(list_profiles()))
        return 0
    plan = plan_training(
        model=args.model,
        budget_bytes=_memory_argument(args.mem) if args.mem is not None else None,
        profile=args.profile,
        seq_len=args.seq_len,
        batch=args.batch,
        world_size=args.world_size,
        headroom=args.headroom,
        prefer=args.prefer,
        init=args.lora_init,
    )
    try:
        plan.to_json(args.out)
    except OSError as error:
        raise UserError(f"--out {args.out}: cannot write ({error.strerror or error})") from None
    if args.json:
        print(plan.to_json(), end="")
    else:
        print(format_plan(plan))
        print(f"\nplan written to {args.out}")
    return 0


# --------------------------------------------------------------------------------------- train


def _setting_help(name: str) -> str:
    """A TrainSettings field's help text with its default, for the flag of the same name."""
    from dataclasses import MISSING, fields

    from lorasp_edge.train.settings import TrainSettings

    field = next(item for item in fields(TrainSettings) if item.name == name)
    default = "" if field.default is MISSING or field.default is None or isinstance(field.default, bool) else f" (default {field.default:g})"
    return field.metadata.get("help", name).replace("%", "%%") + default


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune with LoRA-SP within a memory plan",
        description=(
            "Fine-tune a causal LM with LoRA-SP (LoRA with half of each adapter matrix frozen at random) from a "
            "streamed data file, inside a memory plan. Data: JSONL with 'text', 'prompt'/'completion' (loss on the "
            "completion only) or chat 'messages'; or plain .txt. Writes DIR/adapter (PEFT-loadable), DIR/plan.json, "
            "DIR/metrics.jsonl, DIR/loss.png, DIR/summary.json and DIR/checkpoint.pt. Under torchrun it trains "
            "data-parallel (one adapter, gradients averaged over ranks)."
        ),
    )
    parser.add_argument("--model", help="base model: a bundled alias (smollm2-135m), a local HF folder or a hub id (default: the plan's model)")
    parser.add_argument("--data", required=True, type=Path, help="training data (.jsonl or .txt), read lazily")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--plan", type=Path, help="plan file from 'lorasp-edge plan'")
    budget.add_argument("--mem", help="plan here for this memory budget (e.g. 8GB, 6GiB); default: free memory")
    parser.add_argument("--seq-len", type=int, help="tokens per block when planning here (default: the planner's)")
    parser.add_argument("--batch", type=int, help="effective batch in blocks when planning here")
    parser.add_argument("--prefer", choices=PREFERENCES, help="when planning here: " + PREFER_HELP)
    parser.add_argument("--eval-data", type=Path, help="held-out data: eval loss every --eval-every steps and at the end")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (on --resume: a larger total stretches the schedule to end there)")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1; steps estimated from the file size)")
    # Setting flags default to None so that --resume can tell a flag given from one left out; their
    # defaults and help come from TrainSettings, the one place they are written.
    for name, kind in (("lr", float), ("weight_decay", float), ("warmup_steps", int), ("max_grad_norm", float), ("seed", int),
                       ("shuffle_buffer", int), ("save_every", int), ("eval_every", int), ("redraw_every", int),
                       ("max_nonfinite_steps", int)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=_setting_help(name))
    parser.add_argument("--skip-bad-lines", action="store_true", default=None, help=_setting_help("skip_bad_lines"))
    parser.add_argument("--compile", action="store_true", default=None, help=_setting_help("compile"))
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, exactly; changed flags are applied with a note or refused")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that is not empty and was not written by lorasp-edge train, or start over the run in it (its checkpoint is deleted)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_train)


TRAIN_SETTING_FLAGS = (
    "steps", "epochs", "lr", "weight_decay", "warmup_steps", "max_grad_norm", "seed", "shuffle_buffer", "save_every",
    "eval_every", "redraw_every", "max_nonfinite_steps", "skip_bad_lines", "compile",
)


def _run_train(args) -> int:
    from lorasp_edge.train.job import TrainRequest, run_training
    from lorasp_edge.train.report import format_summary
    from lorasp_edge.train.settings import TrainSettings

    if args.prefer and (args.plan or args.resume):
        raise UserError(f"--prefer applies only when train plans here: {'--plan' if args.plan else 'the run being resumed'} already fixes the plan")
    given = {name: getattr(args, name) for name in TRAIN_SETTING_FLAGS if getattr(args, name) is not None}
    request = TrainRequest(
        data=args.data,
        out=args.out,
        model=args.model,
        plan=args.plan,
        mem_bytes=_memory_argument(args.mem) if args.mem else None,
        seq_len=args.seq_len,
        batch=args.batch,
        prefer=args.prefer or "speed",
        eval_data=args.eval_data,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        settings=TrainSettings(**given),
        given=frozenset(given),
    )
    if given.get("max_grad_norm") == 0:
        print("lorasp-edge train: --max-grad-norm 0: gradients are not clipped", file=sys.stderr)
    summary = run_training(request, progress=not args.no_progress, note=lambda line: print(f"lorasp-edge train: resume: {line}", file=sys.stderr))
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    if summary.get("stopped") in ("SIGINT", "SIGTERM"):
        print(f"stopped by {summary['stopped']} at step {summary['steps']}: checkpoint written; continue with: {summary['resume_command']}", file=sys.stderr)
        return 130 if summary["stopped"] == "SIGINT" else 143
    return 0


def _memory_argument(text: str) -> int:
    from lorasp_edge.plan.units import parse_memory

    return parse_memory(text)


# -------------------------------------------------------------------------------------- export


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="merge an adapter and export a verified ONNX model",
        description=(
            "Merge base + LoRA-SP adapter in fp32 (a 4/8-bit base is dequantized, as trained) and write OUT/hf "
            "(Hugging Face folder), OUT/onnx (KV-cache decoder, optimum's names) and OUT/manifest.json. "
            "onnxruntime is checked against PyTorch on every run; a failed check exits 4 and writes nothing. "
            "Exporting into an earlier export replaces only the formats written now and keeps the others."
        ),
    )
    parser.add_argument("--adapter", required=True, type=Path, help="adapter folder written by `lorasp-edge train`")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--model", help="base model (bundled alias, local folder or hub id); default: the one the adapter names")
    parser.add_argument("--format", help="formats to write, comma-separated: " + "; ".join(f"{name}: {item.description}" for name, item in FORMATS.items()) + "; both = hf,onnx (default: both)")
    parser.add_argument("--quantize", choices=["none", "int8", "int4"],
                        help="also write OUT/onnx-int8 or OUT/onnx-int4 (MatMulNBits weight-only; default: none)")
    parser.add_argument("--block-size", type=int, help="quantization block size (default: 32)")
    parser.add_argument("--keep-8bit", help="--quantize int4: linear layers kept at 8 bits, comma-separated, or 'none' "
                        "(default: v_proj,down_proj,up_proj, the quality mix; 'none' is llama.cpp q4_0's bits: smaller and faster, "
                        "higher perplexity; docs/export.md)")
    parser.add_argument("--gguf-type", help="--format gguf: f16, bf16, f32, q8_0, q5_1, q5_0, q4_1 or q4_0 (default: f16)")
    parser.add_argument("--opset", type=int, help="ONNX opset, 14-20 (default: 17)")
    parser.add_argument("--eval-text", type=Path, help="held-out text file for perplexity (default: the Python language reference)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="no merge: write the adapter for a runtime that applies it, beside the base as trained (--format gguf: llama.cpp --lora)")
    parser.add_argument("--mem", help="memory budget, e.g. 8GB or 6GiB: the export reads the weights in memory when its estimate fits, else streamed from "
                        "the base's shards; exit 2 with the estimate before any work if neither fits (default: the memory available)")
    parser.add_argument("--source", choices=["auto", "memory", "streamed"],
                        help="where the merged weights come from: auto (default: in memory when the estimate fits the budget, else streamed), memory, streamed")
    parser.add_argument("--min-agreement", type=float, help="lowest greedy agreement with the merged model that a quantized ONNX, genai or GGUF export may show (default 0.95 for 8/16-bit, 0.70 for 4-bit; random-weight models have near-tied logits and need 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out that is not an earlier export, or drop the formats of an earlier export not written now: everything in --out is replaced")
    parser.set_defaults(run=_run_export)


def _run_export(args) -> int:
    import signal
    import threading

    from lorasp_edge.export.output import record_folder
    from lorasp_edge.export.run import ExportSettings, export

    # Options left out take ExportSettings' defaults (the one place they are written).
    options = {name: getattr(args, name) for name in ("format", "quantize", "block_size", "keep_8bit", "gguf_type", "opset", "mem", "source", "min_agreement") if getattr(args, name) is not None}
    settings = ExportSettings(adapter=args.adapter, out=args.out, model=args.model, eval_text=args.eval_text, adapter_only=args.adapter_only,
                              overwrite=args.overwrite, **options)
    terminated = []  # set before the raise: an import interrupted by it surfaces as ImportError

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the cleanup short
        terminated.append(signum)
        raise KeyboardInterrupt  # unwinds like Ctrl-C, so the export's cleanup runs

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        report = export(settings, progress=lambda message: print(message, file=sys.stderr, flush=True))
    except BaseException:
        if not terminated:
            raise
        print(f"lorasp-edge export: stopped by SIGTERM; nothing half-written was left in or beside {args.out}", file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    manifest = report.manifest
    print(f"exported to {report.out} in {report.seconds:.0f} s")
    if report.replaced:
        print(f"  replaced: {', '.join(report.replaced)}")
    if report.kept:
        print(f"  kept from the earlier export: {', '.join(report.kept)}")
    if report.removed:
        print(f"  removed (--overwrite): {', '.join(report.removed)}")
    for name, size in manifest["files"].items():
        if name != "fp32_parameters":
            kept = " (kept)" if record_folder("files", name) in report.kept else ""
            print(f"  {name:<10} {size / 1e6:9.1f} MB{kept}")
    for name, check in manifest["verification"].items():
        print(f"  {name:<10} {_check_line(check)}")
    for name, value in manifest["perplexity"].items():
        if isinstance(value, float):
            print(f"  perplexity {name:<10} {value:.2f}")
    return 0


def _check_line(check: dict) -> str:
    """One manifest verification record as a line: logit difference, greedy agreement, perplexity."""
    logits = check.get("logits", check)
    parts = []
    if "max_abs_diff" in logits:
        parts.append(f"max |logit diff| {logits['max_abs_diff']:.2e} ({logits['relative_diff']:.2e} of scale)")
    if "agreement" in check:
        parts.append(f"greedy agreement {check['agreement']['agreement']:.1%} over {check['agreement']['positions']} tokens")
    elif "greedy_agreement" in check:
        parts.append(f"greedy agreement {check['greedy_agreement']:.1%}")
    if "perplexity_ratio" in check:
        parts.append(f"perplexity x{check['perplexity_ratio']:.3f}")
    if check.get("runtime", "") is None:
        parts.append("not run (runtime not installed)")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------ generate


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with an exported model (onnxruntime, onnxruntime-genai, llama.cpp)",
        description=(
            "Stream text from an export folder (its onnx/, genai/ or gguf/), any folder with model.onnx, an onnxruntime-genai "
            "folder, a .gguf file (needs llama-cpp-python) or a merged Hugging Face folder."
        ),
    )
    parser.add_argument("--model", required=True, type=Path, help="export folder, ONNX or genai folder, .gguf file or Hugging Face folder")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens at most (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--threads", type=int, help="CPU threads for the runtime (default: the runtime's own choice)")
    parser.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from lorasp_edge.generate import GenerateSettings, generate

    settings = GenerateSettings(
        model=args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, chat=args.chat, seed=args.seed, threads=args.threads,
    )
    result = generate(settings, on_text=lambda piece: print(piece, end="", flush=True),
                      on_note=lambda line: print(f"lorasp-edge generate: note: {line}", file=sys.stderr, flush=True))
    print()
    print(
        f"{result.new_tokens} tokens in {result.total_seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s "
        f"({result.backend}, prompt {result.prompt_tokens} tokens, first token after {result.prefill_seconds:.2f} s)",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------------------ quantize


def _add_quantize(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="write a pre-quantized 4/8-bit base once, so training loads it small",
        description=(
            "Quantize a model's decoder linear layers to NF4 (4) or LLM.int8 (8) with bitsandbytes and write the "
            "checkpoint save_pretrained would write (transformers and PEFT load it). It streams: one tensor is "
            "read at a time and output shards are written as they fill, so the peak is about one shard, not the "
            "model. Plan and train with --model OUT: nothing 16-bit is loaded. (On CPU, train does this itself "
            "into the cache the first time a 4/8-bit plan runs.)"
        ),
    )
    parser.add_argument("--model", required=True, help="bundled alias, local Hugging Face folder (safetensors) or a hub id in the local hub cache")
    parser.add_argument("--bits", required=True, type=int, choices=[4, 8], help="4 (NF4, double quantization) or 8 (LLM.int8)")
    parser.add_argument("--out", required=True, type=Path, help="new folder to write")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], help="dtype the weights are quantized from and computed in (default: bfloat16 where the CPU/GPU computes it natively, else float32, as the planner picks)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_quantize)


def _run_quantize(args) -> int:
    import torch

    from lorasp_edge.prequantize import quantize_model

    dtype = getattr(torch, args.compute_dtype) if args.compute_dtype else None
    report = quantize_model(args.model, args.out, args.bits, dtype, progress=not args.no_progress)
    print(
        f"wrote {report.out}: {report.quantized_tensors} linear weights at {report.bits}-bit, "
        f"{report.input_bytes / 1e9:.2f} GB -> {report.output_bytes / 1e9:.2f} GB in {report.seconds:.0f} s, "
        f"peak RSS {report.peak_rss_bytes / 1e9:.2f} GB"
    )
    print(f"plan and train with --model {report.out}")
    return 0


# ---------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lorasp-edge",
        description="Fine-tune language models on the hardware you have: plan -> train -> export -> generate.",
    )
    from lorasp_edge import __version__

    parser.add_argument("--version", action="version", version=f"lorasp-edge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_plan(subparsers)
    _add_train(subparsers)
    _add_export(subparsers)
    _add_generate(subparsers)
    _add_quantize(subparsers)
    return parser


def _quiet_libraries() -> None:
    """Keep the terminal for lorasp-edge's own output: library notices that need no action go."""
    import logging
    import warnings

    # bitsandbytes logs a warning on every import on AVX512-BF16 CPUs about an optional hub kernel.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(f"lorasp-edge {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"lorasp-edge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

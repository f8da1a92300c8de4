"""A catalog model at full size, end to end through the CLI: quantize once, plan, train, measured.

    python tools/big_model_run.py make --model llama-3.1-8b --out /scratch/llama8b
    python tools/big_model_run.py run --base /scratch/llama8b --work /scratch/run8b --mem 16GB --seq-len 128 --batch 1
    python tools/big_model_run.py load --model /scratch/run8b/q4

`make` writes a random-init bf16 checkpoint with the catalog entry's published shape, one shard at
a time (normal(0, 0.02) weights, unit norms), so making it needs about one shard of memory. The
tokenizer is the bundled SmolLM2's, or, for a vocabulary smaller than its 49,152 ids, a 4,096-id BPE
trained on the run's text (`small_tokenizer`).
`run` runs, each as its own process: `lorasp-edge quantize --bits 4`, `lorasp-edge plan` for the
quantized folder, and `lorasp-edge train --steps N` under that plan; with `--limit-data` the
trainer runs under RLIMIT_DATA = the budget (prlimit: the kernel refuses private writable memory
past it, which bounds anonymous memory from above; file pages are outside it). Each child's
/proc/PID/status is sampled every 20 ms: peak resident set (VmRSS, and the kernel's VmHWM), peak
anonymous memory (VmRSS - RssFile) and peak VmData, written every ~10 s to <log>.peaks.json so a
run stopped early keeps them. It prints one JSON result and a Markdown row. `run --quantize-only`
stops after quantizing (a later `run` reuses the folder and its figures); `export` exports the
trained adapter (`lorasp-edge export --format both --quantize int4 --mem <budget>`, or another
`--format`; `--min-agreement 0` since random weights have near-tied logits) and reports its peak beside the manifest's; `load`
reports the anonymous memory loading a quantized folder adds against the bytes of its tensors.

    python tools/big_model_run.py export --work /scratch/run8b --mem 16GB
    python tools/big_model_run.py table /scratch/run8b /scratch/run3b ... [--write-docs]

`table` sets each run's plan against its training process's peak anonymous memory (sampled from the
process's start, so loading counts) and writes the Markdown table of docs/planner.md's "At size".
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

INIT_STD = 0.02  # transformers' default initializer_range for these families
SMOLLM2_VOCAB = 49152  # ids of the bundled tokenizer


def small_tokenizer(vocab_size: int = 4096):
    """A byte-level BPE trained here on the run's own text and the held-out reference text, for
    shapes whose vocabulary is smaller than the bundled tokenizer's."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [json.loads(line)["text"] for line in data_lines()] + list(pydoc_data.topics.topics.values())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_checkpoint(model_id: str, out: Path, shard_bytes: int, layers: int | None = None) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorasp_edge.sources import resolve_model
    from lorasp_edge.plan.catalog import catalog_entry

    entry = catalog_entry(model_id)
    fields = {key: value for key, value in entry["config"].items() if key != "torch_dtype"}
    if layers:  # the entry's widths and vocabulary with fewer decoder layers
        fields["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**fields)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = {key for key in (getattr(model, "all_tied_weights_keys", None) or {})}
    names = [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied]
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards, pending, pending_bytes, total = [], {}, 0, 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            name = f"part-{len(shards):05d}.safetensors"
            save_file(pending, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(pending)))
            pending, pending_bytes = {}, 0

    started = time.perf_counter()
    for name, shape in names:
        if name.endswith("norm.weight") or "layernorm" in name:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            tensor = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=generator)
        size = tensor.numel() * 2
        if pending and pending_bytes + size > shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += size
        total += size
    flush()
    weight_map = {}
    for i, (name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update({key: final for key in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config_dict = config.to_dict()
    config_dict["dtype"] = "bfloat16"
    config_dict["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    tokenizer_dir = Path(resolve_model("smollm2-135m"))
    if config.vocab_size >= SMOLLM2_VOCAB:
        for item in tokenizer_dir.iterdir():
            if item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                shutil.copy2(item, out / item.name)
    else:  # SmolLM2's ids would run past this vocabulary (Phi-3: 32,064; Mistral: 32,768)
        small_tokenizer().save_pretrained(out)
    return {"model": model_id, "bytes": total, "shards": len(shards), "seconds": round(time.perf_counter() - started, 1)}


# ----------------------------------------------------------------------------------- measuring


def _status(pid: int) -> dict[str, int]:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssFile", "VmHWM", "VmData"):
                    fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return fields


def measured_run(command: list[str], log: Path, prefix: list[str] | None = None) -> dict:
    """Run `command`, sampling its memory; the result holds peaks in bytes, seconds and the exit code."""
    peaks = {"rss": 0, "anonymous": 0, "hwm": 0, "data": 0}
    started = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen((prefix or []) + command, stdout=handle, stderr=subprocess.STDOUT)

        def sample():
            samples = 0
            while child.poll() is None:
                fields = _status(child.pid)
                if "VmRSS" in fields and "RssFile" in fields:
                    peaks["rss"] = max(peaks["rss"], fields["VmRSS"])
                    peaks["anonymous"] = max(peaks["anonymous"], fields["VmRSS"] - fields["RssFile"])
                    peaks["hwm"] = max(peaks["hwm"], fields.get("VmHWM", 0))
                    peaks["data"] = max(peaks["data"], fields.get("VmData", 0))
                samples += 1
                if samples % 500 == 0:  # peaks so far, every ~10 s: a run stopped early still has them
                    log.with_suffix(".peaks.json").write_text(json.dumps(peaks | {"seconds": round(time.perf_counter() - started, 1)}))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = child.wait()
        sampler.join()
    return {"exit": code, "seconds": round(time.perf_counter() - started, 1), "peak_rss": max(peaks["rss"], peaks["hwm"]), "peak_anonymous": peaks["anonymous"], "peak_vmdata": peaks["data"]}


def data_lines(lines: int = 2000) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [json.dumps({"text": " ".join(str(n) for n in range(i % 50, i % 50 + 20)) + ". " + " ".join(words[(i + k) % 8] for k in range(12))})
            for i in range(lines)]


def write_data(path: Path, lines: int = 2000) -> Path:
    path.write_text("".join(line + "\n" for line in data_lines(lines)))
    return path


def run(args) -> dict:
    from lorasp_edge.plan.units import parse_memory

    cli = [sys.executable, "-m", "lorasp_edge"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quantized = work / f"q{args.bits}"
    result = {"base": str(args.base), "bits": args.bits, "mem": args.mem, "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps}
    if not (quantized / "config.json").is_file():
        result["quantize"] = measured_run(cli + ["quantize", "--model", str(args.base), "--bits", str(args.bits), "--out", str(quantized), "--no-progress"], work / "quantize.log")
        (work / "quantize.json").write_text(json.dumps(result["quantize"]))
        if result["quantize"]["exit"] != 0:
            return result
    elif (work / "quantize.json").is_file():  # quantized by an earlier `run --quantize-only`
        result["quantize"] = json.loads((work / "quantize.json").read_text())
    if args.quantize_only:
        return result
    plan_path = work / "plan.json"
    plan = subprocess.run(cli + ["plan", "--mem", args.mem, "--model", str(quantized), "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--out", str(plan_path)], capture_output=True, text=True, check=False)
    (work / "plan.log").write_text(plan.stdout + plan.stderr)
    if plan.returncode != 0:
        result["plan_error"] = plan.stderr.strip()
        return result
    planned = json.loads(plan_path.read_text())
    if args.micro_batch or args.allocator or args.checkpointing:  # the planner's setting with these forced (an A/B at one setting)
        if args.checkpointing:
            planned["gradient_checkpointing"] = args.checkpointing == "on"
        if args.micro_batch:
            planned.update(micro_batch=args.micro_batch, grad_accum=args.batch // args.micro_batch,
                           loss_chunk_tokens=min(planned["loss_chunk_tokens"], args.micro_batch * (args.seq_len - 1)))
        planned["host_allocator"] = args.allocator or planned.get("host_allocator", "heap")
        planned["memory"] = forced_memory(planned)
        plan_path.write_text(json.dumps(planned, indent=2))
    result["plan"] = {key: planned.get(key) for key in ("quant_bits", "rank", "gradient_checkpointing", "micro_batch", "grad_accum", "compute_dtype", "host_allocator")}
    result["plan"]["layers"] = len(planned["layers"])
    result["plan"]["total_bytes"] = planned["memory"]["total_bytes"]
    budget = parse_memory(args.mem)
    prefix = ["prlimit", f"--data={budget}"] if args.limit_data else None
    result["limit"] = f"RLIMIT_DATA {budget}" if args.limit_data else None
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    data = write_data(work / "data.jsonl")
    train = cli + ["train", "--model", str(quantized), "--plan", str(plan_path), "--data", str(data), "--out", str(out), "--steps", str(args.steps), "--save-every", "0", "--no-progress"]
    result["train"] = measured_run(train, work / "train.log", prefix)
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        result["train"]["step_seconds"] = [round(b["elapsed_s"] - a, 1) for a, b in zip([0.0] + [r["elapsed_s"] for r in records], records)]
        result["train"]["losses"] = [round(r["loss"], 4) for r in records]
    total = result["plan"]["total_bytes"]
    if result["train"]["peak_anonymous"]:
        result["anonymous_vs_plan"] = round(result["train"]["peak_anonymous"] / total - 1, 4)
        result["rss_vs_plan"] = round(result["train"]["peak_rss"] / total - 1, 4)
    return result


def forced_memory(planned: dict) -> dict:
    """The planner's estimate for a plan file's setting as it now stands."""
    from lorasp_edge.plan.catalog import model_info
    from lorasp_edge.plan.memory import Candidate, estimate

    arch = model_info(planned["model"]["name"]).architecture
    setting = Candidate(planned["quant_bits"], planned["compute_dtype"], planned["rank"], tuple(planned["target_modules"]), len(planned["layers"]),
                        planned["gradient_checkpointing"], planned["micro_batch"], planned["seq_len"], planned["loss_chunk_tokens"],
                        grad_accum=planned["grad_accum"], host_allocator=planned["host_allocator"], init=planned.get("init", "zeros"))
    return estimate(arch, setting, "cpu")


def export_run(args) -> dict:
    """`lorasp-edge export` of WORK/run/adapter over WORK/q<bits>, measured like the training run."""
    work = Path(args.work)
    out = work / f"export-{args.format.replace(',', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    quantize = ["--quantize", args.quantize] if {"onnx", "genai", "both"} & set(args.format.split(",")) else []
    command = [sys.executable, "-m", "lorasp_edge", "export", "--model", str(work / f"q{args.bits}"), "--adapter", str(work / "run" / "adapter"),
               "--out", str(out), "--format", args.format, *quantize, "--mem", args.mem, "--min-agreement", "0"]
    result = {"work": str(work), "mem": args.mem, "format": args.format, "quantize": args.quantize,
              "export": measured_run(command, work / f"export-{args.format.replace(',', '-')}.log")}
    manifest = out / "manifest.json"
    if manifest.is_file():
        written = json.loads(manifest.read_text())
        result["manifest_peak_rss"] = written.get("peak_rss_bytes")
        result["verification"] = {name: {key: check.get(key) for key in ("relative_diff", "perplexity_ratio") if key in check}
                                  for name, check in written.get("verification", {}).items()}
        result["files"] = written.get("files")
    return result


def markdown_row(result: dict) -> str:
    q, t, p = result.get("quantize", {}), result["train"], result["plan"]
    gb = lambda b: f"{b / 1e9:.2f}" if b else "-"
    steps = ", ".join(f"{s:.0f}" for s in t.get("step_seconds", []))
    return (
        f"| {Path(result['base']).name} | {result['mem']} | {p['quant_bits']}-bit, r{p['rank']}, {p['layers']} layers, ckpt {'on' if p['gradient_checkpointing'] else 'off'}, "
        f"{p['micro_batch']}x{result['seq_len']}, {p.get('host_allocator') or 'heap'} | {gb(q.get('peak_rss'))} GB / {q.get('seconds', '-')} s | {gb(p['total_bytes'])} | {gb(t['peak_anonymous'])} "
        f"({result.get('anonymous_vs_plan', 0) * 100:+.1f}%) | {gb(t['peak_rss'])} | {gb(t['peak_vmdata'])} | {steps} | {t['exit']} |"
    )


TABLE_BEGIN, TABLE_END = "<!-- at-size:begin -->", "<!-- at-size:end -->"


def planner_table(works: list[Path]) -> str:
    """The planner against each `run`'s whole-process peak anonymous memory (load included), as Markdown."""
    import statistics

    from lorasp_edge.plan.planfile import DEFAULT_HEADROOM as HEADROOM

    rows, errors = [], []
    for work in works:
        result = json.loads((work / "result.json").read_text())
        plan, train = result["plan"], result["train"]
        config = json.loads((Path(result["base"]) / "config.json").read_text())
        parameters = json.loads((work / "plan.json").read_text())["model"].get("params")
        measured, predicted = train["peak_anonymous"], plan["total_bytes"]
        error = predicted / measured - 1  # negative: the plan says less than the run used
        errors.append(error)
        shape = f"{config['model_type']} {config['num_hidden_layers']}L h{config['hidden_size']} v{config['vocab_size']}"
        size = f"{parameters / 1e9:.2f}B" if parameters else "-"
        setting = (f"{plan['quant_bits']}-bit r{plan['rank']}, {plan['layers']} layers, ckpt {'on' if plan['gradient_checkpointing'] else 'off'}, "
                   f"{plan['micro_batch']}x{plan['grad_accum']} x {result['seq_len']}, {plan.get('host_allocator') or 'heap'}")
        rows.append(f"| `{work.name}` | {shape} | {size} | {result['mem']} | {setting} | {predicted / 1e9:.2f} | {measured / 1e9:.2f} | "
                    f"{error * 100:+.1f}% | {train['peak_rss'] / 1e9:.2f} | {train['exit']} |")
    absolute = [abs(e) for e in errors]
    under = [e for e in errors if e < -HEADROOM]
    summary = (f"{len(errors)} points: median |error| {statistics.median(absolute) * 100:.1f}%, worst {max(absolute) * 100:.1f}% "
               f"(range {min(errors) * 100:+.1f}% to {max(errors) * 100:+.1f}%); under-predicting by more than the {HEADROOM:.0%} headroom: {len(under)}.")
    head = ("| run | shape | parameters | budget | plan's setting (micro x accum x seq, allocator) | plan GB | peak anonymous GB | error | peak RSS GB | exit |\n"
            "|---|---|---:|---|---|---:|---:|---:|---:|---|")
    return "\n".join([head, *rows, "", summary])


def write_table(works: list[Path], docs: Path) -> str:
    table = planner_table(works)
    text = docs.read_text()
    start, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
    docs.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    return table


def load_only(folder: Path, bits: int) -> dict:
    """Anonymous memory that loading a (pre-quantized) folder adds, against the bytes of its tensors."""
    import gc

    import bitsandbytes as bnb

    from lorasp_edge.models import load_model

    def anonymous() -> int:
        fields = {}
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssFile"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"] - fields["RssFile"]

    before = anonymous()
    model = load_model(str(folder), quant_bits=bits, compute_dtype=torch.float32, device="cpu")
    gc.collect()
    added = anonymous() - before
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    states = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            states += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.state2.absmax, state.state2.code))
    return {"folder": str(folder), "anonymous_added": added, "tensor_bytes": sum(tensors.values()) + states}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write a random-init bf16 checkpoint with a catalog model's shape")
    make.add_argument("--model", required=True, help="catalog id, e.g. llama-3.1-8b")
    make.add_argument("--out", required=True, type=Path)
    make.add_argument("--shard-gb", type=float, default=2.0)
    make.add_argument("--layers", type=int, help="fewer decoder layers than the catalog entry (same widths and vocabulary)")
    go = sub.add_parser("run", help="quantize, plan and train through the CLI, measured")
    go.add_argument("--base", required=True, type=Path, help="folder written by `make`")
    go.add_argument("--work", required=True, type=Path)
    go.add_argument("--bits", type=int, default=4, choices=[4, 8])
    go.add_argument("--mem", default="16GB")
    go.add_argument("--seq-len", type=int, default=128)
    go.add_argument("--batch", type=int, default=1)
    go.add_argument("--steps", type=int, default=2)
    go.add_argument("--micro-batch", type=int, help="force this micro-batch (accumulating to --batch) instead of the plan's")
    go.add_argument("--allocator", choices=["heap", "mmap"], help="force the plan's host_allocator (lorasp_edge.allocator)")
    go.add_argument("--checkpointing", choices=["on", "off"], help="force the plan's gradient checkpointing")
    go.add_argument("--limit-data", action="store_true", help="train under prlimit --data=<budget> (RLIMIT_DATA)")
    go.add_argument("--quantize-only", action="store_true", help="stop after quantizing (a later run reuses it and its figures)")
    export = sub.add_parser("export", help="export WORK/run/adapter (HF + ONNX) under --mem, measured")
    export.add_argument("--work", required=True, type=Path, help="the folder of an earlier `run`")
    export.add_argument("--bits", type=int, default=4, choices=[4, 8])
    export.add_argument("--mem", default="16GB")
    export.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"])
    export.add_argument("--format", default="both", help="export --format: both, gguf, genai, ... (--quantize applies to onnx and genai)")
    table = sub.add_parser("table", help="the planner against every given run's peak, as Markdown")
    table.add_argument("works", nargs="+", type=Path, help="folders of earlier `run`s")
    table.add_argument("--write-docs", action="store_true", help="replace the table between the at-size markers in docs/planner.md")
    load = sub.add_parser("load", help="anonymous memory that loading a quantized folder adds, against its tensors' bytes")
    load.add_argument("--model", required=True, type=Path, help="folder written by `lorasp-edge quantize`")
    load.add_argument("--bits", type=int, default=4, choices=[4, 8])
    args = parser.parse_args()
    if args.command == "load":
        print(json.dumps(load_only(args.model, args.bits)))
        return
    if args.command == "table":
        docs = Path(__file__).resolve().parent.parent / "docs" / "planner.md"
        print(write_table(args.works, docs) if args.write_docs else planner_table(args.works))
        return
    if args.command == "run" and args.micro_batch and args.batch % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} must divide --batch {args.batch}")
    if args.command == "export":
        result = export_run(args)
        (Path(args.work) / "export.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    if args.command == "make":
        print(json.dumps(make_checkpoint(args.model, args.out, int(args.shard_gb * 1e9), args.layers)))
        return
    result = run(args)
    (Path(args.work) / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if "train" in result:
        print(markdown_row(result))


if __name__ == "__main__":
    main()

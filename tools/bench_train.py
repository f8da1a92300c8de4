"""lorasp-edge's training step against plain PEFT loops, side by side, on the same blocks.

    python tools/bench_train.py [--steps 8] [--warmup 2] [--rounds 3] [--task text|chat|both] [--json out.json]
    python tools/bench_train.py --device cuda --model-config qwen2.5-0.5b      (PEFT bf16 and QLoRA peers)

Default: the bundled SmolLM2-135M-Instruct on CPU, batch 4 x 256 tokens. With --model-config, a
random-init model of that catalog entry's shape (built from its config, no download), batch 8 x 512.
Every method trains on the same packed blocks in the same order (lorasp_edge.train.data.PackedStream
over one generated JSONL file), constant lr 2e-4, clip 1.0, no warmup. `--task`: text (default),
plain English-like sentences, every position a target; chat, the README's task
(tools/make_task_data.py: chat messages, loss on the assistant reply only, so most positions carry
no target; the share is printed); both runs the two one after the other. Methods:
- lorasp-edge: the plan the planner makes for --mem (default 8 GB) at this seq and batch, then
  build_model / build_optimizer / train_step from lorasp_edge.train (what `lorasp-edge train` runs);
- lorasp-edge-r16: the same plan at rank 16, alpha 32;
- lorasp-edge-r16-compile: that, with every decoder layer compiled (`train --compile`); its first
  step's time, which holds the compile, is printed as first_step_s;
- lorasp-edge-zeros, lorasp-edge-offset: the default plan with LoRA-SP's start set (`plan --lora-init`):
  what the offset start (a held rank of 2r) costs in speed and memory;
- lorasp-edge-peft-layer: the default plan with PEFT's own LoRA Linear put back in place of
  lorasp_edge.train.lora_linear.FusedLoraLinear: what the fused layer saves;
- lorasp-edge-three-ops: the default plan with the fused layer's forward as three autograd ops
  (base linear, A, then addmm) in place of lorasp_edge.train.lora_linear.LoraLinearFunction: what
  the one function's backward saves;
- lorasp-edge-torch-ce: the default plan with torch's F.cross_entropy in place of the loss's own
  (lorasp_edge.train.loss.SummedCrossEntropy, whose backward works in place): what that saves;
- lorasp-edge-top-half: the default plan with adapters on the last half of the decoder layers only
  (the backward stops below the lowest adapted layer): what adapting fewer layers would buy;
- peft-bf16: PEFT LoraConfig(r=16, lora_alpha=32, target_modules="all-linear") on the base loaded in
  bf16, torch AdamW (fused=True on CUDA, torch's default on CPU), model(input_ids, labels).loss;
- peft-fp32: the same on an fp32 base (a first PEFT script); qlora: the same on an NF4 base (CUDA).
Each method runs in a fresh process; peak is that process's whole-life maximum RSS (getrusage), and
on CUDA also torch.cuda.max_memory_allocated. tokens/s is the median step after the warm-up steps;
loss is the mean of the last 3 steps. Rounds alternate the order of methods; tables show medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ("lorasp-edge", "lorasp-edge-r16", "lorasp-edge-r16-compile", "lorasp-edge-zeros", "lorasp-edge-offset", "lorasp-edge-peft-layer",
           "lorasp-edge-three-ops", "lorasp-edge-top-half", "lorasp-edge-torch-ce", "peft-bf16", "peft-fp32", "qlora")
CPU_METHODS = ("lorasp-edge", "lorasp-edge-r16", "peft-bf16", "peft-fp32")
CUDA_METHODS = ("lorasp-edge", "lorasp-edge-r16", "peft-bf16", "qlora")
LR = 2e-4


def write_data(path: Path, examples: int = 3000) -> Path:
    """Plain English-like sentences, generated with a fixed seed (no downloads)."""
    rng = random.Random(0)
    subjects = ["The engineer", "A small robot", "My neighbour", "The old farmer", "A student", "The pilot", "Our team"]
    verbs = ["repaired", "painted", "measured", "described", "carried", "tested", "sold"]
    objects = ["the bicycle", "a wooden chair", "the red kite", "an electric motor", "the garden fence", "a paper map"]
    tails = ["before lunch.", "in the rain.", "with great care.", "for the museum.", "after the storm.", "on Sunday morning."]
    with open(path, "w") as handle:
        for _ in range(examples):
            text = " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}" for _ in range(rng.randint(2, 5)))
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def write_chat_data(path: Path, examples: int = 3000) -> Path:
    """The README's chat task (tools/make_task_data.py), its training split."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_task_data

    train, _ = make_task_data.make_examples(examples, 0, seed=1234)
    return make_task_data.write_jsonl(path, train)


def target_share(data: Path, seq_len: int, batch: int, steps: int) -> float:
    """Share of positions with a trained target in the blocks the benchmark runs."""
    from lorasp_edge.train.loss import valid_targets

    step_batches = blocks(data, seq_len, batch, steps)
    return sum(valid_targets(b["labels"]) for b in step_batches) / sum(b["labels"][:, 1:].numel() for b in step_batches)


def random_model(config_id: str, folder: Path) -> Path:
    """A random-init model with a catalog entry's shape, saved in bf16 (SmolLM2's tokenizer ids fit any vocab here)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorasp_edge.plan.catalog import catalog_entry

    config = dict(catalog_entry(config_id)["config"])
    config.pop("torch_dtype", None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def blocks(data: Path, seq_len: int, batch: int, steps: int) -> list[dict]:
    from lorasp_edge.models import load_tokenizer
    from lorasp_edge.train.data import PackedStream

    stream = PackedStream(data, load_tokenizer("smollm2-135m"), seq_len)
    return [stream.next_batch(batch) for _ in range(steps)]


def split(batch: dict, micro: int) -> list[dict]:
    rows = batch["input_ids"].shape[0]
    return [{key: value[start : start + micro] for key, value in batch.items()} for start in range(0, rows, micro)]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_lorasp(method: str, model: str, device, seq_len: int, batch: int, mem: int, data: list[dict], plan_dtype: str = "auto") -> dict:
    from lorasp_edge.plan.search import local_device, plan_training
    from lorasp_edge.train.loop import build_model, build_optimizer
    from lorasp_edge.train.step import train_step

    init = {"lorasp-edge-zeros": "zeros", "lorasp-edge-offset": "offset"}.get(method)
    # float32: plan as for a CPU without native bf16 (what an AVX2-only laptop's plan computes in).
    planned_on = dataclasses.replace(local_device(), bf16=False) if plan_dtype == "float32" else None
    plan = plan_training(model=model, budget_bytes=mem, seq_len=seq_len, batch=batch, init=init, device=planned_on)
    if method.startswith("lorasp-edge-r16"):
        plan = dataclasses.replace(plan, rank=16, alpha=32.0)
    if method == "lorasp-edge-top-half":  # adapters on the last half of the layers: the backward stops below them
        plan = dataclasses.replace(plan, layers=plan.layers[len(plan.layers) // 2 :])
    peft_model = build_model(plan, model, device=device, compile_layers=method.endswith("-compile"))
    if method == "lorasp-edge-peft-layer":
        from peft.tuners.lora.layer import Linear as PeftLoraLinear

        from lorasp_edge.train.adapter import lora_layers

        for layer in lora_layers(peft_model).values():  # the fused layer is a subclass that changes forward only
            if type(layer).__name__ == "FusedLoraLinear":
                layer.__class__ = PeftLoraLinear
    if method == "lorasp-edge-three-ops":
        from lorasp_edge.train.lora_linear import FusedLoraLinear

        FusedLoraLinear._plain_adapter = lambda self, name: False  # the float layer's three-op path
    optimizer = build_optimizer(peft_model, lr=LR)
    from lorasp_edge.train.loss import ChunkedCausalLMLoss

    loss_module = ChunkedCausalLMLoss(peft_model, chunk_tokens=plan.loss_chunk_tokens)
    if method == "lorasp-edge-torch-ce":  # torch's cross_entropy in place of the loss's own backward
        import torch
        import torch.nn.functional as F

        def torch_chunk_loss(hidden, targets):  # ChunkedCausalLMLoss._chunk_loss with F.cross_entropy
            logits = loss_module.lm_head(hidden).float()
            if loss_module.logit_softcap:
                logits = torch.tanh(logits / loss_module.logit_softcap) * loss_module.logit_softcap
            return F.cross_entropy(logits, targets, reduction="sum")

        loss_module._chunk_loss = torch_chunk_loss
    times, losses = [], []
    for step_batch in data:
        sync(device)
        started = time.perf_counter()
        result = train_step(loss_module, optimizer, split(step_batch, plan.micro_batch), plan, 1.0)
        sync(device)
        times.append(time.perf_counter() - started)
        losses.append(result["loss"])
    keys = ("quant_bits", "compute_dtype", "rank", "init", "micro_batch", "grad_accum", "gradient_checkpointing", "loss_chunk_tokens")
    return {"times": times, "losses": losses, "plan": {**{key: getattr(plan, key) for key in keys}, "adapted_layers": len(plan.layers)}}


def run_peft(method: str, model: str, device, data: list[dict]) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from lorasp_edge.models import load_model

    dtype = torch.float32 if method == "peft-fp32" else torch.bfloat16
    base = load_model(model, quant_bits=4 if method == "qlora" else None, compute_dtype=dtype, device=device)
    base.config.use_cache = False
    peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True if device.type == "cuda" else None)
    peft_model.train()
    times, losses = [], []
    for step_batch in data:
        sync(device)
        started = time.perf_counter()
        loss = peft_model(input_ids=step_batch["input_ids"].to(device), labels=step_batch["labels"].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - started)
        losses.append(float(loss))
    return {"times": times, "losses": losses}


def child(args) -> None:
    import torch

    device = torch.device(args.device)
    data = blocks(args.data, args.seq_len, args.batch, args.steps)
    if args.child.startswith("lorasp-edge"):
        result = run_lorasp(args.child, args.model, device, args.seq_len, args.batch, args.mem, data, args.plan_dtype)
    else:
        result = run_peft(args.child, args.model, device, data)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if device.type == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    print("RESULT " + json.dumps(result, default=str))


def measure(method: str, args, data: Path, model: str) -> dict:
    command = [sys.executable, __file__, "--child", method, "--data", str(data), "--model", model, "--device", args.device,
               "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--mem", str(args.mem),
               "--plan-dtype", args.plan_dtype]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["tokens_per_s"] = args.seq_len * args.batch / statistics.median(result["times"][args.warmup :])
    result["final_loss"] = statistics.mean(result["losses"][-3:])
    result["first_step_s"] = result["times"][0]
    result["peak_bytes"] = result.get("peak_cuda_bytes", result["peak_rss_bytes"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m", help="model to load (default: the bundled SmolLM2-135M)")
    parser.add_argument("--model-config", help="catalog id: a random-init model of its shape instead of --model")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--mem", type=int, default=8 * 10**9, help="budget the lorasp-edge plan is made for (bytes)")
    parser.add_argument("--methods", help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--task", choices=("text", "chat", "both"), default="text", help="training data: plain text, the README's chat task, or both in turn")
    parser.add_argument("--plan-dtype", choices=("auto", "float32"), default="auto",
                        help="auto: the plan this machine gets; float32: the plan of a CPU without native bf16 (fp32 base and compute)")
    parser.add_argument("--json")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    big = args.model_config is not None
    args.seq_len = args.seq_len or (512 if big else 256)
    args.batch = args.batch or (8 if big else 4)
    if args.child:
        child(args)
        return

    methods = (args.methods.split(",") if args.methods else list(CUDA_METHODS if args.device.startswith("cuda") else CPU_METHODS))
    everything = {}
    for task in (("text", "chat") if args.task == "both" else (args.task,)):
        everything[task] = bench_task(task, methods, args, big)
    if args.json:
        Path(args.json).write_text(json.dumps(everything if args.task == "both" else everything[args.task], indent=2, default=str))


def bench_task(task: str, methods: list[str], args, big: bool) -> dict:
    """Every method on one kind of data, `args.rounds` rounds; prints the table, returns the runs."""
    results = {method: [] for method in methods}
    with tempfile.TemporaryDirectory() as folder:
        data = (write_chat_data if task == "chat" else write_data)(Path(folder) / "train.jsonl")
        share = target_share(data, args.seq_len, args.batch, args.steps)
        model = str(random_model(args.model_config, Path(folder) / "model")) if big else args.model
        for round_index in range(args.rounds):
            order = methods if round_index % 2 == 0 else methods[::-1]
            for method in order:
                result = measure(method, args, data, model)
                results[method].append(result)
                print(f"round {round_index + 1} {method:16s} {result['tokens_per_s']:8.1f} tokens/s  "
                      f"peak {result['peak_bytes'] / 1e9:5.2f} GB  loss {result['final_loss']:.4f}", file=sys.stderr, flush=True)

    def median(method, key):
        return statistics.median(r[key] for r in results[method])

    print(f"{task} data ({share:.1%} of positions are targets): "
          f"{args.model_config or args.model} on {args.device}, batch {args.batch} x {args.seq_len}, {args.steps} steps "
          f"(median step after {args.warmup}), medians of {args.rounds} rounds; peak = {'CUDA allocated' if args.device.startswith('cuda') else 'RSS'}")
    peers = [m for m in ("peft-bf16", "peft-fp32", "qlora") if m in results]
    header = "| method | tokens/s | peak (GB) | final loss | " + " | ".join(f"speed / {p} | peak / {p} | loss / {p}" for p in peers) + " |"
    print(header)
    print("|" + "---|" * (4 + 3 * len(peers)))
    for method in methods:
        speed, peak, loss = median(method, "tokens_per_s"), median(method, "peak_bytes"), median(method, "final_loss")
        cells = [f"{speed / median(p, 'tokens_per_s'):.2f}x | {peak / median(p, 'peak_bytes'):.2f}x | {loss / median(p, 'final_loss'):.3f}" for p in peers]
        print(f"| {method} | {speed:.1f} | {peak / 1e9:.2f} | {loss:.4f} | " + " | ".join(cells) + " |")
    for method in methods:
        print(f"{method} first step (compile included where compiled): {median(method, 'first_step_s'):.1f} s")
    for method in methods:
        if "plan" in results[method][0]:
            print(f"{method} plan: {results[method][0]['plan']}")
    return {"target_share": share, "runs": results}


if __name__ == "__main__":
    main()

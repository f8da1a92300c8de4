"""Where one training step's time goes: lorasp-edge against the plain PEFT loop, by phase.

    python tools/profile_step.py [--rank 16] [--steps 2] [--batch 4] [--seq-len 256] [--ops]
    python tools/profile_step.py --device cuda --model-config qwen2.5-0.5b

The bundled SmolLM2-135M-Instruct (or a random-init model of a catalog entry's shape), batch 4 x 256
(8 x 512 with --model-config), LoRA r16 alpha 32 on every linear layer, bf16 base.
- lorasp-edge: the planner's 8 GB plan at --rank, build_model / build_optimizer and the trainer's
  `train_step` (lorasp_edge.train);
- PEFT: LoraConfig(r=16, lora_alpha=32, target_modules="all-linear") on the bf16 base, torch AdamW
  (fused on CUDA), model(input_ids, labels=input_ids).loss, clip 1.0.
One warm-up step, then --steps profiled steps (torch.profiler, CPU and, on CUDA, device activity).
Phases are record_function ranges this tool puts around: taking the next block (data), the decoder
(forward), lm_head + cross-entropy (loss, also when recomputed in backward), backward, gradient
clipping and the optimizer step (optimizer), and LoRA-SP's rebuild and gradient gather (hooks).
Each phase's time excludes phases nested in it; bookkeeping is the step's wall time left over
(loss reads, zero_grad, autocast, Python). Table: mean ms per step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES = ("data", "forward", "loss", "backward", "optimizer", "hooks", "bookkeeping")


def labelled(phase: str, function):
    import torch

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(f"phase: {phase}"):
            return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def patched(target, name: str, phase: str):
    original = getattr(target, name)
    setattr(target, name, labelled(phase, original))
    try:
        yield
    finally:
        setattr(target, name, original)


def exclusive_ms(events) -> dict[str, float]:
    """Per phase, the time of its ranges minus the phase ranges nested in them."""
    totals = dict.fromkeys(PHASES, 0.0)

    def nested_phase_time(event) -> float:
        found = 0.0
        for child in event.cpu_children:
            if child.name.startswith("phase: ") or "_RebuildBackward" in child.name:
                found += child.cpu_time_total
            else:
                found += nested_phase_time(child)
        return found

    for event in events:
        if event.name.startswith("phase: "):
            totals[event.name[7:]] += (event.cpu_time_total - nested_phase_time(event)) / 1e3
        elif "evaluate_function: _RebuildBackward" in event.name:
            totals["hooks"] += event.cpu_time_total / 1e3
    return totals


def run(method: str, args, model_name: str, data_file: Path) -> dict:
    import torch
    from bench_train import split
    from torch.profiler import ProfilerActivity, profile

    from lorasp_edge.models import load_model, load_tokenizer
    from lorasp_edge.train.data import PackedStream

    device = torch.device(args.device)
    stream = PackedStream(data_file, load_tokenizer("smollm2-135m"), args.seq_len)
    next_batch = labelled("data", stream.next_batch)
    patches = contextlib.ExitStack()
    if method == "lorasp-edge":
        import dataclasses

        from lorasp_edge.plan.search import plan_training
        from lorasp_edge.train import flat, step
        from lorasp_edge.train.loop import build_model, build_optimizer
        from lorasp_edge.train.loss import ChunkedCausalLMLoss

        plan = plan_training(model=model_name, budget_bytes=8 * 10**9, seq_len=args.seq_len, batch=args.batch)
        plan = dataclasses.replace(plan, rank=args.rank, alpha=2.0 * args.rank)
        model = build_model(plan, model_name, device=device)
        optimizer = build_optimizer(model, lr=2e-4)
        loss_module = ChunkedCausalLMLoss(model, chunk_tokens=plan.loss_chunk_tokens)
        decoder = loss_module.decoder
        patches.enter_context(patched(ChunkedCausalLMLoss, "_chunk_loss", "loss"))
        patches.enter_context(patched(flat.LoRASPStore, "refresh", "hooks"))
        patches.enter_context(patched(step.torch.nn.utils, "clip_grad_norm_", "optimizer"))

        def one_step():
            batch = next_batch(args.batch)
            return step.train_step(loss_module, optimizer, split(batch, plan.micro_batch), plan, 1.0)

        setting = {key: getattr(plan, key) for key in ("rank", "quant_bits", "compute_dtype", "micro_batch", "gradient_checkpointing", "loss_chunk_tokens")}
    else:
        from peft import LoraConfig, get_peft_model

        base = load_model(model_name, compute_dtype=torch.bfloat16, device=device)
        base.config.use_cache = False
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True if device.type == "cuda" else None)
        model.train()
        transformer = model.get_base_model()
        decoder = transformer.model
        patches.enter_context(patched(transformer.lm_head, "forward", "loss"))
        patches.enter_context(patched(transformer, "loss_function", "loss"))
        clip = labelled("optimizer", torch.nn.utils.clip_grad_norm_)

        def one_step():
            batch = next_batch(args.batch)
            ids = batch["input_ids"].to(device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            clip(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return {"loss": float(loss)}

        setting = {"rank": 16, "base": "bf16"}
    patches.enter_context(patched(decoder, "forward", "forward"))
    patches.enter_context(patched(torch.Tensor, "backward", "backward"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with patches:
        one_step()  # warm-up
        with profile(activities=activities) as prof:
            walls = []
            for _ in range(args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                one_step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                walls.append(time.perf_counter() - started)
    phases = {key: value / args.steps for key, value in exclusive_ms(prof.events()).items()}
    wall_ms = 1e3 * sum(walls) / len(walls)
    phases["bookkeeping"] = wall_ms - sum(value for key, value in phases.items() if key != "bookkeeping")
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return {"method": method, "setting": setting, "wall_ms": wall_ms, "phases": phases, "top_ops": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-config", help="catalog id: a random-init model of its shape instead of SmolLM2-135M")
    parser.add_argument("--batch", type=int, help="default 4 (8 with --model-config)")
    parser.add_argument("--seq-len", type=int, help="default 256 (512 with --model-config)")
    parser.add_argument("--ops", action="store_true", help="also print each method's top ops by self CPU time")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq_len = args.seq_len or (512 if args.model_config else 256)
    args.batch = args.batch or (8 if args.model_config else 4)
    if args.child:
        print("RESULT " + json.dumps(run(args.child, args, args.model, args.data)))
        return

    import subprocess

    from bench_train import random_model, write_data

    results = []
    with tempfile.TemporaryDirectory() as folder:
        data = write_data(Path(folder) / "train.jsonl")
        model = str(random_model(args.model_config, Path(folder) / "model")) if args.model_config else args.model
        for method in ("lorasp-edge", "peft"):  # a fresh process each
            command = [sys.executable, __file__, "--child", method, "--model", model, "--data", str(data), "--device", args.device,
                       "--rank", str(args.rank), "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len)] + (["--model-config", args.model_config] if args.model_config else [])
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:]))
    print(f"{args.model_config or 'smollm2-135m'} on {args.device}, batch {args.batch} x {args.seq_len}, mean of {args.steps} profiled steps (ms per step)")
    print("| phase | " + " | ".join(r["method"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for phase in PHASES:
        print(f"| {phase} | " + " | ".join(f"{r['phases'][phase]:.0f}" for r in results) + " |")
    print("| **step (wall)** | " + " | ".join(f"**{r['wall_ms']:.0f}**" for r in results) + " |")
    for r in results:
        print(f"{r['method']}: {r['setting']}")
        if args.ops:
            print(r["top_ops"])


if __name__ == "__main__":
    main()

"""lorasp-edge train against PEFT LoRA (default settings, fp32) and full fine-tuning.

    python tools/bench_train.py [--steps 12] [--warmup 3] [--rounds 2] [--json out.json]

The bundled SmolLM2-135M-Instruct, batch 4 x 256 tokens, the same packed blocks in the same order
for every method (lorasp_edge.train.data.PackedStream over one generated JSONL file), the same number
of optimizer steps.
- lorasp-edge: `run_training` (what `lorasp-edge train` runs) with the plan the planner makes for
  this machine's free memory at seq 256, batch 4, lr 2e-4.
- PEFT LoRA default: fp32 model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
  torch AdamW lr 2e-4, `model(input_ids, labels).loss`.
- full fine-tuning: fp32, every parameter trained, torch AdamW lr 2e-5.
Each method runs in a fresh process; peak RSS is that process's whole-life maximum
(getrusage RUSAGE_CHILDREN), tokens/s is the median step after the warm-up steps, loss is the mean
of the last 3 steps. Rounds alternate the order of methods; the table shows medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ_LEN, BATCH = 256, 4
METHODS = ("lorasp-edge", "peft-lora", "full")


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


def batches(data: Path, steps: int):
    from lorasp_edge.models import load_tokenizer
    from lorasp_edge.train.data import PackedStream

    stream = PackedStream(data, load_tokenizer("smollm2-135m"), SEQ_LEN)
    return [stream.next_batch(BATCH) for _ in range(steps)]


def run_baseline(method: str, data: Path, steps: int, warmup: int) -> dict:
    import torch

    from lorasp_edge.models import load_model

    blocks = batches(data, steps)
    model = load_model("smollm2-135m", compute_dtype=torch.float32, device="cpu")
    model.config.use_cache = False
    if method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        lr = 2e-4
    else:
        lr = 2e-5
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    times, losses = [], []
    for batch in blocks:
        started = time.perf_counter()
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(float(loss))
    return {"step_times": times[warmup:], "losses": losses, "trainable": sum(p.numel() for p in params)}


def run_lorasp(data: Path, steps: int, warmup: int) -> dict:
    from lorasp_edge.train.job import TrainRequest, run_training
    from lorasp_edge.train.report import read_metrics
    from lorasp_edge.train.settings import TrainSettings

    with tempfile.TemporaryDirectory() as out:
        summary = run_training(
            TrainRequest(
                data=data, out=Path(out) / "run", model="smollm2-135m", seq_len=SEQ_LEN, batch=BATCH,
                settings=TrainSettings(steps=steps, lr=2e-4, warmup_steps=1, save_every=0),
            ),
            progress=False,
        )
        records = read_metrics(Path(out) / "run" / "metrics.jsonl")
        plan = json.loads((Path(out) / "run" / "plan.json").read_text())
    return {
        "step_times": [SEQ_LEN * BATCH / r["tokens_per_s"] for r in records[warmup:]],
        "losses": [r["loss"] for r in records],
        "plan": {k: plan[k] for k in ("quant_bits", "compute_dtype", "rank", "micro_batch", "grad_accum", "gradient_checkpointing", "target_modules")},
        "summary": summary,
    }


def child(method: str, data: Path, steps: int, warmup: int) -> None:
    result = run_lorasp(data, steps, warmup) if method == "lorasp-edge" else run_baseline(method, data, steps, warmup)
    # Whole-life peak of this process (Linux reports KiB).
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result, default=str))


def measure(method: str, data: Path, steps: int, warmup: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", method, "--data", str(data), "--steps", str(steps), "--warmup", str(warmup)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["tokens_per_s"] = SEQ_LEN * BATCH / statistics.median(result["step_times"])
    result["final_loss"] = statistics.mean(result["losses"][-3:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.steps, args.warmup)
        return

    methods = args.methods.split(",")
    results = {method: [] for method in methods}
    with tempfile.TemporaryDirectory() as folder:
        data = write_data(Path(folder) / "train.jsonl")
        for round_index in range(args.rounds):
            order = methods if round_index % 2 == 0 else methods[::-1]
            for method in order:
                result = measure(method, data, args.steps, args.warmup)
                results[method].append(result)
                print(
                    f"round {round_index + 1} {method:12s} {result['tokens_per_s']:7.1f} tokens/s  "
                    f"peak {result['peak_rss_bytes'] / 1e9:5.2f} GB  loss {result['final_loss']:.4f}",
                    file=sys.stderr,
                )

    def median(method, key):
        return statistics.median(r[key] for r in results[method])

    reference = "peft-lora"
    print("| method | tokens/s | x PEFT | peak RSS (GB) | / PEFT | final loss | / PEFT |")
    print("|---|---|---|---|---|---|---|")
    for method in methods:
        speed, peak, loss = median(method, "tokens_per_s"), median(method, "peak_rss_bytes"), median(method, "final_loss")
        if reference in results:
            ratios = (speed / median(reference, "tokens_per_s"), peak / median(reference, "peak_rss_bytes"), loss / median(reference, "final_loss"))
        else:
            ratios = (float("nan"),) * 3
        print(f"| {method} | {speed:.1f} | {ratios[0]:.2f} | {peak / 1e9:.2f} | {ratios[1]:.2f} | {loss:.4f} | {ratios[2]:.3f} |")
    if "lorasp-edge" in results:
        print(f"\nlorasp-edge plan: {results['lorasp-edge'][0]['plan']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

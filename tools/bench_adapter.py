"""LoRA-SP against PEFT LoRA on the same model: parameters, optimizer state, step time, peak RSS.

    python tools/bench_adapter.py [--rounds 3] [--steps 10] [--json out.json]

Model: a Llama config (hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1376, vocab 32000),
built from the config with a fixed seed; batch 4 x 256 tokens; rank 16, alpha 32, all linear layers;
fp32; AdamW lr 2e-4, gradient clipping 1.0. Each measurement runs in a fresh process; rounds
alternate which method goes first; the table shows the median over rounds of each round's
median step time (10 steps after 3 warm-up steps) and peak RSS, and the ratio LoRA-SP / LoRA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

CONFIG = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
)


def measure(method: str, steps: int, warmup: int) -> dict:
    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    process = psutil.Process()
    peak = [process.memory_info().rss]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    if method == "lorasp":
        from lorasp_edge.train.adapter import LoRASPConfig, apply_lorasp, count_parameters, trainable_parameters
        from lorasp_edge.train.optim import LoRASPAdamW

        model = apply_lorasp(model, LoRASPConfig(rank=16, alpha=32, target_modules="all-linear"))
        optimizer = LoRASPAdamW(trainable_parameters(model), lr=2e-4)
        trainable = count_parameters(model)["trainable"]
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from lorasp_edge.train.optim import state_bytes

    params = [p for p in model.parameters() if p.requires_grad]
    batch = torch.randint(0, CONFIG["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(1))
    model.train()
    times, losses = [], []
    for step in range(warmup + steps):
        started = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - started)
        losses.append(float(loss))
    stop.set()
    return {
        "method": method,
        "trainable": trainable,
        "optimizer_state_bytes": state_bytes(optimizer),
        "median_step_s": statistics.median(times),
        "peak_rss_bytes": max(peak[0], process.memory_info().rss),
        "final_loss": losses[-1],
    }


def run_in_fresh_process(method: str, steps: int, warmup: int) -> dict:
    code = f"import json, sys; sys.path.insert(0, 'tools'); import bench_adapter as b; print(json.dumps(b.measure({method!r}, {steps}, {warmup})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()

    results = {"lora": [], "lorasp": []}
    for round_index in range(args.rounds):
        order = ["lora", "lorasp"] if round_index % 2 == 0 else ["lorasp", "lora"]
        for method in order:
            result = run_in_fresh_process(method, args.steps, args.warmup)
            results[method].append(result)
            print(f"round {round_index + 1} {method:7s} step {result['median_step_s'] * 1e3:7.1f} ms  peak {result['peak_rss_bytes'] / 2**20:7.0f} MiB", file=sys.stderr)

    def median(method, key):
        return statistics.median(r[key] for r in results[method])

    rows = [
        ("trainable parameters", "trainable", lambda v: f"{v:,.0f}"),
        ("optimizer state (bytes)", "optimizer_state_bytes", lambda v: f"{v:,.0f}"),
        ("median step time (ms)", "median_step_s", lambda v: f"{v * 1e3:.1f}"),
        ("peak RSS (MiB)", "peak_rss_bytes", lambda v: f"{v / 2**20:.0f}"),
    ]
    print(f"| {'':24s} | {'PEFT LoRA':>12s} | {'LoRA-SP':>12s} | {'LoRA-SP / LoRA':>14s} |")
    print(f"|{'-' * 26}|{'-' * 14}|{'-' * 14}|{'-' * 16}|")
    for label, key, fmt in rows:
        lora, lorasp = median("lora", key), median("lorasp", key)
        print(f"| {label:24s} | {fmt(lora):>12s} | {fmt(lorasp):>12s} | {lorasp / lora:>14.3f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

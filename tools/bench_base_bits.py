"""Step time of a 4-bit (NF4) against an 8-bit (LLM.int8) frozen base, side by side, on one device.

    python tools/bench_base_bits.py [--model smollm2-135m] [--seq-len 256] [--batch 2] [--rank 16]
                                    [--steps 4] [--warmup 1] [--rounds 2] [--dtypes float32,bfloat16]
    python tools/bench_base_bits.py --layers-of llama-3.1-8b [--seq-len 512] [--repeats 3]

--layers-of: one decoder layer's frozen linears at a catalog model's shapes (bitsandbytes Linear4bit
NF4 with double quantization against Linear8bitLt), forward and the input's gradient (what a frozen
base computes in a LoRA step) on seq-len tokens, in one process, the two alternating; the table
sums one layer's linears (median of the repeats).

Otherwise each (bits, compute dtype) runs in a fresh process with the same setting otherwise (every linear
layer adapted, no checkpointing, one micro-batch a step, the same packed blocks), through what
`lorasp-edge train` runs: plan_for_setting, build_model, build_optimizer, train_step. The base is
pre-quantized into a scratch cache first (lorasp_edge.prequantize), so loading is not timed.
Rounds alternate the order; the table shows the median step time after the warm-up steps and the
planner's predicted peak for the setting. The planner uses it to order 8- and 4-bit bases
(lorasp_edge.plan.search).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(args) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import blocks, split

    from lorasp_edge.plan import memory
    from lorasp_edge.plan.catalog import model_info
    from lorasp_edge.plan.search import Device, plan_for_setting
    from lorasp_edge.train.loop import build_model, build_optimizer
    from lorasp_edge.train.step import train_step

    arch = model_info(args.model).architecture
    targets = tuple(arch.module_names())
    setting = memory.Candidate(args.bits, args.dtype, args.rank, targets, arch.num_layers, False, args.batch, args.seq_len,
                               args.batch * (args.seq_len - 1))
    plan = plan_for_setting(args.model, setting, Device("cpu", args.dtype == "bfloat16", (16, 8, 4)))
    model = build_model(plan, args.model, device=torch.device("cpu"))
    optimizer = build_optimizer(model)
    data = blocks(Path(args.data), args.seq_len, args.batch, args.steps)
    times, losses = [], []
    for batch in data:
        started = time.perf_counter()
        result = train_step(model, optimizer, split(batch, plan.micro_batch), plan, 1.0)
        times.append(time.perf_counter() - started)
        losses.append(result["loss"])
    print("RESULT " + json.dumps({"times": times, "losses": losses, "predicted_bytes": plan.memory["total_bytes"]}))


def layer_times(model_id: str, tokens: int, dtype_name: str, repeats: int) -> dict[int, float]:
    """Seconds for one decoder layer's frozen linears, forward + input gradient, by base bits."""
    import bitsandbytes as bnb
    import torch

    from lorasp_edge.plan.catalog import model_info

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    layers = {}
    for linear in model_info(model_id).architecture.linears():
        weight = torch.randn(linear.d_out, linear.d_in) * 0.02
        four = bnb.nn.Linear4bit(linear.d_in, linear.d_out, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        four.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type="nf4", compress_statistics=True)
        eight = bnb.nn.Linear8bitLt(linear.d_in, linear.d_out, bias=False, has_fp16_weights=False)
        eight.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        layers[linear.name] = {4: four.to("cpu"), 8: eight.to("cpu")}
    times: dict[int, list[float]] = {4: [], 8: []}
    for repeat in range(repeats + 1):
        for bits in (8, 4) if repeat % 2 == 0 else (4, 8):
            total = 0.0
            for modules in layers.values():
                x = torch.randn(tokens, modules[bits].in_features, dtype=dtype, requires_grad=True)
                started = time.perf_counter()
                modules[bits](x).sum().backward()
                total += time.perf_counter() - started
            if repeat:  # the first pass warms up
                times[bits].append(total)
    return {bits: statistics.median(values) for bits, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--layers-of", help="catalog id: time one decoder layer's 4- and 8-bit linears at its shapes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.layers_of:
        print(f"{args.layers_of}: one decoder layer's linears, forward + input gradient, {args.seq_len} tokens, median of {args.repeats}")
        print("| compute | 8-bit s | 4-bit s | 4-bit / 8-bit |")
        print("|---|---:|---:|---:|")
        for dtype in args.dtypes.split(","):
            t = layer_times(args.layers_of, args.seq_len, dtype, args.repeats)
            print(f"| {dtype} | {t[8]:.3f} | {t[4]:.3f} | {t[4] / t[8]:.2f} |")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import write_data

    scratch = Path(tempfile.mkdtemp(prefix="bench-bits-"))
    data = write_data(scratch / "data.jsonl")
    env = dict(os.environ, LORASP_EDGE_CACHE=str(scratch / "cache"))
    configs = [(bits, dtype) for dtype in args.dtypes.split(",") for bits in (8, 4)]
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for bits, dtype in configs if round_ % 2 == 0 else list(reversed(configs)):
            command = [sys.executable, __file__, "--child", "--bits", str(bits), "--dtype", dtype, "--data", str(data), "--model", args.model,
                       "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--rank", str(args.rank), "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{bits}-bit {dtype} failed:\n{done.stderr[-3000:]}")
            runs.setdefault(f"{bits}-bit {dtype}", []).append(json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:]))
    print(f"{args.model}, {args.batch} x {args.seq_len}, rank {args.rank}, all linear layers, no checkpointing, {args.rounds} rounds")
    print("| base | compute | step s (median) | tokens/s | loss (last) | planned peak MB |")
    print("|---|---|---:|---:|---:|---:|")
    summary = {}
    for name, results in runs.items():
        step = statistics.median(t for r in results for t in r["times"][args.warmup :])
        bits, dtype = name.split(" ")
        summary[name] = {"step_s": step, "tokens_per_s": args.batch * args.seq_len / step, "loss": results[-1]["losses"][-1], "predicted_bytes": results[0]["predicted_bytes"]}
        print(f"| {bits} | {dtype} | {step:.2f} | {args.batch * args.seq_len / step:,.0f} | {results[-1]['losses'][-1]:.3f} | {results[0]['predicted_bytes'] / 1e6:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs, "summary": summary}, indent=1, default=str))


if __name__ == "__main__":
    main()

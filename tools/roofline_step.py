"""How close lorasp-edge's training step is to what its matmuls alone take on this machine.

    python tools/roofline_step.py [--task text|chat] [--steps 3] [--batch 4] [--seq-len 256] [--mem 8e9] [--json out.json]
    python tools/roofline_step.py --plan-dtype float32      # the plan of a CPU without native bf16
    python tools/roofline_step.py --model-config qwen2.5-0.5b --device cuda

One step of the planner's plan (build_model / build_optimizer / train_step, what `lorasp-edge train`
runs) on the bundled SmolLM2-135M-Instruct (or a random-init model of a catalog shape), on the data
tools/bench_train.py uses (`--task`: plain text, or the README's chat task).

1. Matmul work. A TorchDispatchMode records every matrix product the step runs (aten mm, addmm,
   addmm_, bmm, baddbmm: lm_head, the base linears, LoRA A and B, attention where it is not fused, forward
   and backward), with its shapes and dtype; FLOPs = 2 M N K each (times the batch for bmm).
2. The floor. Each distinct (op, shapes, dtype) is timed alone on this machine (median of
   `--gemm-reps` runs after a warm-up) and multiplied by how often the step ran it: the time the
   step would take if it did its matmuls at this machine's rate at those shapes and nothing else.
   Scaled dot-product attention kernels are not matrix products here and count as non-matmul time.
3. The step. The median wall time of `--steps` steps after one warm-up, and the ratio step / floor.
4. Where the rest goes: torch.profiler over one step, the top ops by self time that are not matrix
   products (aten ops, and bitsandbytes' dequantization on a 4/8-bit base; op name, ms per step,
   share of the step); `--by-shape` splits them by input shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MATMUL_OPS = ("mm", "addmm", "addmm_", "bmm", "baddbmm")


def matmul_flops(op: str, shapes: tuple[tuple[int, ...], ...]) -> int:
    """2 M N K for mm/addmm/addmm_ (addmm's first input is the bias, or the output addmm_ adds to),
    times the batch for bmm/baddbmm."""
    first, second = (shapes[1], shapes[2]) if op in ("addmm", "addmm_", "baddbmm") else (shapes[0], shapes[1])
    if op in ("mm", "addmm", "addmm_"):
        return 2 * first[0] * first[1] * second[1]
    return 2 * first[0] * first[1] * first[2] * second[2]


def record_matmuls(run_step) -> Counter:
    """Counter of (op, input shapes, dtype) -> calls, for every matrix product `run_step()` runs."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: Counter = Counter()
    wanted = {getattr(torch.ops.aten, name).default: name for name in MATMUL_OPS}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = wanted.get(func)
            if name is not None:
                tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
                calls[(name, tuple(tuple(t.shape) for t in tensors), str(tensors[-1].dtype))] += 1
            return func(*args, **(kwargs or {}))

    with Recorder():
        run_step()
    return calls


def time_matmul(op: str, shapes, dtype: str, device, reps: int) -> float:
    """Median seconds of one call of `op` at these shapes, on fresh random inputs."""
    import torch

    tensors = [torch.randn(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device) for shape in shapes]
    function = getattr(torch.ops.aten, op).default

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    function(*tensors)
    times = []
    for _ in range(reps):
        sync()
        started = time.perf_counter()
        function(*tensors)
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("text", "chat"), default="text")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-config", help="catalog id: a random-init model of its shape instead of --model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mem", type=float, default=8e9, help="budget the plan is made for, bytes (default 8e9)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median)")
    parser.add_argument("--gemm-reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="non-matmul ops listed")
    parser.add_argument("--plan-dtype", choices=("auto", "float32"), default="auto",
                        help="float32: the plan a CPU without native bf16 gets (an AVX2 laptop's), here")
    parser.add_argument("--by-shape", action="store_true", help="list the non-matmul ops by op and input shapes (record_shapes)")
    parser.add_argument("--json")
    args = parser.parse_args()

    from bench_train import blocks, random_model, split, write_chat_data, write_data

    from lorasp_edge.plan.search import local_device, plan_training
    from lorasp_edge.train.loop import build_model, build_optimizer
    from lorasp_edge.train.loss import ChunkedCausalLMLoss
    from lorasp_edge.train.step import train_step

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        data = (write_chat_data if args.task == "chat" else write_data)(Path(folder) / "train.jsonl")
        model_name = str(random_model(args.model_config, Path(folder) / "model")) if args.model_config else args.model
        planned_on = dataclasses.replace(local_device(), bf16=False) if args.plan_dtype == "float32" else None
        plan = plan_training(model=model_name, budget_bytes=int(args.mem), seq_len=args.seq_len, batch=args.batch, device=planned_on)
        step_batches = blocks(data, args.seq_len, args.batch, args.steps + 3)
        model = build_model(plan, model_name, device=device)
        optimizer = build_optimizer(model, lr=2e-4)
        loss_module = ChunkedCausalLMLoss(model, chunk_tokens=plan.loss_chunk_tokens)
        batches = iter(step_batches)

        def run_step():
            train_step(loss_module, optimizer, split(next(batches), plan.micro_batch), plan, 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize()

        run_step()  # warm-up
        calls = record_matmuls(run_step)
        step_times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            run_step()
            step_times.append(time.perf_counter() - started)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.by_shape) as profiler:
            run_step()

    rows, floor, flops = [], 0.0, 0
    for (op, shapes, dtype), count in sorted(calls.items(), key=lambda item: -matmul_flops(item[0][0], item[0][1]) * item[1]):
        seconds = time_matmul(op, shapes, dtype, device, args.gemm_reps)
        work = matmul_flops(op, shapes)
        floor += seconds * count
        flops += work * count
        rows.append({"op": op, "shapes": shapes, "dtype": dtype, "calls": count, "gflops": work * count / 1e9,
                     "ms": seconds * count * 1e3, "gflop_per_s": work / seconds / 1e9})
    step = statistics.median(step_times)
    matmul_names = {f"aten::{name}" for name in MATMUL_OPS}
    averages = profiler.key_averages(group_by_input_shape=args.by_shape)
    # bitsandbytes' ops (a 4/8-bit base's dequantization) are torch custom ops outside aten.
    others = [event for event in averages if event.key not in matmul_names and event.key.startswith(("aten::", "bitsandbytes::"))]
    others.sort(key=lambda event: -event.self_cpu_time_total)
    tokens = args.seq_len * args.batch
    print(f"{args.model_config or args.model} on {args.device}, {args.task} data, batch {args.batch} x {args.seq_len}; plan: "
          f"{plan.quant_bits}-bit base, {plan.compute_dtype}, rank {plan.rank}, micro-batch {plan.micro_batch} x {plan.grad_accum}, "
          f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}")
    print(f"step {step * 1e3:.0f} ms ({tokens / step:.1f} tokens/s, median of {args.steps}); matmul floor {floor * 1e3:.0f} ms "
          f"({flops / 1e9:.1f} GFLOP at {flops / floor / 1e9:.1f} GFLOP/s); step / floor = {step / floor:.2f}x")
    print("\n| matmul | shapes | calls | GFLOP | ms | GFLOP/s |\n|---|---|---:|---:|---:|---:|")
    for row in rows[:12]:
        print(f"| {row['op']} | {' x '.join(str(list(s)) for s in row['shapes'])} | {row['calls']} | {row['gflops']:.2f} | {row['ms']:.1f} | {row['gflop_per_s']:.1f} |")
    print("\n| top non-matmul op | ms per step | share of step |\n|---|---:|---:|")
    for event in others[: args.top]:
        ms = event.self_cpu_time_total / 1e3
        name = f"{event.key} {event.input_shapes} x{event.count}" if args.by_shape else event.key
        print(f"| {name} | {ms:.1f} | {ms / (step * 1e3):.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "task": args.task, "step_s": step, "step_times": step_times, "floor_s": floor, "matmul_gflop": flops / 1e9,
            "ratio": step / floor, "matmuls": rows,
            "non_matmul_ms": {event.key: event.self_cpu_time_total / 1e3 for event in others[: args.top]},
        }, indent=2, default=str))


if __name__ == "__main__":
    main()

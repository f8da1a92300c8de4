"""Tokens/s of `lorasp-edge train` in one process and data-parallel under torchrun.

    python tools/bench_distributed.py [--nproc 1,2] [--steps 8] [--warmup 2] [--rounds 2]

The bundled SmolLM2-135M, seq 128, effective batch 8 blocks (1 process: micro-batch 8; N processes:
micro-batch 8/N each), bf16 base, fixed masks, the same data. Tokens/s is the median over the steps
after the warm-up (all ranks' tokens), from metrics.jsonl. On one machine the processes share its
cores (torchrun sets OMP_NUM_THREADS=1 per process), so this measures the cost of the all-reduce
and the split, not a speed-up from more hardware.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import write_data  # noqa: E402  (a sibling script)

SEQ_LEN, EFFECTIVE_BATCH = 128, 8


def plan_file(folder: Path, nproc: int) -> Path:
    from lorasp_edge.plan.search import plan_training

    plan = plan_training(model="smollm2-135m", budget_bytes=16 * 10**9, seq_len=SEQ_LEN, batch=EFFECTIVE_BATCH, world_size=nproc)
    plan = dataclasses.replace(plan, micro_batch=EFFECTIVE_BATCH // nproc, grad_accum=1, rank=16, alpha=32.0, gradient_checkpointing=False)
    path = folder / f"plan{nproc}.json"
    path.write_text(json.dumps(plan.to_dict()))
    return path


def run(nproc: int, folder: Path, data: Path, steps: int, warmup: int) -> float:
    out = folder / f"run{nproc}"
    train = ["-m", "lorasp_edge", "train", "--model", "smollm2-135m", "--data", str(data), "--out", str(out),
             "--plan", str(plan_file(folder, nproc)), "--steps", str(steps), "--save-every", "0", "--no-progress"]
    if nproc == 1:
        command = [sys.executable, *train]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}", *train]
    subprocess.run(command, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return statistics.median(r["tokens_per_s"] for r in records[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    speeds = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as folder:
        data = write_data(Path(folder) / "train.jsonl")
        for round_index in range(args.rounds):
            for n in counts if round_index % 2 == 0 else counts[::-1]:
                speeds[n].append(run(n, Path(folder), data, args.steps, args.warmup))
                print(f"round {round_index + 1}: {n} process(es) {speeds[n][-1]:.1f} tokens/s", file=sys.stderr)
    base = statistics.median(speeds[counts[0]])
    print("| processes | tokens/s (median) | vs 1 process |")
    print("|---|---|---|")
    for n in counts:
        print(f"| {n} | {statistics.median(speeds[n]):.1f} | {statistics.median(speeds[n]) / base:.2f} |")


if __name__ == "__main__":
    main()

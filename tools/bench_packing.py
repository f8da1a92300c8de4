"""Packing benchmark: training tokens/s with whole-example packing against continuous packing.

Whole-example packing restarts position ids at every prompt/completion or chat example, and
transformers then builds a block-diagonal causal mask (masking_utils) instead of taking the plain
causal fast path. This measures what that costs: the same packed blocks (same tokens, same labels)
are trained with their position ids and without them (positions 0..seq_len-1, which is how blocks
were trained before: examples attend to each other). Steps alternate between the two so that load
from other processes falls on both alike; the result is the median tokens/s of each and their ratio.

    python tools/bench_packing.py                                  # smollm2-135m, 2 x 512, 4 rounds
    python tools/bench_packing.py --model path/to/model --seq-len 256 --batch 4 --rounds 6

Target (issue 12): the mask costs <= 5% tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def write_examples(path: Path, count: int, seed: int = 0) -> Path:
    """Prompt/completion lines of 10-200 words: several examples per block, as in instruction data."""
    rng = random.Random(seed)
    words = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was", "by", "at", "be", "this", "from", "or", "have", "an", "are", "not"]
    with open(path, "w") as file:
        for _ in range(count):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(10, 120)))
            completion = " ".join(rng.choice(words) for _ in range(rng.randint(5, 80)))
            file.write(json.dumps({"prompt": prompt, "completion": " " + completion}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per variant, alternating (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    from lorasp_edge.models import load_tokenizer
    from lorasp_edge.plan.search import plan_training
    from lorasp_edge.train.data import PackedStream
    from lorasp_edge.train.loop import build_model, build_optimizer
    from lorasp_edge.train.loss import ChunkedCausalLMLoss
    from lorasp_edge.train.step import DTYPES, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = plan_training(model=args.model, budget_bytes=16 * 10**9, seq_len=args.seq_len, batch=args.batch)
    plan = dataclasses.replace(plan, quant_bits=16, micro_batch=args.batch, grad_accum=1, gradient_checkpointing=False)
    tokenizer = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as folder:
        data = write_examples(Path(folder) / "pc.jsonl", count=2000)
        stream = PackedStream(data, tokenizer, args.seq_len, shuffle_buffer=0)
        batches = [stream.next_batch(args.batch) for _ in range(args.rounds + 1)]
        stream.close()
    # position runs per block: examples, plus a padding run where one did not fit
    runs = [row.count(0) for batch in batches for row in batch["position_ids"].tolist()]
    model = build_model(plan, args.model, device="cpu")
    loss_module = ChunkedCausalLMLoss(model, chunk_tokens=plan.loss_chunk_tokens)
    optimizer = build_optimizer(model, lr=1e-4)
    dtype = DTYPES[plan.compute_dtype]

    def timed(batch: dict, with_positions: bool) -> float:
        if not with_positions:
            batch = {key: value for key, value in batch.items() if key != "position_ids"}
        started = time.perf_counter()
        result = train_step(loss_module, optimizer, [batch], plan, compute_dtype=dtype)
        seconds = time.perf_counter() - started
        assert result["skipped"] is None, result
        return result["tokens"] / seconds

    speeds = {"whole examples (block-diagonal mask)": [], "continuous (causal mask)": []}
    for index, batch in enumerate(batches):
        for with_positions, name in ((True, "whole examples (block-diagonal mask)"), (False, "continuous (causal mask)")):
            speed = timed(batch, with_positions)
            if index > 0:  # the first round warms up both
                speeds[name].append(speed)
            print(f"  step {index}: {name:38s} {speed:8.0f} tokens/s" + ("  (warm-up)" if index == 0 else ""), flush=True)
    masked, plain = (statistics.median(values) for values in speeds.values())
    print(f"model {args.model}, {plan.compute_dtype}, batch {args.batch} x {args.seq_len}, {len(batches) - 1} timed steps each, "
          f"{statistics.mean(runs):.1f} position runs per block on average; torch threads {torch.get_num_threads()}")
    for name, values in speeds.items():
        print(f"  {name:38s} median {statistics.median(values):8.0f} tokens/s  (min {min(values):.0f}, max {max(values):.0f})")
    print(f"ratio whole/continuous: {masked / plain:.3f} ({(1 - masked / plain) * 100:+.1f}% cost; target <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

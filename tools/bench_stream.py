"""Streaming benchmark: peak RSS of one pass over a large JSONL against a small one.

The data stream must not grow with the file: the target is a large-file peak RSS within 50 MB of
the small-file peak. Each file is streamed in a fresh subprocess (so imports and allocator state do
not carry over) through `PackedStream.next_batch`, taking a state_dict every 100 batches as the
trainer's checkpoints do, in the shuffled order training uses (--shuffle-buffer, default the
trainer's); the child reports its peak RSS (getrusage ru_maxrss, the kernel's exact
high-water mark) and its throughput.

    python tools/bench_stream.py                      # 500 MB against 1 MB
    python tools/bench_stream.py --size-mb 50 --tokenizer path/to/model_dir

The data mixes `text` and `prompt`/`completion` lines of 5-400 words. Without --tokenizer, a
byte-level BPE tokenizer (vocab 2000) is trained on a sample of it here.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorasp_edge.train.settings import DEFAULT_SHUFFLE_BUFFER

WORDS = "the a of to and in is it that for on with as was by at be this from or have an are not".split() + [
    f"w{n}" for n in range(400)
]


def sample_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 400)))
        if rng.random() < 0.5:
            record = {"text": words}
        else:
            cut = words.find(" ", len(words) // 3)
            record = {"prompt": words[:cut], "completion": words[cut:]}
        lines.append(json.dumps(record) + "\n")
    return lines


def write_jsonl(path: Path, size_bytes: int, pool: list[str]) -> int:
    """Cycle through the pool until size_bytes; returns the bytes written."""
    written = 0
    with open(path, "w") as file:
        while written < size_bytes:
            for line in pool:
                file.write(line)
                written += len(line)
                if written >= size_bytes:
                    break
    return written


def train_tokenizer(folder: Path, pool: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(pool, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def stream_once(data: Path, tokenizer_dir: str, seq_len: int, micro_batch: int, shuffle_buffer: int) -> dict:
    """The child: one full pass, then the figures as JSON on stdout."""
    from transformers import AutoTokenizer

    from lorasp_edge.train.data import PackedStream

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    started = time.perf_counter()
    # skip_bad_lines: a few completions here are longer than seq_len, which a whole example cannot be
    stream = PackedStream(data, tokenizer, seq_len, epochs=1, shuffle_buffer=shuffle_buffer, seed=0, skip_bad_lines=True)
    batches, largest_state = 0, 0
    while stream.next_batch(micro_batch) is not None:
        batches += 1
        if batches % 100 == 0:
            largest_state = max(largest_state, len(json.dumps(stream.state_dict())))
    seconds = time.perf_counter() - started
    return {
        "file_bytes": data.stat().st_size,
        "batches": batches,
        "tokens": stream.tokens_seen,
        "seconds": round(seconds, 2),
        "mb_per_s": round(data.stat().st_size / 1e6 / seconds, 2),
        "tokens_per_s": round(stream.tokens_seen / seconds),
        "largest_state_json_bytes": largest_state,
        "lines_skipped": stream.bad_lines,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    }


def measure(data: Path, tokenizer_dir: str, seq_len: int, micro_batch: int, shuffle_buffer: int) -> dict:
    command = [sys.executable, __file__, "--child", str(data), "--tokenizer", tokenizer_dir]
    command += ["--seq-len", str(seq_len), "--micro-batch", str(micro_batch), "--shuffle-buffer", str(shuffle_buffer)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=500, help="size of the large file")
    parser.add_argument("--baseline-mb", type=float, default=1, help="size of the small file")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--shuffle-buffer", type=int, default=DEFAULT_SHUFFLE_BUFFER, help="examples shuffled within (0: file order)")
    parser.add_argument("--tokenizer", help="a local tokenizer folder; default: train a small BPE here")
    parser.add_argument("--workdir", help="where to write the data (default: a temp folder, removed after)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(stream_once(Path(args.child), args.tokenizer, args.seq_len, args.micro_batch, args.shuffle_buffer)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        folder = Path(folder)
        pool = sample_lines(2000)
        tokenizer_dir = args.tokenizer or str(train_tokenizer(folder / "tokenizer", pool))
        results = {}
        for name, size_mb in (("small", args.baseline_mb), ("large", args.size_mb)):
            data = folder / f"{name}.jsonl"
            write_jsonl(data, int(size_mb * 1e6), pool)
            results[name] = measure(data, tokenizer_dir, args.seq_len, args.micro_batch, args.shuffle_buffer)
            data.unlink()
    difference = results["large"]["peak_rss_bytes"] - results["small"]["peak_rss_bytes"]
    results["peak_rss_difference_bytes"] = difference
    results["within_50mb"] = difference <= 50e6
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'file':>8} {'MB':>9} {'tokens':>12} {'seconds':>8} {'MB/s':>6} {'state B':>8} {'peak RSS MB':>12}")
    for name in ("small", "large"):
        row = results[name]
        print(
            f"{name:>8} {row['file_bytes'] / 1e6:9.1f} {row['tokens']:12d} {row['seconds']:8.1f} {row['mb_per_s']:6.2f} "
            f"{row['largest_state_json_bytes']:8d} {row['peak_rss_bytes'] / 1e6:12.1f}"
        )
    verdict = "within" if results["within_50mb"] else "OVER"
    print(f"peak RSS difference {difference / 1e6:+.1f} MB ({verdict} the 50 MB target)")


if __name__ == "__main__":
    main()

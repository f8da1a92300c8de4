"""A plain-text corpus of real English, held out by document, written from what Python ships (no downloads).

    python tools/make_text_data.py [--out data/text] [--every 5]

The documents are the topics of the Python language reference that `pydoc` shows (`help("assert")`,
`help("calls")`, ...): the standard library's `pydoc_data.topics`, 79 documents and about 465,000
characters of technical English prose with code examples, written by people for people. Every
Python install carries them, so the corpus is the same on every machine with the same Python.

Split by document, never inside one: the topics sorted by name, every `--every`-th (the 4th, 8th,
...) held out. Files (JSONL, `{"topic": ..., "text": ...}` a line, the plain-text layout
`lorasp_edge.train.data.PackedStream` reads):

    train.jsonl     the other documents, in name order
    heldout.jsonl   the held-out documents

A continued pre-training run trains on `train.jsonl` and reports perplexity on `heldout.jsonl`: text
of the same kind that the run never saw. The files are rebuilt from the installed Python, so they
are not committed (`/data/` is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from make_task_data import write_jsonl  # a sibling script (tools/ is on the path when either runs)


def documents() -> list[tuple[str, str]]:
    """(topic, text) for every pydoc topic, sorted by topic."""
    from pydoc_data.topics import topics

    return sorted((name, text.strip()) for name, text in topics.items() if text.strip())


def split(every: int = 4) -> tuple[list[dict], list[dict]]:
    train, heldout = [], []
    for index, (name, text) in enumerate(documents()):
        (heldout if index % every == every - 1 else train).append({"topic": name, "text": text})
    return train, heldout


def write_text(out: str | Path, every: int = 4) -> dict[str, Path]:
    out = Path(out)
    train, heldout = split(every)
    return {"train": write_jsonl(out / "train.jsonl", train), "heldout": write_jsonl(out / "heldout.jsonl", heldout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/text"), help="folder for train.jsonl and heldout.jsonl")
    parser.add_argument("--every", type=int, default=4, help="hold out every N-th document (by name)")
    args = parser.parse_args()
    if args.every < 2:
        raise SystemExit(f"--every must be >= 2, not {args.every}")
    for name, path in write_text(args.out, args.every).items():
        records = [json.loads(line) for line in path.read_text().splitlines()]
        print(f"{name}: {path} ({len(records)} documents, {sum(len(r['text']) for r in records):,} characters; Python {platform.python_version()})")


if __name__ == "__main__":
    main()

"""What llama.cpp holds resident while the GGUF check runs: one GGUF file opened as the check opens it,
then one forward with logits for every position (the perplexity window), mapped and not mapped.

    python tools/llamacpp_memory.py MODEL.gguf [--tokens 512] [--no-mmap]

Prints the process's resident set (anonymous and file-backed, /proc/self/status) after each step.
The constants of lorasp_edge/export/memory.py (LLAMACPP_*) come from this tool (docs/export.md,
"Export memory"). Run each variant in its own process: the high-water mark is per process.
"""

from __future__ import annotations

import argparse
import os
import re


def status() -> str:
    text = open(f"/proc/{os.getpid()}/status").read()

    def gigabytes(key: str) -> float:
        return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1e6

    return (f"rss {gigabytes('VmRSS'):.2f} GB (anonymous {gigabytes('RssAnon'):.2f}, file {gigabytes('RssFile'):.2f}), "
            f"high-water mark {gigabytes('VmHWM'):.2f} GB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--no-mmap", action="store_true", help="read the weights into llama.cpp's buffers, as the export's check does")
    args = parser.parse_args()
    from lorasp_edge.export.llamacpp import LlamaCppModel

    print("before:", status(), flush=True)
    model = LlamaCppModel(args.gguf, context=args.tokens + 1, use_mmap=not args.no_mmap)
    print("opened:", status(), flush=True)
    logits = model.logits([100 + index % 1000 for index in range(args.tokens)])
    print(f"{args.tokens} positions' logits {tuple(logits.shape)}:", status(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

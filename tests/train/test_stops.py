"""Training that cannot silently go wrong: steps without targets, non-finite steps, out of memory.

Each test runs the real job (`run_training`, in process, on the tiny model) and asserts exact
outcomes: which steps were skipped, what the checkpoint holds, that no adapter with non-finite
values is written.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_trainer import losses, write_plan

from lorasp_edge.errors import NonFiniteError, OverBudgetError
from lorasp_edge.train import checkpoint as ckpt
from lorasp_edge.train import job
from lorasp_edge.train.adapter import held_matrices, trainable_parameters
from lorasp_edge.train.job import TrainRequest, run_training
from lorasp_edge.train.settings import TrainSettings


def request(tmp_path, model_dir, data, **settings) -> TrainRequest:
    plan = write_plan(tmp_path / "plan.json", model_dir)
    return TrainRequest(data=data, out=tmp_path / "run", model=str(model_dir), plan=plan, settings=TrainSettings(**settings))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def with_hook(monkeypatch, make_hook):
    """Let `make_hook(model)` register hooks on the model the job builds."""
    built = {}

    def build_model(*args, **kwargs):
        model = original(*args, **kwargs)
        make_hook(model)
        built["model"] = model
        return model

    original = job.build_model
    monkeypatch.setattr(job, "build_model", build_model)
    return built


def test_steps_without_targets_are_skipped_and_counted(tmp_path, model_dir):
    from lorasp_edge.models import load_tokenizer
    from lorasp_edge.train.data import PackedStream

    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"{i} {i + 1} {i + 2}", "completion": ""} for i in range(60)]  # nothing to learn
    rows += [{"prompt": f"add {i} and 1:", "completion": f" {i + 1}"} for i in range(60)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # The steps the file order gives without a target: 4 blocks of 32 per step (plan: 2 x 2).
    stream = PackedStream(data, load_tokenizer(str(model_dir)), 32, shuffle_buffer=0)
    expected = 0
    while not any((batch["labels"][:, 1:] != -100).any() for batch in [stream.next_batch(2), stream.next_batch(2)]):
        expected += 1
    assert expected >= 2
    summary = run_training(request(tmp_path, model_dir, data, steps=expected + 2, shuffle_buffer=0), progress=False)
    records = metrics(tmp_path / "run")
    assert [r.get("skipped") for r in records] == ["no targets"] * expected + [None, None]
    assert all(r["loss"] is None and r["grad_norm"] is None for r in records[:expected])
    assert summary["skipped_steps"] == {"no targets": expected} and summary["steps"] == expected + 2
    assert math.isfinite(summary["final_loss"])


def test_injected_inf_gradient_stops_with_the_last_good_weights(tmp_path, model_dir, data_file, monkeypatch):
    seen = {"calls": 0}

    def poison(model):
        values = trainable_parameters(model)[0]

        def hook(grad):  # 2 backward passes a step (grad_accum 2): poison every one from step 3 on
            seen["calls"] += 1
            step = (seen["calls"] - 1) // 2 + 1
            if step == 3 and "good" not in seen:
                seen["good"] = values.detach().clone()  # the weights after step 2
            return grad * float("inf") if step >= 3 else grad

        values.register_hook(hook)

    built = with_hook(monkeypatch, poison)
    with pytest.raises(NonFiniteError) as stop:
        run_training(request(tmp_path, model_dir, data_file, steps=20, save_every=0, max_nonfinite_steps=3), progress=False)
    assert str(stop.value).startswith("3 steps in a row had a gradient that is not finite (steps 3-5); none reached the weights")
    assert stop.value.exit_code == 5
    out = tmp_path / "run"
    assert [r.get("skipped") for r in metrics(out)] == [None, None] + ["non-finite gradient"] * 3
    model = built["model"]
    assert torch.equal(trainable_parameters(model)[0].detach(), seen["good"])  # the skipped steps wrote nothing
    record = ckpt.load_checkpoint(out / "checkpoint.pt")
    assert record.step == 5 and record.skipped["non-finite gradient"] == 3
    for key, weight in held_matrices(model).items():  # the checkpoint holds the adapter file's form
        saved = record.lora[key]
        assert torch.isfinite(saved).all() and torch.equal(saved, weight)
    assert record.optimizer["state"][0]["step"] == 2  # Adam stepped twice, at steps 1 and 2
    assert not (out / "adapter").exists()


def test_nonfinite_loss_then_recovery_resets_the_count(tmp_path, model_dir, data_file, monkeypatch):
    """Two bad steps, then good ones: skipped and counted, the run finishes with a finite adapter."""
    seen = {"calls": 0}

    def poison(model):
        def hook(module, args, output):
            seen["calls"] += 1
            step = (seen["calls"] - 1) // 2 + 1
            if step in (2, 3):
                output.last_hidden_state[0, 0, 0] = float("nan")
            return output

        model.get_base_model().base_model.register_forward_hook(hook)

    with_hook(monkeypatch, poison)
    summary = run_training(request(tmp_path, model_dir, data_file, steps=5, max_nonfinite_steps=3), progress=False)
    out = tmp_path / "run"
    assert [r.get("skipped") for r in metrics(out)] == [None, "non-finite loss", "non-finite loss", None, None]
    assert summary["skipped_steps"] == {"non-finite loss": 2} and summary["steps"] == 5
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_out_of_memory_in_a_step_checkpoints_the_step_before_and_resumes(tmp_path, model_dir, data_file, monkeypatch):
    seen = {"calls": 0}

    def fail_once(model):
        def hook(module, args):
            seen["calls"] += 1
            if seen["calls"] == 5:  # step 3's first micro-batch
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.get_base_model().base_model.register_forward_pre_hook(hook)

    with_hook(monkeypatch, fail_once)
    settings = dict(steps=6, save_every=0, lr=5e-3)
    with pytest.raises(OverBudgetError) as stop:
        run_training(request(tmp_path, model_dir, data_file, **settings), progress=False)
    message = str(stop.value)
    assert stop.value.exit_code == 3
    assert message.startswith("out of memory in step 3 (CUDA out of memory. Tried to allocate 2.00 GiB); peak ")
    assert "the plan predicted" in message and "a checkpoint of step 2 was written" in message
    out = tmp_path / "run"
    assert ckpt.load_checkpoint(out / "checkpoint.pt").step == 2
    monkeypatch.undo()
    run_training(TrainRequest(**{**request(tmp_path, model_dir, data_file, **settings).__dict__, "resume": True}), progress=False)
    reference = tmp_path / "reference"
    reference.mkdir()
    run_training(request(reference, model_dir, data_file, **settings), progress=False)
    assert losses(out) == losses(reference / "run")  # the failed step was redone from its exact position


def test_sigterm_writes_one_checkpoint(tmp_path, model_dir, data_file, monkeypatch):
    import os
    import signal

    from lorasp_edge.train import loop

    seen = {"calls": 0, "saves": []}

    def terminate_in_step_3(model):
        def hook(module, args):
            seen["calls"] += 1
            if seen["calls"] == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag: step 3 completes

        model.get_base_model().base_model.register_forward_pre_hook(hook)

    def counting_save(path, record):
        seen["saves"].append(record.step)
        return original_save(path, record)

    original_save = loop.ckpt.save_checkpoint
    monkeypatch.setattr(loop.ckpt, "save_checkpoint", counting_save)
    with_hook(monkeypatch, terminate_in_step_3)
    summary = run_training(request(tmp_path, model_dir, data_file, steps=10, save_every=0), progress=False)
    assert summary["stopped"] == "SIGTERM" and summary["steps"] == 3
    assert seen["saves"] == [3]
    # The stop's summary names the plan and budget, and the command that continues the run.
    from lorasp_edge.train.report import format_summary

    plan = json.loads((tmp_path / "plan.json").read_text())
    assert summary["budget_bytes"] == plan["budget_bytes"] and summary["planned_total_bytes"] == plan["memory"]["total_bytes"]
    assert f"budget: {plan['budget_bytes'] / 1e9:.2f} GB" in format_summary(summary)
    assert summary["resume_command"].endswith(f"--out {(tmp_path / 'run').resolve()} --model {model_dir} --resume")


def test_float16_compute_trains_under_a_grad_scaler(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "plan.json", model_dir, compute_dtype="float16")
    out = tmp_path / "run"
    summary = run_training(TrainRequest(data=data_file, out=out, model=str(model_dir), plan=plan, settings=TrainSettings(steps=3, lr=5e-3)), progress=False)
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    record = ckpt.load_checkpoint(out / "checkpoint.pt")
    # GradScaler starts at 2**16; each step halves it on an overflow or keeps it (growth after 2000 good steps)
    scale = record.scaler["scale"]
    overflows = summary["skipped_steps"].get("fp16 overflow", 0)
    assert scale == 2.0**16 / 2**overflows
    assert all(r.get("skipped") in (None, "fp16 overflow") for r in metrics(out))

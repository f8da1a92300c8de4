"""--resume with flags that differ from the run's: applied with a note, or refused with one line."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from test_trainer import write_plan

from lorasp_edge.errors import UserError
from lorasp_edge.train import checkpoint as ckpt
from lorasp_edge.train.job import TrainRequest, run_training
from lorasp_edge.train.settings import TrainSettings


def resume(base: TrainRequest, notes: list | None = None, **changes) -> dict:
    given = {key for key in changes if key in {f.name for f in dataclasses.fields(TrainSettings)}}
    request_changes = {key: value for key, value in changes.items() if key not in given}
    settings = dataclasses.replace(TrainSettings(), **{key: changes[key] for key in given})
    request = dataclasses.replace(base, resume=True, settings=settings, given=frozenset(given), **request_changes)
    return run_training(request, progress=False, note=(notes.append if notes is not None else None))


def test_resume_contract(tmp_path, model_dir, data_file):
    from tiny import make_model_dir

    plan = write_plan(tmp_path / "plan.json", model_dir)
    first = TrainSettings(steps=4, lr=5e-3, save_every=0, seed=0)
    base = TrainRequest(data=data_file, out=tmp_path / "run", model=str(model_dir), plan=plan, settings=first)
    run_training(base, progress=False)

    # refused, one line each, the checkpoint untouched
    refusals = [
        (dict(seed=1), "cannot resume with --seed 1: the run was started with 0, which drew the masks and the data order"),
        (dict(shuffle_buffer=0), "cannot resume with --shuffle-buffer 0: the run was started with 10000"),
        (dict(steps=3), "cannot resume with 3 steps in all: the run is already at step 4"),
        (dict(seq_len=16), "cannot resume: --seq-len 16: the run's blocks are 32 tokens"),
        (dict(plan=write_plan(tmp_path / "rank4.json", model_dir, rank=4)), "cannot resume: --plan " + str(tmp_path / "rank4.json") + ": rank is 4, the run's adapter and data were made with 8"),
        (dict(data=tmp_path / "other.jsonl"), "cannot resume: --data " + str(tmp_path / "other.jsonl") + " is not the run's data file"),
        (dict(model=str(make_model_dir(tmp_path / "other-model", seed=1))), "cannot resume: --model " + str(tmp_path / "other-model") + " is not the base model the run was trained on"),
    ]
    (tmp_path / "other.jsonl").write_text(data_file.read_text())
    for changes, expected in refusals:
        with pytest.raises(UserError) as refused:
            resume(base, **changes)
        assert str(refused.value).startswith(expected), str(refused.value)
        assert "\n" not in str(refused.value)
    assert ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt").step == 4

    # applied, with a note each: more steps (the schedule stretched), another lr, a plan with another batch split
    notes = []
    split = write_plan(tmp_path / "split.json", model_dir, micro_batch=1, grad_accum=4)
    summary = resume(base, notes, steps=8, lr=1e-3, plan=split)
    assert notes == [
        "plan micro_batch 2 -> 1", "plan grad_accum 2 -> 4",
        "--lr 0.005 -> 0.001",
        "steps 4 -> 8: warmup + cosine now end at step 8",
    ]
    assert summary["steps"] == 8 and summary["resume_notes"] == notes
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    # step 5's lr follows the new schedule: warmup 1, cosine over steps 1..8 to 0.1 x the new peak
    expected_lr = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (4 - 1) / (8 - 1))))
    assert records[4]["lr"] == pytest.approx(expected_lr, rel=1e-12)
    saved = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved.settings["lr"] == 1e-3 and saved.total_steps == 8 and saved.plan["grad_accum"] == 4

    # a flag not given keeps the run's value: no note, nothing changed
    notes = []
    summary = resume(base, notes, plan=split)
    assert notes == [] and summary["steps"] == 8

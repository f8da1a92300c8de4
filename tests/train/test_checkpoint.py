"""The checkpoint record: one dataclass, taken from the trainer, written, read and restored in
lorasp_edge/train/checkpoint.py; the step has one import path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorasp_edge.errors import UserError
from lorasp_edge.train import checkpoint as ckpt
from lorasp_edge.train import loop


def _record(**changes) -> ckpt.Checkpoint:
    fields = dict(step=7, tokens=1792, elapsed=3.5, world_size=1, lora={"m.lora_A": torch.arange(6.0).reshape(2, 3)}, draw=1,
                  optimizer={"state": {}}, scheduler={"last_epoch": 7}, scaler=None, data=[{"path": "d.jsonl", "offset": 12}],
                  rng=[ckpt.rng_state()], plan={"rank": 4}, settings={"lr": 1e-3}, total_steps=9, skipped={"no targets": 1},
                  nonfinite_run=0, base_fingerprint="abc")
    return ckpt.Checkpoint(**(fields | changes))


def test_round_trip_is_exact(tmp_path):
    record = _record()
    ckpt.save_checkpoint(tmp_path / "checkpoint.pt", record)
    loaded = ckpt.load_checkpoint(tmp_path / "checkpoint.pt")
    for field in dataclasses.fields(ckpt.Checkpoint):
        got, expected = getattr(loaded, field.name), getattr(record, field.name)
        if field.name == "lora":
            assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        elif field.name != "rng":
            assert got == expected, field.name


def test_a_record_from_before_the_fingerprint_loads_with_defaults(tmp_path):
    record = {"format": ckpt.FORMAT, **{f.name: getattr(_record(), f.name) for f in dataclasses.fields(ckpt.Checkpoint)}}
    for newer in ("skipped", "nonfinite_run", "base_fingerprint"):
        del record[newer]
    torch.save(record, tmp_path / "old.pt")
    loaded = ckpt.load_checkpoint(tmp_path / "old.pt")
    assert loaded.base_fingerprint is None and loaded.skipped == {} and loaded.nonfinite_run == 0
    del record["lora"]
    torch.save(record, tmp_path / "torn.pt")
    with pytest.raises(UserError, match="incomplete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "torn.pt")


def test_train_step_has_one_import_path():
    from lorasp_edge.train import step

    assert callable(step.train_step) and callable(step.evaluate)
    assert not hasattr(loop, "train_step") and not hasattr(loop, "evaluate")

"""`lorasp-edge train` never trains the wrong way, never loses work, never touches a user's files.

Each case drives the real CLI in process (`lorasp_edge.cli.main`) on the tiny model and asserts the
exit code, that the error is one line (no traceback), and what is on disk afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch
from test_trainer import write_plan

from lorasp_edge import cli
from lorasp_edge.train import checkpoint as ckpt
from lorasp_edge.train import job


def train(capsys, model_dir, data, out, plan, *extra) -> tuple[int, str, str]:
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress"]
    argv += ["--plan", str(plan)] if plan is not None else []
    code = cli.main([*argv, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lorasp-edge train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def lora_b(out) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return [tensor for key, tensor in weights.items() if "lora_B" in key]


@pytest.fixture
def plan(tmp_path, model_dir):
    return write_plan(tmp_path / "plan.json", model_dir)


# ---------------------------------------------------------------- flag values


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-grad-norm=-1"], "--max-grad-norm must be a finite number > 0, or 0 for no clipping, not -1.0"),
        (["--lr", "inf"], "--lr must be a finite number > 0, not inf"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, not nan"),
        (["--steps", "2", "--warmup-steps", "100"], "--warmup-steps 100 is longer than the run's 2 steps"),
        (["--eval-every", "-1", "--lr", "-1"], "--lr must be a finite number > 0, not -1.0; --eval-every must be >= 0, not -1"),
    ],
)
def test_bad_flag_values_are_one_line_before_anything_is_written(capsys, tmp_path, model_dir, data_file, plan, flags, expected):
    out = tmp_path / "run"
    code, _, err = train(capsys, model_dir, data_file, out, plan, *flags)
    assert code == 2
    assert expected in one_line(err)
    assert not out.exists()


def test_max_grad_norm_zero_means_no_clipping_and_says_so(capsys, tmp_path, model_dir, data_file, plan):
    out = tmp_path / "run"
    code, _, err = train(capsys, model_dir, data_file, out, plan, "--steps", "3", "--max-grad-norm", "0", "--lr", "3e-3")
    assert code == 0, err
    assert "--max-grad-norm 0: gradients are not clipped" in err
    assert all(tensor.abs().max() > 0 for tensor in lora_b(out))  # it trained
    norms = [json.loads(line)["grad_norm"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(norms) == 3 and all(norm is not None and norm > 0 for norm in norms)


# ---------------------------------------------------------------- the user's files


def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(capsys, tmp_path, model_dir, data_file, plan):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "mine.txt").write_text("my notes")
    code, _, err = train(capsys, model_dir, data_file, out, plan, "--steps", "2")
    assert code == 2
    assert "not empty and was not written by lorasp-edge train" in one_line(err) and "--overwrite" in one_line(err)
    assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*")) == ["adapter", "adapter/mine.txt"]
    assert (out / "adapter" / "mine.txt").read_text() == "my notes"
    code, _, err = train(capsys, model_dir, data_file, out, plan, "--steps", "2", "--overwrite")
    assert code == 0, err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_out_that_is_a_file_is_one_line(capsys, tmp_path, model_dir, data_file, plan):
    out = tmp_path / "run"
    out.write_text("keep")
    code, _, err = train(capsys, model_dir, data_file, out, plan, "--steps", "2")
    assert code == 2 and "is a file, not a folder" in one_line(err)
    assert out.read_text() == "keep"


def test_data_that_is_a_folder_is_one_line(capsys, tmp_path, model_dir, plan):
    code, _, err = train(capsys, model_dir, tmp_path, tmp_path / "run", plan, "--steps", "2")
    assert code == 2 and f"--data {tmp_path}: is a folder, not a file" in one_line(err)


def test_overwrite_starts_a_finished_run_over(capsys, tmp_path, model_dir, data_file, plan):
    out = tmp_path / "run"
    assert train(capsys, model_dir, data_file, out, plan, "--steps", "3")[0] == 0
    code, _, err = train(capsys, model_dir, data_file, out, plan, "--steps", "2", "--overwrite")
    assert code == 0, err
    assert ckpt.load_checkpoint(out / ckpt.CHECKPOINT_FILE).step == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # Started over and stopped before any step: nothing of the earlier run is left to pass for this one's.
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    code, _, err = train(capsys, model_dir, bad, out, plan, "--steps", "2", "--overwrite")
    assert code == 2 and f"{bad}:1" in one_line(err)
    assert sorted(path.name for path in out.iterdir()) == [".lorasp-edge", "plan.json"]


def test_results_follow_the_umask(capsys, tmp_path, model_dir, data_file, plan):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert train(capsys, model_dir, data_file, out, plan, "--steps", "2")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "adapter").stat().st_mode) == 0o755
    for path in [out / ckpt.CHECKPOINT_FILE, *(out / "adapter").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_relative_model_path_is_recorded_absolute(capsys, tmp_path, model_dir, data_file, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    plan = write_plan(tmp_path / "plan.json", model_dir)
    code, _, err = train(capsys, model_dir.name, data_file, tmp_path / "run", plan, "--steps", "2")
    assert code == 0, err
    info = json.loads((tmp_path / "run" / "adapter" / "lorasp.json").read_text())
    assert info["base_model"] == str(model_dir.resolve())


# ---------------------------------------------------------------- never lose work


def test_a_bad_line_mid_run_keeps_the_steps_done_and_resumes_with_skip(capsys, tmp_path, model_dir, data_file, plan):
    data = tmp_path / "bad.jsonl"
    lines = data_file.read_text().splitlines()[:200]
    lines[50] = "{not json"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    # File order: line 51 is read in a known step, long before the first periodic save (50).
    code, _, err = train(capsys, model_dir, data, out, plan, "--steps", "40", "--shuffle-buffer", "0")
    assert code == 2
    message = one_line(err)
    saved = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_FILE).step
    assert saved > 0 and f"{data}:51" in message and f"a checkpoint of step {saved} was written" in message
    assert "continue with: lorasp-edge train" in message and message.endswith("--resume --skip-bad-lines")
    code, out_text, err = train(capsys, model_dir, data, out, plan, "--steps", "40", "--shuffle-buffer", "0", "--resume", "--skip-bad-lines")
    assert code == 0, err
    assert "bad lines    2 skipped" in out_text  # 40 steps read the 200 lines twice: the line is met in each pass
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 41))


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(capsys, tmp_path, model_dir, data_file, plan, monkeypatch):
    saves = []
    original = torch.save

    def save(obj, file, *args, **kwargs):
        saves.append(obj.get("step") if isinstance(obj, dict) else None)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, file, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)
    out = tmp_path / "run"
    code, _, err = train(capsys, model_dir, data_file, out, plan, "--steps", "6", "--save-every", "2")
    assert code == 2
    message = one_line(err)
    assert "writing the checkpoint" in message and "no space left on the device" in message and "the previous checkpoint is kept" in message
    assert "continue with:" in message
    monkeypatch.setattr(ckpt.torch, "save", original)
    assert ckpt.load_checkpoint(out / ckpt.CHECKPOINT_FILE).step == 2
    assert not [path for path in out.iterdir() if path.name.endswith(".tmp")]


def test_a_read_only_out_is_one_line(capsys, tmp_path, model_dir, data_file, plan, monkeypatch):
    out = tmp_path / "run"

    def read_only(folder, kind):
        raise OSError(errno.EROFS, "Read-only file system", str(folder / ".lorasp-edge"))

    monkeypatch.setattr(job, "write_marker", read_only)
    code, _, err = train(capsys, model_dir, data_file, out, plan, "--steps", "2")
    assert code == 2 and "the file system is read-only: choose a writable folder" in one_line(err)


# ---------------------------------------------------------------- plans that cannot be right


def test_a_plan_for_another_model_is_refused_before_loading(capsys, tmp_path, model_dir, data_file):
    from lorasp_edge.plan.search import plan_training

    plan = tmp_path / "smollm.json"
    plan_training(model="smollm2-135m", budget_bytes=8 * 10**9, seq_len=64, batch=2).to_json(plan)
    code, _, err = train(capsys, model_dir, data_file, tmp_path / "run", plan, "--steps", "2")
    assert code == 2
    assert "the plan was made for smollm2-135m (134.5M parameters), but --model" in one_line(err)
    assert not (tmp_path / "run").exists()


def test_plan_fields_the_model_does_not_have_are_all_named(capsys, tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "plan.json", model_dir, seq_len=4096, layers=[0, 1, 7], target_modules=["q_proj", "nope_proj"])
    code, _, err = train(capsys, model_dir, data_file, tmp_path / "run", plan, "--steps", "2", "--lr", "nan")
    assert code == 2
    message = one_line(err)
    assert "--lr must be a finite number > 0, not nan" in message  # the flags' problems in the same line
    assert "layers [7] are not in the model, which has layers 0-1" in message
    assert "target_modules ['nope_proj'] are not linear layers" in message
    assert "seq_len 4096 is longer than the model's context of 256 tokens" in message


# ---------------------------------------------------------------- data


def test_one_huge_line_is_read_in_pieces(tmp_path, model_dir):
    from tiny import corpus
    from transformers import AutoTokenizer

    from lorasp_edge.train.data import PackedStream

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    huge = " ".join(corpus(400)) * 10  # about 317,000 characters, tens of thousands of tokens
    data = tmp_path / "huge.jsonl"
    data.write_text(json.dumps({"text": "a first line"}) + "\n" + json.dumps({"text": huge}) + "\n")
    stream = PackedStream(data, tokenizer, 32, epochs=1)
    piece_chars = stream.encoder.long_text_chars
    blocks, most_buffered = 0, 0
    while stream.next_block() is not None:
        blocks += 1
        most_buffered = max(most_buffered, len(stream.ids))
    whole = len(tokenizer(huge, add_special_tokens=False)["input_ids"])
    assert blocks >= whole // 32 * 0.99
    assert most_buffered <= piece_chars + 32  # a piece's tokens, never the line's
    assert most_buffered < whole / 10


def test_a_utf8_byte_order_mark_is_read_as_utf8(tmp_path, model_dir):
    from transformers import AutoTokenizer

    from lorasp_edge.train.data import PackedStream

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with_bom, without = tmp_path / "bom.jsonl", tmp_path / "plain.jsonl"
    text = "".join(json.dumps({"text": f"alpha beta {n}"}) + "\n" for n in range(40))
    with_bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    without.write_text(text)
    first = [block["input_ids"].tolist() for block in PackedStream(with_bom, tokenizer, 16, epochs=1)]
    second = [block["input_ids"].tolist() for block in PackedStream(without, tokenizer, 16, epochs=1)]
    assert first == second and first

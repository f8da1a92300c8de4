"""Data-parallel training under torchrun on CPU (gloo), two processes on this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from safetensors.torch import load_file
from test_trainer import losses, run_cli, write_plan

from lorasp_edge.train import checkpoint as ckpt


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *train_args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", "-m", "lorasp_edge", "train", "--no-progress", *train_args,
    ]


def common(model_dir, data_file, out, plan, steps="8"):
    return ["--model", str(model_dir), "--data", str(data_file), "--out", str(out), "--plan", str(plan), "--steps", steps, "--lr", "5e-3"]


def test_two_ranks_equal_one_rank_with_same_effective_batch(tmp_path, model_dir, data_file):
    one = write_plan(tmp_path / "one.json", model_dir, micro_batch=4, grad_accum=2, world_size=1)
    two = write_plan(tmp_path / "two.json", model_dir, micro_batch=2, grad_accum=2, world_size=2)
    run_cli(sys.executable, "-m", "lorasp_edge", "train", "--no-progress", *common(model_dir, data_file, tmp_path / "one", one))
    run_cli(*torchrun(2, *common(model_dir, data_file, tmp_path / "two", two)), timeout=300)
    one_losses, two_losses = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one_losses) == len(two_losses) == 8
    assert max(abs(a - b) for a, b in zip(one_losses, two_losses)) < 1e-5
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["tokens"] == 8 * 2 * 2 * 2 * 32  # steps x micro x accum x ranks x seq


def test_killed_job_resumes_exactly(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "two.json", model_dir, micro_batch=1, grad_accum=1, world_size=2)
    args = common(model_dir, data_file, tmp_path / "ref", plan, steps="60") + ["--save-every", "5"]
    run_cli(*torchrun(2, *args), timeout=300)
    out = tmp_path / "killed"
    args = common(model_dir, data_file, out, plan, steps="60") + ["--save-every", "5"]
    job = subprocess.Popen(torchrun(2, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 20):
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job: launcher and both ranks
    job.wait()
    assert 20 <= ckpt.load_checkpoint(out / "checkpoint.pt").step + 5 and len(losses(out)) < 60
    run_cli(*torchrun(2, *args, "--resume"), timeout=300)
    assert losses(out) == losses(tmp_path / "ref")
    ref = (tmp_path / "ref" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == ref


def test_resume_with_another_world_size_is_refused(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "two.json", model_dir, micro_batch=1, grad_accum=1, world_size=2)
    out = tmp_path / "run"
    run_cli(*torchrun(2, *common(model_dir, data_file, out, plan, steps="2")), timeout=300)
    done = run_cli(sys.executable, "-m", "lorasp_edge", "train", "--no-progress", *common(model_dir, data_file, out, plan, steps="4"), "--resume", check=False)
    assert done.returncode == 2
    assert "written by 2 rank(s), resumed with 1" in done.stderr


def test_missing_rank_times_out_with_clear_error(tmp_path, model_dir, data_file):
    plan = write_plan(tmp_path / "two.json", model_dir, world_size=2)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "LORASP_EDGE_DIST_TIMEOUT": "5"}
    started = time.time()
    done = run_cli(sys.executable, "-m", "lorasp_edge", "train", "--no-progress", *common(model_dir, data_file, tmp_path / "run", plan),
                   check=False, env=env, timeout=120)
    assert done.returncode == 2
    assert time.time() - started < 60
    lines = [line for line in done.stderr.splitlines() if line.strip() and "kernels" not in line]
    assert "Traceback" not in done.stderr
    assert any("rank 0 of 2" in line and "5 s" in line for line in lines), done.stderr[-2000:]


def test_more_ranks_than_gpus_is_one_clear_line(monkeypatch):
    """torchrun --nproc-per-node 2 on a one-GPU machine sends rank 1 to cuda:1: refused before any CUDA call."""
    import pytest
    import torch

    from lorasp_edge.errors import UserError
    from lorasp_edge.train.distributed import World

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"^rank 1 of 2: 2 processes on this node but 1 GPU\(s\); each rank needs its own: use --nproc-per-node 1 or fewer \(or --device cpu\)$"):
        World.from_env(torch.device("cuda"))

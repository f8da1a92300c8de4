"""lorasp-edge on one CUDA GPU, checked in one command: speed and memory against PEFT, the CLI
under its own plans, the memory guard, the planner's CUDA points and the CUDA tests.

    python tools/gpu_check.py --json gpu_check.json      one CUDA GPU, no network: under 8 minutes
    python tools/gpu_check.py --big                       also Qwen2.5-1.5B's shape (about 4 more minutes;
                                                          without --big it runs only when the time left allows)
    python tools/gpu_check.py --only speed,train          some sections (env always runs first)
    python tools/gpu_check.py --dry-run --json dry.json   the whole check on CPU at toy sizes (about a minute)
    python tools/gpu_check.py --requirements > gpu-requirements.txt      the wheels a bare GPU machine may lack

It prints one table (every figure, then every target with pass or miss) and writes it, with every
measurement behind it, as JSON (`table`, `targets`, `sections`). Exit code 1 when a section failed or
env found a problem; a missed target alone is a finding, not a failure (exit 0).
Not run on CUDA in this repository yet (no GPU was available where it was written): no figure from
it exists yet, and none is quoted here. Every ratio it prints is measured in the same run.

Sections, each with a time cap (CAPS); a section that fails or runs out of time is recorded in the
table and the JSON with its error's first line, and the others still run:
  env        python, torch and its CUDA build, the GPU, bf16; bitsandbytes NF4 on the device (a Linear4bit
             forward and backward); transformers, peft, bitsandbytes, accelerate, pytest importable; free
             disk; which of the project's dependencies are not installed (--requirements lists them).
  speed      lorasp-edge's training step against PEFT on a random-init model of a catalog shape
             (Qwen2.5-0.5B: bench_train.random_model, and big_model_run.small_tokenizer), batch 8 x 512,
             each method in a fresh process, the same packed blocks for all (bench_train.write_data):
               lorasp-edge r16 bf16   the plan lorasp-edge makes for --speed-mem (default 12 GB) with its
                                      base held at 16 bits, run by build_model / build_optimizer / train_step
                                      (lorasp_edge.train.loop: what `lorasp-edge train` runs each step)
               lorasp-edge r16 NF4    the same plan search with the base held at 4 bits
               PEFT LoRA bf16         bench_train.run_peft: LoraConfig(r=16, lora_alpha=32,
                                      target_modules="all-linear"), model(input_ids, labels=input_ids).loss,
                                      torch.optim.AdamW(fused=True), bf16 base
               PEFT QLoRA NF4         the same on a BitsAndBytesConfig NF4 base (double quantization), bf16 compute
             tokens/s: median of 10 steps after 3 warm-up steps; peak: torch.cuda.max_memory_allocated and
             max_memory_reserved over the process's life (loading included).
  train      `lorasp-edge train --mem 12GB` and `--mem 24GB` through the CLI (it plans for itself) on that
             model, 5 steps: the exit code, the trainer's peak (summary.json `peak_bytes`: reserved CUDA
             memory, what the memory guard limits) and the process's max_memory_allocated (the CLI runs as
             `lorasp_edge.cli.main` in a child that records it at exit) against the plan's total; then the
             12 GB run's plan.json with `budget_bytes` lowered to a tenth of its total: the guard must stop
             that run with exit code 3.
  planner    tools/validate_planner.py on CUDA (it runs its points there when torch sees a GPU): its held-out
             grid points on the small models built from a config (`--points`, 2 steps each), with the median
             and worst |error| of the held-out points. A run past the cap keeps the points it finished.
  pytest     python -m pytest -m cuda (tests/test_cuda.py and every other test marked cuda).
  speed-big  the speed section on Qwen2.5-1.5B's shape: with --big, or when the time left allows.

Targets (TARGETS), each printed with pass or miss: lorasp-edge r16 bf16 >= 1.0x PEFT LoRA bf16's tokens/s
at <= 0.65x its peak, and NF4 >= 1.25x PEFT QLoRA's at <= 0.65x (peak: allocated and reserved both);
planner held-out median |error| <= 7%, worst <= 15%; the 12 and 24 GB plans train inside their budgets
without the guard tripping; the guard stops an over-budget run with exit 3; the CUDA tests pass.

--dry-run runs every section on CPU at toy sizes (a 2-layer Qwen2-shaped model from tests/tiny.py,
seq 32, batch 2, 3 steps, float32 where the CUDA run uses bf16, one planner point): it checks the tool
itself (tests/test_gpu_check.py runs it), not the targets. PEFT QLoRA keeps bench_train's bf16 compute;
the 4-bit methods are skipped with the reason when bitsandbytes cannot run 4-bit on the device.

What to carry to a GPU machine without network: this repository, and the wheels `--requirements`
prints (the project's dependencies as installed here, from pip freeze), with the CUDA build of
torch 2.13.0 in place of a CPU one; no model or data set is downloaded (all are built here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import bench_train  # noqa: E402  (standard library only at import: torch loads in the children)
import validate_planner  # noqa: E402

SECTIONS = ("env", "speed", "train", "planner", "pytest", "speed-big")
# Seconds each section may take; all of them together stay inside TOTAL_S (the 8-minute promise).
CAPS = {"env": 90, "speed": 210, "train": 180, "planner": 150, "pytest": 90, "speed-big": 240}
TOTAL_S = 465
BUDGETS = ("12GB", "24GB")  # the `lorasp-edge train --mem` runs
GUARD_SHARE = 0.1  # the guard run's budget: this share of its plan's total
MIN_DISK_BYTES = {"cuda": 10 * 10**9, "cpu": 10**9}

# (method, peer, least tokens/s ratio, most peak ratio)
TARGETS = (("lorasp-bf16", "peft-lora", 1.0, 0.65), ("lorasp-nf4", "peft-qlora", 1.25, 0.65))
PLANNER_MEDIAN_PCT, PLANNER_WORST_PCT = 7.0, 15.0


@dataclass(frozen=True)
class Sizes:
    mode: str  # "cuda" or "dry-run"
    device: str
    model: str  # catalog id, or "tiny" (tests/tiny.py)
    big_model: str | None
    seq_len: int
    batch: int
    warmup: int
    steps: int  # measured steps after the warm-up
    train_steps: int
    dtype: str  # compute dtype of the lorasp-edge methods
    peft_method: str  # bench_train's name of the PEFT LoRA peer
    planner_points: tuple[int, ...]
    planner_steps: int


def held_out_small_points() -> tuple[int, ...]:
    """validate_planner's held-out grid points on its small models (no bundled model needed)."""
    return tuple(i for i, p in enumerate(validate_planner.grid(False)) if p["held_out"] and p["model"] in validate_planner.TINY_CONFIGS)


def sizes_for(dry_run: bool) -> Sizes:
    if dry_run:
        return Sizes("dry-run", "cpu", "tiny", None, 32, 2, 1, 2, 3, "float32", "peft-fp32", (24,), 1)
    return Sizes("cuda", "cuda", "qwen2.5-0.5b", "qwen2.5-1.5b", 512, 8, 3, 10, 5, "bfloat16", "peft-bf16", held_out_small_points(), 2)


SPEED_METHODS = {  # id: (label, bits, bench_train peer name or None for lorasp-edge); {dtype}: bf16, or fp32 in a dry run
    "lorasp-bf16": ("lorasp-edge r16 {dtype}", 16, None),
    "lorasp-nf4": ("lorasp-edge r16 NF4", 4, None),
    "peft-lora": ("PEFT LoRA {dtype}", 16, "peft"),
    "peft-qlora": ("PEFT QLoRA NF4", 4, "qlora"),
}


def method_label(method: str, dtype: str) -> str:
    return SPEED_METHODS[method][0].format(dtype="bf16" if dtype == "bfloat16" else "fp32")


# ------------------------------------------------------------------------------ children
# Every measurement runs in a child process (`gpu_check.py --child NAME SPEC_JSON`), so that each
# has its own CUDA context, allocator and peak counters, and a hung one can be killed at its cap.


def child_env(spec: dict) -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        info.update(gpu=properties.name, gpu_count=torch.cuda.device_count(), capability=f"{properties.major}.{properties.minor}",
                    gpu_total_bytes=total, gpu_free_bytes=free, bf16=torch.cuda.is_bf16_supported())
    info["packages"] = {}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "pytest"):
        try:
            info["packages"][name] = __import__(name).__version__
        except Exception as error:  # noqa: BLE001 (any failure to import is the finding)
            info["packages"][name] = None
            info.setdefault("import_errors", {})[name] = first_line(error)
    device = torch.device(spec["device"])
    try:  # NF4 forward and backward on the device, as both 4-bit methods need
        import bitsandbytes as bnb

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        layer = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=dtype, quant_type="nf4").to(device)
        x = torch.randn(4, 256, device=device, dtype=dtype, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        if x.grad is None or not torch.isfinite(y).all():
            raise RuntimeError("a Linear4bit forward/backward gave no input gradient or a non-finite output")
        info["bnb_4bit"] = {"device": device.type, "ok": True}
    except Exception as error:  # noqa: BLE001
        info["bnb_4bit"] = {"device": device.type, "ok": False, "error": first_line(error)}
    return info


def child_prepare(spec: dict) -> dict:
    """A random-init model with its tokenizer in spec['out']: tests/tiny.py's, or a catalog shape's."""
    folder = Path(spec["out"])
    if spec["model"] == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_model_dir

        make_model_dir(folder, arch="qwen2")
    else:
        import big_model_run

        bench_train.random_model(spec["model"], folder)
        big_model_run.small_tokenizer().save_pretrained(folder)  # 4,096 ids: fits any catalog vocabulary
    return {"folder": str(folder), "bytes": sum(path.stat().st_size for path in folder.glob("*.safetensors"))}


def child_speed(spec: dict) -> dict:
    import resource

    import torch

    from lorasp_edge.models import load_tokenizer
    from lorasp_edge.train.data import PackedStream

    device = torch.device(spec["device"])
    stream = PackedStream(Path(spec["data"]), load_tokenizer(spec["model"]), spec["seq_len"])
    data = [stream.next_batch(spec["batch"]) for _ in range(spec["warmup"] + spec["steps"])]
    if any(batch is None for batch in data):
        raise RuntimeError(f"the data file holds fewer than {len(data)} batches of {spec['batch']} x {spec['seq_len']}")
    _, bits, peer = SPEED_METHODS[spec["method"]]
    if peer is None:
        result = run_lorasp(spec, bits, device, data)
    else:
        peer_method = spec["peft_method"] if peer == "peft" else peer
        result = bench_train.run_peft(peer_method, spec["model"], device, data)
        result["compute_dtype"] = "float32" if peer_method == "peft-fp32" else "bfloat16"  # bench_train's QLoRA computes in bf16
    measured = result["times"][spec["warmup"]:]
    result["tokens_per_s"] = spec["seq_len"] * spec["batch"] / statistics.median(measured)
    result["measured_steps"] = len(measured)
    if device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["peak_measure"] = "torch.cuda max_memory_allocated / max_memory_reserved"
    else:  # no allocated/reserved split on CPU: both are the process's peak resident set
        result["peak_allocated_bytes"] = result["peak_reserved_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["peak_measure"] = "peak resident set (CPU)"
    return result


def run_lorasp(spec: dict, bits: int, device, data: list[dict]) -> dict:
    """lorasp-edge's step as the trainer runs it, under the plan made for spec['mem'] with the base at `bits`."""
    from lorasp_edge.plan.search import Device, plan_training
    from lorasp_edge.train.loop import build_model, build_optimizer
    from lorasp_edge.train.step import train_step
    from lorasp_edge.train.loss import ChunkedCausalLMLoss

    device_kind = Device(device.type, spec["dtype"] == "bfloat16", (bits,))
    plan = plan_training(model=spec["model"], budget_bytes=spec["mem"], seq_len=spec["seq_len"], batch=spec["batch"], device=device_kind)
    model = build_model(plan, spec["model"], device=device)
    optimizer = build_optimizer(model, lr=bench_train.LR)
    loss_module = ChunkedCausalLMLoss(model, chunk_tokens=plan.loss_chunk_tokens)
    times, losses = [], []
    for batch in data:
        bench_train.sync(device)
        started = time.perf_counter()
        result = train_step(loss_module, optimizer, bench_train.split(batch, plan.micro_batch), plan, 1.0)
        bench_train.sync(device)
        times.append(time.perf_counter() - started)
        losses.append(result["loss"])
    return {"times": times, "losses": losses, "compute_dtype": plan.compute_dtype, "plan": describe_plan(plan.to_dict()),
            "plan_total_bytes": plan.memory["total_bytes"]}


def child_cli(stats_path: str, argv: list[str]) -> int:
    """`lorasp-edge ARGV` as `python -m lorasp_edge` runs it, recording the CUDA peaks at exit."""
    from lorasp_edge.cli import main

    try:
        return main(argv)
    finally:
        import torch

        stats = {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stats = {"max_memory_allocated": torch.cuda.max_memory_allocated(), "max_memory_reserved": torch.cuda.max_memory_reserved()}
        Path(stats_path).write_text(json.dumps(stats))


CHILDREN = {"env": child_env, "prepare": child_prepare, "speed": child_speed}


# ------------------------------------------------------------------------------ running children


class CheckError(Exception):
    """A step of a section failed; the message's first line goes into the table."""


def first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line[:300]


def last_line(text: str) -> str:
    """The line a failed child ends on (a traceback's exception, or the CLI's one-line error)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


class Check:
    """What the sections share: sizes, the work folder, the clock, the models built so far."""

    def __init__(self, args, sizes: Sizes, work: Path):
        self.args, self.sizes, self.work = args, sizes, work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.deadline = self.started + TOTAL_S
        self.models: dict[str, str] = {}
        self.lock = threading.Lock()
        self.env_result: dict = {}
        self.data = bench_train.write_data(work / "train.jsonl")
        self.environ = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.environ.setdefault("LORASP_EDGE_CACHE", str(work / "cache"))
        if args.jobs > 1:  # children side by side: one thread each, not two fighting over each core
            self.environ.setdefault("OMP_NUM_THREADS", "1")
        self.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    @property
    def big_asked(self) -> bool:
        return bool(self.args.big or (self.args.only and "speed-big" in self.args.only))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, command: list[str], deadline: float, log_name: str) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of `command`; CheckError when it passes `deadline` (it is killed)."""
        left = deadline - time.monotonic()
        if left < 2:
            raise CheckError(f"{log_name}: not started, the section's time cap is spent")
        log = self.logs / f"{log_name}.log"
        with open(log, "w+") as handle:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=handle, text=True, cwd=ROOT, env=self.environ,
                                       start_new_session=True)
            try:
                stdout, _ = process.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the child and anything it started, by its group id
                process.communicate()
                raise CheckError(f"{log_name}: still running at the section's time cap, stopped") from None
            handle.seek(0)
            stderr = handle.read()
            handle.write(f"\n--- stdout (exit {process.returncode}) ---\n{stdout}")
        return process.returncode, stdout, stderr

    def child(self, name: str, spec: dict, deadline: float, log_name: str) -> dict:
        code, stdout, stderr = self.run([sys.executable, __file__, "--child", name, json.dumps(spec)], deadline, log_name)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if code != 0 or not lines:
            raise CheckError(f"{log_name}: exit {code}: {last_line(stderr)}")
        return json.loads(lines[-1][len("RESULT "):])

    def model_dir(self, model: str, deadline: float) -> str:
        with self.lock:  # sections side by side (--jobs) share one folder: the second waits for the first
            if model not in self.models:
                out = self.work / "models" / model
                self.models[model] = self.child("prepare", {"model": model, "out": str(out)}, deadline, f"prepare-{model}")["folder"]
            return self.models[model]

    def bnb_4bit(self) -> tuple[bool, str]:
        probe = self.env_result.get("bnb_4bit") or {}
        return bool(probe.get("ok")), probe.get("error", "the env section did not run")


# ------------------------------------------------------------------------------ sections


def section_env(check: Check, deadline: float) -> dict:
    result = check.child("env", {"device": check.sizes.device}, deadline, "env")
    result["disk_free_bytes"] = shutil.disk_usage(check.work).free
    result["missing_requirements"] = [name for name, version in installed_requirements() if version is None]
    problems = []
    if check.sizes.mode == "cuda" and not result["cuda_available"]:
        problems.append(f"torch {result['torch']} sees no CUDA device (built for CUDA {result['torch_cuda_build']}): "
                        "install torch's CUDA build, or run --dry-run")
    notes = []
    if not result["bnb_4bit"]["ok"]:  # on CUDA a problem; in a dry run the 4-bit methods are skipped with the reason
        bnb = f"bitsandbytes 4-bit does not run on {result['bnb_4bit']['device']}: {result['bnb_4bit']['error']}"
        (problems if check.sizes.mode == "cuda" else notes).append(bnb)
    problems += [f"{name} does not import: {error}" for name, error in result.get("import_errors", {}).items()]
    if result["missing_requirements"]:
        problems.append("not installed: " + ", ".join(result["missing_requirements"]) + " (carry them: --requirements)")
    need = MIN_DISK_BYTES[check.sizes.device]
    if result["disk_free_bytes"] < need:
        problems.append(f"{result['disk_free_bytes'] / 1e9:.1f} GB free under {check.work}, {need / 1e9:.0f} GB wanted")
    check.env_result = result
    result.update(problems=problems, notes=notes)
    if problems:
        result.update(status="problems", error=problems[0])
    return result


def speed_section(model_key: str):
    def section(check: Check, deadline: float) -> dict:
        sizes = check.sizes
        model_id = getattr(sizes, model_key)
        model = check.model_dir(model_id, deadline)
        result = {"model": model_id, "dtype": sizes.dtype, "batch": sizes.batch, "seq_len": sizes.seq_len, "warmup": sizes.warmup, "steps": sizes.steps,
                  "speed_mem": check.args.speed_mem, "methods": {}}
        bnb_ok, bnb_error = check.bnb_4bit()
        for method, (_, bits, _) in SPEED_METHODS.items():
            label = method_label(method, sizes.dtype)
            if bits == 4 and not bnb_ok:
                result["methods"][method] = {"label": label, "status": "skipped", "reason": f"bitsandbytes 4-bit cannot run here: {bnb_error}"}
                continue
            spec = {"method": method, "model": model, "data": str(check.data), "device": sizes.device, "seq_len": sizes.seq_len,
                    "batch": sizes.batch, "warmup": sizes.warmup, "steps": sizes.steps, "dtype": sizes.dtype,
                    "peft_method": sizes.peft_method, "mem": parse_bytes(check.args.speed_mem)}
            try:
                measured = check.child("speed", spec, deadline, f"speed-{model_id}-{method}")
                del measured["times"]
                result["methods"][method] = {"label": label, "status": "ok", **measured}
            except CheckError as error:
                result["methods"][method] = {"label": label, "status": "error", "error": first_line(error)}
        errors = [m["error"] for m in result["methods"].values() if m["status"] == "error"]
        if errors:
            result.update(status="error", error=errors[0])
        return result

    return section


def section_train(check: Check, deadline: float) -> dict:
    sizes = check.sizes
    model = check.model_dir(sizes.model, deadline)
    result = {"model": sizes.model, "steps": sizes.train_steps, "runs": {}}
    common = ["--model", model, "--data", str(check.data), "--save-every", "0", "--no-progress"]
    for budget in BUDGETS:
        flags = ["--mem", budget, "--seq-len", str(sizes.seq_len), "--batch", str(sizes.batch), "--steps", str(sizes.train_steps)]
        result["runs"][budget] = cli_train(check, f"train-{budget}", common + flags, deadline)
    # The guard: the 12 GB run's plan with a budget far below its own total.
    plan_path = check.work / f"train-{BUDGETS[0]}" / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        plan["budget_bytes"] = int(plan["memory"]["total_bytes"] * GUARD_SHARE)
        lowered = check.work / "guard-plan.json"
        lowered.write_text(json.dumps(plan, indent=2))
        result["guard"] = cli_train(check, "train-guard", common + ["--plan", str(lowered), "--steps", "3"], deadline, expected_exit=3)
    else:
        result["guard"] = {"status": "error", "error": f"no plan to lower: the {BUDGETS[0]} run wrote no plan.json"}
    failed = [f"{name}: {run['error']}" for name, run in [*result["runs"].items(), ("guard", result["guard"])] if run.get("error")]
    if failed:
        result.update(status="error", error=failed[0])
    return result


def cli_train(check: Check, name: str, flags: list[str], deadline: float, expected_exit: int = 0) -> dict:
    """One `lorasp-edge train` run through the CLI: its exit code, what it recorded, and the process's CUDA peaks."""
    out = check.work / name
    stats = check.work / f"{name}.cuda.json"
    command = [sys.executable, __file__, "--child", "cli", str(stats), "train", "--out", str(out), *flags]
    try:
        code, stdout, stderr = check.run(command, deadline, name)
    except CheckError as error:
        return {"status": "error", "error": first_line(error)}
    run = {"status": "ok", "exit_code": code, "expected_exit_code": expected_exit}
    if code != expected_exit:
        run["error"] = f"exit {code} (expected {expected_exit}): {last_line(stderr)}"
    summary_path, plan_path = out / "summary.json", out / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        run.update(plan=describe_plan(plan), budget_bytes=plan["budget_bytes"], plan_total_bytes=plan["memory"]["total_bytes"],
                   plan_runtime_bytes=plan["memory"].get("runtime"))
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        run.update(peak_bytes=summary["peak_bytes"], peak_measure=summary["peak_measure"], peak_rss_bytes=summary["peak_rss_bytes"],
                   tokens_per_s=summary["tokens_per_s"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()] if (out / "metrics.jsonl").is_file() else []
    if records:
        run["steps_logged"] = len(records)
        run["median_step_tokens_per_s"] = statistics.median(record["tokens_per_s"] for record in records[1:] or records)
        run.setdefault("peak_bytes", max(record["peak_bytes"] or 0 for record in records))
    cuda = json.loads(stats.read_text()) if stats.is_file() else {}
    run["peak_allocated_bytes"] = cuda.get("max_memory_allocated")
    run["peak_reserved_bytes"] = cuda.get("max_memory_reserved")
    total = run.get("plan_total_bytes")
    for key, ratio in (("peak_bytes", "peak_vs_plan"), ("peak_allocated_bytes", "allocated_vs_plan"), ("peak_reserved_bytes", "reserved_vs_plan")):
        if total and run.get(key):
            run[ratio] = run[key] / total
    if "went over the budget" in stderr:
        run["message"] = next(line for line in stderr.splitlines() if "went over the budget" in line).strip()[:300]
    return run


def section_planner(check: Check, deadline: float) -> dict:
    sizes = check.sizes
    out = check.work / "planner.json"
    command = [sys.executable, str(ROOT / "tools" / "validate_planner.py"), "--points", ",".join(map(str, sizes.planner_points)),
               "--steps", str(sizes.planner_steps), "--json", str(out)]
    result = {"requested_points": len(sizes.planner_points)}
    try:  # the tool writes its JSON after every point: a run stopped at the cap keeps what it measured
        code, _, stderr = check.run(command, deadline, "planner")
        if code != 0:
            result["error"] = f"exit {code}: {last_line(stderr)}"
    except CheckError as error:
        result["error"] = first_line(error)
    points = json.loads(out.read_text()) if out.is_file() else []
    if not points:
        raise CheckError(result.get("error", "validate_planner.py measured no point"))
    result["points"] = [{"point": describe_point(p["spec"]), "held_out": p["spec"].get("held_out", False), "device": p["device"],
                         "predicted_bytes": p["predicted"]["total_bytes"] - p["predicted"]["runtime"], "measured_bytes": p["measured"],
                         "error_pct": validate_planner.error(p)} for p in points]
    held_out = [abs(p["error_pct"]) for p in result["points"] if p["held_out"]]
    result.update(device=points[0]["device"], measured_points=len(points), held_out_points=len(held_out))
    if held_out:
        result.update(held_out_median_pct=statistics.median(held_out), held_out_worst_pct=max(held_out))
    if "error" in result:
        result["status"] = "error"
    return result


def section_pytest(check: Check, deadline: float) -> dict:
    junit = check.work / "pytest-cuda.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests"]
    code, stdout, _ = check.run(command, deadline, "pytest")
    result = {"exit_code": code, "summary": last_line(stdout)}
    if junit.is_file():
        suites = ElementTree.parse(junit).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
        result.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
    if code == 5:
        result.update(status="error", error="no test marked cuda was collected")
    elif code != 0:
        result.update(status="error", error=f"pytest exit {code}: {result['summary']}")
    return result


SECTION_FUNCTIONS = {"env": section_env, "speed": speed_section("model"), "train": section_train, "planner": section_planner,
                     "pytest": section_pytest, "speed-big": speed_section("big_model")}


def run_section(check: Check, name: str) -> dict:
    # Each section stops at its cap or at the end of the whole budget, whichever comes first; speed-big
    # asked for by name (--big, --only) has its own cap beyond the budget.
    cap = CAPS[name] if name == "speed-big" and check.big_asked else min(CAPS[name], check.left())
    started = time.monotonic()
    try:
        result = SECTION_FUNCTIONS[name](check, started + cap)
        result.setdefault("status", "ok")
    except Exception as error:  # noqa: BLE001 (one section's failure must not stop the others)
        result = {"status": "error", "error": first_line(error)}
    result.update(seconds=round(time.monotonic() - started, 1), cap_s=round(cap))
    print(f"gpu_check: {name:9s} {result['status']:8s} {result['seconds']:6.1f} s" + (f"  {result['error']}" if result.get("error") else ""),
          file=sys.stderr, flush=True)
    return result


def run_sections(check: Check, names: list[str]) -> dict:
    """env first (the others read it), then the middle sections, --jobs at a time, then speed-big (it
    runs when the time left allows)."""
    sections = {}

    def one(name: str) -> None:
        reason = skip_reason(check, name, sections)
        sections[name] = {"status": "skipped", "reason": reason} if reason else run_section(check, name)

    one("env")
    middle = [name for name in names if name not in ("env", "speed-big")]
    with ThreadPoolExecutor(max_workers=max(1, check.args.jobs)) as pool:
        list(pool.map(one, middle))
    if "speed-big" in names:
        one("speed-big")
    return {name: sections[name] for name in names}


def skip_reason(check: Check, name: str, sections: dict) -> str | None:
    """Why section `name` does not run, or None."""
    env = sections.get("env", {})
    if name != "env" and check.sizes.mode == "cuda" and not env.get("cuda_available"):
        return "no CUDA device (see env); --dry-run runs the check on CPU"
    if name == "speed-big":
        if check.sizes.big_model is None:
            return "dry-run: one toy model"
        speed_seconds = sections.get("speed", {}).get("seconds") or CAPS["speed"]
        if not check.big_asked and check.left() < 2.5 * speed_seconds + 10:
            return f"{check.left():.0f} s left of the {TOTAL_S} s budget, about {2.5 * speed_seconds:.0f} s needed: run with --big"
    elif check.left() < 10:
        return f"the {TOTAL_S} s budget is spent"
    return None


# ------------------------------------------------------------------------------ targets and the table


def speed_targets(section: dict) -> list[dict]:
    """lorasp-edge against its peer, side by side in this run: tokens/s, and peak allocated and reserved."""
    rows, methods = [], section.get("methods", {})
    dtype = section.get("dtype", "bfloat16")
    for method, peer, least_speed, most_peak in TARGETS:
        name = f"{section.get('model', 'speed')}: {method_label(method, dtype)} vs {method_label(peer, dtype)}"
        target = f">= {least_speed:.2f}x tokens/s, <= {most_peak:.2f}x peak"
        a, b = methods.get(method, {}), methods.get(peer, {})
        if a.get("status") != "ok" or b.get("status") != "ok":
            rows.append(target_row(name, None, target, None))
            continue
        speed = a["tokens_per_s"] / b["tokens_per_s"]
        allocated = a["peak_allocated_bytes"] / b["peak_allocated_bytes"]
        reserved = a["peak_reserved_bytes"] / b["peak_reserved_bytes"]
        row = target_row(name, f"{speed:.2f}x tokens/s, {allocated:.2f}x allocated, {reserved:.2f}x reserved", target,
                         speed >= least_speed and allocated <= most_peak and reserved <= most_peak)
        rows.append(row | {"speed_ratio": speed, "allocated_ratio": allocated, "reserved_ratio": reserved})
    return rows


def target_row(name: str, figure: str | None, target: str, passed: bool | None) -> dict:
    """One target line: `figure` None (and `passed` None) when it was not measured."""
    result = "n/a" if passed is None else "pass" if passed else "miss"
    return {"name": name, "figure": figure or "not measured", "target": target, "result": result}


def all_targets(sections: dict) -> list[dict]:
    """Every target of the sections selected, pass/miss, or n/a where a section did not measure it."""
    rows = []
    for name in ("speed", "speed-big"):
        if name in sections and (name == "speed" or sections[name].get("methods")):
            rows += speed_targets(sections[name])
    if "planner" in sections:
        planner = sections["planner"]
        median, worst = planner.get("held_out_median_pct"), planner.get("held_out_worst_pct")
        measured = median is not None
        rows.append(target_row(f"planner, absolute error of {planner.get('held_out_points', 0)} held-out points on {planner.get('device', '-')}",
                               f"median {median:.1f}%, worst {worst:.1f}%" if measured else None,
                               f"median <= {PLANNER_MEDIAN_PCT:.0f}%, worst <= {PLANNER_WORST_PCT:.0f}%",
                               median <= PLANNER_MEDIAN_PCT and worst <= PLANNER_WORST_PCT if measured else None))
    if "train" in sections:
        runs = sections["train"].get("runs", {})
        for budget in BUDGETS:
            run = runs.get(budget, {})
            ran = "exit_code" in run
            inside = ran and run["exit_code"] == 0 and run.get("peak_bytes") is not None and run["peak_bytes"] <= run.get("budget_bytes", 0)
            rows.append(target_row(f"lorasp-edge train --mem {budget}",
                                   f"exit {run['exit_code']}, peak {gb(run.get('peak_bytes'))} of {gb(run.get('budget_bytes'))} GB" if ran else None,
                                   "exit 0, peak <= budget (guard never trips)", inside if ran else None))
        code = sections["train"].get("guard", {}).get("exit_code")
        rows.append(target_row("memory guard on a budget set too small", f"exit {code}" if code is not None else None, "exit 3",
                               code == 3 if code is not None else None))
    if "pytest" in sections:
        tests = sections["pytest"]
        bad = tests.get("failures", 0) + tests.get("errors", 0)
        figure = f"{tests.get('passed', 0)} passed, {tests.get('failures', 0)} failed, {tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped"
        ran = tests.get("passed", 0) + bad > 0  # all skipped (no CUDA): nothing shown either way
        rows.append(target_row("pytest -m cuda", figure if "tests" in tests else None, "all pass", bad == 0 if ran else None))
    return rows


def figure_rows(sections: dict) -> list[list[str]]:
    """The measurements, one table row each: section, item, figure."""
    rows = []
    env = sections.get("env", {})
    if env.get("torch"):
        gpu = f"{env['gpu']} ({gb(env['gpu_total_bytes'])} GB, bf16 {env['bf16']})" if env.get("gpu") else "no CUDA device"
        bnb = "NF4 ok" if env["bnb_4bit"]["ok"] else "NF4 fails"
        rows.append(["env", f"torch {env['torch']} (CUDA build {env['torch_cuda_build']})", f"{gpu}; bitsandbytes {bnb} on {env['bnb_4bit']['device']}"])
        if env.get("problems"):
            rows.append(["env", "problems", "; ".join(env["problems"])])
    for name in ("speed", "speed-big"):
        for method in sections.get(name, {}).get("methods", {}).values():
            if method["status"] == "ok":
                setting = f" ({method['plan']})" if "plan" in method else ""
                figure = (f"{method['tokens_per_s']:,.0f} tokens/s, allocated {gb(method['peak_allocated_bytes'])} GB, "
                          f"reserved {gb(method['peak_reserved_bytes'])} GB{setting}")
            else:
                figure = f"{method['status']}: {method.get('error') or method.get('reason')}"
            rows.append([f"{name} {sections[name]['model']}", method["label"], figure])
    train = sections.get("train", {})
    for label, run in [*train.get("runs", {}).items(), ("guard", train.get("guard"))]:
        if not run:
            continue
        if "exit_code" not in run:
            rows.append(["train", label, f"error: {run.get('error')}"])
            continue
        figure = f"exit {run['exit_code']}, peak {gb(run.get('peak_bytes'))} GB" + (f" ({run['peak_measure']})" if run.get("peak_measure") else "")
        if run.get("peak_allocated_bytes"):
            figure += f", allocated {gb(run['peak_allocated_bytes'])} GB"
        if run.get("plan_total_bytes"):
            figure += f"; plan {gb(run['plan_total_bytes'])} GB ({run['plan']}), peak/plan {run.get('peak_vs_plan', 0):.2f}"
            if run.get("allocated_vs_plan"):
                figure += f", allocated/plan {run['allocated_vs_plan']:.2f}"
        rows.append(["train", f"--mem {label}" if label != "guard" else f"guard (budget {gb(run.get('budget_bytes'))} GB)", figure])
    planner = sections.get("planner", {})
    for point in planner.get("points", []):
        rows.append(["planner", point["point"] + (" *" if point["held_out"] else ""),
                     f"predicted {point['predicted_bytes'] / 1e6:,.0f} MB, measured {point['measured_bytes'] / 1e6:,.0f} MB, {point['error_pct']:+.1f}%"])
    for name, section in sections.items():
        if section.get("status") in ("error", "skipped"):  # env's problems have their own row above
            rows.append([name, section["status"], section.get("error") or section.get("reason", "")])
    return rows


def table_rows(sections: dict, targets: list[dict]) -> list[dict]:
    """The one table: every measurement, then every target with pass/miss."""
    rows = [{"section": section, "item": item, "result": "", "target": "", "figure": figure} for section, item, figure in figure_rows(sections)]
    return rows + [{"section": "target", "item": row["name"], "result": row["result"], "target": row["target"], "figure": row["figure"]}
                   for row in targets]


def print_table(report: dict) -> None:
    what = "DRY RUN on CPU at toy sizes: checks the tool, not the targets" if report["mode"] == "dry-run" else "CUDA"
    print(f"gpu_check ({what}), {report['seconds']:.0f} s")
    columns = (("section", 12), ("item", 56), ("result", 6), ("target", 44), ("figure", 0))
    print("| " + " | ".join(f"{name:{width}}" for name, width in columns))
    print("|" + "|".join("-" * (width + 2) for _, width in columns[:-1]) + "|--------")
    for row in report["table"]:
        print("| " + " | ".join(f"{row[name]:{width}}" for name, width in columns))


# ------------------------------------------------------------------------------ small helpers


def gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def describe_plan(plan: dict) -> str:
    return (f"{plan['quant_bits']}-bit r{plan['rank']} {plan['compute_dtype']}, {plan['micro_batch']}x{plan['grad_accum']} x {plan['seq_len']}, "
            f"ckpt {'on' if plan['gradient_checkpointing'] else 'off'}, loss chunk {plan['loss_chunk_tokens']}")


def describe_point(spec: dict) -> str:
    accum = f"x{spec['accum']}" if spec.get("accum", 1) > 1 else ""
    return (f"{spec['model']} {spec['bits']}-bit {'ckpt ' if spec['ckpt'] else ''}{spec['batch']}x{spec['seq']}{accum} "
            f"r{spec['rank']} {spec['targets']}")


def parse_bytes(text: str) -> int:
    from lorasp_edge.plan.units import parse_memory  # standard library only

    return parse_memory(text)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(root: str = "lorasp-edge", extras: tuple[str, ...] = ("test",)) -> list[str]:
    """The distributions `root` (with `extras`) needs, directly or through others, as installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, order, queue = set(), [], [(root, extras)]
    while queue:
        name, wanted = queue.pop(0)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here: listed as missing, its own needs unknown
        for text in requires:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": extra}) for extra in ("", *wanted)):
                continue
            key = normalized(requirement.name)
            if key not in seen:
                seen.add(key)
                order.append(requirement.name)
                queue.append((requirement.name, tuple(requirement.extras)))
    return order


def installed_requirements() -> list[tuple[str, str | None]]:
    """(name, installed version or None) for every distribution in the project's dependency closure."""
    from importlib import metadata

    found = []
    for name in dependency_closure():
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            found.append((name, None))
    return found


def requirements_text() -> str:
    """`pip freeze`, restricted to the project's dependencies, with how to carry them."""
    wanted = {normalized(name): name for name, _ in installed_requirements()}
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=False).stdout.splitlines()
    pins = {}
    for line in frozen:
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match and normalized(match.group(1)) in wanted:
            pins[normalized(match.group(1))] = (match.group(1), match.group(2))
    lines = [
        "# lorasp-edge's dependencies (extras: test) as installed here: pip freeze, restricted to them.",
        "# On a machine with network and the GPU machine's Python and platform:  pip download -r THIS_FILE -d wheels",
        "# On the GPU machine:  pip install --no-index --find-links wheels -r THIS_FILE && pip install --no-deps --no-build-isolation -e .",
    ]
    for key, name in wanted.items():
        if key not in pins:
            lines.append(f"# {name}: not installed here")
            continue
        name, version = pins[key]
        if key == "torch":
            lines.append("# torch: carry the CUDA build of this version for the GPU machine's driver (PyTorch's wheel index for that CUDA"
                         " version), not a +cpu wheel; it brings its nvidia-* wheels")
            version = version.split("+")[0]
        lines.append(f"{name}=={version}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # gpu_check.py --child NAME SPEC | --child cli STATS ARGV...
        if sys.argv[2] == "cli":
            return child_cli(sys.argv[3], sys.argv[4:])
        print("RESULT " + json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3])), default=str), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where to write the results (default gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="every section on CPU at toy sizes (checks the tool, not the targets)")
    parser.add_argument("--only", help="comma-separated sections: " + ", ".join(SECTIONS) + " (env always runs)")
    parser.add_argument("--big", action="store_true", help="also the speed section on Qwen2.5-1.5B's shape, whatever the time")
    parser.add_argument("--speed-mem", default="12GB", help="the budget the lorasp-edge speed methods are planned for (default 12GB)")
    parser.add_argument("--jobs", type=int, help="sections run side by side (default 1: on one GPU, side by side would "
                        "disturb the measurements; 2 with --dry-run)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed unless a section failed)")
    parser.add_argument("--requirements", action="store_true", help="print the project's dependencies as installed here (pip freeze) and exit")
    args = parser.parse_args()
    if args.requirements:
        print(requirements_text())
        return 0
    args.only = [name.strip() for name in args.only.split(",")] if args.only else None
    if args.only and not set(args.only) <= set(SECTIONS):
        parser.error(f"--only: sections are {', '.join(SECTIONS)}")
    sizes = sizes_for(args.dry_run)
    args.jobs = args.jobs or (2 if args.dry_run else 1)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args, sizes, work)
    sections = run_sections(check, [name for name in SECTIONS if name == "env" or not args.only or name in args.only])
    failed = any(section["status"] in ("error", "problems") for section in sections.values())
    targets = all_targets(sections)
    report = {"tool": "tools/gpu_check.py", "mode": sizes.mode, "seconds": round(time.monotonic() - check.started, 1),
              "sizes": asdict(sizes), "sections": sections, "targets": targets, "table": table_rows(sections, targets),
              "work": str(work) if failed or args.work else None}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report)
    print(f"\nwritten: {args.json}" + (f"; logs kept in {work / 'logs'}" if report["work"] else ""))
    if not failed and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

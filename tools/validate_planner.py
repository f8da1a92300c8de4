"""Check the planner's memory model against real training steps.

    python tools/validate_planner.py [--quick] [--no-defaults] [--json runs.json] [--write-docs]
    python tools/validate_planner.py --fit runs.json          # fit the heap-slack constants, score the held-out third
    python tools/validate_planner.py --from-json runs.json    # the same measurements against the model as it is

Each grid point (model x quant bits x compute dtype x checkpointing x seq x batch x accumulation x
rank x targets) runs in a fresh process: import everything, record the resident set (the baseline:
what the planner calls the runtime), build the model with the trainer's `build_model`, run a few
optimizer steps with the trainer's `train_step` (each over `accum` micro-batches packed as the
trainer's data stream packs them), and take the peak resident set during the steps
(a 5 ms sampling thread and the kernel's VmHWM, reset after loading: /proc/self/clear_refs).
Measured = peak - baseline; predicted = the planner's total minus its runtime term. On a machine
with a GPU the points run on CUDA and measured = torch.cuda.max_memory_allocated.

Models: the bundled SmolLM2-135M and small models built from a config (random weights, saved
once under $LORASP_EDGE_CACHE/validate). `--write-docs` replaces the table between the markers
in docs/planner.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "planner.md"
BEGIN, END = "<!-- validation:begin -->", "<!-- validation:end -->"

# Small architectures built from a config: the llama path (GQA), Qwen2 (q/k/v bias, tied),
# Phi-3 (fused qkv and gate_up) and Gemma 2 (eager attention, four norms a layer).
TINY_CONFIGS = {
    "tiny-llama": dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=64, vocab_size=8192, tie_word_embeddings=False, max_position_embeddings=2048),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                       num_key_value_heads=2, vocab_size=16384, tie_word_embeddings=True, max_position_embeddings=2048),
    "tiny-phi3": dict(model_type="phi3", hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=6, vocab_size=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, max_position_embeddings=2048),
    "tiny-gemma2": dict(model_type="gemma2", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        max_position_embeddings=2048),
}

ALL, ATTENTION, QV = "all", "attn", "qv"


LOCAL = "local"  # the compute dtype the planner picks on this machine (bf16 where native, else fp32)


def point(model, bits, dtype, ckpt, seq, batch, rank=16, targets=ALL, layers=None, chunk=1024, held_out=False, accum=1):
    """One grid point; `accum` micro-batches of `batch` sequences make one optimizer step, as in the trainer."""
    return dict(model=model, bits=bits, dtype=dtype, ckpt=ckpt, seq=seq, batch=batch, rank=rank, targets=targets, layers=layers,
                chunk=chunk, held_out=held_out, accum=accum)


def default_shapes() -> list[dict]:
    """The planner's default request on the bundled model (seq 512, effective batch 8, rank 64 where it
    fits) and its long-sequence variant: seq 512 and 1024, micro-batch 4 and 8 (accumulating to 8), 16-bit
    and 4-bit, checkpointing off and on."""
    points = []
    for seq in (512, 1024):
        for micro in (4, 8):
            for bits in (16, 4):
                for ckpt in (False, True):
                    chunk = 512 if seq == 512 else 1024
                    points.append(point("smollm2-135m", bits, LOCAL, ckpt, seq, micro, rank=64, chunk=chunk, accum=8 // micro))
    return points


def grid(quick: bool, defaults: bool = True) -> list[dict]:
    """Every point in the compute dtype the planner picks on the machine that runs it. Every third
    point, from the first, is held out (`held_out=True`): `--fit` never sees it, and the table scores
    it apart. The small models come first, then the bundled model at small shapes, then its default
    shapes (`defaults`: minutes a step on a CPU without native bf16)."""
    if quick:
        return [
            point("tiny-llama", 16, LOCAL, False, 512, 2),
            point("tiny-llama", 4, LOCAL, True, 512, 2),
            point("tiny-gemma2", 8, LOCAL, False, 256, 2),
            point("smollm2-135m", 16, LOCAL, True, 256, 4),
            point("smollm2-135m", 16, LOCAL, False, 512, 4, rank=64, chunk=512, accum=2),
        ]
    points = [
        # tiny-llama: h 512, 8 layers, GQA
        point("tiny-llama", 16, LOCAL, False, 512, 2),
        point("tiny-llama", 16, LOCAL, True, 512, 2),
        point("tiny-llama", 8, LOCAL, False, 512, 2),
        point("tiny-llama", 8, LOCAL, True, 512, 2),
        point("tiny-llama", 4, LOCAL, False, 512, 2),
        point("tiny-llama", 4, LOCAL, True, 512, 2),
        point("tiny-llama", 16, LOCAL, False, 128, 8, rank=64),
        point("tiny-llama", 16, LOCAL, False, 1024, 1, rank=8),
        point("tiny-llama", 4, LOCAL, False, 256, 4, rank=8, targets=ATTENTION),
        point("tiny-llama", 16, LOCAL, False, 256, 4, rank=32, targets=QV, layers=4),
        point("tiny-llama", 16, LOCAL, False, 256, 4, rank=32),
        point("tiny-llama", 16, LOCAL, False, 256, 2, accum=2),
        point("tiny-llama", 4, LOCAL, True, 512, 2, accum=2),
        point("tiny-llama", 8, LOCAL, False, 128, 4, accum=4),
        point("tiny-llama", 16, LOCAL, True, 1024, 2),
        # tiny-qwen2: q/k/v bias, tied embeddings, vocab 16384
        point("tiny-qwen2", 16, LOCAL, False, 512, 2),
        point("tiny-qwen2", 4, LOCAL, True, 512, 2),
        point("tiny-qwen2", 8, LOCAL, True, 1024, 2),
        point("tiny-qwen2", 16, LOCAL, False, 256, 4, accum=2),
        point("tiny-qwen2", 4, LOCAL, False, 1024, 1),
        # tiny-phi3: fused qkv and gate_up
        point("tiny-phi3", 16, LOCAL, False, 512, 2),
        point("tiny-phi3", 4, LOCAL, False, 512, 1),
        point("tiny-phi3", 16, LOCAL, True, 512, 2),
        point("tiny-phi3", 8, LOCAL, False, 256, 4),
        # tiny-gemma2: eager attention, four norms a layer
        point("tiny-gemma2", 16, LOCAL, False, 256, 2),
        point("tiny-gemma2", 16, LOCAL, False, 512, 2),
        point("tiny-gemma2", 4, LOCAL, True, 256, 2),
        point("tiny-gemma2", 8, LOCAL, False, 256, 4, accum=2),
        # the bundled model at small shapes
        point("smollm2-135m", 16, LOCAL, False, 256, 4),
        point("smollm2-135m", 16, LOCAL, True, 256, 4),
        point("smollm2-135m", 4, LOCAL, True, 256, 4),
        point("smollm2-135m", 8, LOCAL, False, 128, 2),
        point("smollm2-135m", 16, LOCAL, True, 512, 2, rank=32),
        point("smollm2-135m", 4, LOCAL, False, 256, 2, rank=64, chunk=512, accum=2),
        *default_shapes(),
    ]
    # Points added after the first run go last, so that the split of the points above never moves.
    points += [
        point("tiny-gemma2", 16, LOCAL, True, 512, 2),
        point("tiny-gemma2", 4, LOCAL, False, 512, 1),
        point("tiny-gemma2", 8, LOCAL, False, 256, 2),
        # --prefer memory's shape on the bundled model: one sequence a micro-batch, accumulated
        point("smollm2-135m", 16, LOCAL, True, 256, 1, accum=4),
        point("smollm2-135m", 4, LOCAL, True, 256, 1, accum=4),
    ]
    points = [{**spec, "held_out": index % 3 == 0} for index, spec in enumerate(points)]
    return points if defaults else [spec for spec in points if {**spec, "held_out": False} not in default_shapes()]


# --------------------------------------------------------------------------- one point (child)


def tiny_model_dir(name: str) -> Path:
    from lorasp_edge.sources import cache_root

    return cache_root() / "validate" / name


def prepare_tiny_model(name: str) -> None:
    """Save a randomly initialised model of the named config (run in its own process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = tiny_model_dir(name)
    if (target / "config.json").is_file():
        return
    fields = dict(TINY_CONFIGS[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    os.replace(tmp, target)


def setting_of(spec: dict, arch):
    from lorasp_edge.plan.memory import Candidate, host_allocator_for
    from lorasp_edge.plan.search import target_choices

    choices = dict(zip((ALL, ATTENTION, QV), target_choices(arch)))
    return Candidate(
        quant_bits=spec["bits"], compute_dtype=compute_dtype(spec), rank=spec["rank"], target_modules=choices[spec["targets"]],
        adapted_layers=spec["layers"] or arch.num_layers, gradient_checkpointing=spec["ckpt"], micro_batch=spec["batch"],
        seq_len=spec["seq"], loss_chunk_tokens=spec["chunk"], grad_accum=spec.get("accum", 1),
        host_allocator=host_allocator_for(arch, "cpu"),
    )


def compute_dtype(spec: dict) -> str:
    if spec["dtype"] != LOCAL:
        return spec["dtype"]
    from lorasp_edge.plan.search import local_device

    return "bfloat16" if local_device().bf16 else "float32"


def batches(spec: dict, vocab_size: int) -> list[dict]:
    """The step's micro-batches, packed as the trainer's data stream packs them: every block holds two
    examples (position ids restart half-way), so attention is masked block-diagonally, as in training."""
    import torch

    generator = torch.Generator().manual_seed(0)
    seq, half = spec["seq"], spec["seq"] // 2
    positions = torch.cat([torch.arange(half), torch.arange(seq - half)]).expand(spec["batch"], seq).contiguous()
    out = []
    for _ in range(spec.get("accum", 1)):
        input_ids = torch.randint(0, vocab_size, (spec["batch"], seq), generator=generator)
        out.append({"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": positions.clone()})
    return out


def model_name(spec: dict) -> str:
    return spec["model"] if spec["model"] in ("smollm2-135m",) else str(tiny_model_dir(spec["model"]))


def run_point(spec: dict, steps: int) -> dict:
    import threading

    import psutil
    import torch

    from lorasp_edge.plan.catalog import model_info
    from lorasp_edge.plan.memory import estimate
    from lorasp_edge.plan.search import Device, plan_for_setting
    from lorasp_edge.train.loop import build_model, build_optimizer
    from lorasp_edge.train.step import train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = model_name(spec)
    arch = model_info(name).architecture
    _import_model_code(arch.model_type)
    setting = setting_of(spec, arch)
    plan = plan_for_setting(name, setting, Device(device.type, True, (16, 8, 4)), grad_accum=spec.get("accum", 1))
    predicted = estimate(arch, setting, device.type)
    batch = batches(spec, arch.vocab_size)

    process = psutil.Process()
    baseline = process.memory_info().rss

    model = build_model(plan, name, device=device)
    # from_pretrained leaves the decoder in eval mode, where transformers skips gradient
    # checkpointing; training runs in train mode.
    model.train()
    optimizer = build_optimizer(model)
    loaded = process.memory_info().rss
    _reset_peak()
    peak = {"rss": process.memory_info().rss}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak["rss"] = max(peak["rss"], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak restarts from what is allocated now: the model
    started = time.perf_counter()
    losses = [train_step(model, optimizer, batch, plan)["loss"] for _ in range(steps)]
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    peak_rss = max(peak["rss"], _vm_hwm())
    result = {
        "spec": spec,
        "predicted": predicted,
        "baseline_rss": baseline,
        "loaded_rss": loaded,
        "static_measured": loaded - baseline,
        "peak_rss": peak_rss,
        "measured": peak_rss - baseline,
        "losses": losses,
        "step_seconds": seconds / steps,
        "device": device.type,
    }
    if device.type == "cuda":
        # Every tensor on the device, weights included; the CUDA context is outside it, as the
        # planner's runtime term is outside `predicted`.
        result["measured"] = torch.cuda.max_memory_allocated()
    return result


LIVE_POINTS = [
    point("tiny-llama", 16, "bfloat16", False, 256, 2),
    point("tiny-llama", 4, "bfloat16", True, 256, 2),
    point("tiny-llama", 8, "float32", False, 256, 2),
    point("tiny-llama", 16, "float32", False, 256, 2, targets=QV, layers=4),
    point("tiny-llama", 16, "float32", True, 512, 2),
    point("tiny-llama", 4, "float32", False, 512, 2, rank=64, targets=ATTENTION, chunk=512),
    point("tiny-qwen2", 16, "bfloat16", False, 256, 2),
    point("tiny-phi3", 16, "bfloat16", False, 256, 2),
    point("tiny-gemma2", 16, "bfloat16", False, 256, 2),
]


def live_point(spec: dict) -> dict:
    """Peak bytes of the tensors autograd keeps during one train_step, beyond weights and optimizer
    state, against the planner's activations + transient + LoRA gradients (+ autocast's copies)."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from lorasp_edge.plan.catalog import model_info
    from lorasp_edge.plan.memory import estimate, lora_entries
    from lorasp_edge.plan.search import Device, plan_for_setting
    from lorasp_edge.train.loop import build_model, build_optimizer
    from lorasp_edge.train.step import train_step

    class LiveBytes(TorchDispatchMode):
        def __init__(self, known: set[int]):
            super().__init__()
            self.known, self.live, self.current, self.peak = known, {}, 0, 0

        def _sweep(self):
            for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
                self.current -= self.live.pop(key)[1]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key in self.live and self.live[key][0].expired():
                    self.current -= self.live.pop(key)[1]  # the address was freed and reused
                if key[0] and key not in self.live and key[0] not in self.known:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
                    if self.current > self.peak:
                        self._sweep()
                        self.peak = max(self.peak, self.current)
            return out

    name = model_name(spec)
    arch = model_info(name).architecture
    setting = setting_of(spec, arch)
    plan = plan_for_setting(name, setting, Device("cpu", True, (16, 8, 4)))
    batch = batches(spec, arch.vocab_size)
    model = build_model(plan, name, device="cpu")
    model.train()  # see run_point
    optimizer = build_optimizer(model)
    train_step(model, optimizer, batch, plan)  # optimizer state exists from here on
    known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    known |= {t.untyped_storage().data_ptr() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)}
    with LiveBytes(known) as tracker:
        train_step(model, optimizer, batch, plan)
    parts = estimate(arch, setting, "cpu")
    casts = lora_entries(arch, setting)[0] * 2 if setting.compute_dtype != "float32" else 0
    predicted = parts["activations"] + parts["transient"] + parts["lora_grads"] + casts
    return {"spec": spec, "live": tracker.peak, "predicted": predicted}


def _import_model_code(model_type: str) -> None:
    """Everything build_model imports lazily, so that the baseline holds the libraries' code."""
    import importlib

    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    from peft import LoraConfig, get_peft_model  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: F401

    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak resident set (VmHWM) to the current one
    except OSError:
        pass


def _vm_hwm() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- the grid (parent)


def measure(spec: dict, steps: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--point", json.dumps(spec), "--steps", str(steps)],
        capture_output=True, text=True, cwd=ROOT,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"point {spec} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def prepare(names: set[str]) -> None:
    for name in sorted(names):
        if name in TINY_CONFIGS and not (tiny_model_dir(name) / "config.json").is_file():
            subprocess.run([sys.executable, __file__, "--prepare", name], check=True, cwd=ROOT)


def describe(spec: dict) -> str:
    layers = f" L{spec['layers']}" if spec["layers"] else ""
    held_out = " *" if spec.get("held_out") else ""
    accum = f"x{spec['accum']}" if spec.get("accum", 1) > 1 else ""
    return (f"{spec['model']:13s} {spec['bits']:>2d}b {compute_dtype(spec)[:4]:4s} {'ckpt' if spec['ckpt'] else '    '} "
            f"{spec['batch']}x{spec['seq']}{accum:<4s} r{spec['rank']:<3d}{spec['targets']:4s}{layers}{held_out}")


def table(results: list[dict]) -> str:
    lines = [
        "| point (model, bits, compute dtype, checkpointing, batch x seq, rank, targets, adapted layers; * held out) | predicted MB | measured MB | error |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        predicted = r["predicted"]["total_bytes"] - r["predicted"]["runtime"]
        lines.append(f"| `{describe(r['spec'])}` | {predicted / 1e6:,.0f} | {r['measured'] / 1e6:,.0f} | {error(r):+.1f}% |")
    errors = [abs(error(r)) for r in results]
    held_out = [abs(error(r)) for r in results if r["spec"].get("held_out")]
    baselines = [r["baseline_rss"] for r in results]
    lines += [
        "",
        f"{len(results)} points on {results[0]['device']}: median |error| {statistics.median(errors):.1f}%, worst {max(errors):.1f}%"
        + (f"; held out (*): median {statistics.median(held_out):.1f}%, worst {max(held_out):.1f}%" if held_out else "")
        + "; "
        f"process baseline after imports (the runtime term): median {statistics.median(baselines) / 1e6:.0f} MB "
        f"(min {min(baselines) / 1e6:.0f}, max {max(baselines) / 1e6:.0f}).",
    ]
    return "\n".join(lines)


def repredict(result: dict) -> dict:
    """The same measurement against the planner as it is now."""
    from lorasp_edge.plan.catalog import model_info
    from lorasp_edge.plan.memory import estimate

    arch = model_info(model_name(result["spec"])).architecture
    return {**result, "predicted": estimate(arch, setting_of(result["spec"], arch), result["device"])}


def error(result: dict) -> float:
    predicted = result["predicted"]["total_bytes"] - result["predicted"]["runtime"]
    return (predicted / result["measured"] - 1) * 100


# --------------------------------------------------------------------------- fitting the heap terms

# No fitted point may under-predict by more than this share: half the planner's default headroom,
# leaving the other half for the points the fit does not see.
FIT_UNDER_LIMIT = 0.05


def heap_terms(result: dict) -> tuple[float, dict[str, float]]:
    """A measured point's bytes outside the heap's slack, as the planner predicts them now, and the
    slack's terms (memory.heap_slack_terms) at that point."""
    from lorasp_edge.plan import memory
    from lorasp_edge.plan.catalog import model_info

    arch = model_info(model_name(result["spec"])).architecture
    setting = setting_of(result["spec"], arch)
    predicted = memory.estimate(arch, setting, "cpu")
    saved = memory.saved_with_grad_bytes(memory.activation_bytes(arch, setting), setting)
    other = predicted["total_bytes"] - predicted["runtime"] - predicted.get("allocator_slack", 0)
    return other, memory.heap_slack_terms(arch, setting, saved)


def fit_heap(rows: list[tuple[float, dict[str, float]]], measured: list[float]) -> dict[str, float]:
    """The heap-slack constants (memory.HEAP_SLACK's names) fitted on measured points (`fit_constants`);
    `rows` are their `heap_terms`."""
    import numpy as np

    names = list(rows[0][1])
    return fit_constants(
        names,
        np.array([o for o, _ in rows], dtype=float),
        np.array([[terms[name] for name in names] for _, terms in rows], dtype=float),
        np.array(measured, dtype=float),
    )


def fit_constants(names: list[str], other, features, measured) -> dict[str, float]:
    """Constants for `features` (points x names) that minimise median + worst |relative error| of
    other + features @ constants against `measured`, none negative, with no point under-predicted by
    more than FIT_UNDER_LIMIT.

    Starts from the non-negative least-squares fit of the relative errors, then a pattern search
    (Hooke and Jeeves 1961): move one constant up or down by its step while that lowers the score, and
    halve the steps when no move does."""
    import numpy as np

    other = other / measured
    features = features / measured[:, None]
    scale = np.abs(features).max(0)
    scale[scale == 0] = 1
    features = features / scale  # every constant of order one while searching
    # Drop the terms no point exercises, fit the rest, and drop the negatives until none is left.
    active = [j for j in range(len(names)) if features[:, j].any()]
    while True:
        solution, *_ = np.linalg.lstsq(features[:, active], 1 - other, rcond=None)
        if (solution >= 0).all():
            break
        active = [j for j, value in zip(active, solution) if value >= 0]
    constants = np.zeros(len(names))
    constants[active] = solution

    def score(values: np.ndarray) -> float:
        errors = other + features @ values - 1
        penalty = max(0.0, -FIT_UNDER_LIMIT - errors.min()) * 100
        return float(np.median(np.abs(errors)) + np.abs(errors).max() + penalty)

    steps = np.where(constants > 0, constants / 4, 0.0)
    steps[[j for j in active if constants[j] == 0]] = 0.1
    best = score(constants)
    while steps.max() > 1e-5:
        moved = False
        for j in active:
            for sign in (1, -1):
                trial = constants.copy()
                trial[j] = max(0.0, trial[j] + sign * steps[j])
                value = score(trial)
                if value < best - 1e-12:
                    constants, best, moved = trial, value, True
        if not moved:
            steps /= 2
    if (other + features @ constants - 1).min() < -FIT_UNDER_LIMIT - 1e-9:
        raise SystemExit(f"no constants keep every fitted point within {FIT_UNDER_LIMIT:.0%} under its measurement")
    return dict(zip(names, (float(value) for value in constants / scale)))


def fit_report(results: list[dict]) -> str:
    from lorasp_edge.plan import memory

    rows = [(r, *heap_terms(r)) for r in results]
    fitted = [row for row in rows if not row[0]["spec"].get("held_out")]
    held_out = [row for row in rows if row[0]["spec"].get("held_out")]
    if not fitted or not held_out:
        raise SystemExit("--fit needs both fitted and held-out points in the runs")
    constants = fit_heap([(other, terms) for _, other, terms in fitted], [r["measured"] for r, _, _ in fitted])

    def errors(group, values):
        return [((other + sum(values[name] * terms[name] for name in terms)) / r["measured"] - 1) * 100 for r, other, terms in group]

    lines = [f"fitted on {len(fitted)} points, {len(held_out)} held out (of {len(rows)})"]
    lines.append("constants: " + ", ".join(f"{name} {value:.4g}" for name, value in constants.items()))
    for label, values in (("now (memory.HEAP_SLACK)", memory.HEAP_SLACK), ("fitted", constants)):
        for group_label, group in (("fit", fitted), ("held out", held_out)):
            e = errors(group, values)
            lines.append(f"{label:24s} {group_label:8s}: median |error| {statistics.median(map(abs, e)):.1f}%, worst "
                         f"{max(map(abs, e)):.1f}%, most under {min(e):+.1f}%")
    return "\n".join(lines)


def write_docs(text: str) -> None:
    doc = DOCS.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOCS}: markers {BEGIN} / {END} not found")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 5-point grid (a few minutes)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per point (default 3)")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/planner.md")
    parser.add_argument("--json", type=Path, help="also write every result as JSON")
    parser.add_argument("--only", help="run only points whose model name contains this")
    parser.add_argument("--points", help="run only these grid points, by their index in the grid (0-based, comma-separated)")
    parser.add_argument("--no-defaults", action="store_true",
                        help="leave out the bundled model's default shapes (minutes a step on a CPU without native bf16)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="run every point in this compute dtype (a CPU without native bf16 runs bf16 points emulated, "
                             "many times slower; the planner computes in fp32 there)")
    parser.add_argument("--from-json", type=Path, help="re-predict the measurements saved by an earlier --json run (no training)")
    parser.add_argument("--fit", type=Path, metavar="RUNS_JSON",
                        help="fit the CPU heap-slack constants on the unmarked points of an earlier --json run, score the held-out ones")
    parser.add_argument("--live", action="store_true", help="check activations against the tensors autograd keeps (no allocator)")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.prepare:
        prepare_tiny_model(args.prepare)
        return 0
    if args.point:
        spec = json.loads(args.point)
        print("RESULT " + json.dumps(live_point(spec) if args.live else run_point(spec, args.steps)))
        return 0
    if args.live:
        prepare({p["model"] for p in LIVE_POINTS})
        print("| point | live peak MB | predicted MB | error |\n|---|---:|---:|---:|")
        for spec in LIVE_POINTS:
            done = subprocess.run([sys.executable, __file__, "--live", "--point", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"point {spec} failed:\n{done.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            print(f"| `{describe(spec)}` | {r['live'] / 1e6:.1f} | {r['predicted'] / 1e6:.1f} | {(r['predicted'] / r['live'] - 1) * 100:+.1f}% |", flush=True)
        return 0

    if args.fit:
        print(fit_report(json.loads(args.fit.read_text())))
        return 0
    if args.from_json:
        results = [repredict(r) for r in json.loads(args.from_json.read_text())]
        text = table(results)
        print(text)
        if args.write_docs:
            write_docs(text)
        return 0

    points = [p for p in grid(args.quick, defaults=not args.no_defaults) if not args.only or args.only in p["model"]]
    if args.points:
        if args.only or args.no_defaults:
            parser.error("--points names the points itself: leave out --only and --no-defaults")
        everything = grid(args.quick)
        try:
            indices = [int(index) for index in args.points.split(",")]
        except ValueError:
            indices = [-1]
        if not all(0 <= index < len(everything) for index in indices):
            parser.error(f"--points: indices 0-{len(everything) - 1}, comma-separated")
        points = [everything[index] for index in indices]
    if args.dtype:  # every point in one compute dtype; points that become the same are run once
        unique = {}
        for spec in points:
            spec = {**spec, "dtype": args.dtype}
            unique.setdefault(json.dumps({k: v for k, v in spec.items() if k != "held_out"}, sort_keys=True), spec)
        points = list(unique.values())
    prepare({p["model"] for p in points})
    results = []
    started = time.time()
    for spec in points:
        result = measure(spec, args.steps)
        results.append(result)
        predicted = result["predicted"]["total_bytes"] - result["predicted"]["runtime"]
        print(f"{describe(spec)}  predicted {predicted / 1e6:8.1f} MB  measured {result['measured'] / 1e6:8.1f} MB  "
              f"{error(result):+6.1f}%  ({result['step_seconds']:.1f} s/step)", flush=True)
        if args.json:  # after every point: a long run stopped part-way keeps what it measured
            args.json.write_text(json.dumps(results, indent=2))
    text = table(results)
    print()
    print(text)
    print(f"\n{time.time() - started:.0f} s")
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the frozen half costs and saves: LoRA-SP against LoRA and full fine-tuning on a real task.

    python tools/bench_quality.py --write-docs --json build/quality.json   # the full run: about 40 min on 2 cores
    python tools/bench_quality.py --quick          # a smoke run: 1 seed, 8 steps, 25 held-out prompts (checks the tool)
    python tools/bench_quality.py --task text --methods lora,plan-default --seeds 0,1,2   # plain text, perplexity

Two tasks (`--task`):
    chat  tools/make_task_data.py: five instruction families, exact match and held-out loss (below)
    text  tools/make_text_data.py: continued pre-training on real English (the pydoc topics of the
          Python reference, held out by document); held-out loss and perplexity over every held-out
          block. Its defaults follow a plain PEFT script: 40 steps x 4 x 256 tokens, LoRA lr 2e-4.

The plot goes to docs/results.png with --write-docs, else to build/quality.png (--plot overrides).

Model: the bundled SmolLM2-135M-Instruct (`lorasp_edge.models.load_model("smollm2-135m")`).
Task: tools/make_task_data.py (dates, unit conversion, number words, two-digit addition, JSON
extraction; chat format, loss on the assistant reply only), rewritten from its seed each run.

Methods (`METHODS`; all but lorasp-r32 run by default):
    lorasp        LoRA-SP: apply_lorasp, rank 16, ratio 0.5, LoRASPAdamW (torch AdamW over the flat trainable entries)
    lora          PEFT LoraConfig, rank 16, torch AdamW
    lora-half     PEFT LoraConfig, rank 8 (the trainable count of LoRA-SP at rank 16)
    lorasp-4bit   LoRA-SP as above on a bitsandbytes NF4 base
    full          every parameter trained (fp32 weights), torch AdamW, FULL_LR
    lorasp-2xlr   LoRA-SP at twice the adapter lr (with half of each matrix frozen, a step updates half as many entries)
    lorasp-r32    LoRA-SP at rank 32: the trainable count of LoRA at rank 16 (not run by default)
    offset, offset-2xlr, offset-r32-2xlr   LoRA-SP from the offset start (the trainer's default), at 1x/2x lr, rank 16/32
    offset-2xlr-top-half   offset-2xlr on the last half of the decoder layers only (the backward stops below them)
    plan-default  the rank, start, targets and layers `lorasp-edge plan` picks, 2x lr

Equal budgets. For seed s every method reads the same packed blocks in the same order (one
PackedStream over the training file shuffled with seed s), SEQ_LEN x BATCH tokens a step, the same
number of optimizer steps, the same warmup + cosine schedule (lorasp_edge.train.loop.build_scheduler,
warmup as `lorasp-edge train` sets it), the same loss (lorasp_edge.train.loss.ChunkedCausalLMLoss), bf16
autocast over a bf16 base (fp32 LoRA weights; full fine-tuning keeps fp32 weights), clipping at
1.0 over the trainable tensors, no weight decay, no dropout. The seed also seeds the LoRA init
(drawn as apply_lorasp draws it, so LoRA and LoRA-SP at one rank start from the same A) and the
LoRA-SP masks. Adapter alpha = 2 x rank, so the LoRA scale alpha/r is 2 for every rank.

Each (method, seed) and the untuned base run in a fresh process, so peak RSS (getrusage ru_maxrss,
read after the training loop: model load plus training) and times are that run's alone.

Scores, on the held-out split: loss = lorasp_edge.train.step.evaluate over the split's first
EVAL_LOSS_BLOCKS packed SEQ_LEN-token blocks (mean CE over reply tokens); exact match = greedy
decoding of every prompt (batched, left padding, at most MAX_NEW_TOKENS new tokens), scored by
make_task_data.exact_match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_task_data: a sibling script, not a package
import make_task_data as task
import make_text_data as text_task

ROOT = Path(__file__).resolve().parent.parent

# -- the full run's size: 6 methods x 3 seeds x 50 steps x 512 tokens, plus the untuned base (bf16, NF4).
# Sized for about 40 min on 2 quiet cores (docs/results.md: the estimate and what it rests on).
STEPS = 50
SEEDS = (0, 1, 2)
SEQ_LEN, BATCH = 256, 2  # 512 tokens a step: about 7 task examples
HELDOUT = 250  # held-out prompts scored: the whole split, 50 a family
TRAIN_EXAMPLES = 4000  # the generated training split; a run reads about 7 a step

# -- methods and their settings
RANK = 16
ALPHA_PER_RANK = 2.0
LORA_LR = 1e-3  # every adapter method (LoRA, LoRA-SP); see docs/results.md for the choice
FULL_LR = 5e-5  # full fine-tuning
MAX_GRAD_NORM = 1.0
MIN_LR_RATIO = 0.1

# -- evaluation
MAX_NEW_TOKENS = 32  # the longest reply (JSON) is 27 tokens with its end marker
GEN_BATCH = 50  # one family a batch (prompts are sorted by family)
EVAL_BATCH = 8
EVAL_LOSS_BLOCKS = 32  # held-out loss over the split's first 32 packed blocks (8192 tokens, about 120 examples)

QUICK = {"steps": 8, "seeds": (0,), "heldout": 25}

# Per task: steps, blocks a step, the adapter lr (LoRA-SP methods scale it by their lr_scale).
TASKS = {
    "chat": {"steps": STEPS, "batch": BATCH, "lr": LORA_LR},
    "text": {"steps": 40, "batch": 4, "lr": 2e-4},
}
TEXT_EVAL_BLOCKS = 1000  # every held-out block (the split holds about 65)


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # "lorasp" | "lora" | "full"
    rank: int = 0
    quant_bits: int | None = None
    lr_scale: float = 1.0
    init: str = "zeros"  # LoRA-SP's B start (LoRASPConfig.init)
    plan_default: bool = False  # rank and init as `lorasp-edge plan` picks them by default (--prefer speed)
    layer_share: float = 1.0  # adapters on the last round(share x layers) decoder layers, as the planner's layer choices


METHODS = {
    "lorasp": Method(f"LoRA-SP r{RANK}, ratio 0.5", "lorasp", RANK),
    "lora": Method(f"PEFT LoRA r{RANK}", "lora", RANK),
    "lora-half": Method(f"PEFT LoRA r{RANK // 2}", "lora", RANK // 2),
    "lorasp-4bit": Method(f"LoRA-SP r{RANK}, NF4 base", "lorasp", RANK, quant_bits=4),
    "full": Method("full fine-tuning", "full"),
    "lorasp-2xlr": Method(f"LoRA-SP r{RANK}, 2x lr", "lorasp", RANK, lr_scale=2.0),
    "lorasp-r32": Method(f"LoRA-SP r{2 * RANK}, ratio 0.5", "lorasp", 2 * RANK),
    "offset": Method(f"LoRA-SP r{RANK}, offset init", "lorasp", RANK, init="offset"),
    "offset-2xlr": Method(f"LoRA-SP r{RANK}, offset init, 2x lr", "lorasp", RANK, lr_scale=2.0, init="offset"),
    "offset-r32-2xlr": Method(f"LoRA-SP r{2 * RANK}, offset init, 2x lr", "lorasp", 2 * RANK, lr_scale=2.0, init="offset"),
    # The backward stops below the lowest adapted layer: what --prefer speed could buy with fewer layers.
    "offset-2xlr-top-half": Method(f"LoRA-SP r{RANK}, offset init, 2x lr, last half of the layers", "lorasp", RANK, lr_scale=2.0,
                                   init="offset", layer_share=0.5),
    # What a user gets: the rank and start the planner picks for this model, the trainer's lr ratio.
    "plan-default": Method("LoRA-SP, the plan's default (rank, init), 2x lr", "lorasp", 0, lr_scale=2.0, plan_default=True),
}
DEFAULT_METHODS = ("lorasp", "lora", "lora-half", "lorasp-4bit", "full", "lorasp-2xlr")
# The untuned model, scored once; its NF4 form too when a method trains on an NF4 base.
BASE_MODELS = {"base": None, "base-nf4": 4}

RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
TEXT_START, TEXT_END = "<!-- text-results:start -->", "<!-- text-results:end -->"


def method_lr(method: Method, lora_lr: float, full_lr: float) -> float:
    return full_lr if method.kind == "full" else lora_lr * method.lr_scale


# ------------------------------------------------------------------------ one run (child process)


def compute_dtype_here():
    """The dtype `lorasp-edge plan` computes in on this machine: bf16 where the CPU has native bf16
    matmuls (AVX512-BF16, AMX), else fp32 (emulated bf16 is slower than fp32)."""
    import torch

    from lorasp_edge.plan.search import local_device

    return torch.bfloat16 if local_device().bf16 else torch.float32


def plan_default(task_name: str) -> dict:
    """Rank, init, targets and layers (None: every layer) of the default plan for this model, 3 GB,
    at the task's batch."""
    from lorasp_edge.plan.search import plan_training

    plan = plan_training("smollm2-135m", 3 * 10**9, seq_len=SEQ_LEN, batch=TASKS[task_name]["batch"])
    every_layer = len(plan.layers) == plan.model["num_layers"]
    return {"rank": plan.rank, "init": plan.init, "target_modules": list(plan.target_modules), "layers": None if every_layer else list(plan.layers)}


def build(method: Method, seed: int, lr: float, task_name: str = "chat"):
    """(model, optimizer, trainable entry count, what was built) for one method."""
    import torch

    from lorasp_edge.models import load_model
    from lorasp_edge.train.adapter import LoRASPConfig, apply_lorasp, count_parameters
    from lorasp_edge.train.loop import build_optimizer

    compute_dtype = compute_dtype_here()
    # Full fine-tuning keeps fp32 master weights: bf16 holds 8 significant bits, so an AdamW step of
    # about lr = 5e-5 would round away on every weight of magnitude 2^-6 or more.
    weight_dtype = torch.float32 if method.kind == "full" else compute_dtype
    model = load_model("smollm2-135m", quant_bits=method.quant_bits, compute_dtype=weight_dtype, device="cpu")
    model.config.use_cache = False
    built = {"rank": method.rank, "init": method.init, "target_modules": "all-linear", "layers": None}
    if method.layer_share < 1.0:  # PEFT takes a layer list only with the modules named
        from lorasp_edge.families import family_of

        count = model.config.num_hidden_layers
        built["layers"] = list(range(count - max(1, round(method.layer_share * count)), count))
        built["target_modules"] = sorted({name for name, _, _ in family_of(model.config).linears})
    if method.plan_default:
        built = plan_default(task_name)
    alpha = ALPHA_PER_RANK * built["rank"]
    if method.kind == "lorasp":
        config = LoRASPConfig(rank=built["rank"], alpha=alpha, ratio=0.5, seed=seed, target_modules=built["target_modules"], layers=built["layers"], init=built["init"])
        model = apply_lorasp(model, config)
        optimizer = build_optimizer(model, lr=lr, weight_decay=0.0)
        return model, optimizer, count_parameters(model)["trainable"], built
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=method.rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
        # The LoRA init drawn as apply_lorasp draws it: same seed, caller's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(model, config)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    return model, optimizer, sum(p.numel() for p in parameters), built


def training_batches(path: Path, tokenizer, steps: int, batch: int = BATCH) -> list[dict]:
    from lorasp_edge.train.data import PackedStream

    stream = PackedStream(path, tokenizer, SEQ_LEN)  # cycles through the file if the steps outrun it
    batches = [stream.next_batch(batch) for _ in range(steps)]
    stream.close()
    return batches


def generate_replies(model, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy replies, batched with left padding (prompts of one family batch together)."""
    import torch

    tokenizer.padding_side = "left"
    replies = []
    for start in range(0, len(prompts), GEN_BATCH):
        encoded = tokenizer(prompts[start : start + GEN_BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
        dtype = compute_dtype_here()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            output = model.generate(
                **encoded, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        replies += tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return replies


def score_heldout(model, tokenizer, heldout_path: Path) -> dict:
    examples = task.read_jsonl(heldout_path)
    order = sorted(range(len(examples)), key=lambda i: (examples[i]["family"], len(examples[i]["messages"][0]["content"])))
    prompts = [tokenizer.apply_chat_template(examples[i]["messages"][:-1], tokenize=False, add_generation_prompt=True) for i in order]
    started = time.perf_counter()
    replies = dict(zip(order, generate_replies(model, tokenizer, prompts)))
    seconds = time.perf_counter() - started
    families: dict[str, list[int]] = {}
    exact = found = 0
    for index, record in enumerate(examples):
        hit = task.exact_match(record["family"], replies[index], record["answer"])
        exact += hit
        found += task.answer_found(record["family"], replies[index], record["answer"])
        families.setdefault(record["family"], []).append(hit)
    return {
        "exact_match": exact / len(examples),
        "answer_found": found / len(examples),
        "family_exact_match": {family: sum(hits) / len(hits) for family, hits in sorted(families.items())},
        "generate_seconds": round(seconds, 1),
        "samples": [{"answer": examples[i]["answer"], "reply": replies[i]} for i in range(min(6, len(examples)))],
    }


def run_child(method_name: str, seed: int, steps: int, train_path: Path, heldout_path: Path, lora_lr: float, full_lr: float, task_name: str = "chat") -> dict:
    import torch

    from lorasp_edge.models import load_model, load_tokenizer
    from lorasp_edge.train.adapter import disable_bnb_cpu_repack
    from lorasp_edge.train.data import eval_batches
    from lorasp_edge.train.loop import build_scheduler
    from lorasp_edge.train.step import evaluate, train_step
    from lorasp_edge.train.loss import ChunkedCausalLMLoss
    from lorasp_edge.train.optim import state_bytes

    torch.manual_seed(seed)
    tokenizer = load_tokenizer("smollm2-135m")
    compute_dtype = compute_dtype_here()
    result: dict = {"method": method_name, "seed": seed, "task": task_name, "compute_dtype": str(compute_dtype).removeprefix("torch.")}
    eval_blocks = TEXT_EVAL_BLOCKS if task_name == "text" else EVAL_LOSS_BLOCKS
    heldout = eval_batches(heldout_path, tokenizer, SEQ_LEN, EVAL_BATCH, max_blocks=eval_blocks)
    result["heldout_tokens"] = sum(int((b["labels"] != -100).sum()) for b in heldout)

    if method_name in BASE_MODELS:
        model = load_model("smollm2-135m", quant_bits=BASE_MODELS[method_name], compute_dtype=compute_dtype, device="cpu")
        model.config.use_cache = False
        disable_bnb_cpu_repack(model)  # as apply_lorasp does: the NF4 kernels lorasp-4bit runs
        loss_module = ChunkedCausalLMLoss(model)
        result.update(trainable=0, optimizer_state_bytes=0, steps=0)
    else:
        method = METHODS[method_name]
        lr = method_lr(method, lora_lr, full_lr)
        batch_size = TASKS[task_name]["batch"]
        batches = training_batches(train_path, tokenizer, steps, batch_size)
        model, optimizer, trainable, built = build(method, seed, lr, task_name)
        result["built"] = built
        loss_module = ChunkedCausalLMLoss(model).train()
        warmup = min(100, max(1, steps // 20))  # as lorasp_edge.job sets it
        scheduler = build_scheduler(optimizer, steps, warmup, MIN_LR_RATIO)
        losses, step_seconds = [], []
        cpu_started = time.process_time()
        for batch in batches:
            # The trainer's step (clipping over the tensors this method's optimizer steps).
            started = time.perf_counter()
            step = train_step(loss_module, optimizer, batch, max_grad_norm=MAX_GRAD_NORM, compute_dtype=compute_dtype)
            scheduler.step()
            step_seconds.append(time.perf_counter() - started)
            losses.append(step["loss"])
        result.update(
            lr=lr,
            steps=steps,
            tokens=steps * SEQ_LEN * batch_size,
            trainable=trainable,
            optimizer_state_bytes=state_bytes(optimizer),
            train_seconds=round(sum(step_seconds), 2),
            # CPU seconds of all threads: beside train_seconds it shows how busy the machine was.
            train_cpu_seconds=round(time.process_time() - cpu_started, 2),
            median_step_seconds=round(statistics.median(step_seconds), 3),
            train_loss_first=losses[0],
            train_loss_last=statistics.mean(losses[-10:]),
        )
        # Linux reports KiB. Model load plus the training loop; evaluation comes after.
        result["peak_rss_train_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    result["heldout_loss"] = evaluate(loss_module, heldout, compute_dtype)
    result["perplexity"] = math.exp(result["heldout_loss"])
    model.eval()
    if task_name == "chat":
        result.update(score_heldout(model, tokenizer, heldout_path))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# --------------------------------------------------------------------------- the grid (parent)


def prepare_text(data_dir: Path, seeds) -> tuple[Path, dict[int, Path]]:
    """The plain-text corpus (rewritten each run), the held-out documents, one document order per seed."""
    paths = text_task.write_text(data_dir)
    return paths["heldout"], write_orders(data_dir, task.read_jsonl(paths["train"]), seeds)


def write_orders(data_dir: Path, records: list[dict], seeds) -> dict[int, Path]:
    """One training file per seed: the records shuffled with that seed."""
    orders = {}
    for seed in seeds:
        shuffled = list(records)
        random.Random(seed).shuffle(shuffled)
        orders[seed] = task.write_jsonl(data_dir / f"train-order{seed}.jsonl", shuffled)
    return orders


def prepare_data(data_dir: Path, seeds, heldout: int) -> tuple[Path, dict[int, Path]]:
    """The task files (rewritten from their seed, so never stale), the held-out prompts scored, one
    training order per seed."""
    task.write_task(data_dir, train=TRAIN_EXAMPLES, heldout=HELDOUT)
    heldout_examples = task.read_jsonl(data_dir / "heldout.jsonl")
    if heldout > len(heldout_examples):
        raise SystemExit(f"--heldout {heldout}: {data_dir / 'heldout.jsonl'} holds only {len(heldout_examples)} examples")
    heldout_path = task.write_jsonl(data_dir / f"heldout-first{heldout}.jsonl", heldout_examples[:heldout])
    return heldout_path, write_orders(data_dir, task.read_jsonl(data_dir / "train.jsonl"), seeds)


def score_line(result: dict) -> str:
    scores = f"held-out loss {result['heldout_loss']:.4f} (perplexity {result['perplexity']:.3f})"
    return (f"exact match {100 * result['exact_match']:5.1f}%  " if "exact_match" in result else "") + scores


def launch(args, method: str, seed: int, train_path: Path | None, heldout_path: Path) -> dict:
    command = [
        sys.executable, __file__, "--child", method, "--child-seed", str(seed), "--steps", str(args.steps),
        "--child-train", str(train_path or ""), "--child-heldout", str(heldout_path),
        "--lr", str(args.lr), "--full-lr", str(args.full_lr), "--task", args.task,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    started = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed:\n{done.stderr[-4000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    return result


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> dict:
    keys = ("exact_match", "answer_found", "heldout_loss", "perplexity", "peak_rss_train_bytes", "train_seconds", "optimizer_state_bytes", "trainable")
    summary = {key: spread([run[key] for run in runs]) for key in keys if key in runs[0]}
    if "family_exact_match" in runs[0]:
        families = runs[0]["family_exact_match"]
        summary["family_exact_match"] = {family: spread([run["family_exact_match"][family] for run in runs]) for family in families}
    summary["tokens_per_s"] = spread([run["tokens"] / run["train_seconds"] for run in runs])
    summary["seeds"] = [run["seed"] for run in runs]
    return summary


def standard_error(spread_: tuple[float, float], n: int) -> float:
    return spread_[1] / math.sqrt(n) if n > 1 else float("nan")


def paired(runs_a: list[dict], runs_b: list[dict], key: str) -> tuple[float, float, int]:
    """Mean and standard error of a - b over the seeds both ran (same seed: same data order and A init)."""
    b_by_seed = {run["seed"]: run[key] for run in runs_b}
    gaps = [run[key] - b_by_seed[run["seed"]] for run in runs_a if run["seed"] in b_by_seed]
    if not gaps:
        return float("nan"), float("nan"), 0
    mean, sd = spread(gaps)
    return mean, sd / math.sqrt(len(gaps)) if len(gaps) > 1 else float("nan"), len(gaps)


def _pm(mean: float, sd: float, scale: float, digits: int, seeds: int) -> str:
    return f"{mean * scale:.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if seeds > 1 else "")


BASE_LABELS = {"base": "untuned base", "base-nf4": "untuned base (NF4)"}


def _se(summary: dict, key: str, scale: float, digits: int) -> str:
    n = len(summary["seeds"])
    return f"{standard_error(summary[key], n) * scale:.{digits}f}" if n > 1 else "-"


def results_table(bases: dict[str, dict], summaries: dict[str, dict], text: bool = False) -> str:
    """One row per untuned base and method: resources, held-out loss with its SE, then the task's
    scores (text: perplexity; chat: exact match with its SE, answer found)."""
    digits = 4 if text else 3
    scores = "perplexity" if text else "exact match (%) | SE | answer found (%)"
    lines = [
        f"| method | seeds | trainable params | optimizer state (MB) | peak RSS, load + train (GB) | tokens/s | held-out loss | SE | {scores} |",
        "|---" * (9 if text else 11) + "|",
    ]
    for name, base in bases.items():
        tail = f"{base['perplexity']:.3f}" if text else f"{100 * base['exact_match']:.1f} | - | {100 * base['answer_found']:.1f}"
        lines.append(f"| {BASE_LABELS[name]} | - | 0 | 0 | - | - | {base['heldout_loss']:.{digits}f} | - | {tail} |")
    for name, s in summaries.items():
        n = len(s["seeds"])
        if text:
            tail = _pm(*s["perplexity"], 1, 3, n)
        else:
            tail = f"{_pm(*s['exact_match'], 100, 1, n)} | {_se(s, 'exact_match', 100, 1)} | {_pm(*s['answer_found'], 100, 1, n)}"
        lines.append(
            f"| {METHODS[name].label} | {n} | {s['trainable'][0] / 1e6:.3f} M | {s['optimizer_state_bytes'][0] / 1e6:.1f} "
            f"| {_pm(*s['peak_rss_train_bytes'], 1e-9, 2, n)} | {_pm(*s['tokens_per_s'], 1, 0, n)} "
            f"| {_pm(*s['heldout_loss'], 1, digits, n)} | {_se(s, 'heldout_loss', 1, digits)} | {tail} |"
        )
    return "\n".join(lines)


def family_table(bases: dict[str, dict], summaries: dict[str, dict], seeds: int) -> str:
    families = list(bases["base"]["family_exact_match"])
    lines = ["| method | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
    for name, base in bases.items():
        lines.append(f"| {BASE_LABELS[name]} | " + " | ".join(f"{100 * base['family_exact_match'][f]:.0f}" for f in families) + " |")
    for name, s in summaries.items():
        lines.append(f"| {METHODS[name].label} | " + " | ".join(_pm(*s["family_exact_match"][f], 100, 0, len(s["seeds"])) for f in families) + " |")
    return "\n".join(lines)


def default_method(record: dict) -> str | None:
    """The method that trains as the default plan does: 'plan-default' when it ran, else the LoRA-SP
    method with the plan's rank and init at the trainer's lr ratio (2x) on a float base, when the plan
    adapts what every such method adapts (every linear layer of every decoder layer); else None."""
    from lorasp_edge.plan.catalog import model_info
    from lorasp_edge.plan.search import target_choices

    runs = {name for name, results in record["runs"].items() if results}
    if "plan-default" in runs:
        return "plan-default"
    chosen = plan_default(record["settings"].get("task", "chat"))
    every_linear = set(target_choices(model_info("smollm2-135m").architecture)[0])
    if chosen["layers"] is not None or set(chosen["target_modules"]) != every_linear:
        return None
    for name in runs:
        m = METHODS[name]
        if m.kind == "lorasp" and m.lr_scale == 2.0 and m.quant_bits is None and m.rank == chosen["rank"] and m.init == chosen["init"]:
            return name
    return None


def target_checks(record: dict) -> list[str]:
    """Issue targets against the means (points = percentage points of exact match; SE = standard
    error of a mean over seeds; paired = the same seeds' differences, which share data order and A)."""
    runs = {name: results for name, results in record["runs"].items() if results}
    summaries = {name: summarize(results) for name, results in runs.items()}
    text = record["settings"].get("task", "chat") == "text"
    default = default_method(record)
    checks = []

    def gap(a: str, b: str, key: str, scale: float, unit: str, digits: int = 1) -> str:
        mean, se, n = paired(runs[a], runs[b], key)
        return f"{scale * mean:+.{digits}f}{unit} ({_paired_note(scale * se, n, digits)})"

    variants = [name for name in runs if METHODS[name].kind == "lorasp" and METHODS[name].lr_scale == 2.0 and METHODS[name].rank == RANK and METHODS[name].quant_bits is None]
    if not text and "lora-half" in runs and variants:
        best = max(variants, key=lambda name: summaries[name]["exact_match"][0])
        diff = 100 * (summaries[best]["exact_match"][0] - summaries["lora-half"]["exact_match"][0])
        checks.append(
            f"method: best LoRA-SP r{RANK} at 2x lr ({METHODS[best].label}) vs PEFT LoRA r{RANK // 2}, exact match "
            f"(target: >= +2 points): {diff:+.1f} points, {'met' if diff >= 2 else 'missed'}; {gap(best, 'lora-half', 'exact_match', 100, ' points')}"
        )
    if default and "lora" in runs:
        label = METHODS[default].label
        if not text:
            diff = 100 * (summaries[default]["exact_match"][0] - summaries["lora"]["exact_match"][0])
            checks.append(
                f"product: the default plan's run ({label}) vs PEFT LoRA r{RANK}, exact match (target: within 1 point): "
                f"{diff:+.1f} points, {'met' if diff >= -1 else 'missed'}; {gap(default, 'lora', 'exact_match', 100, ' points')}"
            )
        ratio = summaries[default]["heldout_loss"][0] / summaries["lora"]["heldout_loss"][0] - 1
        checks.append(
            f"product: held-out loss of the default vs PEFT LoRA r{RANK} (target: at most +1%): {100 * ratio:+.2f}%, "
            f"{'met' if ratio <= 0.01 else 'missed'}; {gap(default, 'lora', 'heldout_loss', 1, ' nats', 4)}"
        )
        if text:
            ratio = summaries[default]["perplexity"][0] / summaries["lora"]["perplexity"][0] - 1
            checks.append(
                f"text: held-out perplexity of the default vs PEFT LoRA r{RANK} at the same tokens (target: within 1%): "
                f"{summaries[default]['perplexity'][0]:.3f} vs {summaries['lora']['perplexity'][0]:.3f}, {100 * ratio:+.2f}%, {'met' if ratio <= 0.01 else 'missed'}"
            )
    if default and "lorasp-2xlr" in runs and default != "lorasp-2xlr":
        speed = summaries[default]["tokens_per_s"][0] / summaries["lorasp-2xlr"]["tokens_per_s"][0] - 1
        peak = summaries[default]["peak_rss_train_bytes"][0] / summaries["lorasp-2xlr"]["peak_rss_train_bytes"][0] - 1
        checks.append(
            f"cost of the default against the zero-start LoRA-SP (target: no worse than 5%): tokens/s {100 * speed:+.1f}%, "
            f"peak RSS {100 * peak:+.1f}%, {'met' if speed >= -0.05 and peak <= 0.05 else 'missed'} "
            f"(the grid's own timings: {busy_note({n: runs[n] for n in (default, 'lorasp-2xlr')})}; tools/bench_train.py measures speed side by side)"
        )
    return checks


def _paired_note(se: float, n: int, digits: int) -> str:
    return f"paired SE {se:.{digits}f}, {n} seeds" if n > 1 else "one shared seed, no SE"


def comparisons(record: dict) -> list[str]:
    """The default against each other method: paired differences (same seeds), speed and memory."""
    runs = {name: results for name, results in record["runs"].items() if results}
    reference = default_method(record) or next(iter(runs))
    summaries = {name: summarize(results) for name, results in runs.items()}
    ref = summaries[reference]
    text = record["settings"].get("task", "chat") == "text"
    lines = []
    for name, other in summaries.items():
        if name == reference:
            continue
        parts = []
        if not text:
            mean, se, n = paired(runs[reference], runs[name], "exact_match")
            parts.append(f"exact match {100 * mean:+.1f} points ({_paired_note(100 * se, n, 1)})")
        mean, se, n = paired(runs[reference], runs[name], "heldout_loss")
        parts.append(f"held-out loss {mean:+.4f} ({_paired_note(se, n, 4)})")
        parts.append(f"tokens/s {100 * (ref['tokens_per_s'][0] / other['tokens_per_s'][0] - 1):+.1f}%")
        parts.append(f"peak RSS {100 * (ref['peak_rss_train_bytes'][0] / other['peak_rss_train_bytes'][0] - 1):+.1f}%")
        parts.append(f"optimizer state x{ref['optimizer_state_bytes'][0] / max(other['optimizer_state_bytes'][0], 1):.2f}")
        lines.append(f"{METHODS[reference].label} vs {METHODS[name].label}: " + ", ".join(parts))
    return lines


def plot(bases: dict[str, dict], summaries: dict[str, dict], seeds: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    labels = [textwrap.fill(METHODS[name].label.replace(",", ""), 11) for name in names]
    kind_colors = {"lorasp": "tab:orange", "lora": "tab:blue", "full": "tab:gray"}
    colors = [kind_colors[METHODS[name].kind] for name in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110)
    accuracy = [summaries[n]["exact_match"] for n in names]
    bars = left.bar(labels, [100 * m for m, _ in accuracy], yerr=[100 * s for _, s in accuracy], color=colors, capsize=4)
    left.bar_label(bars, fmt="%.1f", fontsize=8, label_type="center")
    for (name, base), style in zip(bases.items(), ("--", ":")):
        left.axhline(100 * base["exact_match"], color="black", linestyle=style, linewidth=1, label=f"{BASE_LABELS[name]}: {100 * base['exact_match']:.1f}%")
    left.set_ylabel("held-out exact match (%)")
    left.set_ylim(0, 100)
    left.legend(loc="upper right", fontsize=8)
    memory = [summaries[n]["peak_rss_train_bytes"] for n in names]
    bars = right.bar(labels, [m / 1e9 for m, _ in memory], yerr=[s / 1e9 for _, s in memory], color=colors, capsize=4)
    right.bar_label(bars, fmt="%.2f", fontsize=8, label_type="center")
    right.set_ylabel("peak RSS, model load + training (GB)")
    for axes in (left, right):
        axes.tick_params(axis="x", labelsize=8)
        axes.grid(axis="y", alpha=0.3)
    figure.suptitle(f"SmolLM2-135M-Instruct, equal steps and tokens; error bars: sd over {seeds} seed(s)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def machine() -> str:
    import psutil
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions.append(f"{package} {__import__(package).__version__}")
        except ImportError:
            pass
    return (
        f"{cpu}; {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}; "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; {', '.join(versions)}"
    )


def busy_note(runs: dict[str, list[dict]]) -> str:
    """CPU seconds per wall second of the training loops: near the thread count on a quiet machine."""
    ratios = [run["train_cpu_seconds"] / run["train_seconds"] for results in runs.values() for run in results] or [0.0]
    return f"training loops used {min(ratios):.2f}-{max(ratios):.2f} CPU seconds per wall second"


def results_section(args, record: dict, plot_path: Path | None) -> str:
    runs = {name: results for name, results in record["runs"].items() if results}
    bases = record["bases"]
    summaries = {name: summarize(results) for name, results in runs.items()}
    settings_ = record["settings"]
    text = settings_.get("task", "chat") == "text"
    seeds = sorted({run["seed"] for results in runs.values() for run in results})
    batch = settings_.get("batch", BATCH)
    adapter_lrs = sorted({method_lr(METHODS[name], settings_["lr"], settings_["full_lr"]) for name in summaries if METHODS[name].kind != "full"})
    dtypes = sorted({run.get("compute_dtype", "bfloat16") for results in runs.values() for run in results})
    settings = (
        f"{settings_['steps']} optimizer steps x {SEQ_LEN * batch} tokens ({batch} x {SEQ_LEN}) per run; seeds {', '.join(map(str, seeds))}; "
        + ("every held-out block" if text else f"{settings_['heldout']} held-out prompts")
        + f"; adapter lr {', '.join(f'{lr:g}' for lr in adapter_lrs)}"
        + (f", full fine-tuning lr {settings_['full_lr']:g}" if "full" in summaries else "")
        + f"; rank {RANK}, alpha {ALPHA_PER_RANK:g} x rank; compute dtype {', '.join(dtypes)}"
    )
    command = record.get("command") or ("python tools/bench_quality.py " + " ".join(sys.argv[1:])).strip()
    start, end = (TEXT_START, TEXT_END) if text else (RESULTS_START, RESULTS_END)
    parts = [
        start,
        (
            f"_Filled in from the grid `{command}` on {time.strftime('%Y-%m-%d')}; the grid took {record['total_seconds'] / 60:.1f} min "
            f"({busy_note(runs)})._"
        ),
        "",
        f"Machine: {record['machine']}.",
        "",
        f"Settings: {settings}.",
        "",
        "Mean ± sample standard deviation over the seeds; SE: standard error of the mean (sd / sqrt(seeds)).",
        "",
        results_table(bases, summaries, text),
        "",
    ]
    if not text:
        parts += ["Exact match by task family (%):", "", family_table(bases, summaries, len(seeds)), ""]
    parts += [
        "Targets, against the means above:",
        "",
        *[f"- {line}" for line in target_checks(record)],
        "",
        "The default against each other method (paired differences over shared seeds):",
        "",
        *[f"- {line}" for line in comparisons(record)],
    ]
    if plot_path is not None:
        parts += ["", f"![held-out exact match and peak memory per method]({os.path.relpath(plot_path, ROOT / 'docs')})"]
    parts.append(end)
    return "\n".join(parts)


def write_docs(path: Path, section: str, start: str, end: str) -> None:
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no '{start}' ... '{end}' section to fill")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(head + section + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--seeds", default=None, help=f"comma-separated (default: {','.join(map(str, SEEDS))})")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default: {STEPS})")
    parser.add_argument("--heldout", type=int, default=None, help=f"held-out prompts scored (default: {HELDOUT})")
    parser.add_argument("--task", choices=sorted(TASKS), default="chat", help="chat: the instruction task (exact match); text: plain text (perplexity)")
    parser.add_argument("--lr", type=float, default=None, help=f"peak lr of LoRA (LoRA-SP methods scale it; default: chat {TASKS['chat']['lr']:g}, text {TASKS['text']['lr']:g})")
    parser.add_argument("--full-lr", type=float, default=FULL_LR, help="peak lr of full fine-tuning")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless given")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the task's files go (default: data/task or data/text)")
    parser.add_argument("--json", type=Path, help="every run's raw result, written after each run; an existing file of the same settings is continued (runs it holds are skipped)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: docs/results.png with --write-docs, else build/quality.png)")
    parser.add_argument("--write-docs", action="store_true", help="fill the results section of docs/results.md")
    parser.add_argument("--from-json", type=Path, nargs="+", metavar="JSON",
                        help="only report (tables, plot, --write-docs) from --json files of earlier grids; several files of the "
                             "same settings (grids run side by side over other seeds) are reported as one")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-train", help=argparse.SUPPRESS)
    parser.add_argument("--child-heldout", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        result = run_child(args.child, args.child_seed, args.steps, Path(args.child_train), Path(args.child_heldout), args.lr, args.full_lr, args.task)
        print("RESULT " + json.dumps(result))
        return

    if args.from_json:
        record = merged_grids([json.loads(path.read_text()) for path in args.from_json], args.from_json)
        args.task = record["settings"].get("task", "chat")
        report(args, record)
        return

    defaults = QUICK if args.quick else {"steps": TASKS[args.task]["steps"], "seeds": SEEDS, "heldout": HELDOUT}
    args.lr = args.lr if args.lr is not None else TASKS[args.task]["lr"]
    args.steps = args.steps or defaults["steps"]
    args.heldout = args.heldout or defaults["heldout"]
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(defaults["seeds"])
    methods = args.methods.split(",")
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    saved = json.loads(args.json.read_text()) if args.json and args.json.exists() else None
    if saved is not None:
        if saved["settings"].get("task", "chat") != args.task or saved["settings"]["steps"] != args.steps or saved["settings"]["lr"] != args.lr:
            raise SystemExit(f"{args.json}: holds a grid of other settings ({saved['settings']}); choose another --json")
        saved["seconds_before"] = saved.get("total_seconds", 0.0)
    started = time.perf_counter()
    if args.task == "text":
        heldout_path, orders = prepare_text(args.data_dir or ROOT / "data" / "text", args.seeds)
    else:
        heldout_path, orders = prepare_data(args.data_dir or ROOT / "data" / "task", args.seeds, args.heldout)
    base_names = ["base"] + (["base-nf4"] if any(METHODS[name].quant_bits == 4 for name in methods) else [])
    record = saved if saved is not None else {"bases": {}, "runs": {}, "total_seconds": 0.0}
    record.update(
        settings={"task": args.task, "steps": args.steps, "heldout": args.heldout, "lr": args.lr, "full_lr": args.full_lr,
                  "seq_len": SEQ_LEN, "batch": TASKS[args.task]["batch"], "rank": RANK},
        machine=machine(),
    )
    record.setdefault("command", ("python tools/bench_quality.py " + " ".join(sys.argv[1:])).strip())
    record["methods"] = {**record.get("methods", {}), **{name: asdict(METHODS[name]) for name in methods}}
    runs = record["runs"]
    for name in base_names:
        if name not in record["bases"]:
            record["bases"][name] = launch(args, name, 0, None, heldout_path)
            save(args, record, started)
        print(f"{BASE_LABELS[name]}: {score_line(record['bases'][name])}", file=sys.stderr)
    for seed in args.seeds:
        for name in methods:
            if any(run["seed"] == seed for run in runs.get(name, [])):
                continue  # already in --json (an earlier, interrupted or shorter run of the grid)
            result = launch(args, name, seed, orders[seed], heldout_path)
            runs.setdefault(name, []).append(result)
            save(args, record, started)
            print(
                f"{name:12s} seed {seed}: {score_line(result)}  "
                f"train {result['train_seconds']:6.1f} s ({result['median_step_seconds']:.2f} s/step, {result['train_cpu_seconds']:.0f} CPU s)  "
                f"peak {result['peak_rss_train_bytes'] / 1e9:.2f} GB  process {result['process_seconds']:.0f} s",
                file=sys.stderr,
            )
    save(args, record, started)
    report(args, record)


def merged_grids(records: list[dict], paths: list[Path]) -> dict:
    """One grid from several of the same settings: the first file's bases and machine, every file's runs
    (a method's run of a seed once), the grids' seconds added."""
    first = records[0]
    for record, path in zip(records[1:], paths[1:]):
        if record["settings"] != first["settings"]:
            raise SystemExit(f"{path}: a grid of other settings than {paths[0]} ({record['settings']} against {first['settings']})")
        for name, runs in record["runs"].items():
            seen = {run["seed"] for run in first["runs"].setdefault(name, [])}
            first["runs"][name].extend(run for run in runs if run["seed"] not in seen)
        first["methods"] = {**record.get("methods", {}), **first.get("methods", {})}
        first["total_seconds"] = first.get("total_seconds", 0.0) + record.get("total_seconds", 0.0)
    if len(records) > 1:
        first["command"] = " ; ".join(record.get("command", "") for record in records)
    return first


def save(args, record: dict, started: float) -> None:
    """The grid so far, after every run: an interrupted grid continues with the same --json."""
    record["total_seconds"] = record.get("seconds_before", 0.0) + time.perf_counter() - started
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(args.json)


def report(args, record: dict) -> None:
    runs = {name: results for name, results in record["runs"].items() if results}
    bases = record["bases"]
    summaries = {name: summarize(results) for name, results in runs.items()}
    seeds = max(len(results) for results in runs.values())
    text = record["settings"]["task"] == "text"
    print(results_table(bases, summaries, text))
    if not text:
        print("", family_table(bases, summaries, seeds), sep="\n")
    print("", *target_checks(record), "", *comparisons(record), sep="\n")
    print(f"\ntotal {record['total_seconds'] / 60:.1f} min; {busy_note(runs)}")
    if text:
        if args.write_docs:
            write_docs(ROOT / "docs" / "results.md", results_section(args, record, None), TEXT_START, TEXT_END)
        return
    plot_path = plot(bases, summaries, seeds, args.plot or ROOT / ("docs/results.png" if args.write_docs else "build/quality.png"))
    if args.write_docs:
        write_docs(ROOT / "docs" / "results.md", results_section(args, record, plot_path), RESULTS_START, RESULTS_END)


if __name__ == "__main__":
    main()

"""What the frozen half costs and saves: LoRA-SP against LoRA and full fine-tuning on a real task.

    python tools/bench_quality.py --write-docs --json build/quality.json   # the full run: about 40 min on 2 cores
    python tools/bench_quality.py --quick          # a smoke run: 1 seed, 8 steps, 25 held-out prompts (checks the tool)

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

Scores, on the held-out split: loss = lorasp_edge.train.loop.evaluate over the split's first
EVAL_LOSS_BLOCKS packed SEQ_LEN-token blocks (mean CE over reply tokens); exact match = greedy
decoding of every prompt (batched, left padding, at most MAX_NEW_TOKENS new tokens), scored by
make_task_data.exact_match.
"""

from __future__ import annotations

import argparse
import json
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


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # "lorasp" | "lora" | "full"
    rank: int = 0
    quant_bits: int | None = None
    lr_scale: float = 1.0


METHODS = {
    "lorasp": Method(f"LoRA-SP r{RANK}, ratio 0.5", "lorasp", RANK),
    "lora": Method(f"PEFT LoRA r{RANK}", "lora", RANK),
    "lora-half": Method(f"PEFT LoRA r{RANK // 2}", "lora", RANK // 2),
    "lorasp-4bit": Method(f"LoRA-SP r{RANK}, NF4 base", "lorasp", RANK, quant_bits=4),
    "full": Method("full fine-tuning", "full"),
    "lorasp-2xlr": Method(f"LoRA-SP r{RANK}, 2x lr", "lorasp", RANK, lr_scale=2.0),
    "lorasp-r32": Method(f"LoRA-SP r{2 * RANK}, ratio 0.5", "lorasp", 2 * RANK),
}
DEFAULT_METHODS = ("lorasp", "lora", "lora-half", "lorasp-4bit", "full", "lorasp-2xlr")
# The untuned model, scored once; its NF4 form too when a method trains on an NF4 base.
BASE_MODELS = {"base": None, "base-nf4": 4}

RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


def method_lr(method: Method, lora_lr: float, full_lr: float) -> float:
    return full_lr if method.kind == "full" else lora_lr * method.lr_scale


# ------------------------------------------------------------------------ one run (child process)


def build(method: Method, seed: int, lr: float):
    """(model, optimizer, trainable entry count) for one method."""
    import torch

    from lorasp_edge.models import load_model
    from lorasp_edge.train.adapter import LoRASPConfig, apply_lorasp, count_parameters
    from lorasp_edge.train.loop import build_optimizer

    compute_dtype = torch.bfloat16
    # Full fine-tuning keeps fp32 master weights: bf16 holds 8 significant bits, so an AdamW step of
    # about lr = 5e-5 would round away on every weight of magnitude 2^-6 or more.
    weight_dtype = torch.float32 if method.kind == "full" else compute_dtype
    model = load_model("smollm2-135m", quant_bits=method.quant_bits, compute_dtype=weight_dtype, device="cpu")
    model.config.use_cache = False
    alpha = ALPHA_PER_RANK * method.rank
    if method.kind == "lorasp":
        model = apply_lorasp(model, LoRASPConfig(rank=method.rank, alpha=alpha, ratio=0.5, seed=seed, target_modules="all-linear"))
        optimizer = build_optimizer(model, lr=lr, weight_decay=0.0)
        return model, optimizer, count_parameters(model)["trainable"]
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=method.rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
        # The LoRA init drawn as apply_lorasp draws it: same seed, caller's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(model, config)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    return model, optimizer, sum(p.numel() for p in parameters)


def training_batches(path: Path, tokenizer, steps: int) -> list[dict]:
    from lorasp_edge.train.data import PackedStream

    stream = PackedStream(path, tokenizer, SEQ_LEN)  # cycles through the file if the steps outrun it
    batches = [stream.next_batch(BATCH) for _ in range(steps)]
    stream.close()
    return batches


def generate_replies(model, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy replies, batched with left padding (prompts of one family batch together)."""
    import torch

    tokenizer.padding_side = "left"
    replies = []
    for start in range(0, len(prompts), GEN_BATCH):
        encoded = tokenizer(prompts[start : start + GEN_BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
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


def run_child(method_name: str, seed: int, steps: int, train_path: Path, heldout_path: Path, lora_lr: float, full_lr: float) -> dict:
    import torch

    from lorasp_edge.models import load_model, load_tokenizer
    from lorasp_edge.train.adapter import disable_bnb_cpu_repack
    from lorasp_edge.train.data import eval_batches
    from lorasp_edge.train.loop import build_scheduler, evaluate, train_step
    from lorasp_edge.train.loss import ChunkedCausalLMLoss
    from lorasp_edge.train.optim import state_bytes

    torch.manual_seed(seed)
    tokenizer = load_tokenizer("smollm2-135m")
    compute_dtype = torch.bfloat16
    result: dict = {"method": method_name, "seed": seed}
    heldout = eval_batches(heldout_path, tokenizer, SEQ_LEN, EVAL_BATCH, max_blocks=EVAL_LOSS_BLOCKS)

    if method_name in BASE_MODELS:
        model = load_model("smollm2-135m", quant_bits=BASE_MODELS[method_name], compute_dtype=compute_dtype, device="cpu")
        model.config.use_cache = False
        disable_bnb_cpu_repack(model)  # as apply_lorasp does: the NF4 kernels lorasp-4bit runs
        loss_module = ChunkedCausalLMLoss(model)
        result.update(trainable=0, optimizer_state_bytes=0, steps=0)
    else:
        method = METHODS[method_name]
        lr = method_lr(method, lora_lr, full_lr)
        batches = training_batches(train_path, tokenizer, steps)
        model, optimizer, trainable = build(method, seed, lr)
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
            tokens=steps * SEQ_LEN * BATCH,
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
    model.eval()
    result.update(score_heldout(model, tokenizer, heldout_path))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# --------------------------------------------------------------------------- the grid (parent)


def prepare_data(data_dir: Path, seeds, heldout: int) -> tuple[Path, dict[int, Path]]:
    """The task files (rewritten from their seed, so never stale), the held-out prompts scored, one
    training order per seed."""
    task.write_task(data_dir, train=TRAIN_EXAMPLES, heldout=HELDOUT)
    heldout_examples = task.read_jsonl(data_dir / "heldout.jsonl")
    if heldout > len(heldout_examples):
        raise SystemExit(f"--heldout {heldout}: {data_dir / 'heldout.jsonl'} holds only {len(heldout_examples)} examples")
    heldout_path = task.write_jsonl(data_dir / f"heldout-first{heldout}.jsonl", heldout_examples[:heldout])
    train_examples = task.read_jsonl(data_dir / "train.jsonl")
    orders = {}
    for seed in seeds:
        shuffled = list(train_examples)
        random.Random(seed).shuffle(shuffled)
        orders[seed] = task.write_jsonl(data_dir / f"train-order{seed}.jsonl", shuffled)
    return heldout_path, orders


def launch(args, method: str, seed: int, train_path: Path | None, heldout_path: Path) -> dict:
    command = [
        sys.executable, __file__, "--child", method, "--child-seed", str(seed), "--steps", str(args.steps),
        "--child-train", str(train_path or ""), "--child-heldout", str(heldout_path),
        "--lr", str(args.lr), "--full-lr", str(args.full_lr),
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
    keys = ("exact_match", "answer_found", "heldout_loss", "peak_rss_train_bytes", "train_seconds", "optimizer_state_bytes", "trainable")
    summary = {key: spread([run[key] for run in runs]) for key in keys}
    families = runs[0]["family_exact_match"]
    summary["family_exact_match"] = {family: spread([run["family_exact_match"][family] for run in runs]) for family in families}
    summary["tokens_per_s"] = spread([run["tokens"] / run["train_seconds"] for run in runs])
    return summary


def _pm(mean: float, sd: float, scale: float, digits: int, seeds: int) -> str:
    return f"{mean * scale:.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if seeds > 1 else "")


BASE_LABELS = {"base": "untuned base (bf16)", "base-nf4": "untuned base (NF4)"}


def results_table(bases: dict[str, dict], summaries: dict[str, dict], seeds: int) -> str:
    lines = [
        "| method | trainable params | optimizer state (MB) | peak RSS, load + train (GB) | train time (s) | tokens/s | held-out loss | exact match (%) | answer found (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, base in bases.items():
        lines.append(f"| {BASE_LABELS[name]} | 0 | 0 | - | - | - | {base['heldout_loss']:.3f} | {100 * base['exact_match']:.1f} | {100 * base['answer_found']:.1f} |")
    for name, s in summaries.items():
        lines.append(
            f"| {METHODS[name].label} | {s['trainable'][0] / 1e6:.3f} M | {s['optimizer_state_bytes'][0] / 1e6:.1f} "
            f"| {_pm(*s['peak_rss_train_bytes'], 1e-9, 2, seeds)} | {_pm(*s['train_seconds'], 1, 0, seeds)} "
            f"| {_pm(*s['tokens_per_s'], 1, 0, seeds)} | {_pm(*s['heldout_loss'], 1, 3, seeds)} "
            f"| {_pm(*s['exact_match'], 100, 1, seeds)} | {_pm(*s['answer_found'], 100, 1, seeds)} |"
        )
    return "\n".join(lines)


def family_table(bases: dict[str, dict], summaries: dict[str, dict], seeds: int) -> str:
    families = list(bases["base"]["family_exact_match"])
    lines = ["| method | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
    for name, base in bases.items():
        lines.append(f"| {BASE_LABELS[name]} | " + " | ".join(f"{100 * base['family_exact_match'][f]:.0f}" for f in families) + " |")
    for name, s in summaries.items():
        lines.append(f"| {METHODS[name].label} | " + " | ".join(_pm(*s["family_exact_match"][f], 100, 0, seeds) for f in families) + " |")
    return "\n".join(lines)


def target_checks(bases: dict[str, dict], summaries: dict[str, dict]) -> list[str]:
    """The issue's targets, stated against the measured means (points = percentage points)."""
    checks = []

    def em(name):
        return 100 * summaries[name]["exact_match"][0]

    if "lorasp" in summaries and "lora" in summaries:
        gap = em("lorasp") - em("lora")
        checks.append(f"LoRA-SP vs LoRA r{RANK}, exact match (target: within 2 points): {gap:+.1f} points, {'met' if gap >= -2 else 'missed'}")
        ratio = summaries["lorasp"]["optimizer_state_bytes"][0] / summaries["lora"]["optimizer_state_bytes"][0]
        checks.append(f"LoRA-SP optimizer state / LoRA r{RANK}'s (target: 0.5): {ratio:.3f}, {'met' if abs(ratio - 0.5) < 0.01 else 'missed'}")
    if "lorasp" in summaries and "lora-half" in summaries:
        gap = em("lorasp") - em("lora-half")
        checks.append(f"LoRA-SP vs LoRA r{RANK // 2}, exact match (target: at least equal): {gap:+.1f} points, {'met' if gap >= 0 else 'missed'}")
    if "lorasp-2xlr" in summaries and "lora" in summaries:
        gap = em("lorasp-2xlr") - em("lora")
        checks.append(f"LoRA-SP at 2x lr vs LoRA r{RANK} at 1x, exact match (does a higher lr close the gap?): {gap:+.1f} points")
    tuned = [name for name in ("lorasp", "lora") if name in summaries]
    if tuned:
        floor = min(em(name) for name in tuned)
        checks.append(
            f"untuned base {100 * bases['base']['exact_match']:.1f}% vs the lower of {' and '.join(tuned)} {floor:.1f}% "
            f"(target: clearly below): {floor - 100 * bases['base']['exact_match']:+.1f} points"
        )
    return checks


def comparisons(summaries: dict[str, dict], reference: str = "lorasp") -> list[str]:
    """Where `reference` wins and loses against each other method, by how much (means; the seed
    spread of exact match in brackets, reference first)."""
    if reference not in summaries:
        return []
    ref = summaries[reference]
    lines = []
    for name, other in summaries.items():
        if name == reference:
            continue
        em_gap = 100 * (ref["exact_match"][0] - other["exact_match"][0])
        lines.append(
            f"{METHODS[reference].label} vs {METHODS[name].label}: exact match {em_gap:+.1f} points "
            f"(sd {100 * ref['exact_match'][1]:.1f} / {100 * other['exact_match'][1]:.1f}), "
            f"held-out loss {ref['heldout_loss'][0] - other['heldout_loss'][0]:+.3f}, "
            f"optimizer state x{ref['optimizer_state_bytes'][0] / max(other['optimizer_state_bytes'][0], 1):.2f}, "
            f"peak RSS {(ref['peak_rss_train_bytes'][0] - other['peak_rss_train_bytes'][0]) / 1e6:+.0f} MB "
            f"({100 * (ref['peak_rss_train_bytes'][0] / other['peak_rss_train_bytes'][0] - 1):+.1f}%), "
            f"train time {100 * (ref['train_seconds'][0] / other['train_seconds'][0] - 1):+.1f}%"
        )
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
    ratios = [run["train_cpu_seconds"] / run["train_seconds"] for results in runs.values() for run in results]
    return f"training loops used {min(ratios):.2f}-{max(ratios):.2f} CPU seconds per wall second"


def results_section(args, bases: dict[str, dict], runs: dict[str, list[dict]], summaries: dict[str, dict], total_seconds: float, plot_path: Path) -> str:
    seeds = len(args.seeds)
    adapter_lrs = sorted({method_lr(METHODS[name], args.lr, args.full_lr) for name in summaries if METHODS[name].kind != "full"})
    settings = (
        f"{args.steps} optimizer steps x {SEQ_LEN * BATCH} tokens ({BATCH} x {SEQ_LEN}) per run; seeds {', '.join(map(str, args.seeds))}; "
        f"{args.heldout} held-out prompts; adapter lr {', '.join(f'{lr:g}' for lr in adapter_lrs)}"
        + (f", full fine-tuning lr {args.full_lr:g}" if "full" in summaries else "")
        + f"; rank {RANK}, alpha {ALPHA_PER_RANK:g} x rank"
    )
    command = ("python tools/bench_quality.py " + " ".join(sys.argv[1:])).strip()
    relative_plot = os.path.relpath(plot_path, ROOT / "docs")
    parts = [
        RESULTS_START,
        (
            f"_Filled in by `{command}` on {time.strftime('%Y-%m-%d')}; the whole grid took {total_seconds / 60:.1f} min "
            f"({busy_note(runs)})._"
        ),
        "",
        f"Machine: {machine()}.",
        "",
        f"Settings: {settings}.",
        "",
        f"Mean ± sample standard deviation over {seeds} seed(s).",
        "",
        results_table(bases, summaries, seeds),
        "",
        "Exact match by task family (%):",
        "",
        family_table(bases, summaries, seeds),
        "",
        "Targets, against the means above:",
        "",
        *[f"- {line}" for line in target_checks(bases, summaries)],
        "",
        "LoRA-SP against each other method (differences of means):",
        "",
        *[f"- {line}" for line in comparisons(summaries)],
        "",
        f"![held-out exact match and peak memory per method]({relative_plot})",
        RESULTS_END,
    ]
    return "\n".join(parts)


def write_docs(path: Path, section: str) -> None:
    text = path.read_text()
    if RESULTS_START not in text or RESULTS_END not in text:
        raise SystemExit(f"{path}: no '{RESULTS_START}' ... '{RESULTS_END}' section to fill")
    head, rest = text.split(RESULTS_START, 1)
    tail = rest.split(RESULTS_END, 1)[1]
    path.write_text(head + section + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--seeds", default=None, help=f"comma-separated (default: {','.join(map(str, SEEDS))})")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default: {STEPS})")
    parser.add_argument("--heldout", type=int, default=None, help=f"held-out prompts scored (default: {HELDOUT})")
    parser.add_argument("--lr", type=float, default=LORA_LR, help="peak lr of the adapter methods")
    parser.add_argument("--full-lr", type=float, default=FULL_LR, help="peak lr of full fine-tuning")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless given")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "task")
    parser.add_argument("--json", type=Path, help="write every run's raw result here")
    parser.add_argument("--plot", type=Path, help="PNG path (default: docs/results.png with --write-docs, else build/quality.png)")
    parser.add_argument("--write-docs", action="store_true", help="fill the results section of docs/results.md")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the plot from a --json file of an earlier run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-train", help=argparse.SUPPRESS)
    parser.add_argument("--child-heldout", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        result = run_child(args.child, args.child_seed, args.steps, Path(args.child_train), Path(args.child_heldout), args.lr, args.full_lr)
        print("RESULT " + json.dumps(result))
        return

    if args.replot:
        record = json.loads(args.replot.read_text())
        summaries = {name: summarize(results) for name, results in record["runs"].items()}
        path = plot(record["bases"], summaries, len(record["settings"]["seeds"]), args.plot or ROOT / "build" / "quality.png")
        print(f"plot: {path}")
        return

    defaults = QUICK if args.quick else {"steps": STEPS, "seeds": SEEDS, "heldout": HELDOUT}
    args.steps = args.steps or defaults["steps"]
    args.heldout = args.heldout or defaults["heldout"]
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(defaults["seeds"])
    methods = args.methods.split(",")
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    started = time.perf_counter()
    heldout_path, orders = prepare_data(args.data_dir, args.seeds, args.heldout)
    base_names = ["base"] + (["base-nf4"] if any(METHODS[name].quant_bits == 4 for name in methods) else [])
    bases = {}
    for name in base_names:
        bases[name] = launch(args, name, 0, None, heldout_path)
        print(f"{BASE_LABELS[name]}: exact match {100 * bases[name]['exact_match']:.1f}%, held-out loss {bases[name]['heldout_loss']:.3f}", file=sys.stderr)
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    for seed in args.seeds:
        for name in methods:
            result = launch(args, name, seed, orders[seed], heldout_path)
            runs[name].append(result)
            print(
                f"{name:12s} seed {seed}: exact match {100 * result['exact_match']:5.1f}%  held-out loss {result['heldout_loss']:.3f}  "
                f"train {result['train_seconds']:6.1f} s ({result['median_step_seconds']:.2f} s/step, {result['train_cpu_seconds']:.0f} CPU s)  "
                f"peak {result['peak_rss_train_bytes'] / 1e9:.2f} GB  process {result['process_seconds']:.0f} s",
                file=sys.stderr,
            )
    total_seconds = time.perf_counter() - started
    summaries = {name: summarize(results) for name, results in runs.items()}

    seeds = len(args.seeds)
    print(results_table(bases, summaries, seeds), family_table(bases, summaries, seeds), sep="\n\n")
    print("", *target_checks(bases, summaries), "", *comparisons(summaries), sep="\n")
    print(f"\ntotal {total_seconds / 60:.1f} min; {busy_note(runs)}")
    plot_path = plot(bases, summaries, seeds, args.plot or ROOT / ("docs/results.png" if args.write_docs else "build/quality.png"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "settings": {"steps": args.steps, "seeds": args.seeds, "heldout": args.heldout, "lr": args.lr, "full_lr": args.full_lr, "seq_len": SEQ_LEN, "batch": BATCH, "rank": RANK},
            "methods": {name: asdict(METHODS[name]) for name in methods},
            "machine": machine(),
            "total_seconds": total_seconds,
            "bases": bases,
            "runs": runs,
        }
        args.json.write_text(json.dumps(record, indent=2))
    if args.write_docs:
        write_docs(ROOT / "docs" / "results.md", results_section(args, bases, runs, summaries, total_seconds, plot_path))


if __name__ == "__main__":
    main()

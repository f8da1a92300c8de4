"""The LoRA-SP training loop: streamed data, plan-sized model, exact resume, memory guard.

One optimizer step:

    schedule     lr for this step (linear warmup, then cosine to min_lr_ratio * lr)
    micro-steps  grad_accum micro-batches, each loss = summed CE / valid targets in the whole step
    check        no targets, or a non-finite loss or gradient norm: skip (step.py), log, count
    clip         global norm over trainable entries (frozen entries carry no gradient)
    step         torch AdamW over the one flat parameter of trainable entries (LoRASPAdamW)
    log          loss, lr, grad norm, tokens/s, peak memory -> metrics.jsonl and the progress bar
    eval         every eval_every steps when eval data is given
    save         checkpoint every save_every steps, on SIGINT/SIGTERM, over budget, and at the end

Stops that leave a usable checkpoint: max_nonfinite_steps non-finite steps in a row (exit 5; the
skipped steps never touched the weights, so the checkpoint holds the last good ones), the memory
guard or an out-of-memory error in a step (exit 3; the checkpoint is taken before the failed step).

Rank-aware from the start: under torchrun each rank reads its own packed blocks, gradients are
averaged by DDP, rank 0 alone writes files and prints.

The step itself is step.py's (its one import path); the checkpoint record, taken from the
Trainer and restored into it, is checkpoint.py's.
"""

from __future__ import annotations

import gc
import json
import math
import signal
import time
from pathlib import Path

import torch
from torch import nn

from lorasp_edge import allocator
from lorasp_edge.errors import DataError, NonFiniteError, OverBudgetError, UserError
from lorasp_edge.models import load_model
from lorasp_edge.train import checkpoint as ckpt
from lorasp_edge.train.adapter import LoRASPConfig, apply_lorasp, redraw_masks, trainable_parameters
from lorasp_edge.train.adapter_files import save_adapter
from lorasp_edge.train.distributed import World
from lorasp_edge.train.guard import MemoryGuard
from lorasp_edge.train.loss import ChunkedCausalLMLoss
from lorasp_edge.train.optim import LoRASPAdamW
from lorasp_edge.train.settings import DEFAULT_LR, TrainSettings
from lorasp_edge.train.step import (
    DTYPES,
    FP16_OVERFLOW,
    NO_TARGETS,
    NONFINITE,
    NONFINITE_GRAD,
    NONFINITE_LOSS,
    PartialStepError,
    make_scaler,
)
from lorasp_edge.train import step as steps  # train_step and evaluate: lorasp_edge.train.step is their one import path

# ------------------------------------------------------------------------------ the parts


def build_model(plan, model_name: str, device: torch.device | str | None = None, seed: int = 0, redraw_every: int = 0,
                compile_layers: bool = False):
    """The base model as the plan says (bits, compute dtype, checkpointing) with LoRA-SP applied;
    with `compile_layers`, each decoder layer compiled by torch.compile."""
    compute_dtype = DTYPES[plan.compute_dtype]
    quant_bits = plan.quant_bits if plan.quant_bits in (4, 8) else None
    allocator.use(plan.host_allocator)  # before the load: the weights' temporaries leave no holes either
    model = load_model(model_name, quant_bits=quant_bits, compute_dtype=compute_dtype, device=device)
    model.config.use_cache = False
    if plan.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs and with DDP, recomputes each decoder layer.
        # transformers 5 renamed the switch (the old name warns); 4.x has only the old one.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    layers = list(plan.layers) if plan.layers is not None and len(plan.layers) < n_layers else None
    config = LoRASPConfig(
        rank=plan.rank,
        alpha=plan.alpha,
        dropout=plan.dropout,
        ratio=plan.ratio,
        seed=seed,
        target_modules=list(plan.target_modules),
        layers=layers,
        redraw_every=redraw_every,
        init=plan.init,
    )
    peft_model = apply_lorasp(model, config)
    # from_pretrained returns an eval-mode model, and transformers checkpoints layers only in
    # training mode: without this, a plan's gradient checkpointing would silently not happen.
    peft_model.train()
    if compile_layers:
        compile_decoder_layers(peft_model)
    return peft_model


def compile_decoder_layers(model: nn.Module) -> int:
    """torch.compile every decoder layer in place (`nn.Module.compile`, so state_dict keys do not
    change and checkpoints, resume and the adapter file are the same as without it). The layers are
    the classes transformers lists in `_no_split_modules`. Fixed shapes (`dynamic=False`): every
    micro-batch has the plan's shape. Returns how many layers were compiled."""
    names = set(getattr(model, "_no_split_modules", None) or getattr(model.get_base_model(), "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise UserError("--compile: this model declares no decoder layer classes to compile (transformers' _no_split_modules)")
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def build_optimizer(model, lr: float = DEFAULT_LR, weight_decay: float = 0.0) -> LoRASPAdamW:
    return LoRASPAdamW(trainable_parameters(model), lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------ the loop


class Trainer:
    """Runs the loop over given parts; `lorasp_edge.train.job.run_training` assembles them from files."""

    def __init__(
        self,
        model,
        optimizer: LoRASPAdamW,
        scheduler,
        stream,
        plan,
        settings: TrainSettings,
        out_dir: str | Path,
        total_steps: int,
        world: World | None = None,
        eval_batches: list[dict] | None = None,
        guard: MemoryGuard | None = None,
        progress: bool = True,
        base_fingerprint: str | None = None,
    ):
        self.model = model  # PeftModel
        self.optimizer, self.scheduler, self.stream = optimizer, scheduler, stream
        self.plan, self.settings, self.total_steps = plan, settings, total_steps
        self.out_dir = Path(out_dir)
        self.world = world or World.single()
        self.eval_batches = eval_batches or []
        self.guard = guard
        self.progress = progress and self.world.is_main
        self.base_fingerprint = base_fingerprint
        self.loss_module = self.world.wrap(ChunkedCausalLMLoss(model, chunk_tokens=plan.loss_chunk_tokens))
        self.compute_dtype = DTYPES[plan.compute_dtype]
        self.scaler = make_scaler(self.world.device, self.compute_dtype)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.skipped = {reason: 0 for reason in (NO_TARGETS, NONFINITE_LOSS, NONFINITE_GRAD, FP16_OVERFLOW)}
        self.nonfinite_run = 0  # non-finite steps in a row
        self._saved_step: int | None = None
        self._stop_signal: int | None = None

    # -- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / ckpt.CHECKPOINT_FILE

    def save_checkpoint(self, data_state: dict | None = None, rng_state: dict | None = None) -> None:
        """Write the state after self.step; data_state/rng_state override this rank's (the
        position before a failed step)."""
        data_states = self.world.gather_objects(data_state or self.stream.state_dict())
        rng_states = self.world.gather_objects(rng_state or ckpt.rng_state())
        if self.world.is_main:
            ckpt.save_checkpoint(self.checkpoint_path, ckpt.capture(self, data_states, rng_states))
        self._saved_step = self.step

    def load_checkpoint(self, checkpoint: ckpt.Checkpoint) -> None:
        ckpt.restore(self, checkpoint)
        self._saved_step = self.step
        if self.world.is_main:
            _truncate_metrics(self.out_dir / "metrics.jsonl", self.step)

    # -- signals

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _install_signal_handlers(self):
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread
                pass
        return previous

    # -- the loop

    def run(self) -> dict:
        previous_handlers = self._install_signal_handlers()
        try:
            return self._loop()
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)

    def _loop(self) -> dict:
        from tqdm import tqdm

        settings, plan = self.settings, self.plan
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        metrics = open(self.out_dir / "metrics.jsonl", "a") if self.world.is_main else None
        stopped, last_eval = None, None
        try:
            while self.step < self.total_steps:
                # The position before this step: an out-of-memory failure checkpoints it (one process only:
                # with several, the other ranks are inside a collective and cannot join a save).
                before = (self.stream.state_dict(), ckpt.rng_state()) if not self.world.distributed else None
                # micro-steps: this rank's grad_accum micro-batches (the stream may end)
                try:
                    micro_batches = [self.stream.next_batch(plan.micro_batch) for _ in range(plan.grad_accum)]
                except DataError as error:
                    self._bad_data(error, before)
                if self.world.any_true(any(mb is None for mb in micro_batches)):
                    stopped = "data exhausted"
                    break
                started = time.perf_counter()
                try:
                    result = steps.train_step(self.loss_module, self.optimizer, micro_batches, plan, settings.max_grad_norm, self.world,
                                        scaler=self.scaler)
                except (torch.OutOfMemoryError, MemoryError, PartialStepError) as error:
                    self._out_of_memory(error, before)
                # schedule: the lr of the next step (a skipped step still takes its place in the schedule)
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                self.step += 1
                step_seconds = time.perf_counter() - started
                self.elapsed += step_seconds
                self.tokens += result["tokens"]
                skipped = result["skipped"]
                if skipped:
                    self.skipped[skipped] += 1
                self.nonfinite_run = self.nonfinite_run + 1 if skipped in NONFINITE else 0 if skipped is None else self.nonfinite_run
                if settings.redraw_every and self.step % settings.redraw_every == 0 and self.step < self.total_steps:
                    redraw_masks(self.model, self.step // settings.redraw_every)
                    self.optimizer.reset_state()
                # log
                record = {
                    "step": self.step,
                    "loss": result["loss"],
                    "lr": lr,
                    "grad_norm": result["grad_norm"],
                    "tokens": self.tokens,
                    "tokens_per_s": result["tokens"] / step_seconds,
                    # peak_bytes: what the budget limits (guard.measure); peak_rss_bytes: the whole resident set
                    "peak_bytes": self.guard.peak_bytes() if self.guard else None,
                    "peak_rss_bytes": self.guard.peak_rss_bytes() if self.guard else None,
                    "elapsed_s": round(self.elapsed, 3),
                }
                if skipped:
                    record["skipped"] = skipped
                # eval
                if self.eval_batches and settings.eval_every and self.step % settings.eval_every == 0:
                    record["eval_loss"] = last_eval = steps.evaluate(self.loss_module_inner, self.eval_batches, self.compute_dtype)
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.set_postfix(
                    loss=f"{result['loss']:.4f}" if result["loss"] is not None else "-",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    peak=_gigabytes(record["peak_bytes"]),
                    **({"skipped": skipped} if skipped else {}),
                    refresh=False,
                )
                bar.update(1)
                # save
                nonfinite_stop = settings.max_nonfinite_steps > 0 and self.nonfinite_run >= settings.max_nonfinite_steps
                over_budget = self.guard is not None and self.world.any_true(self.guard.over_budget())
                signalled = self.world.any_true(self._stop_signal is not None)
                periodic = settings.save_every and self.step % settings.save_every == 0
                if nonfinite_stop or over_budget or signalled or periodic:
                    self.save_checkpoint()
                if nonfinite_stop:
                    raise NonFiniteError(self._nonfinite_report(skipped))
                if over_budget:
                    raise OverBudgetError(self.guard.report(self.step))
                if signalled:
                    stopped = signal.Signals(self._stop_signal).name if self._stop_signal else "signal"
                    break
        finally:
            bar.close()
            if metrics:
                metrics.close()
        if stopped == "data exhausted" and self.step == 0:
            raise UserError("the data ended before the first optimizer step (fewer blocks than one step needs)")
        if self._saved_step != self.step:
            self.save_checkpoint()
        if self.eval_batches:
            last_eval = steps.evaluate(self.loss_module_inner, self.eval_batches, self.compute_dtype)
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens,
            "train_seconds": round(self.elapsed, 2),
            "tokens_per_s": round(self.tokens / self.elapsed, 1) if self.elapsed else None,
            "peak_bytes": self.guard.peak_bytes() if self.guard else None,
            "peak_rss_bytes": self.guard.peak_rss_bytes() if self.guard else None,
            "peak_measure": self.guard.measure if self.guard else None,
            "eval_loss": last_eval,
            "stopped": stopped,
            "skipped_steps": {reason: count for reason, count in self.skipped.items() if count},
        }

    def _nonfinite_report(self, last: str) -> str:
        first = self.step - self.nonfinite_run + 1
        return (
            f"{self.nonfinite_run} steps in a row had a {last.removeprefix('non-finite ')} that is not finite (steps {first}-{self.step}); "
            f"none reached the weights, so the checkpoint holds the weights of step {first - 1}: lower --lr "
            f"(now {self.settings.lr:g}; --resume takes a new --lr) or check the data"
        )

    def _bad_data(self, error: DataError, before: tuple[dict, dict] | None) -> None:
        """A bad line met mid-run: checkpoint the position before this step (the steps done are kept),
        then stop with the line's message."""
        if self.step == 0:
            raise error
        if before is not None:
            self.save_checkpoint(data_state=before[0], rng_state=before[1])
            kept = f"a checkpoint of step {self.step} was written"
        else:  # several ranks: they meet the line in different steps, and a save is collective
            kept = f"the last checkpoint (step {self._saved_step if self._saved_step is not None else 'none'}) is kept"
        raise DataError(f"{error}; {kept}") from None

    def _out_of_memory(self, error: BaseException, before: tuple[dict, dict] | None) -> None:
        """Free what the failed step held, checkpoint the position before it, and stop with exit 3."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.world.device.type == "cuda":
            torch.cuda.empty_cache()
        text = str(error).strip()
        what = text.splitlines()[0][:160] if text else type(error).__name__
        partial = isinstance(error, PartialStepError)
        if before is not None and not partial:
            self.save_checkpoint(data_state=before[0], rng_state=before[1])
            saved = f"a checkpoint of step {self.step} was written"
        else:
            why = "the optimizer failed inside its step" if partial else "other ranks cannot join a save"
            saved = f"{why}, so the last checkpoint ({self._saved_step if self._saved_step is not None else 'none'}) is kept"
        planned = self.plan.memory.get("total_bytes") if isinstance(self.plan.memory, dict) else None
        how_far = ""
        if self.guard is not None:
            peak = self.guard.peak_bytes()
            how_far = f"; peak {peak / 1e9:.2f} GB"
            if planned:
                how_far += f", the plan predicted {planned / 1e9:.2f} GB ({(peak / planned - 1) * 100:+.0f}%)"
        elif planned:
            how_far = f"; the plan predicted {planned / 1e9:.2f} GB"
        raise OverBudgetError(
            f"out of memory in step {self.step + 1} ({what}){how_far}; {saved}: plan for a smaller budget "
            "(or a smaller --seq-len/--batch) and resume with --plan"
        ) from None

    @property
    def loss_module_inner(self) -> ChunkedCausalLMLoss:
        module = self.loss_module
        return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module

    def save_final_adapter(self, info: dict) -> Path:
        path = self.out_dir / "adapter"
        if not all(torch.isfinite(parameter).all() for parameter in trainable_parameters(self.model)):
            raise NonFiniteError(f"the trained weights hold non-finite values at step {self.step}: no adapter written; the checkpoint holds the last finite state")
        if self.world.is_main:
            save_adapter(self.model, path, info)
        self.world.barrier()
        return path


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (they will be recomputed), and a
    last line torn by a kill mid-write."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # torn by the kill: the step is recomputed
            raise UserError(f"{path}:{number}: not a JSON record; move the file away to resume") from None
        if record["step"] <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _gigabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}GB"

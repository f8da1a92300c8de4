"""What a training run is asked to do, beside the plan: steps, learning rate, schedule, saving."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# LoRA-SP's peak learning rate: twice the common LoRA default of 2e-4. With half of each matrix
# frozen, a step moves half as many entries. docs/results.md (SmolLM2-135M, 50 steps, 3 seeds, rank 16):
# with LoRA at 2e-4, LoRA-SP at 2e-4 had held-out loss 0.595 against LoRA's 0.455 (exact match 12.9
# points lower), at 4e-4 0.463 (2.0 points lower); with LoRA at 1e-3, LoRA-SP at 1e-3 had 0.344
# against 0.301 (3.5 points lower), at 2e-3 0.299 (2.0 points lower).
DEFAULT_LR = 4e-4
# Examples the data order is shuffled within. The buffer holds two integers per example (offset and
# line), so its size, not the file's, bounds the memory and the checkpoint's data position; a file of
# up to this many examples is shuffled as a whole.
DEFAULT_SHUFFLE_BUFFER = 10_000


@dataclass
class TrainSettings:
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (default: one epoch)"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the data (ignored with steps)"})
    lr: float = field(default=DEFAULT_LR, metadata={"help": "peak learning rate, twice LoRA's usual 2e-4 (docs/results.md); warmup then cosine"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay on trainable entries"})
    warmup_steps: int | None = field(default=None, metadata={"help": "linear warmup steps (default: 5% of steps, at most 100)"})
    min_lr_ratio: float = 0.1
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping over trainable entries"})
    seed: int = field(default=0, metadata={"help": "seed for LoRA init, masks and data order"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    eval_every: int = field(default=0, metadata={"help": "eval every N steps with eval data (0: only at the end)"})
    eval_blocks: int = field(default=16, metadata={"help": "blocks of eval data scored per eval"})
    redraw_every: int = field(default=0, metadata={"help": "redraw LoRA-SP masks every K steps (0: fixed)"})
    skip_bad_lines: bool = field(default=False, metadata={"help": "count and skip malformed data lines instead of stopping"})
    max_nonfinite_steps: int = field(default=3, metadata={"help": "steps with a non-finite loss or gradient are skipped; stop (exit 5) after N in a row (0: never)"})
    compile: bool = field(default=False, metadata={"help": "compile each decoder layer with torch.compile (the first steps pay the compile time; docs/performance.md)"})
    shuffle_buffer: int = field(default=DEFAULT_SHUFFLE_BUFFER, metadata={"help": "examples the data order is shuffled within, seeded by the seed and the epoch (0: file order)"})

    def problems(self) -> list[str]:
        found = []
        if self.steps is not None and self.steps < 1:
            found.append(f"--steps must be >= 1, not {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            found.append(f"--epochs must be > 0, not {self.epochs}")
        if not self.lr > 0:
            found.append(f"--lr must be > 0, not {self.lr}")
        if self.save_every < 0:
            found.append(f"--save-every must be >= 0, not {self.save_every}")
        if self.max_nonfinite_steps < 0:
            found.append(f"--max-nonfinite-steps must be >= 0, not {self.max_nonfinite_steps}")
        if self.shuffle_buffer < 0:
            found.append(f"--shuffle-buffer must be >= 0, not {self.shuffle_buffer}")
        return found

    @classmethod
    def from_record(cls, record: dict) -> "TrainSettings":
        """Settings saved in a checkpoint; fields this version added take their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})

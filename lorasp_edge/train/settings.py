"""What a training run is asked to do, beside the plan: steps, learning rate, schedule, saving."""

from __future__ import annotations

import math
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
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm over trainable entries to this (0: no clipping, as in the HF Trainer)"})
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
        """Every setting out of its range, one sentence each (flags as the CLI names them)."""
        found = []

        def need(name: str, ok: bool, expected: str) -> None:
            if not ok:
                found.append(f"--{name.replace('_', '-')} must be {expected}, not {getattr(self, name)}")

        def finite(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if self.steps is not None:
            need("steps", self.steps >= 1, ">= 1")
        if self.epochs is not None:
            need("epochs", finite(self.epochs) and self.epochs > 0, "a finite number > 0")
        need("lr", finite(self.lr) and self.lr > 0, "a finite number > 0")
        need("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0")
        need("max_grad_norm", finite(self.max_grad_norm) and self.max_grad_norm >= 0, "a finite number > 0, or 0 for no clipping")
        need("min_lr_ratio", finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        if self.warmup_steps is not None:
            need("warmup_steps", self.warmup_steps >= 0, ">= 0")
            if self.steps is not None and self.warmup_steps > self.steps >= 1:
                found.append(f"--warmup-steps {self.warmup_steps} is longer than the run's {self.steps} steps: the peak learning rate "
                             "would never be reached; lower --warmup-steps or raise --steps")
        need("seed", self.seed >= 0, ">= 0")
        for name in ("save_every", "eval_every", "redraw_every", "max_nonfinite_steps", "shuffle_buffer"):
            need(name, getattr(self, name) >= 0, ">= 0")
        need("eval_blocks", self.eval_blocks >= 1, ">= 1")
        return found

    @classmethod
    def from_record(cls, record: dict) -> "TrainSettings":
        """Settings saved in a checkpoint; fields this version added take their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})

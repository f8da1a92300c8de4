"""Causal-LM loss without full-sequence logits.

The logits of a small model are often its largest tensor: SmolLM2-135M at batch 4 x 256 has a
49152-wide vocabulary, so fp32 logits take 4 * 256 * 49152 * 4 B = 192 MiB a copy, and autograd
keeps several copies (logits, log-softmax, their gradients). Here the decoder runs to its final
hidden states; lm_head and the fp32 cross-entropy then run in chunks of `chunk_tokens` tokens,
each chunk recomputed in backward (non-reentrant checkpoint). Only one chunk's logits live at a
time: chunk_tokens x vocab x (compute-dtype logits + fp32 logits + fp32 gradient). When the
micro-batch has no more targets than `chunk_tokens` (the plan's memory model says the full logits
fit), the loss takes the plain path: one lm_head over every position, no recompute.

    loss = sum over valid targets of CE(lm_head(h_t), x_{t+1}) / normalizer

lm_head runs only at positions with a target: the hidden states of the others are dropped before
it (an index_select, whose backward scatters the gradient back). On prompt/completion and chat data
most positions are prompt (the README's chat task: 15% of tokens are targets, counted by
tools/bench_train.py), and lm_head is a large share of a small model's matmuls (SmolLM2:
49,152 x 576), so its cost follows the targets, not the tokens. Plain text, where every position
is a target, skips the gather. The chunking then counts targets, so a micro-batch with few targets
takes the plain path; the planner's loss-chunk term (every position) stays an upper bound.

The caller passes `normalizer` (the number of valid targets in the whole optimizer step, over
micro-batches and data-parallel ranks), so gradient accumulation and data parallelism give the
same gradient as one big batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def valid_targets(labels: torch.Tensor) -> int:
    """Number of positions that carry a loss (labels shift left by one)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class ChunkedCausalLMLoss(nn.Module):
    """Wraps a (PEFT-wrapped) causal LM so that forward returns the summed chunked loss.

    A module, not a function, so that DistributedDataParallel can wrap it: DDP's gradient
    all-reduce hooks run only for forwards that go through the DDP wrapper.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = 256):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        transformer = _unwrap(model)
        self.decoder = transformer.base_model  # e.g. LlamaModel, GPT2Model
        self.lm_head = transformer.get_output_embeddings()
        # Gemma 2 caps its logits: cap * tanh(logits / cap) (transformers' Gemma2ForCausalLM).
        self.logit_softcap = getattr(transformer.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, normalizer: float, position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss / normalizer to backpropagate, summed loss detached). position_ids that restart mark
        packed examples: transformers then masks attention block-diagonally."""
        hidden = self.decoder(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        kept = targets != IGNORE_INDEX
        if not bool(kept.all()):  # a sync point (one bool), far cheaper than lm_head at every position
            index = kept.nonzero().squeeze(1)
            hidden, targets = hidden.index_select(0, index), targets.index_select(0, index)
        if targets.numel() <= self.chunk_tokens:
            # The whole micro-batch's logits fit the plan's budget: one lm_head, no recompute.
            total = self._chunk_loss(hidden, targets)
            return total / normalizer, total.detach()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), self.chunk_tokens):
            end = start + self.chunk_tokens
            if self.training and torch.is_grad_enabled():
                total = total + checkpoint(self._chunk_loss, hidden[start:end], targets[start:end], use_reentrant=False)
            else:
                total = total + self._chunk_loss(hidden[start:end], targets[start:end])
        return total / normalizer, total.detach()

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return SummedCrossEntropy.apply(logits, targets)


class SummedCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(logits_i)[targets_i], its backward in place over the saved log-probabilities.

    F.cross_entropy's backward fills a zero (rows, vocab) gradient, scatters -grad into it, and
    log_softmax's backward then writes a third (rows, vocab) tensor. The gradient is softmax - onehot,
    times the incoming grad: here exp_ and mul_ over the saved log-probabilities (which nothing else
    reads) and one subtraction per row, so backward allocates no (rows, vocab) tensor. Targets must all
    be valid (ChunkedCausalLMLoss drops IGNORE_INDEX before the loss). The saved tensor is consumed:
    a second backward through the same graph raises."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probs, targets)
        ctx.consumed = False
        return -log_probs.gather(1, targets.unsqueeze(1)).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError("SummedCrossEntropy's backward reuses its saved log-probabilities in place: it runs once per forward")
        ctx.consumed = True
        log_probs, targets = ctx.saved_tensors
        gradient = log_probs.exp_().mul_(grad)
        gradient[torch.arange(targets.numel(), device=targets.device), targets] -= grad
        return gradient, None


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model

"""Greedy agreement with the merged PyTorch model over a long continuation: the check every
runtime export (GGUF, onnxruntime-genai) is gated on.

    prompt (held-out text) --merged PyTorch, greedy--> N reference tokens
    runtime, fed prompt + reference tokens once --> its argmax at each of the N positions
    agreement = share of positions where the runtime's argmax is the reference token

Teacher forcing (feeding the reference tokens rather than the runtime's own choices) keeps one
early near-tie flip from making every later position incomparable, so the figure measures the
weights and kernels, not the luck of the first divergence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lorasp_edge.export.verify import as_pieces

PROMPT_TOKENS = 16
CONTINUATION_TOKENS = 128
# Smallest allowed agreement over CONTINUATION_TOKENS positions: 16- and 8-bit weights must pick
# the reference token almost everywhere. 4/5-bit weights are gated lower: on SmolLM2-135M,
# llama.cpp's q4_0 measured 78.9% (tools/verify_gguf.py, docs/export.md).
AGREEMENT_LIMIT = {16: 0.95, 8: 0.95, 4: 0.70}


@dataclass
class Agreement:
    agreement: float  # share of the continuation's positions with the reference argmax
    positions: int
    first_difference: int | None  # index of the first position that differs, None when none does
    limit: float

    @property
    def passed(self) -> bool:
        return self.agreement >= self.limit


@torch.no_grad()
def greedy_continuation(model, prompt: list[int], count: int = CONTINUATION_TOKENS) -> list[int]:
    """`count` raw-argmax tokens of the merged model after `prompt`, through its KV cache. EOS is
    not special here (the comparison needs a fixed number of positions), and nothing masks it."""
    output = model(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens = [int(output.logits[0, -1].argmax())]
    while len(tokens) < count:
        output = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=output.past_key_values, use_cache=True)
        tokens.append(int(output.logits[0, -1].argmax()))
    return tokens


def measure(logits_of: Callable[[list[int]], np.ndarray], prompt: list[int], continuation: list[int], limit: float) -> Agreement:
    """`logits_of(ids)` returns the runtime's (len(ids), vocab) logits for one forward over `ids`."""
    logits = np.asarray(logits_of(prompt + continuation[:-1]))
    picks = logits[len(prompt) - 1 :].argmax(-1)
    return _agreement(picks == np.asarray(continuation), limit)


def _agreement(same: np.ndarray, limit: float) -> Agreement:
    """Agreement from a boolean per compared position."""
    differs = np.flatnonzero(~same)
    return Agreement(float(same.mean()), len(same), int(differs[0]) if len(differs) else None, limit)


def limit_for_bits(bits: int, settings=None) -> float:
    """The gate for weights of `bits` bits; `settings.min_agreement` (export --min-agreement) overrides it."""
    given = getattr(settings, "min_agreement", None)
    return given if given is not None else AGREEMENT_LIMIT[16 if bits >= 16 else 8 if bits >= 8 else 4]


def argmax_recorder(logits_of: Callable, picks: list) -> Callable:
    """`logits_of` that also appends to `picks` the argmax per position of each piece of logits it
    returns (a whole array is one piece; `verify.onnx_logit_pieces` returns row blocks)."""
    def record(logits):
        picks.append(np.asarray(logits).argmax(-1))
        return logits

    def recorded(ids: list[int]):
        return (record(piece) for piece in as_pieces(logits_of(ids)))

    return recorded


def held_out_agreement(picks: list, reference_picks: list, limit: float) -> Agreement:
    """Agreement of two runs of argmax_recorder over the same held-out windows (teacher-forced on the text)."""
    return _agreement(np.concatenate(picks) == np.concatenate(reference_picks), limit)

"""Checks an export must pass: exported logits against the merged PyTorch model, perplexity.

The held-out sample defaults to the Python language reference shipped with every Python
(`pydoc_data.topics`): English prose that no adapter here was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorasp_edge.errors import UserError

DECODE_STEPS = 3
PERPLEXITY_ROWS = 64
ONNX_PIECE_ROWS = 128  # positions per onnxruntime forward when scoring perplexity (onnx_logit_pieces)


@dataclass
class Comparison:
    """One model against the merged PyTorch model on the verification batch."""

    max_abs_diff: float
    relative_diff: float  # max_abs_diff / max |reference logit|
    greedy_agreement: float  # share of compared positions with the same argmax
    positions: int


def held_out_text(path: Path | None) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def held_out_ids(tokenizer, text: str, count: int) -> list[int]:
    # Tokenize a prefix only: a few characters per token is plenty, the whole reference is 0.5 MB.
    ids = tokenizer(text[: count * 16], add_special_tokens=False)["input_ids"][:count]
    if len(ids) < 32:
        raise UserError(f"the held-out text gives only {len(ids)} tokens; at least 32 are needed")
    return list(ids)


def verification_batch(ids: list[int], pad_id: int, length: int = 12, padding: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of held-out text; the second is left-padded, so padding and positions are exercised."""
    first = ids[:length]
    second = [pad_id] * padding + ids[length : 2 * length - padding]
    input_ids = torch.tensor([first, second])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :padding] = 0
    return input_ids, attention_mask


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def reference_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Full-recompute logits of a PyTorch model (no cache), fp32."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask), use_cache=False)
    return output.logits.float()


def compare(reference: list[torch.Tensor], candidate: list[np.ndarray | torch.Tensor], masks: list[torch.Tensor]) -> Comparison:
    """Logit differences and argmax agreement over the positions each mask marks as real."""
    max_abs, scale, agree, count = 0.0, 0.0, 0, 0
    for ref, got, mask in zip(reference, candidate, masks):
        got = torch.as_tensor(got, dtype=torch.float32)
        keep = mask.bool()
        ref, got = ref[keep], got[keep]
        max_abs = max(max_abs, float((ref - got).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        count += int(keep.sum())
    return Comparison(max_abs, max_abs / scale if scale else max_abs, agree / count, count)


def reference_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int = DECODE_STEPS) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """PyTorch full recompute over the prefill and `steps` greedy decode steps: (ids, mask, logits) per step.

    Computed before any onnxruntime session opens, the PyTorch side's memory and the session's
    do not add up; `verify_onnx` takes the list instead of recomputing it for every graph."""
    steps_out = [(input_ids, attention_mask, reference_logits(model, input_ids, attention_mask))]
    for _ in range(steps):
        ids, mask, reference = steps_out[-1]
        next_ids = reference[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        steps_out.append((ids, mask, reference_logits(model, ids, mask)))
    return steps_out


def verify_onnx(decoder, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int = DECODE_STEPS,
                references: list | None = None) -> Comparison:
    """onnxruntime with its KV cache against PyTorch full recompute: prefill, then `steps` decode steps.

    Both sides are fed the same tokens (PyTorch's greedy choice), so one early argmax flip does not
    make every later step incomparable. `references` (from `reference_steps`) replaces `model`'s forwards.
    """
    references = references or reference_steps(model, input_ids, attention_mask, steps)
    ids, mask, reference = references[0]
    logits, past = decoder(ids.numpy(), mask.numpy(), _positions(mask).numpy(), decoder.empty_cache(len(ids)))
    wanted, candidates, masks = [reference], [logits], [mask]
    for ids, mask, reference in references[1:]:
        next_ids = ids[:, -1:]
        position = _positions(mask)[:, -1:]
        logits, past = decoder(next_ids.numpy(), mask.numpy(), position.numpy(), past)
        wanted.append(reference[:, -1:])
        candidates.append(logits)
        masks.append(torch.ones_like(next_ids))
    return compare(wanted, candidates, masks)


def in_place_difference(decoder, references: list) -> float | None:
    """Largest |logit difference| / logit scale between the two ways a runtime may hold the graph's
    cache, on the verification batch's first row (prefill + each decode step of `references`): one
    buffer per layer updated in place (onnx_runtime.BoundDecoder, what `generate` and
    onnxruntime-genai run) and the growing cache `verify_onnx` checks against PyTorch. None for a
    graph that does not offer the shared buffer or runs in layer slices."""
    from lorasp_edge.export.onnx_runtime import BoundDecoder

    if not getattr(decoder, "shares_cache", False):
        return None
    ids = references[-1][0][0].tolist()  # the unpadded row, with every decode step's token
    start = len(ids) - (len(references) - 1)
    bound = BoundDecoder(decoder, capacity=len(ids))
    in_place = [bound(ids[:start])] + [bound([token]) for token in ids[start:]]
    growing, past = [], decoder.empty_cache(1)
    for end in range(start, len(ids) + 1):
        begin = 0 if end == start else end - 1
        row = np.asarray([ids[begin:end]])
        logits, past = decoder(row, np.ones((1, end), np.int64), np.arange(begin, end)[None], past)
        growing.append(logits[0, -1])
    scale = max(float(np.abs(logits).max()) for logits in growing)
    return max(float(np.abs(a - b).max()) for a, b in zip(in_place, growing)) / scale


def perplexity(logits_of: Callable[[list[int]], np.ndarray | Iterable[np.ndarray]], ids: list[int], window: int) -> float:
    """exp(mean next-token NLL) over consecutive windows of `window` + 1 tokens.

    `logits_of(ids)` returns the (len(ids), vocab) logits, or an iterable of consecutive row blocks
    of them (`onnx_logit_pieces`): a window's logits then never exist whole."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        targets = torch.tensor(chunk[1:])
        done = 0
        for piece in as_pieces(logits_of(chunk[:-1])):
            logits = torch.as_tensor(piece)
            # float64 a slice of positions at a time: a whole window's copy is window x vocab x 8 bytes
            for row in range(0, len(logits), PERPLEXITY_ROWS):
                part = logits[row : row + PERPLEXITY_ROWS].to(torch.float64)
                wanted = targets[done + row : done + row + len(part)]
                total += float(torch.nn.functional.cross_entropy(part, wanted, reduction="sum"))
            done += len(logits)
        if done != len(targets):
            raise ValueError(f"logits for {done} positions, {len(targets)} expected")
        count += len(targets)
    return float(np.exp(total / count))


def as_pieces(logits) -> Iterable:
    """A whole (positions, vocab) array as one piece; an iterable of pieces as it is."""
    return [logits] if isinstance(logits, (np.ndarray, torch.Tensor)) else logits


def onnx_logits_fn(decoder) -> Callable[[list[int]], np.ndarray]:
    def logits_of(ids: list[int]) -> np.ndarray:
        x = np.asarray([ids], dtype=np.int64)
        return decoder(x, np.ones_like(x), np.arange(len(ids))[None], decoder.empty_cache(1))[0][0]

    return logits_of


def onnx_logit_pieces(decoder, rows: int = ONNX_PIECE_ROWS) -> Callable[[list[int]], Iterator[np.ndarray]]:
    """Like `onnx_logits_fn`, as consecutive blocks of `rows` positions fed through the KV cache:
    the session holds one block's activations and logits, not a window's (a 1.5B model's 151,936-entry
    vocabulary makes a 512-token window's logits 311 MB, and onnxruntime keeps a copy in its arena)."""
    def pieces(ids: list[int]) -> Iterator[np.ndarray]:
        past = decoder.empty_cache(1)
        for start in range(0, len(ids), rows):
            x = np.asarray([ids[start : start + rows]], dtype=np.int64)
            end = start + x.shape[1]
            logits, past = decoder(x, np.ones((1, end), np.int64), np.arange(start, end)[None], past)
            yield logits[0]

    return pieces


def torch_logits_fn(model) -> Callable[[list[int]], np.ndarray]:
    def logits_of(ids: list[int]) -> np.ndarray:
        x = torch.tensor([ids])
        return reference_logits(model, x, torch.ones_like(x))[0].numpy()

    return logits_of

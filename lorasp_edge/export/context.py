"""What every export format's writer is handed, built in one place (`build_context`): the reference
model the formats are checked against, the weights to write, the verification inputs, the folder to
write into and the manifest to fill.

    source (export/sources/)  --model, weights, config-->  ExportContext  <--held-out ids, verification batch
                                                             |
                                              each format's writer (export/formats/)

Writers ask the context, never the type of the source: `weights` gives the weights to write by
checkpoint key (in memory or read from disk), `streamed` says the reference reads its weights layer by
layer from disk (so a writer takes weights from `weights` rather than from the model object), and
`merged_folder` is the merged Hugging Face folder when the source has written one already.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasp_edge.export import agreement
from lorasp_edge.export.verify import held_out_ids, held_out_text, reference_logits, verification_batch

PERPLEXITY_WINDOW = 512


@dataclass(frozen=True)
class VerificationInputs:
    """Held-out token ids for perplexity and agreement, and a two-row verification batch (one row
    left-padded) for logit comparisons."""

    ids: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def verification_inputs(tokenizer, eval_text: Path | None = None, eval_tokens: int = 1024) -> VerificationInputs:
    ids = held_out_ids(tokenizer, held_out_text(eval_text), eval_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return VerificationInputs(ids, *verification_batch(ids, pad_id))


@dataclass
class ExportContext:
    settings: object  # ExportSettings (None outside an export: tools and tests)
    folder: Path  # the temporary export folder, renamed into place when every writer has passed
    model: object  # the reference: the merged fp32 model, or the base with the adapter unmerged (`merged` False)
    tokenizer: object
    ids: list[int]  # held-out token ids for perplexity
    input_ids: torch.Tensor  # verification batch (two rows, one left-padded)
    attention_mask: torch.Tensor
    reference: torch.Tensor  # the reference model's fp32 logits on the verification batch
    window: int  # perplexity window
    manifest: dict
    say: Callable[[str], None]
    session_slices: int = 1  # onnxruntime sessions over consecutive layers the fp32 graph is verified in
    weights: object | None = None  # key -> tensor view of the weights to write (lorasp_edge.export.sources.weights)
    streamed: bool = False  # the reference reads its weights from disk, one layer at a time
    merged_folder: Path | None = None  # the merged Hugging Face folder the source wrote, if it wrote one
    is_merged: bool = True  # False: the adapter is unmerged (export --adapter-only)
    reference_record: dict = field(default_factory=dict)  # what the reference is, as a format's manifest record states it
    continuation: list[int] | None = field(default=None, repr=False)  # see reference_continuation

    def reference_continuation(self) -> list[int]:
        """The reference's greedy tokens after the held-out prompt (agreement.PROMPT_TOKENS ids), which
        every runtime's greedy agreement is measured against: computed once per export (a streamed
        reference reads every weight from disk once a token)."""
        if self.continuation is None:
            self.continuation = agreement.greedy_continuation(self.model, self.ids[: agreement.PROMPT_TOKENS])
        return self.continuation

    @property
    def merged(self):
        """The reference model, under the name the writers have always used."""
        return self.model

    @property
    def config(self):
        """The model's config (the base's, for an unmerged adapter)."""
        return self.model.get_base_model().config if hasattr(self.model, "get_base_model") else self.model.config


def build_context(model, tokenizer, inputs: VerificationInputs, folder: Path, manifest: dict, say: Callable[[str], None] | None = None,
                  settings=None, **source_facts) -> ExportContext:
    """The one context builder: the reference logits and the perplexity window from the model, the rest
    as given. `source_facts`: weights, streamed, merged_folder, is_merged, reference_record, session_slices."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    window = min(PERPLEXITY_WINDOW, getattr(config, "max_position_embeddings", PERPLEXITY_WINDOW) or PERPLEXITY_WINDOW)
    return ExportContext(
        settings=settings, folder=Path(folder), model=model, tokenizer=tokenizer, ids=inputs.ids, input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask, reference=reference_logits(model, inputs.input_ids, inputs.attention_mask), window=window,
        manifest=manifest, say=say or (lambda message: None), **source_facts,
    )


def model_context(model, tokenizer, folder: Path, eval_tokens: int = 1024, window: int = PERPLEXITY_WINDOW, say=None) -> ExportContext:
    """A context for a model outside an export (tools and tests run the formats' runtime checks on it)."""
    context = build_context(model, tokenizer, verification_inputs(tokenizer, None, eval_tokens), folder,
                            {"files": {}, "verification": {}, "perplexity": {}}, say)
    context.window = window
    return context

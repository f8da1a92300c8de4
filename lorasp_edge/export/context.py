"""What every export format's writer is handed: the merged model, the verification inputs, the
folder to write into and the manifest to fill."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class ExportContext:
    settings: object  # ExportSettings
    folder: Path  # the temporary export folder, renamed into place when every writer has passed
    merged: torch.nn.Module  # plain fp32 model with the adapter merged
    tokenizer: object
    ids: list[int]  # held-out token ids for perplexity
    input_ids: torch.Tensor  # verification batch (two rows, one left-padded)
    attention_mask: torch.Tensor
    reference: torch.Tensor  # merged model's fp32 logits on the verification batch
    window: int  # perplexity window
    manifest: dict
    say: Callable[[str], None]
    session_slices: int = 1  # onnxruntime sessions over consecutive layers the fp32 graph is verified in

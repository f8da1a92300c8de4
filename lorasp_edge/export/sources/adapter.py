"""The adapter source (`export --adapter-only`): the adapter left unmerged, for runtimes that apply it.

    base (as trained: float, or bitsandbytes 4/8-bit) + adapter --PEFT, unmerged--> reference model

Formats with an adapter writer (lorasp_edge.export.formats) write the base as trained beside the
adapter in the runtime's form (gguf_adapter.py) and check the runtime against this reference.
"""

from __future__ import annotations

import torch

from lorasp_edge.export.sources.source import Source, SourceRequest


def open_source(request: SourceRequest) -> Source:
    from lorasp_edge.models import load_model
    from lorasp_edge.train.adapter import load_adapter

    bits = request.base_bits
    request.say(f"loading base '{request.model_name}'" + (f" ({bits}-bit, as trained)" if bits else ""))
    base = load_model(request.model_name, quant_bits=bits, compute_dtype=torch.float32, device="cpu")
    request.say(f"loading adapter {request.adapter_dir} (unmerged)")
    adapted = load_adapter(base, request.adapter_dir)
    return Source("adapter", adapted, sum(p.numel() for p in adapted.get_base_model().parameters()), is_merged=False)

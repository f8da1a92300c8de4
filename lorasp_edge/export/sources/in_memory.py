"""The in-memory source: the base loaded as trained, the adapter merged into a plain fp32 model.

    base (float, or bitsandbytes 4/8-bit as trained) + adapter --PEFT--> adapted model
    adapted --merged_model (merge.py)--> plain fp32 model with W0 + (alpha/r) B A
    merged vs adapted logits on the verification batch: the merge check (sources.check_merge)

The fast source for a model that fits: every forward runs on weights in memory. It holds the base,
the adapted model and the merged copy at once while merging (memory.IN_MEMORY_FACTOR).
"""

from __future__ import annotations

import torch

from lorasp_edge.export.sources.source import Source, SourceRequest, check_merge
from lorasp_edge.export.sources.weights import ModelWeights


def open_source(request: SourceRequest) -> Source:
    from lorasp_edge.export.sources.merge import merged_model
    from lorasp_edge.export.verify import reference_logits
    from lorasp_edge.models import load_model
    from lorasp_edge.train.adapter_files import load_adapter

    say, bits, inputs = request.say, request.base_bits, request.inputs
    say(f"loading base '{request.model_name}'" + (f" ({bits}-bit, as trained)" if bits else ""))
    base = load_model(request.model_name, quant_bits=bits, compute_dtype=torch.float32, device="cpu")
    say(f"merging adapter {request.adapter_dir} in fp32")
    adapted = load_adapter(base, request.adapter_dir)
    merged = merged_model(adapted)
    check = check_merge(reference_logits(merged, inputs.input_ids, inputs.attention_mask),
                        reference_logits(adapted, inputs.input_ids, inputs.attention_mask), inputs.attention_mask, bits, say)
    del adapted, base
    weights = ModelWeights(merged)
    return Source("in-memory", merged, sum(p.numel() for p in merged.parameters()), weights=weights, checks={"merge": check},
                  closers=[weights.close])

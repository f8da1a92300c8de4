"""What a source is opened with and what it hands the formats, and the one merge check of the merged sources."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorasp_edge.errors import VerificationError

# An adapter trained on an LLM.int8 base saw int8-quantized activations, which the fp32 merge
# cannot reproduce; a 4-bit (NF4) base's forward dequantizes the same weights the merge uses.
MERGE_TOLERANCE = {None: 1e-3, 4: 1e-3, 8: 5e-2}


@dataclass
class SourceRequest:
    """What every source is opened with."""

    settings: object  # ExportSettings
    model_name: str
    base_bits: int | None
    adapter_dir: Path
    info: dict  # lorasp.json
    tokenizer: object
    inputs: object  # lorasp_edge.export.context.VerificationInputs
    folder: Path  # the temporary export folder
    say: Callable[[str], None]
    base_folder: Path | None = None  # the base's local safetensors folder (the streamed source reads it)


@dataclass
class Source:
    kind: str
    model: object  # the reference model
    parameters: int
    weights: object | None = None  # key -> tensor view of the weights the formats write
    streamed: bool = False  # the reference reads its weights from disk, one layer at a time
    merged_folder: Path | None = None  # the merged Hugging Face folder, when the source wrote one
    is_merged: bool = True
    checks: dict = field(default_factory=dict)  # verification records the source made (manifest "verification")
    reference_record: dict = field(default_factory=dict)  # what the reference is, for a format's record (adapter source)
    closers: list = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers = []


def check_merge(merged_logits, adapted_logits, attention_mask, bits: int | None, say, **note) -> dict:
    """The merged model against the base with the adapter applied unmerged, on the verification batch:
    the one merge check of every merged source. Raises VerificationError past MERGE_TOLERANCE[bits]."""
    from lorasp_edge.export.verify import compare

    check = compare([merged_logits], [adapted_logits], [attention_mask])
    tolerance = MERGE_TOLERANCE[bits]
    say(f"  merged vs adapted: max |logit diff| {check.max_abs_diff:.2e} ({check.relative_diff:.2e} of the logit scale)")
    if check.relative_diff > tolerance:
        raise VerificationError(
            f"merged model differs from the adapted model: relative logit difference {check.relative_diff:.2e} > {tolerance:.0e}"
        )
    return {**asdict(check), "tolerance": tolerance, **note}

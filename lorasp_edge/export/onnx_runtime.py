"""onnxruntime over the exported decoder graph: what verification and `generate` run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorasp_edge.errors import UserError
from lorasp_edge.export.onnx_graph import io_names


def open_session(path: str | Path, threads: int | None = None, prepack: bool = True):
    """A CPU onnxruntime session over `path`, all graph optimizations on; a file it cannot load is a UserError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        # Pre-packing copies every fp32 MatMul weight into the kernel's layout beside the original
        # (a 0.5B model's session: 3.0 GB instead of 2.1 GB); a few verification runs do not need it.
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
        raise UserError(f"{path}: onnxruntime cannot load it ({str(error).splitlines()[0]})") from None


class DecoderRuntime:
    """What every onnxruntime decoder here offers: an empty KV cache of the graph's shape, and
    `ranges`, the layers each of its sessions holds. Use as a context manager (or call `close`)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    ranges: list[tuple[int, int]]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.num_layers)]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class OnnxDecoder(DecoderRuntime):
    """An onnxruntime session over the decoder graph (optimum's names), one forward per call."""

    def __init__(self, path: str | Path, threads: int | None = None, prepack: bool = True):
        path = Path(path)
        self.session = open_session(path, threads, prepack)
        past_inputs = [item for item in self.session.get_inputs() if item.name.startswith("past_key_values.")]
        if not past_inputs:
            raise UserError(f"{path}: not a decoder graph with KV cache (no past_key_values.* inputs)")
        self.num_layers = len(past_inputs) // 2
        self.kv_heads, self.head_dim = int(past_inputs[0].shape[1]), int(past_inputs[0].shape[3])
        self.input_names, self.output_names = io_names(self.num_layers)
        self.ranges = [(0, self.num_layers)]  # one session, all the layers

    def close(self) -> None:
        self.session = None

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]):
        """Logits (batch, seq, vocab) and the grown cache."""
        feed = dict(zip(self.input_names, [input_ids.astype(np.int64), attention_mask.astype(np.int64), position_ids.astype(np.int64), *past]))
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present

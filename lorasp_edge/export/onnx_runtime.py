"""onnxruntime over the exported decoder graph: what verification and `generate` run.

`OnnxDecoder` is one forward per call over numpy arrays, the cache growing by a copy of it each
call (verification compares whole logit tensors). `BoundDecoder` is what token-by-token generation
runs on the same session: with onnxruntime's I/O binding the KV cache stays in onnxruntime's memory,
one preallocated buffer per layer that the graph updates in place, and a step moves only its token
ids in and one row of logits out (tools/bench_formats.py's `-numpy` rows measure the difference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorasp_edge.errors import UserError
from lorasp_edge.export.onnx_graph import SHARED_CACHE_KEY, io_names


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
        # The graph may update one buffer in place as past and present (onnx_build.SHARED_CACHE_KEY).
        self.shares_cache = self.session.get_modelmeta().custom_metadata_map.get(SHARED_CACHE_KEY) == "1"

    def close(self) -> None:
        self.session = None

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]):
        """Logits (batch, seq, vocab) and the grown cache."""
        feed = dict(zip(self.input_names, [input_ids.astype(np.int64), attention_mask.astype(np.int64), position_ids.astype(np.int64), *past]))
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present


class BoundDecoder:
    """Batch-1 forwards over an `OnnxDecoder`'s session through I/O binding, the KV cache kept in
    onnxruntime's memory between calls; only the token ids go in and one row of logits comes out.

    On a graph that says it may (onnx_build: GroupQueryAttention), each layer's cache is one buffer of
    `capacity` positions, allocated once and bound as both `past_key_values.i` and `present.i`: the
    graph writes each step's keys and values into it in place, and nothing is copied or allocated
    per token. On a graph without that flag (an earlier export's) each forward's `present.*` OrtValues
    are bound as the next forward's `past_key_values.*`, a cache that grows by one copy per step.
    `open_session` makes CPU sessions only, so everything is bound on the host."""

    def __init__(self, decoder: OnnxDecoder, capacity: int = 2048):
        import onnxruntime as ort

        self.session = decoder.session
        self.past_names, self.present_names = decoder.input_names[3:], decoder.output_names[1:]
        self.binding = self.session.io_binding()
        self.shared = decoder.shares_cache
        self.capacity = capacity
        # Views of these arrays are bound as the mask and positions: nothing is built per step.
        self.ones = np.ones((1, capacity), np.int64)
        self.positions = np.arange(capacity, dtype=np.int64)[None]
        if self.shared:
            shape = (1, decoder.kv_heads, capacity, decoder.head_dim)
            self.cache = [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0) for _ in self.past_names]
            self.binding.bind_output("logits", "cpu")  # bound first: a name bound again keeps its place among the outputs
            for past, present, value in zip(self.past_names, self.present_names, self.cache):
                self.binding.bind_ortvalue_input(past, value)
                self.binding.bind_ortvalue_output(present, value)
        self.empty = np.zeros((1, decoder.kv_heads, 0, decoder.head_dim), np.float32)
        # One-token steps write into these in place: the token and its position go in through OrtValues
        # over arrays set before each run, and the logits come out into one preallocated row, so a step
        # allocates nothing and reads no other output back (binding.get_outputs() wraps every present.i).
        vocab = self.session.get_outputs()[0].shape[-1]
        self.steps_in_place = self.shared and isinstance(vocab, int)
        if self.steps_in_place:
            self.step_token, self.step_position = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
            self.step_logits = np.zeros((1, 1, vocab), np.float32)
            # OrtValues over these arrays' memory (no copy): setting an array sets what the graph reads
            self.step_values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in
                                (("input_ids", self.step_token), ("position_ids", self.step_position), ("logits", self.step_logits))}
        self.reset()

    def reset(self) -> None:
        """An empty cache: the next call is a prefill (a shared buffer is overwritten from slot 0)."""
        if not self.shared:
            for name in self.past_names:
                self.binding.bind_cpu_input(name, self.empty)
        self.length = 0

    def __call__(self, token_ids: list[int]) -> np.ndarray:
        """Logits (vocab,) at the last of `token_ids`, fed after the cached positions; the cache grows by them."""
        if self.length + len(token_ids) > self.capacity:
            raise ValueError(f"{self.length + len(token_ids)} positions do not fit the cache's {self.capacity}")
        start, self.length = self.length, self.length + len(token_ids)
        binding = self.binding
        if self.steps_in_place and len(token_ids) == 1:
            self.step_token[0, 0], self.step_position[0, 0] = token_ids[0], start
            binding.bind_ortvalue_input("input_ids", self.step_values["input_ids"])
            binding.bind_cpu_input("attention_mask", self.ones[:, : self.length])
            binding.bind_ortvalue_input("position_ids", self.step_values["position_ids"])
            binding.bind_ortvalue_output("logits", self.step_values["logits"])
            self.session.run_with_iobinding(binding)
            return self.step_logits[0, -1].copy()
        binding.bind_cpu_input("input_ids", np.asarray([token_ids], np.int64))
        binding.bind_cpu_input("attention_mask", self.ones[:, : self.length])
        binding.bind_cpu_input("position_ids", self.positions[:, start : self.length])
        if self.shared:
            binding.bind_output("logits", "cpu")
            self.session.run_with_iobinding(binding)
            return binding.get_outputs()[0].numpy()[0, -1].copy()
        binding.clear_binding_outputs()  # fresh outputs: last step's present.* are this step's inputs
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        for name, value in zip(self.past_names, present):
            binding.bind_ortvalue_input(name, value)
        return logits.numpy()[0, -1].copy()

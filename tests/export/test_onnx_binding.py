"""The I/O-bound decode loop (BoundDecoder, OnnxStepper) against OnnxDecoder's numpy forwards: the
cache updated in place in one preallocated buffer equals the cache grown step by step."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorasp_edge.export.onnx_build import Quantization, build_decoder
from lorasp_edge.export.onnx_runtime import BoundDecoder, OnnxDecoder
from lorasp_edge.export.sources.weights import ModelWeights
from lorasp_edge.generate import OnnxStepper, generate_ids

PROMPT = [5, 17, 42, 8, 99, 3, 61, 27, 14]
STEPS = 8


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A tiny Llama's decoder graph, fp32 and int4."""
    root = tmp_path_factory.mktemp("binding")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    weights = ModelWeights(LlamaForCausalLM(config).eval())
    return {"fp32": build_decoder(config, weights, root / "fp32"), "int4": build_decoder(config, weights, root / "int4", Quantization(4, 16))}


def numpy_greedy(decoder: OnnxDecoder, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Last-position logits of a prefill and `steps` greedy decode steps, the cache passed through numpy."""
    ids = np.asarray([prompt])
    logits, past = decoder(ids, np.ones_like(ids), np.arange(len(prompt))[None], decoder.empty_cache(1))
    rows, tokens = [logits[0, -1]], []
    for length in range(len(prompt) + 1, len(prompt) + steps + 1):
        tokens.append(int(np.argmax(rows[-1])))
        logits, past = decoder(np.asarray([[tokens[-1]]]), np.ones((1, length)), np.asarray([[length - 1]]), past)
        rows.append(logits[0, -1])
    return rows, tokens


@pytest.mark.parametrize("kind", ["fp32", "int4"])
@pytest.mark.parametrize("shared", [True, False])
def test_bound_logits_and_greedy_ids_equal_the_numpy_path(graphs, kind, shared):
    decoder = OnnxDecoder(graphs[kind])
    assert decoder.shares_cache
    expected, tokens = numpy_greedy(decoder, PROMPT, STEPS)
    decoder.shares_cache = shared  # False: the growing cache a graph without the flag gets
    bound = BoundDecoder(decoder, capacity=len(PROMPT) + STEPS)
    assert bound.shared == shared
    for attempt in range(2):  # reset: a second generation starts from an empty cache (the buffer is overwritten)
        bound.reset()
        got = [bound(PROMPT)] + [bound([token]) for token in tokens]
        assert bound.length == len(PROMPT) + STEPS
        scale = max(float(np.abs(row).max()) for row in expected)
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, expected)) < 1e-5 * scale
        assert [int(np.argmax(row)) for row in got[:-1]] == tokens
    with pytest.raises(ValueError, match="do not fit the cache"):
        bound([1])


def test_in_place_cache_is_one_buffer_written_by_the_graph(graphs):
    decoder = OnnxDecoder(graphs["fp32"])
    bound = BoundDecoder(decoder, capacity=32)
    before = [value.data_ptr() for value in bound.cache]
    bound(PROMPT)
    bound([7])
    logits, *outputs = bound.binding.get_outputs()  # logits, then present.* as onnxruntime returns them
    assert [value.data_ptr() for value in outputs] == before  # the bound buffers, not copies
    row = bound.step_logits  # a one-token step writes its logits into the preallocated row
    assert logits.data_ptr() == row.ctypes.data and row.shape == (1, 1, 120)
    assert all(value.shape() == [1, 2, 32, 16] for value in outputs)
    # the first len(PROMPT) + 1 slots hold what the growing cache holds after the same two forwards
    ids = np.asarray([PROMPT + [7]])
    _, grown = decoder(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], decoder.empty_cache(1))
    for buffer, expected in zip(bound.cache, grown):
        assert np.abs(buffer.numpy()[:, :, : ids.shape[1]] - expected).max() < 1e-5


def test_stepper_decodes_without_numpy_forwards(graphs, monkeypatch):
    decoder = OnnxDecoder(graphs["fp32"])
    _, tokens = numpy_greedy(decoder, PROMPT, STEPS)
    stepper = OnnxStepper(decoder)
    monkeypatch.setattr(decoder.session, "run", lambda *args, **kwargs: pytest.fail("session.run: the cache went through numpy"))
    assert list(generate_ids(stepper, PROMPT, STEPS)) == tokens
    assert list(generate_ids(stepper, PROMPT, STEPS)) == tokens

"""The I/O-bound decode loop (BoundDecoder, OnnxStepper) against OnnxDecoder's numpy forwards."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorasp_edge.export.onnx_graph import ONNX_FILE, export_decoder
from lorasp_edge.export.onnx_runtime import BoundDecoder, OnnxDecoder
from lorasp_edge.export.quantize import quantize_decoder
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
    for kind in ("fp32", "int4"):
        (root / kind).mkdir()
    export_decoder(LlamaForCausalLM(config).eval(), root / "fp32")
    quantize_decoder(root / "fp32" / ONNX_FILE, root / "int4", 4)
    return {"fp32": root / "fp32" / ONNX_FILE, "int4": root / "int4" / ONNX_FILE}


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
def test_bound_logits_and_greedy_ids_equal_the_numpy_path(graphs, kind):
    decoder = OnnxDecoder(graphs[kind])
    expected, tokens = numpy_greedy(decoder, PROMPT, STEPS)
    bound = BoundDecoder(decoder)
    for attempt in range(2):  # reset: a second generation starts from an empty cache
        bound.reset()
        got = [bound(PROMPT)] + [bound([token]) for token in tokens]
        assert bound.length == len(PROMPT) + STEPS
        scale = max(float(np.abs(row).max()) for row in expected)
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, expected)) < 1e-5 * scale
        assert [int(np.argmax(row)) for row in got[:-1]] == tokens


def test_stepper_decodes_without_numpy_forwards(graphs, monkeypatch):
    decoder = OnnxDecoder(graphs["fp32"])
    _, tokens = numpy_greedy(decoder, PROMPT, STEPS)
    stepper = OnnxStepper(decoder)
    monkeypatch.setattr(decoder.session, "run", lambda *args, **kwargs: pytest.fail("session.run: the cache went through numpy"))
    assert list(generate_ids(stepper, PROMPT, STEPS)) == tokens
    assert list(generate_ids(stepper, PROMPT, STEPS)) == tokens

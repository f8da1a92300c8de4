"""Generation with onnxruntime (and a merged HF folder): greedy equals PyTorch, sampling, streaming, CLI."""

import importlib.util

import numpy as np
import pytest
import torch
from tiny import make_model_dir, train_adapter, train_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorasp_edge.cli import main
from lorasp_edge.errors import UserError
from lorasp_edge.export.run import ExportSettings, export
from lorasp_edge.generate import (
    GenerateSettings,
    TextStream,
    context_length,
    encode_prompt,
    generate,
    pick_token,
    resolve_model_dir,
)

PROMPT = "3 4 5 6 7"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    base = make_model_dir(root / "base", "llama", initializer_range=0.2)
    adapter = train_adapter(base, root / "adapter")
    return export(ExportSettings(adapter=adapter, out=root / "out", eval_tokens=64)).out


def pytorch_greedy(folder, prompt, max_new_tokens):
    """transformers' own generate on the merged model, cut before the first EOS (ours stops there)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def test_onnx_greedy_equals_pytorch_generate(exported):
    result = generate(GenerateSettings(model=exported, prompt=PROMPT, max_new_tokens=24))
    assert result.backend == "onnxruntime" and result.model_dir.endswith("onnx")
    expected = pytorch_greedy(exported / "hf", PROMPT, 24)
    assert len(expected) >= 8  # a long enough run to compare
    assert result.token_ids == expected
    assert result.new_tokens == len(expected) and result.tokens_per_s > 0


def test_hf_folder_gives_the_same_tokens(exported):
    onnx_result = generate(GenerateSettings(model=exported / "onnx", prompt=PROMPT, max_new_tokens=16))
    hf_result = generate(GenerateSettings(model=exported / "hf", prompt=PROMPT, max_new_tokens=16))
    assert hf_result.backend == "transformers"
    assert hf_result.token_ids == onnx_result.token_ids


def test_streamed_pieces_add_up_to_the_text(exported):
    pieces = []
    result = generate(GenerateSettings(model=exported, prompt=PROMPT, max_new_tokens=16), on_text=pieces.append)
    tokenizer = AutoTokenizer.from_pretrained(exported / "onnx")
    assert len(pieces) > 1
    assert "".join(pieces) == result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_stream_holds_back_a_split_character():
    tokenizer = train_tokenizer()
    ids = tokenizer("é", add_special_tokens=False)["input_ids"]
    byte_ids = [tokenizer.convert_tokens_to_ids(token) for token in tokenizer.convert_ids_to_tokens(ids)]
    if len(byte_ids) == 1:  # a merge made "é" one token: split it into its two bytes
        byte_ids = [tokenizer.convert_tokens_to_ids(char) for char in tokenizer.convert_ids_to_tokens(ids)[0]]
    stream = TextStream(tokenizer)
    assert stream.push(byte_ids[0]) == ""
    assert stream.push(byte_ids[1]) == "é"


def test_sampling_follows_temperature_and_top_p():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    assert pick_token(logits, 0.0, 1.0, rng) == 0
    draws = np.array([pick_token(logits, 1.0, 1.0, rng) for _ in range(4000)])
    assert np.allclose(np.bincount(draws, minlength=3) / 4000, [0.6, 0.3, 0.1], atol=0.03)
    # top_p 0.5: the nucleus is {0} alone; top_p 0.8: {0, 1} renormalized to 2/3, 1/3
    assert {pick_token(logits, 1.0, 0.5, rng) for _ in range(200)} == {0}
    draws = np.array([pick_token(logits, 1.0, 0.8, rng) for _ in range(3000)])
    assert set(draws) == {0, 1} and abs((draws == 0).mean() - 2 / 3) < 0.03
    # a high temperature flattens: token 2 becomes common
    draws = np.array([pick_token(logits, 10.0, 1.0, rng) for _ in range(3000)])
    assert (draws == 2).mean() > 0.25


def test_sampling_is_reproducible_from_the_seed(exported):
    settings = dict(model=exported, prompt=PROMPT, max_new_tokens=12, temperature=1.0, top_p=0.9)
    first = generate(GenerateSettings(**settings, seed=5)).token_ids
    assert generate(GenerateSettings(**settings, seed=5)).token_ids == first


def test_chat_prompt_uses_the_template(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported / "onnx")
    ids = encode_prompt(tokenizer, "hi", chat=True)
    assert tokenizer.decode(ids) == "<|user|>hi<|end|>\n<|assistant|>"


def test_cli_streams_text_and_reports_speed(exported, capsys):
    code = main(["generate", "--model", str(exported), "--prompt", PROMPT, "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    expected = generate(GenerateSettings(model=exported, prompt=PROMPT, max_new_tokens=8)).text
    assert code == 0
    assert captured.out == expected + "\n"
    assert "tokens/s" in captured.err and "onnxruntime" in captured.err


def test_bad_input(tmp_path, exported, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert main(["generate", "--model", str(exported), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
    with pytest.raises(UserError, match="not an ONNX model"):
        resolve_model_dir(tmp_path)


def counting_prompt(tokenizer, at_least: int, below: int | None = None) -> tuple[str, int]:
    """A counting prompt of at least `at_least` tokens (and fewer than `below`), and its token count."""
    words: list[str] = []
    while True:
        words.append(str(len(words) % 20))
        count = len(tokenizer(" ".join(words))["input_ids"])
        if count >= at_least:
            assert below is None or count < below
            return " ".join(words), count


@pytest.mark.parametrize("sub", ["", "hf"])
def test_a_prompt_longer_than_the_context_is_one_line(exported, capsys, sub):
    prompt, count = counting_prompt(AutoTokenizer.from_pretrained(exported / "hf"), 257)  # the tiny model's context: 256
    assert main(["generate", "--model", str(exported / sub), "--prompt", prompt]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert f"--prompt is {count} tokens, longer than the model's context of 256 tokens (max_position_embeddings in config.json)" in error


def test_max_new_tokens_past_the_context_is_cut_with_a_note(exported, capsys):
    prompt, count = counting_prompt(AutoTokenizer.from_pretrained(exported / "hf"), 250, below=256)
    assert main(["generate", "--model", str(exported), "--prompt", prompt, "--max-new-tokens", "100"]) == 0
    error = capsys.readouterr().err
    assert f"lorasp-edge generate: note: --max-new-tokens 100 cut to {256 - count}:" in error and "Traceback" not in error
    notes: list[str] = []
    result = generate(GenerateSettings(model=exported / "hf", prompt=prompt, max_new_tokens=100), on_note=notes.append)
    assert len(notes) == 1 and result.new_tokens <= 256 - count


def test_gguf_context_is_its_context_length(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(96)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert context_length(path, "llama.cpp") == (96, "n_ctx_train, llama.context_length in m.gguf")


# ------------------------------------------------------------- llama.cpp and onnxruntime-genai


@pytest.fixture(scope="module")
def runtime_exports(tmp_path_factory):
    """The same merged model as GGUF f16 and as an onnxruntime-genai folder (each format needs its runtime)."""
    root = tmp_path_factory.mktemp("runtimes")
    base = make_model_dir(root / "base", "llama", initializer_range=0.2)
    adapter = train_adapter(base, root / "adapter")
    formats = ["hf"] + (["gguf"] if importlib.util.find_spec("llama_cpp") else []) + (["genai"] if importlib.util.find_spec("onnxruntime_genai") else [])
    return export(ExportSettings(adapter=adapter, out=root / "out", format=",".join(formats), eval_tokens=64)).out


@pytest.mark.parametrize("runtime, module, sub", [("llama.cpp", "llama_cpp", "gguf"), ("onnxruntime-genai", "onnxruntime_genai", "genai")])
def test_runtime_greedy_equals_pytorch_generate(runtime_exports, runtime, module, sub):
    pytest.importorskip(module)
    expected = pytorch_greedy(runtime_exports / "hf", PROMPT, 16)
    result = generate(GenerateSettings(model=runtime_exports / sub, prompt=PROMPT, max_new_tokens=16, threads=1))
    assert result.backend == runtime and result.token_ids == expected and result.tokens_per_s > 0


def test_gguf_file_and_cli_report_speed(runtime_exports, capsys):
    pytest.importorskip("llama_cpp")
    gguf_file = runtime_exports / "gguf" / "model-f16.gguf"
    assert resolve_model_dir(gguf_file) == (gguf_file, "llama.cpp")
    assert main(["generate", "--model", str(gguf_file), "--prompt", PROMPT, "--max-new-tokens", "8", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "(llama.cpp," in captured.err
    assert captured.out == generate(GenerateSettings(model=gguf_file, prompt=PROMPT, max_new_tokens=8, threads=1)).text + "\n"


def test_genai_prompt_longer_than_the_context_is_one_line(runtime_exports, capsys):
    pytest.importorskip("onnxruntime_genai")
    assert context_length(runtime_exports / "genai", "onnxruntime-genai") == (256, "context_length in genai_config.json")
    prompt, count = counting_prompt(AutoTokenizer.from_pretrained(runtime_exports / "hf"), 257)
    assert main(["generate", "--model", str(runtime_exports / "genai"), "--prompt", prompt]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"--prompt is {count} tokens, longer than the model's context of 256 tokens" in error


def test_missing_runtime_is_one_line(runtime_exports, tmp_path, monkeypatch, capsys):
    from lorasp_edge.export import llamacpp

    stray = tmp_path / "m.gguf"
    stray.write_bytes(b"GGUF")
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    monkeypatch.setattr("lorasp_edge.generate.load_tokenizer_for", lambda path, backend: AutoTokenizer.from_pretrained(runtime_exports / "hf"))
    assert main(["generate", "--model", str(stray), "--prompt", "x"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "needs llama-cpp-python" in error
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err

"""Test session set-up: a private model cache, so the bundled model's first-use conversion
(GGUF -> safetensors folder) runs here exactly as on a fresh machine."""

import os
import shutil
import tempfile

import pytest

_CACHE = tempfile.mkdtemp(prefix="lorasp-edge-cache-")
os.environ["LORASP_EDGE_CACHE"] = _CACHE  # subprocesses (the CLI under test) inherit it


@pytest.fixture(scope="session", autouse=True)
def _private_cache():
    yield
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama with a trained tokenizer, for the CLI end-to-end tests."""
    from tiny import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    from tiny import write_text_jsonl

    return write_text_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", lines=400)

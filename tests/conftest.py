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
